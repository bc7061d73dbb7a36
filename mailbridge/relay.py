"""The SMTP client of the report relay: warm connections, pipelined transactions.

aiosmtplib opens each connection (TCP or implicit TLS, the greeting, EHLO,
STARTTLS, AUTH: what it does well and is tested for); then `RelayConnection`
takes the transport over and runs the mail transactions itself. With the
relay's PIPELINING (RFC 2920: Postfix, Exim, smtp-sink...) a transaction's
MAIL, RCPT and DATA go in one write, and a message's content, its final `.`
and the next transaction's MAIL, RCPT and DATA in the next one: one round trip
and one wake-up per report instead of four. Without PIPELINING each command
waits for its reply, as RFC 5321 wants.

Each transaction's replies are its own (RFC 2920 section 3.1): a refused MAIL
or RCPT fails that report only (its DATA is refused too, or its content is an
empty message; RSET starts the next one clean); a refused content fails that
report only. What ends a connection (lost, a timeout, 421, a reply that cannot
be parsed) fails every report of the group that has no reply yet, temporarily:
a report whose content was sent but whose 250 never came may have arrived, so
it is retried (at least once, as before).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import aiosmtplib

from mailbridge.config import RelayConfig

MAX_REPLY_BYTES = 64 * 1024  # a relay that sends more without a final line is broken
# What may not appear in an address on a command line (it would smuggle
# parameters or commands in): white space, controls, brackets.
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


class ReportRefused(Exception):
    """The relay refused the report for good (5xx, or too big for it): retrying
    cannot help, a human must (`mailbridge reports list`)."""


class RelayUnavailable(Exception):
    """A temporary failure: a 4xx reply, the connection lost or timed out."""


class Reply(NamedTuple):
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One report to send: envelope sender ("" for `<>`), recipient, the mail
    with LF (or CRLF) line ends."""

    sender: str
    recipient: str
    mail: bytes


# What a report's transaction came to: None when the relay took it (250), else
# the error (ReportRefused: for good; RelayUnavailable: try again later).
Outcome = Exception | None
# Told the index of each letter the relay has taken, as soon as it has (RelayConnection.send).
Accepted = Callable[[int], Awaitable[None]]


def wire_message(mail: bytes) -> bytes:
    """The content as DATA sends it: CRLF line ends, dot-stuffed, ending in
    CRLF, then the final `.` line (RFC 5321 section 4.5.2)."""
    if b"\r" in mail:
        mail = mail.replace(b"\r\n", b"\n")
    data = mail.replace(b"\n", b"\r\n")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def wire_size(mail: bytes) -> int:
    """The size SIZE (RFC 1870) counts: the content with CRLF line ends."""
    return len(mail) + mail.count(b"\n") - mail.count(b"\r\n")


def _address(address: str, utf8: bool) -> bytes:
    if _UNSAFE_ADDRESS.search(address):
        raise ReportRefused(f"address {address!r} cannot be written on an SMTP command line")
    if address.isascii():
        return b"<" + address.encode("ascii") + b">"
    if not utf8:
        raise ReportRefused(f"address {address!r} is not ASCII and the relay lacks SMTPUTF8")
    return b"<" + address.encode("utf-8") + b">"


class RelayConnection(asyncio.Protocol):
    """One connection to the relay once set up: sends groups of transactions.

    Protocol side: parses replies as they arrive and wakes the sender once
    the replies it waits for are all in (one wake-up per group). Every wait
    ends within `timeout_s` of the relay's last sign of life."""

    def __init__(self, *, timeout_s: float, extensions: dict[str, str]) -> None:
        self.timeout_s = timeout_s
        self.pipelining = "pipelining" in extensions
        self.smtputf8 = "smtputf8" in extensions
        size = extensions.get("size", "")
        self.size_limit = int(size) if size.isdigit() and int(size) > 0 else None
        self.say_size = "size" in extensions
        self.transport: asyncio.WriteTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._lines: list[str] = []  # the lines of a multi-line reply so far
        self._replies: list[Reply] = []
        self.answered = 0  # replies received, all told
        self._want = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self._lost: RelayUnavailable | None = None
        self._progress_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- set up ----------------------------------------------------------

    @classmethod
    async def open(cls, relay: RelayConfig) -> RelayConnection:
        """Connect, EHLO, STARTTLS and AUTH as configured (aiosmtplib), then take
        the connection over."""
        smtp = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            use_tls=relay.tls,
            start_tls=relay.starttls if not relay.tls else False,
            timeout=relay.timeout_s,
            username=relay.username,
            password=relay.password,
        )
        await smtp.connect()
        try:
            if smtp.is_ehlo_or_helo_needed:
                await smtp.ehlo()  # its extensions say PIPELINING and SIZE
            transport = smtp.transport
            if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
                raise RelayUnavailable("the relay closed the connection while it was set up")
        except BaseException:
            smtp.close()
            raise
        conn = cls(timeout_s=relay.timeout_s, extensions=dict(smtp.esmtp_extensions))
        transport.set_protocol(conn)
        conn.connection_made(transport)
        return conn

    @property
    def usable(self) -> bool:
        """Still connected, with nothing unread (a relay that spoke unasked,
        421 before closing an idle connection, is not to be trusted)."""
        return (
            self._lost is None
            and self.transport is not None
            and not self.transport.is_closing()
            and not self._buffer
            and not self._replies
        )

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def quit(self) -> None:
        """QUIT politely, within the timeout, then close."""
        try:
            if self.usable:
                await self._exchange([b"QUIT\r\n"], 1)
        except (RelayUnavailable, ReportRefused):
            pass
        finally:
            self.close()

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._progress_at = self._loop.time()
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start:end]).rstrip(b"\r")
            start = end + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(RelayUnavailable(f"the relay sent a line that is no reply: {line!r}"))
                return
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                self._replies.append(Reply(int(line[:3]), "\n".join(self._lines)))
                self._lines = []
                self.answered += 1
        del buffer[:start]
        if len(buffer) > MAX_REPLY_BYTES:
            self._fail(RelayUnavailable("the relay sent a reply line too long"))
            return
        waiter = self._waiter
        if waiter is not None and len(self._replies) >= self._want and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._fail(RelayUnavailable("the relay closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RelayUnavailable(f"connection to the relay lost: {exc or 'closed'}"))
        self.transport = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._progress_at = self._loop.time()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _fail(self, err: RelayUnavailable) -> None:
        if self._lost is None:
            self._lost = err
        for future in (self._waiter, self._drained):
            if future is not None and not future.done():
                future.set_exception(self._lost)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    # -- waiting, bounded ------------------------------------------------

    def _check_timeout(self) -> None:
        deadline = self._progress_at + self.timeout_s
        if self._loop.time() >= deadline:
            self._timer = None
            self._fail(RelayUnavailable(f"the relay did not answer in {self.timeout_s:g} s"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_timeout)

    async def _wait(self, future: asyncio.Future[None]) -> None:
        self._progress_at = self._loop.time()
        self._timer = self._loop.call_at(self._progress_at + self.timeout_s, self._check_timeout)
        try:
            await future
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    async def _exchange(self, chunks: list[bytes], replies: int) -> list[Reply]:
        """Write `chunks` at once and wait for `replies` replies. Fewer when the
        connection ended meanwhile (`_lost` says why): the replies that came
        before still count."""
        if self._lost is not None:
            raise self._lost
        assert self.transport is not None
        self.transport.writelines(chunks)
        try:
            if self._paused:  # a big message: let the relay take it first
                self._drained = self._loop.create_future()
                await self._wait(self._drained)
            if len(self._replies) < replies:
                self._want = replies
                self._waiter = self._loop.create_future()
                try:
                    await self._wait(self._waiter)
                finally:
                    self._waiter = None
        except RelayUnavailable:
            pass  # the connection is gone: hand over what came
        got, self._replies = self._replies[:replies], self._replies[replies:]
        return got

    def _gone(self) -> RelayUnavailable:
        return self._lost or RelayUnavailable("the relay sent fewer replies than commands")

    def _next(self, replies: Iterator[Reply]) -> Reply:
        reply = next(replies, None)
        if reply is None:
            raise self._gone()
        return reply

    async def _round(self, chunks: list[bytes], envelope_from: int) -> list[Reply]:
        """Send one round: with PIPELINING in one write; without, each chunk
        after the previous one's reply, stopping after a refused envelope
        command (chunks[envelope_from:] are MAIL, RCPT, DATA)."""
        if self.pipelining:
            return await self._exchange(chunks, len(chunks))
        got: list[Reply] = []
        for i, chunk in enumerate(chunks):
            replies = await self._exchange([chunk], 1)
            got += replies
            if not replies or (i >= envelope_from and replies[0].code >= 400):
                break
        return got

    # -- transactions ----------------------------------------------------

    def _envelope(self, letter: Outgoing) -> list[bytes]:
        utf8 = self.smtputf8
        mail_from = b"MAIL FROM:" + _address(letter.sender, utf8)
        if self.say_size:
            mail_from += b" SIZE=%d" % wire_size(letter.mail)
        if not (letter.sender.isascii() and letter.recipient.isascii()):
            mail_from += b" SMTPUTF8"
        rcpt = b"RCPT TO:" + _address(letter.recipient, utf8)
        return [mail_from + b"\r\n", rcpt + b"\r\n", b"DATA\r\n"]

    async def send(
        self, letters: Sequence[Outgoing], on_accepted: Accepted | None = None
    ) -> list[Outcome]:
        """Send `letters` in order on this connection; one outcome each.

        `on_accepted(i)` is awaited as soon as the relay has taken letter i (its
        250 after the data), before the next letter's data goes: the caller can
        record it then, so that a crash repeats only what it had not recorded.
        Raises nothing for the relay's answers (but what `on_accepted` raises):
        a connection that fails midway gives its error to every letter still
        without a reply."""
        outcomes: list[Outcome] = [None] * len(letters)
        unanswered = set(range(len(letters)))
        content: tuple[int | None, bytes] | None = None  # (letter, its DATA content)
        reset = False  # an envelope was refused: RSET before the next
        try:
            for i, letter in enumerate(letters):
                try:
                    if self.size_limit is not None and wire_size(letter.mail) > self.size_limit:
                        raise ReportRefused(
                            f"{wire_size(letter.mail)} bytes, over the relay's SIZE limit"
                            f" of {self.size_limit}"
                        )
                    envelope = self._envelope(letter)
                except ReportRefused as err:
                    outcomes[i] = err
                    unanswered.discard(i)
                    continue
                chunks = [content[1]] if content is not None else []
                if reset:
                    chunks.append(b"RSET\r\n")
                start = len(chunks)
                replies = iter(await self._round(chunks + envelope, start))
                if content is not None:
                    await self._settle(
                        content[0], self._next(replies), outcomes, unanswered, on_accepted
                    )
                if reset:
                    self._expect(self._next(replies), 250, "RSET")
                content, reset = self._envelope_outcome(
                    i, letter, list(replies), outcomes, unanswered
                )
            if content is not None:
                replies = iter(await self._round([content[1]], 1))
                await self._settle(
                    content[0], self._next(replies), outcomes, unanswered, on_accepted
                )
        except RelayUnavailable as err:
            self._fail(err)
            for i in unanswered:
                outcomes[i] = err
        except BaseException:
            # Cancelled midway: replies may still come; never reuse this connection.
            self._fail(RelayUnavailable("a send on this connection was interrupted"))
            raise
        return outcomes

    def _envelope_outcome(
        self,
        i: int,
        letter: Outgoing,
        replies: list[Reply],
        outcomes: list[Outcome],
        unanswered: set[int],
    ) -> tuple[tuple[int | None, bytes] | None, bool]:
        """What MAIL, RCPT and DATA's replies mean: the content to send next
        (or None) and whether an RSET must come first."""
        for reply in replies:
            if reply.code == 421:
                raise RelayUnavailable(f"{reply.code} {reply.text}")
        wanted = ((250,), (250, 251), (354,))  # MAIL, RCPT (251: will forward), DATA
        refused = next(
            (r for r, ok in zip(replies, wanted, strict=False) if r.code not in ok), None
        )
        if refused is None:
            if len(replies) < 3:  # fewer replies only after a refusal, or when it ended
                raise self._gone()
            return (i, wire_message(letter.mail)), False
        outcomes[i] = _error(refused)
        unanswered.discard(i)
        if len(replies) == 3 and replies[2].code == 354:
            # DATA accepted after a refused RCPT: end it with an empty message.
            return (None, b".\r\n"), False
        return None, True

    async def _settle(
        self, i: int | None, reply: Reply, outcomes: list[Outcome], unanswered: set[int],
        on_accepted: Accepted | None,
    ) -> None:  # fmt: skip
        if reply.code == 421:
            raise RelayUnavailable(f"{reply.code} {reply.text}")
        if i is None:
            return  # the empty message after a refused RCPT
        outcomes[i] = None if reply.code == 250 else _error(reply)
        unanswered.discard(i)
        if on_accepted is not None and reply.code == 250:
            await on_accepted(i)

    def _expect(self, reply: Reply, code: int, what: str) -> None:
        if reply.code != code:
            raise RelayUnavailable(f"{what}: {reply.code} {reply.text}")


def _error(reply: Reply) -> Exception:
    if reply.code >= 500:
        return ReportRefused(f"{reply.code} {reply.text}")
    return RelayUnavailable(f"{reply.code} {reply.text}")
