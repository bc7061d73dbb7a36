"""SMTP AUTH for accounts that have an `smtp_password` (docs/security.md).

Input: the user name and password of an AUTH PLAIN or LOGIN exchange, which
aiosmtpd only accepts after STARTTLS (`auth_require_tls`). The user name is
the account's `name`, not its keyid: user names end up in MTA configs and
logs, where a secret does not belong, and the keyid stays a second, separate
secret inside every request.
Output: an aiosmtpd `AuthResult`. Success binds the session to the account
(`session.auth_data` is the AccountConfig). A wrong user or password answers
`535 5.7.8` at once (`handled=False`: with `handled=True` aiosmtpd would send
nothing and the client would wait for its timeout). After
`smtp.auth_failure_limit` failures from one client address within
`smtp.rate_window_s`, AUTH answers `454 4.7.0` without looking at the
password, until the bucket refills: online guessing gets a few tries a
minute, and a legitimate client is only delayed, never locked out for good.
Names and passwords are compared in constant time against every account.
Nothing secret is logged: failures log the client address and mechanism only
(a user name field often holds a mistyped password).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailbridge.config import AccountConfig, Config
from mailbridge.limits import RateLimiter, client_key

log = logging.getLogger(__name__)

REPLY_AUTH_LOCKED = "454 4.7.0 Too many failed authentications, try again later"


class IntakeSession(Session):
    """aiosmtpd's Session without the deprecation warning that its `login_data`
    logs at every successful AUTH (the account is in `auth_data`)."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def session_account(session: Session) -> AccountConfig | None:
    """The account the session authenticated as, if any."""
    data = session.auth_data if session.authenticated else None
    return data if isinstance(data, AccountConfig) else None


def find_account(config: Config, keyid: str) -> AccountConfig | None:
    """The account with this keyid, compared in constant time against every key."""
    found: AccountConfig | None = None
    wanted = keyid.encode("utf-8", "surrogateescape")
    for account in config.accounts:
        # Compare against all keys so the time taken says nothing about which matched.
        if hmac.compare_digest(account.keyid.encode("utf-8"), wanted):
            found = account
    return found


def _host(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def _digest(secret: bytes) -> bytes:
    # Fixed-length digests make compare_digest's time independent of lengths too.
    return hashlib.sha256(secret).digest()


class Authenticator:
    """aiosmtpd `authenticator=`: checks a user name and password."""

    def __init__(
        self, accounts: list[AccountConfig], failures: RateLimiter, log_gate: RateLimiter
    ) -> None:
        self._failures = failures
        self._log_gate = log_gate  # one "locked" line per client and window
        self._accounts = [
            (_digest(a.name.encode()), _digest(a.smtp_password.encode()), a)
            for a in accounts
            if a.smtp_password is not None and a.name is not None
        ]

    def find(self, user: bytes, password: bytes) -> AccountConfig | None:
        """The account with this name and password; every account is compared."""
        user_d, password_d = _digest(user), _digest(password)
        found: AccountConfig | None = None
        for name_d, secret_d, account in self._accounts:
            name_ok = hmac.compare_digest(name_d, user_d)
            secret_ok = hmac.compare_digest(secret_d, password_d)
            if name_ok and secret_ok:
                found = account
        return found

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ip = client_key(session.peer)
        if not self._failures.available(ip):
            if self._log_gate.allow("auth " + ip):
                log.warning("AUTH from %s refused: too many failures (454)", ip)
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_LOCKED)
        account = None
        if isinstance(auth_data, LoginPassword):
            account = self.find(auth_data.login, auth_data.password)
        if account is None:
            self._failures.charge(ip)
            log.warning("AUTH %s from %s failed (535)", mechanism, _host(session.peer))
            return AuthResult(success=False, handled=False)  # 535 5.7.8, at once
        log.info(
            "AUTH %s from %s: authenticated as %s", mechanism, _host(session.peer), account.label
        )
        return AuthResult(success=True, auth_data=account)
