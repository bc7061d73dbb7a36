"""SMTP intake: the aiosmtpd handler that turns an email into a stored request.

Input: an SMTP dialogue. Output: a request durably in the store, answered
`250` with its id; or a precise refusal:
- RCPT outside `smtp.recipients`                 -> 550 5.1.1 (never an open relay)
- message over `smtp.max_message_bytes`          -> 552 5.3.4 (at MAIL with SIZE=, or DATA)
- no/unknown keyid, sender or client IP refused  -> 550 5.7.1, and no report (no backscatter)
- invalid request and no emailAck to tell        -> 550 5.6.0
- store unavailable                              -> 451 4.3.0 (the client retries)
Plain mode (SPEC section 9), RCPT TO:<number@one of smtp.number_domains>:
- the local part is not a number                 -> 550 5.1.3
- more than 500 number recipients                -> 452 4.5.3
- number and intake addresses in one mail        -> 550 5.5.1
- no plain-enabled account for the sender/AUTH   -> 550 5.7.1 (530 5.7.0: it needs AUTH)
- no text in the Subject or the body             -> 550 5.6.0
Access control and limits (docs/security.md):
- null sender <> at MAIL (a bounce or a report)  -> 550 5.7.1
- too many connections, in all or from one IP    -> 421 4.7.0 and closed
- silent for smtp.timeout_s, or DATA too slow    -> 421 4.4.2 and closed
- too many MAIL from one client address          -> 450 4.7.1 at MAIL (retry later)
- too many messages for one account              -> 450 4.7.1 at end of DATA, nothing stored
- smtp.tls.required and no STARTTLS yet          -> 530 5.7.0
- account with smtp_password, session not
  authenticated as it                            -> 530 5.7.0 (550 5.7.1 if authenticated
                                                    as another account)
Parsing and checks run inside DATA, on a worker thread so that one large
email does not stall the other connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from mailbridge.auth import Authenticator, IntakeSession, find_account, session_account
from mailbridge.checks import AccountRules, CheckedRequest, check_request
from mailbridge.clock import Clock
from mailbridge.codes import Ack
from mailbridge.config import AccountConfig, Config, SmtpConfig
from mailbridge.envoi import Envoi, parse_envoi
from mailbridge.limits import ConnectionGate, IntakeLimits, RateLimiter, client_key
from mailbridge.logs import request_fields, request_tag
from mailbridge.mime import BARE_ADDRESS, MailContent, parse_address, read_mail
from mailbridge.model import NewRequest
from mailbridge.plain import (
    MAX_PLAIN_RECIPIENTS,
    is_number_local_part,
    plain_email_id,
    plain_request,
    plain_text,
)
from mailbridge.smtp_data import ChunkedDataMixin
from mailbridge.store import Store, StoreUnavailable

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

REPLY_OK = "250 2.0.0 Ok: queued as {}"
REPLY_AUTO_IGNORED = "250 2.0.0 Ok: automatic reply ignored (Auto-Submitted), nothing sent"
REPLY_UNKNOWN_RECIPIENT = "550 5.1.1 <{}>: Recipient address rejected: not an SMS intake address"
REPLY_TOO_BIG = "552 5.3.4 Message too big: the limit is {} bytes"
REPLY_STORE_DOWN = "451 4.3.0 Temporary storage failure, please try again later"
REPLY_NO_KEYID = "550 5.7.1 Request refused: no <envoi> block with a <keyid> found"
REPLY_UNKNOWN_KEYID = "550 5.7.1 Request refused: unknown keyid"
REPLY_SENDER = "550 5.7.1 Request refused: sender <{}> is not allowed for this account"
REPLY_NO_FROM = "550 5.7.1 Request refused: no From: header"
REPLY_SENDER_UNKNOWN = "550 5.7.1 Sender <{}> is not allowed to send SMS requests here"
REPLY_IP = "550 5.7.1 Request refused: client address {} is not allowed for this account"
REPLY_INVALID_NO_ACK = "550 5.6.0 Request not processed ({}) and no <emailAck> to report to"
REPLY_TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
REPLY_TOO_MANY_FROM_IP = "421 4.7.0 Too many connections from your address, try again later"
REPLY_TIMEOUT = "421 4.4.2 {} Error: timeout exceeded"
REPLY_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_NULL_SENDER = (
    "550 5.7.1 Null sender <> refused: this address takes SMS requests, not bounces or reports"
)
REPLY_IP_RATE = "450 4.7.1 Too much mail from {}, try again later"
REPLY_ACCOUNT_RATE = "450 4.7.1 Too many messages for this account, try again later"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required for this account"
REPLY_SENDER_NOT_AUTHED = "550 5.7.1 Sender <{}> is not allowed for the authenticated account"
REPLY_OTHER_ACCOUNT = "550 5.7.1 Request refused: the session is authenticated as another account"
REPLY_NOT_A_NUMBER = "550 5.1.3 <{}>: the local part is not a phone number"
REPLY_TOO_MANY_NUMBERS = "452 4.5.3 Too many recipients: at most 500 numbers per mail"
REPLY_MIXED = "550 5.5.1 <{}>: number addresses and the request address cannot share one mail"
REPLY_PLAIN_SENDER = "550 5.7.1 Sender <{}> may not send SMS to number addresses"
REPLY_PLAIN_NO_TEXT = "550 5.6.0 No text to send: the Subject and the body are empty"
# Per-connection command budgets (aiosmtpd's command_call_limit; past one: 421
# 4.7.0 and closed). They stop a client that keeps a slot with NOOPs or probes
# with VRFY, without limiting real mail: "*" (MAIL, RCPT, DATA, RSET…) is high.
COMMAND_LIMITS = {
    "NOOP": 100, "HELP": 10, "VRFY": 10, "EXPN": 10, "EHLO": 20, "HELO": 20,
    "STARTTLS": 2, "AUTH": 10, "*": 10_000,
}  # fmt: skip
# Auto-Submitted values that still make a normal request (RFC 3834: cron, ERPs).
NORMAL_AUTO_SUBMITTED = (None, "no", "auto-generated")
# Mails up to this size are examined on the event loop (a few tenths of a millisecond:
# cheaper than the hop to a thread); bigger ones (CSV) on a thread, so that the
# other connections keep being answered meanwhile.
INLINE_EXAMINE_BYTES = 4096


class Refused(Exception):
    """The email is refused in the SMTP dialogue with `reply`; no report."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Examined:
    """What DATA found: the request to store, and what to log."""

    request: NewRequest
    account: AccountConfig
    checked: CheckedRequest
    form: str = "envoi"  # or "plain" (SPEC section 9), for the log line


# `<local@domain>` in its plain dot-atom form, optionally followed by
# parameters (not by a comment): by far the most common MAIL/RCPT argument.
_PLAIN_ANGLE_ADDR = re.compile(rf"\s*<({BARE_ADDRESS})>\s*(|[^(\s].*)", re.DOTALL)


# The names aiosmtpd looks for with dir() when it builds a connection's tables.
_HOOK_PREFIXES = ("auth_", "smtp_", "handle_")


class HookNamesOnly:
    """dir() lists only aiosmtpd's hook names (smtp_*, auth_*, handle_*), once per class.

    SMTP.__init__ builds its command, AUTH and hook tables from dir() and
    inspect.getmembers() of the connection and of its handler, on every
    connection. The names are the class's, so they are found once
    (tests/test_aiosmtpd_seam.py checks that the tables come out the same).
    With the FQDN asked once (smtp_protocol), setting up a connection went
    from 184 to 38 µs."""

    def __dir__(self) -> Iterable[str]:
        cls = type(self)
        names: tuple[str, ...] | None = cls.__dict__.get("_hook_names")  # this class's own
        if names is None:
            names = tuple(name for name in dir(cls) if name.startswith(_HOOK_PREFIXES))
            setattr(cls, "_hook_names", names)  # noqa: B010 (a class attribute, set once)
        return names


_STREAM_PROTOCOL_DEL: Callable[[Any], None] = getattr(
    asyncio.StreamReaderProtocol, "__del__", lambda _: None
)


class IntakeSMTP(HookNamesOnly, ChunkedDataMixin, SMTP):
    """aiosmtpd's SMTP with our replies, a connection gate and a timeout reply;
    DATA read in chunks (mailbridge.smtp_data).

    The gate counts a connection once, when it is let in: after STARTTLS,
    aiosmtpd calls connection_made a second time, for the TLS layer (counting
    that call leaked one slot per TLS session). The release is idempotent, as
    aiosmtpd also calls connection_lost itself after a failed TLS handshake.
    """

    def __init__(self, handler: IntakeHandler, gate: ConnectionGate, **kw: Any):
        # aiosmtpd's line_length_limit (1001) is both its stream buffer limit and
        # the longest DATA line; a bare-LF upload is one "line". SPEC section 1:
        # any line up to the message size. Command lines keep their own limit
        # (command_size_limit, 512), and a connection buffers no more than a
        # message may hold.
        self.line_length_limit = max(SMTP.line_length_limit, (kw.get("data_size_limit") or 0) + 2)
        super().__init__(handler, **kw)
        self._gate = gate
        self._gate_key: str | None = None  # set while this connection holds a slot
        self._turned_away = False
        self._idle_deadline = 0.0
        self._timer_at: float | None = None  # when the armed idle timer fires

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd cancels and schedules a timer per command; here a command only
        # moves the deadline, and the one armed timer re-arms itself when it fires
        # early (a tenth of the dialogue's event-loop work was timer churn).
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timer_at is None or self._timer_at > self._idle_deadline:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = self._idle_deadline
        self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_timer)

    def _idle_timer(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._arm_timer()
            return
        self._timer_at = None
        self._timeout_cb()

    def _create_session(self) -> Session:
        return IntakeSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._gate_key is None:
            key = client_key(transport.get_extra_info("peername"))
            refused = self._gate.admit(key)
            if refused is not None:
                self._turned_away = True
                reply = REPLY_TOO_MANY_CONNECTIONS if refused == "total" else REPLY_TOO_MANY_FROM_IP
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(f"{reply}\r\n".encode())
                transport.close()
                return
            self._gate_key = key
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._forgotten:  # aiosmtpd's own call after a failed TLS handshake came first
            return
        if self._turned_away:
            self._forget()
            return
        if self._gate_key is not None:
            self._gate.release(self._gate_key)
            self._gate_key = None
        super().connection_lost(exc)
        task = self._handler_coroutine
        if task is None:
            self._forget()
        else:  # once the dialogue's task has unwound (it was just cancelled)
            task.add_done_callback(lambda _: self._forget())

    # An aiosmtpd connection refers to itself: its command and AUTH tables hold
    # its bound methods, its stream writer and handler task point back at it, and
    # the task's CancelledError keeps its frames. Left so, each closed connection
    # (~60 objects, its socket and buffers) waited for the cyclic GC, which then
    # freed ~100 000 at once: a 110-140 ms stop of the intake every ~1 700
    # connections (p99 of the 250 at 20 new connections 150 ms). Emptied once
    # the connection is over, it is freed at once by reference counting.
    _forgotten = False

    def _forget(self) -> None:
        # First what the stream protocol does as it dies, while its attributes
        # are there: mark the error of its `closed` future as seen (a reset TLS
        # client's would be logged as "Future exception was never retrieved").
        _STREAM_PROTOCOL_DEL(self)
        self.__dict__.clear()
        self._forgotten = True

    def eof_received(self) -> bool | None:
        if self._turned_away:
            return False
        return super().eof_received()

    def _timeout_cb(self) -> None:
        # aiosmtpd just closes; say why first, as Postfix does (RFC 5321 4.2.2).
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(f"{REPLY_TIMEOUT.format(self.hostname)}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Same result as aiosmtpd's, which runs the RFC 5322 header parser and
        # builds a typing.Protocol class on every MAIL and RCPT (a tenth of the
        # intake's CPU, measured); plain addresses skip both.
        match = _PLAIN_ANGLE_ADDR.fullmatch(arg)
        if match is None:
            try:
                return super()._getaddr(arg)
            except Exception:
                # The stdlib's header parser raises on some hostile input
                # (`<.@[0@0>`: AttributeError): a syntax error (501), not a traceback.
                return None, None
        addr, rest = match.group(1), match.group(2)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    @property
    def peer_key(self) -> str | None:
        """client_key() of this connection's peer, computed once when it was let in."""
        return self._gate_key

    def restart_timer(self) -> None:
        """Restart the idle timer: the client is not charged for our processing."""
        self._reset_timeout()

    async def push(self, status: Any) -> None:
        # aiosmtpd words some replies itself; SPEC wants 552 5.3.4, and RFC 3207
        # an enhanced status code with the 530.
        if isinstance(status, str) and status.startswith("552 Error"):
            status = REPLY_TOO_BIG.format(self.data_size_limit)
        elif status == "530 Must issue a STARTTLS command first":
            status = REPLY_STARTTLS_FIRST
        await super().push(status)


def _address_allowed(address: str, account: AccountConfig) -> bool:
    address = address.lower()
    domain = address.rpartition("@")[2]
    return address in account.sender_addresses or domain in account.sender_domains


def _ip_allowed(peer: Any, account: AccountConfig) -> bool:
    if account.allowed_ips is None:
        return True
    try:
        ip = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else peer)
    except (ValueError, TypeError, IndexError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in account.allowed_ips)


class IntakeHandler(HookNamesOnly):
    """aiosmtpd handler hooks: MAIL and RCPT refuse early, DATA does the work."""

    def __init__(
        self,
        config: Config,
        rules: Mapping[str, AccountRules],
        store: Store,
        clock: Clock,
        on_stored: Callable[[bool], None],
        limits: IntakeLimits | None = None,
    ) -> None:
        self.config = config
        self.rules = rules  # keyid -> rules
        self.store = store
        self.clock = clock
        # Wakes the dispatcher and the mailer; with True (the request was finished
        # at intake: nothing to send), the feedback stage too.
        self.on_stored = on_stored
        # Rate limiters: the composition root may pass its own; by default they
        # are built from the config, on the injected clock.
        self.limits = limits or IntakeLimits.from_config(config, clock)
        # One "over the limit" log line per client and window, not one per refusal.
        self._log_gate = RateLimiter(1, config.smtp.rate_window_s, clock)
        self.refused = 0  # emails refused in the dialogue (/metrics: emails_total{refused})
        self.recipients = frozenset(config.smtp.recipients)
        self.number_domains = frozenset(config.smtp.number_domains)
        # Sender address or domain -> the accounts that allow it (MAIL looks here),
        # and the same for plain mode's senders alone (RCPT to a number looks there).
        self._senders: dict[str, list[AccountConfig]] = {}
        self._plain_senders: dict[str, list[AccountConfig]] = {}
        for account in config.accounts:
            plain = account.plain.senders if account.plain.enabled else []
            for allowed in {*account.sender_addresses, *account.sender_domains}:
                self._senders.setdefault(allowed, []).append(account)
            for allowed in plain:
                key = allowed.removeprefix("@")  # "@example.com" is a domain
                self._plain_senders.setdefault(key, []).append(account)
                if account not in self._senders.get(key, []):
                    self._senders.setdefault(key, []).append(account)

    def authenticator(self) -> Authenticator:
        """The AUTH checker for the SMTP sessions, sharing this intake's limits."""
        return Authenticator(self.config.accounts, self.limits.auth_failures, self._log_gate)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's default, but a failed TLS handshake (any client can cause
        one) is one log line, not a traceback; aiosmtpd then closes the connection."""
        if isinstance(error, TLSSetupException):
            log.info("TLS handshake failed: %s", error.__cause__ or error)
            return "421 4.7.0 TLS handshake failed"
        log.exception("SMTP session error")
        return f"500 Error: ({error.__class__.__name__}) {error}"

    # -- envelope --------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # The connection's key, computed at connect (ipaddress parsing per MAIL
        # was 3 % of the intake's CPU); the same peer, so the same key.
        ip = server.peer_key if isinstance(server, IntakeSMTP) else None
        if ip is None:
            ip = client_key(session.peer)
        # Every transaction counts, refused ones too: guessing costs budget.
        if not self.limits.per_ip.allow(ip):
            if self._log_gate.allow("mail " + ip):
                log.warning("rate limit: too much mail from %s; MAIL answered 450", ip)
            return REPLY_IP_RATE.format(ip)
        if address in ("<>", ""):
            # Bounces and automatic reports: never a request, never answered.
            self.refused += 1
            log.info("refused null sender from %s", session.peer)
            return REPLY_NULL_SENDER
        low = address.lower()
        accounts = self._senders.get(low, []) + self._senders.get(low.rpartition("@")[2], [])
        if not accounts:
            self.refused += 1
            log.info("refused MAIL FROM <%s> from %s: no account allows it", address, session.peer)
            return REPLY_SENDER_UNKNOWN.format(address)
        authed = session_account(session)
        if authed is not None and not any(a is authed for a in accounts):
            log.info("refused MAIL FROM <%s> for %s: not its sender", address, authed.label)
            return REPLY_SENDER_NOT_AUTHED.format(address)
        if authed is None and all(a.smtp_password is not None for a in accounts):
            return REPLY_AUTH_REQUIRED  # every account of this sender needs AUTH
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        low = address.lower()
        plain_so_far = (
            sum(1 for r in envelope.rcpt_tos if self.is_number_address(r))
            if self.number_domains
            else 0  # no plain mode: no number addresses
        )
        if low in self.recipients:
            if plain_so_far:
                return REPLY_MIXED.format(address)
        elif self.is_number_address(low):
            if len(envelope.rcpt_tos) > plain_so_far:
                return REPLY_MIXED.format(address)
            try:
                self.plain_account(envelope.mail_from or "", session_account(session))
            except Refused as refusal:
                log.info("refused RCPT TO <%s> from <%s>: %s", address, envelope.mail_from,
                         refusal.reply)  # fmt: skip
                return refusal.reply
            if not is_number_local_part(address.rpartition("@")[0]):
                return REPLY_NOT_A_NUMBER.format(address)
            if plain_so_far >= MAX_PLAIN_RECIPIENTS:
                return REPLY_TOO_MANY_NUMBERS
        else:
            log.info("refused RCPT TO <%s> from %s", address, session.peer)
            return REPLY_UNKNOWN_RECIPIENT.format(address)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    def is_number_address(self, address: str) -> bool:
        """Whether `address` is in one of smtp.number_domains (plain mode); the
        intake addresses (smtp.recipients) never are, even in such a domain."""
        return (
            bool(self.number_domains)
            and address.rpartition("@")[2].lower() in self.number_domains
            and address.lower() not in self.recipients
        )

    def plain_account(self, mail_from: str, authed: AccountConfig | None) -> AccountConfig:
        """The account a plain mail from `mail_from` belongs to, or Refused.

        The authenticated account when the session has AUTH (its MAIL FROM was
        checked at MAIL), else the one whose plain.senders list the sender."""
        if authed is not None:
            if not authed.plain.enabled:
                raise Refused(REPLY_PLAIN_SENDER.format(mail_from))
            return authed
        low = mail_from.lower()
        found = self._plain_senders.get(low) or self._plain_senders.get(low.rpartition("@")[2])
        if not found:
            raise Refused(REPLY_PLAIN_SENDER.format(mail_from))
        account = found[0]  # check-config makes plain senders unique to one account
        if account.smtp_password is not None:
            raise Refused(REPLY_AUTH_REQUIRED)
        return account

    # -- the message -----------------------------------------------------

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if isinstance(server, IntakeSMTP):
            server.restart_timer()  # timeout_s bounds the transfer, not our work
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        peer = session.peer
        client_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        authed = session_account(session)
        numbers = (
            [r.rpartition("@")[0] for r in envelope.rcpt_tos if self.is_number_address(r)]
            if self.number_domains
            else []
        )
        examine = self.examine if not numbers else self.examine_plain
        try:
            if len(raw) <= INLINE_EXAMINE_BYTES:
                examined = examine(raw, mail_from, peer, client_ip, authed, numbers)
            else:
                examined = await asyncio.to_thread(
                    examine, raw, mail_from, peer, client_ip, authed, numbers
                )
        except Refused as refusal:
            self.refused += 1
            log.info("refused mail from <%s> at %s: %s", mail_from, client_ip, refusal.reply)
            return refusal.reply
        if examined is None:
            log.info("ignored automatic reply from <%s> at %s", mail_from, client_ip)
            return REPLY_AUTO_IGNORED
        # After the checks, so that only messages the account really sends count.
        if not self.limits.account_allows(examined.account.keyid):
            if self._log_gate.allow("account " + examined.account.label):
                log.warning("rate limit: account %s over its rate_limit; DATA answered 450",
                            examined.account.label)  # fmt: skip
            return REPLY_ACCOUNT_RATE
        try:
            admission = await self.store.add_request(examined.request)
        except StoreUnavailable as err:
            log.error("store unavailable, answered 451 to <%s>: %s", mail_from, err)
            return REPLY_STORE_DOWN
        request = examined.request
        self.on_stored(
            admission.ack_code == 0 and not any(r.code is None for r in request.recipients)
        )
        self._log(admission.request_id, admission.ack_code, examined, mail_from, client_ip)
        return REPLY_OK.format(admission.request_id)

    def _log(self, request_id: int, ack: int, ex: Examined, mail_from: str, client_ip: str) -> None:
        req = ex.request
        to_send = sum(1 for r in req.recipients if r.code is None)
        log.info(
            "%s: account %s %s from <%s> at %s: ack %d, %d recipient(s), %d to send%s%s",
            request_tag(request_id, req.email_id), ex.account.label, ex.form, mail_from,
            client_ip, ack, len(req.recipients) if ack == 0 else 0, to_send if ack == 0 else 0,
            "".join(f"; {n}" for n in ex.checked.notes),
            "" if req.due_at <= req.received_at else f"; held until {ex.checked.due_at}",
            extra=request_fields(request_id, req.email_id),
        )  # fmt: skip

    def examine(
        self,
        raw: bytes,
        mail_from: str,
        peer: Any,
        client_ip: str,
        authed: AccountConfig | None = None,
        numbers: list[str] | None = None,
    ) -> Examined | None:
        """Parse and check one `<envoi>` email (on a thread when big; pure but
        for the clock).

        `authed` is the account the session authenticated as; `numbers` is
        unused here (plain mode's, see examine_plain). Returns None for an
        automatic reply to ignore; raises Refused for a refusal in the dialogue.
        """
        content = read_mail(raw)
        if content.auto_submitted not in NORMAL_AUTO_SUBMITTED:
            return None
        envoi, format_problem = self._read_envoi(content)
        keyid = envoi.get("keyid") if envoi is not None else None
        if not keyid or not keyid.strip():
            raise Refused(REPLY_NO_KEYID)
        rules = self._rules_for(keyid.strip())
        if rules is None:
            raise Refused(REPLY_UNKNOWN_KEYID)
        account = rules.account
        # AUTH binds the session to one account, and an account with a password
        # takes nothing but its own authenticated sessions (docs/security.md).
        if authed is None and account.smtp_password is not None:
            raise Refused(REPLY_AUTH_REQUIRED)
        if authed is not None and authed is not account:
            raise Refused(REPLY_OTHER_ACCOUNT)
        if not _address_allowed(mail_from, account):
            raise Refused(REPLY_SENDER.format(mail_from))
        self._check_origin(content, account, peer, client_ip, _address_allowed)
        assert envoi is not None
        now = self.clock.now()
        if format_problem is not None:
            checked = CheckedRequest(Ack.INVALID_FORMAT, notes=[format_problem])
        else:
            checked = check_request(envoi, content.attachments, rules, now)
        ack_to = self._report_address(envoi.get("emailack"), account, "emailAck")
        if checked.ack_code != Ack.PROCESSED and ack_to is None:
            why = "; ".join(checked.notes) or f"Ack {checked.ack_code}"
            raise Refused(REPLY_INVALID_NO_ACK.format(why))
        email_id = (envoi.get("emailid") or "").strip() or None
        not_to = self._report_address(envoi.get("emailnot"), account, "emailNot")
        # SPEC 7: etatDlr mails to <emailDlr>, else to emailNot when the account asks.
        if envoi.get("emaildlr") is not None:
            dlr_to = self._report_address(envoi.get("emaildlr"), account, "emailDlr")
        else:
            dlr_to = not_to if account.delivery_reports else None
        received = now.timestamp()
        request = NewRequest(
            account=account.keyid,
            email_id=email_id,
            ack_code=checked.ack_code,
            ack_to=ack_to,
            not_to=not_to,
            numbered=checked.numbered,
            sender=checked.sender,
            reference=checked.reference,
            received_at=received,
            due_at=checked.due_at.timestamp() if checked.due_at else received,
            mail_from=mail_from,
            client_ip=client_ip,
            message_id=content.message_id,
            recipients=checked.recipients,
            dlr_to=dlr_to,
        )
        return Examined(request, account, checked)

    def examine_plain(
        self,
        raw: bytes,
        mail_from: str,
        peer: Any,
        client_ip: str,
        authed: AccountConfig | None = None,
        numbers: list[str] | None = None,
    ) -> Examined | None:
        """Parse and check one plain-mode email (SPEC section 9) sent to `numbers`
        (the local parts of its number recipients); as examine() otherwise."""
        content = read_mail(raw)
        if content.auto_submitted not in NORMAL_AUTO_SUBMITTED:
            return None
        account = self.plain_account(mail_from, authed)

        def allowed(address: str, acc: AccountConfig) -> bool:
            # With AUTH, the account's <envoi> senders may send plain mail too.
            return acc.plain.allows(address) or (
                authed is not None and _address_allowed(address, acc)
            )

        self._check_origin(content, account, peer, client_ip, allowed)
        plain = account.plain
        body = content.text if content.text is not None else content.html_text
        text = plain_text(content.subject, body, plain.text, plain.cut_markers)
        if not text:
            raise Refused(REPLY_PLAIN_NO_TEXT)
        # Identical addresses are one recipient, as for any mail (To and Cc both).
        unique = list(dict.fromkeys(n.lower() for n in numbers or []))
        email_id = plain_email_id(content.message_id, unique)
        now = self.clock.now()
        rules = self.rules[account.keyid]
        checked = check_request(
            plain_request(unique, text, email_id), {}, rules, now, line_break=None
        )
        sender = self._report_address(mail_from, account, "MAIL FROM")
        not_to = sender if plain.reports != "none" else None
        received = now.timestamp()
        request = NewRequest(
            account=account.keyid,
            email_id=email_id,
            ack_code=checked.ack_code,
            ack_to=None,  # plain mode has no Ack
            not_to=not_to,
            numbered=True,
            sender=checked.sender,
            reference=None,
            received_at=received,
            due_at=checked.due_at.timestamp() if checked.due_at else received,
            mail_from=mail_from,
            client_ip=client_ip,
            message_id=content.message_id,
            recipients=checked.recipients,
            plain_reports=plain.reports,
            dlr_to=sender if account.delivery_reports else None,
        )
        return Examined(request, account, checked, form="plain")

    @staticmethod
    def _check_origin(
        content: MailContent,
        account: AccountConfig,
        peer: Any,
        client_ip: str,
        allowed: Callable[[str, AccountConfig], bool],
    ) -> None:
        """Every From: address allowed for the account, and the client address."""
        if not content.from_addresses:
            raise Refused(REPLY_NO_FROM)
        for address in content.from_addresses:
            if not allowed(address, account):
                raise Refused(REPLY_SENDER.format(address))
        if not _ip_allowed(peer, account):
            raise Refused(REPLY_IP.format(client_ip))

    def _rules_for(self, keyid: str) -> AccountRules | None:
        account = find_account(self.config, keyid)
        return None if account is None else self.rules[account.keyid]

    @staticmethod
    def _read_envoi(content: MailContent) -> tuple[Envoi | None, str | None]:
        """The request fields, and why the email is invalid (Ack 3) if it is."""
        if content.text is not None:
            text, problem = content.text, None
        elif content.html_text is not None:
            text, problem = content.html_text, "HTML-only body"
        else:
            return None, "no text body"
        envoi = parse_envoi(text)
        if envoi.has_declarations:
            problem = "DOCTYPE or ENTITY declaration in the body"
        elif not envoi.has_wrapper:
            problem = problem or "no <envoi> block"
        return envoi, problem

    def _report_address(self, value: str | None, account: AccountConfig, tag: str) -> str | None:
        """A report address the account's rules allow, else None (logged)."""
        if value is None or not value.strip():
            return None
        address = parse_address(value)
        local, at, domain = address.rpartition("@")
        # split() != [address]: white space in it (str.isspace's), in one C call.
        if not at or not local or not domain or address.split() != [address]:
            log.warning(
                "account %s: <%s> %r is not an address; no report", account.label, tag, value
            )
            return None
        if address.lower() in self.recipients:
            log.warning("account %s: <%s> is our own intake address; no report", account.label, tag)
            return None
        if account.report_domains is not None and domain.lower() not in account.report_domains:
            log.warning(
                "account %s: <%s> %s is outside report_domains; no report",
                account.label, tag, address,
            )  # fmt: skip
            return None
        return address


def smtp_protocol(
    handler: IntakeHandler, smtp: SmtpConfig, *, tls: ssl.SSLContext | None = None
) -> Callable[[], IntakeSMTP]:
    """The factory of the listener's protocol: one IntakeSMTP per connection, all
    sharing one connection gate (smtp.max_connections, ..._per_ip)."""
    gate = ConnectionGate(smtp.max_connections, smtp.max_connections_per_ip)
    authenticator = handler.authenticator()
    loop = asyncio.get_running_loop()
    # aiosmtpd asks for the FQDN on every connection without a hostname (a
    # resolver call): ask once.
    hostname = smtp.hostname or socket.getfqdn()

    def protocol() -> IntakeSMTP:
        return IntakeSMTP(
            handler,
            gate,
            data_size_limit=smtp.max_message_bytes,
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="mailbridge ESMTP",
            timeout=smtp.timeout_s,
            tls_context=tls,
            require_starttls=bool(smtp.tls and smtp.tls.required),
            authenticator=authenticator,
            auth_require_tls=True,  # AUTH is neither offered nor accepted before STARTTLS
            command_call_limit=COMMAND_LIMITS,
            loop=loop,
        )

    return protocol
