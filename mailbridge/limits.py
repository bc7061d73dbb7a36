"""Rate and connection limits for the SMTP intake, in memory, per daemon.

Input: a client address (the peer of a connection) or an account; the
injected Clock. Output: yes/no answers; the intake turns a "no" into a 4xx
reply that makes a legitimate client's MTA retry later (docs/security.md):
- `RateLimiter`: a token bucket per key, `limit` events per `window_s` (the
  whole limit at once, then one more every window_s / limit seconds). A limit
  of 0 means no limit. Time comes from the Clock, so tests drive it with a
  FakeClock; a clock going backwards never adds tokens.
- `ConnectionGate`: connections open at once, in all and per client address.
- `client_key`: the address a limit counts under: an IPv4 address as is (also
  when it arrives IPv4-mapped, `::ffff:a.b.c.d`), an IPv6 address as its /64,
  because one host usually holds a whole /64 and could otherwise take a new
  address for every connection.
Nothing here raises on a malformed peer: it counts under its text.
The bucket table is bounded (least recently used keys are dropped first), so
a flood of distinct addresses cannot grow memory without end.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mailbridge.clock import Clock
from mailbridge.config import Config

MAX_KEYS = 100_000  # buckets kept; about 100 bytes each


def client_key(peer: Any) -> str:
    """The address a client is counted under (see the module docstring)."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return str(host)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class RateLimiter:
    """Token buckets: `limit` events per `window_s` for each key."""

    def __init__(self, limit: int, window_s: float, clock: Clock, max_keys: int = MAX_KEYS):
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens, time of the last update); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.limit)
        tokens, then = entry
        refill = max(0.0, now - then) * self.limit / self.window_s
        return min(float(self.limit), tokens + refill)

    def available(self, key: str) -> bool:
        """Whether one more event would be allowed now (takes nothing)."""
        return self.limit == 0 or self._tokens(key, self._clock.time()) >= 1.0

    def allow(self, key: str) -> bool:
        """Take one token for `key` if there is one; False when over the limit."""
        if self.limit == 0:
            return True
        now = self._clock.time()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return False
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return True

    def charge(self, key: str) -> None:
        """Take one token whether or not there is one (a failure to count)."""
        if self.limit == 0:
            return
        now = self._clock.time()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1.0), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


class ConnectionGate:
    """Connections open at once: at most `total`, and `per_key` per client address.

    `admit` counts a connection only when it lets it in, and `release` must be
    called once for every admitted connection, so a refused connection can
    never leak a slot.
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self.open = 0
        self._by_key: dict[str, int] = {}

    def admit(self, key: str) -> str | None:
        """None if the connection is let in (and counted), else why not."""
        if self.open >= self.total:
            return "total"
        if self._by_key.get(key, 0) >= self.per_key:
            return "per_key"
        self.open += 1
        self._by_key[key] = self._by_key.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        self.open -= 1
        left = self._by_key.get(key, 0) - 1
        if left > 0:
            self._by_key[key] = left
        else:
            self._by_key.pop(key, None)


@dataclass
class IntakeLimits:
    """The intake's rate limiters, built once by the composition root."""

    per_ip: RateLimiter  # MAIL commands per client address
    auth_failures: RateLimiter  # failed AUTH per client address
    per_account: dict[str, RateLimiter]  # keyid -> accepted messages, accounts with rate_limit

    @classmethod
    def from_config(cls, config: Config, clock: Clock) -> IntakeLimits:
        smtp = config.smtp
        window = smtp.rate_window_s
        return cls(
            per_ip=RateLimiter(smtp.ip_rate_limit, window, clock),
            auth_failures=RateLimiter(smtp.auth_failure_limit, window, clock),
            per_account={
                a.keyid: RateLimiter(a.rate_limit, window, clock)
                for a in config.accounts
                if a.rate_limit is not None
            },
        )

    def account_allows(self, keyid: str) -> bool:
        """Take one message from the account's budget; False when it is spent."""
        limiter = self.per_account.get(keyid)
        return limiter is None or limiter.allow("")
