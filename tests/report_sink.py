"""A real SMTP relay for the daemon's reports: an aiosmtpd server in a
background thread on an ephemeral port that records every mail it accepts.

    with ReportSink() as sink:          # config: reports.smtp = sink.relay_config()
        sink.go_down()                  # connections refused (the port stays reserved)
        sink.go_down("tempfail")        # connections accepted, DATA answered 451 4.3.0
        sink.come_back()                # mail accepted again, on the same port
        sink.mails                      # every accepted mail, in arrival order
        sink.by_message_id()            # Message-ID -> how many times it arrived
        sink.for_email("1548")          # {"ack": [...], "not": [...]} for one emailId

"Refused" is real: the listening socket is closed and replaced by a socket
bound to the same port but not listening, so the kernel answers a connection
with RST (as for a relay that is down) and no other program can take the port.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session

Mode = Literal["up", "refuse", "tempfail"]
REPLY_TEMPFAIL = "451 4.3.0 Relay busy, try again later"
REPLY_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit"


@dataclass(frozen=True)
class Received:
    """One mail the sink accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    at: float  # time.monotonic() of the 250

    @property
    def message(self) -> EmailMessage:
        msg = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        return msg

    def header(self, name: str) -> str:
        value = self.message[name]
        return "" if value is None else str(value)

    @property
    def body(self) -> bytes:
        payload = self.message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        return payload


class _Handler:
    def __init__(self, sink: ReportSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return self.sink._accept(envelope)


class _TrackedSMTP(SMTP):
    """aiosmtpd's SMTP, registered while its connection is open."""

    def __init__(self, sessions: set[SMTP], handler: Any, **kw: Any) -> None:
        super().__init__(handler, ident="report-sink", **kw)
        self._registry = sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(exc)


class ReportSink:
    """An SMTP relay that records what it is given; it can fail on demand."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.mode: Mode = "up"
        self.tempfailed = 0  # DATA answered 451
        self.refused = 0  # DATA answered 552 (refuse_larger_than)
        # DATA of a mail bigger than this gets 552 5.3.4 (a relay's message size
        # limit); None: any size. `size_limit` also advertises it (SIZE, RFC 1870).
        self.refuse_larger_than: int | None = None
        self.size_limit: int | None = None
        self._mails: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._placeholder: socket.socket | None = None
        self._sessions: set[SMTP] = set()  # open connections (used on the loop only)

    # -- life cycle ------------------------------------------------------------

    def start(self) -> ReportSink:
        self._thread.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._serve(sock)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._call(self._close_server)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ReportSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def relay_config(self, **kw: Any) -> dict[str, Any]:
        """The `reports.smtp` block that points the daemon here."""
        return {"host": self.host, "port": self.port, "timeout_s": 10, **kw}

    # -- knobs -----------------------------------------------------------------

    def go_down(self, mode: Literal["refuse", "tempfail"] = "refuse") -> None:
        """`refuse`: open connections are dropped and new ones get RST (no
        listener); `tempfail`: connections are accepted and DATA gets 451."""
        if mode == "refuse" and self._server is not None:
            self._call(self._close_server)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))  # bound, not listening: holds the port
            self._placeholder = sock
        elif mode == "tempfail":
            self._listen_again()
        self.mode = mode

    def come_back(self) -> None:
        """Accept mail again, on the same port."""
        self._listen_again()
        self.mode = "up"

    def _listen_again(self) -> None:
        if self._placeholder is not None:
            sock, self._placeholder = self._placeholder, None
            self._serve(sock)

    # -- what arrived ----------------------------------------------------------

    @property
    def mails(self) -> list[Received]:
        with self._lock:
            return list(self._mails)

    def by_message_id(self) -> Counter[str]:
        """Message-ID -> number of times a mail with it was accepted."""
        return Counter(m.header("Message-ID") for m in self.mails)

    def for_email(self, email_id: str) -> dict[str, list[Received]]:
        """Every delivery of the reports of one emailId: {"ack": [...], "not": [...]}."""
        out: dict[str, list[Received]] = {"ack": [], "not": []}
        for mail in self.mails:
            label, _, subject_id = mail.header("Subject").partition(" ")
            if subject_id == email_id:
                out["ack" if label == "etatAck" else "not"].append(mail)
        return out

    def wait(self, predicate: Callable[[list[Received]], bool], timeout: float = 60.0) -> None:
        """Poll (bounded) until `predicate(mails)` holds."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not predicate(self.mails):
            if time.monotonic() > deadline:
                raise AssertionError(f"report sink: condition not met in {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    # -- internals -------------------------------------------------------------

    def _accept(self, envelope: Envelope) -> str:
        if self.mode == "tempfail":
            with self._lock:
                self.tempfailed += 1
            return REPLY_TEMPFAIL
        limit = self.refuse_larger_than
        if limit is not None and len(envelope.original_content or b"") > limit:
            with self._lock:
                self.refused += 1
            return REPLY_TOO_BIG
        mail = Received(
            envelope.mail_from or "",
            tuple(envelope.rcpt_tos),
            envelope.original_content or b"",
            time.monotonic(),
        )
        with self._lock:
            self._mails.append(mail)
        return "250 2.0.0 Ok: queued"

    def _serve(self, sock: socket.socket) -> None:
        sock.listen(64)
        handler = _Handler(self)

        def protocol() -> SMTP:
            session = _TrackedSMTP(
                self._sessions, handler, hostname="relay.test", data_size_limit=self.size_limit
            )
            return session

        async def create() -> asyncio.base_events.Server:
            return await self._loop.create_server(protocol, sock=sock)

        self._server = asyncio.run_coroutine_threadsafe(create(), self._loop).result(10)

    async def _close_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()  # a relay that goes down drops its clients

    def _call(self, fn: Callable[[], Any]) -> None:
        asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10)
