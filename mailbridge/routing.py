"""(account, number) -> the ordered list of providers to try.

An account names one `provider`, or `routes`: number-prefix rules, first match
wins, each with a failover list. A number no route covers gets no provider
(the dispatcher gives it 999 and logs it).
"""

from __future__ import annotations

from mailbridge.config import AccountConfig


def route_for(account: AccountConfig, number: str) -> list[str]:
    """Providers for an E.164 number, in failover order; [] when none applies."""
    if account.provider is not None:
        return [account.provider]
    for route in account.routes or []:
        if number.startswith(route.prefix):
            return list(route.providers)
    return []
