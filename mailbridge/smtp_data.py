"""DATA read in large chunks, with aiosmtpd 1.4's result to the byte.

aiosmtpd reads a message line by line: one `readuntil(CRLF)`, one debug-log
call and a few list operations per line, a seventh of the intake's CPU for a
short mail. `ChunkedDataMixin.smtp_DATA` reads up to the first CRLF.CRLF in one
`readuntil` and then applies aiosmtpd's rules to the whole bytes:

- the data is the sequence of CRLF-terminated lines (a bare LF or CR is part
  of a line) before the first line that is exactly `.` CRLF;
- `num_bytes` counts every line as received (dots and CRLF included); over
  `data_size_limit` -> 552; a line longer than `line_length_limit` -> 500 (its
  content over the stream limit is caught before the size, a line of exactly
  the limit plus CRLF after it: `data_state` follows aiosmtpd's order);
- a leading dot is removed from each line (RFC 5321 4.5.2);
- the replies, their order and the state after them are aiosmtpd's
  (tests/test_smtp_data.py runs both on the same streams, cut at random).

Whenever the shortcut cannot tell (the data's first line, a reader buffer
that could begin with `.` CRLF, more than the stream limit before CRLF.CRLF),
it reads on line by line exactly as aiosmtpd does.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, syntax

if TYPE_CHECKING:
    from aiosmtpd.smtp import SMTP

    _Base = SMTP
else:
    _Base = object

log = logging.getLogger(__name__)

CRLF = b"\r\n"
END = b".\r\n"  # the line that ends DATA
_END_PREFIXES = (b"", b".", b".\r")  # a buffer this short could still be END


class DataState(enum.Enum):
    """aiosmtpd's _DataState: how the data ended."""

    NOMINAL = "nominal"
    TOO_LONG = "too long"  # 500 Line too long
    TOO_MUCH = "too much"  # 552 Error: Too much mail data


class DataScan:
    """aiosmtpd 1.4's per-line DATA bookkeeping, fed whole CRLF lines.

    `overrun` is aiosmtpd's LimitOverrunError: the line's content (before CRLF)
    is longer than the stream limit, seen before the line is counted.
    """

    __slots__ = ("data_limit", "line_limit", "num_bytes", "state")

    def __init__(self, data_limit: int | None, line_limit: int) -> None:
        self.data_limit = data_limit
        self.line_limit = line_limit
        self.num_bytes = 0
        self.state = DataState.NOMINAL

    def feed(self, line_length: int) -> None:
        """Count one complete line of `line_length` bytes (CRLF included)."""
        if self.state is DataState.NOMINAL and line_length - 2 > self.line_limit:
            self.state = DataState.TOO_LONG  # aiosmtpd: the stream's LimitOverrunError
        self.num_bytes += line_length
        if self.state is not DataState.NOMINAL:
            return
        if self.data_limit and self.num_bytes > self.data_limit:
            self.state = DataState.TOO_MUCH
        elif line_length > self.line_limit:
            self.state = DataState.TOO_LONG  # aiosmtpd's "defensive" joined-line check

    def feed_all(self, lengths: Iterable[int]) -> None:
        """Count the lines of these lengths, in order."""
        for n in lengths:
            self.feed(n)


def data_state(body: bytes, data_limit: int | None, line_limit: int) -> DataState:
    """aiosmtpd's verdict on `body`: complete CRLF lines as received (dot-stuffed),
    the final `.` line excluded."""
    if len(body) <= line_limit and (not data_limit or len(body) <= data_limit):
        return DataState.NOMINAL  # no line can be over either limit
    scan = DataScan(data_limit, line_limit)
    scan.feed_all(len(line) + 2 for line in body.split(CRLF)[:-1])
    return scan.state


def unstuff(body: bytes) -> bytes:
    """The content of dot-stuffed CRLF lines: one leading dot off each line.

    Every CRLF in `body` ends a line (a CR is never an LF), so a line that
    begins with a dot is the start of `body` or follows a CRLF."""
    content = body.replace(b"\r\n.", CRLF)
    return content[1:] if body.startswith(b".") else content


class ChunkedDataMixin(_Base):
    """smtp_DATA for aiosmtpd 1.4's SMTP: the same dialogue, read in chunks.

    The overridden method is aiosmtpd's own but for the reading (a test pins
    aiosmtpd's source of it, so that an upgrade re-reads this)."""

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            state, body = await self._read_data()
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if state is not DataState.NOMINAL:
            if state is DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        original_content = unstuff(body)
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.push("500 Error: strict ASCII mode")
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content
        status: Any = MISSING
        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> tuple[DataState, bytes]:
        """The data up to its final `.` line (consumed): aiosmtpd's verdict and
        the received lines (still dot-stuffed; empty unless NOMINAL)."""
        reader = self._reader
        limit = self.line_length_limit
        lines: list[bytes] = []
        while True:
            try:
                line = await reader.readuntil(CRLF)
            except asyncio.LimitOverrunError:
                return await self._read_data_slowly(lines)
            if line == END:
                body = b"".join(lines)
                return data_state(body, self.data_size_limit, limit), body
            lines.append(line)
            # Peek (aiosmtpd itself clears this buffer after STARTTLS): is the
            # next line surely not the end? Then the end is the first CRLF.CRLF.
            buffered = reader._buffer  # type: ignore[attr-defined]
            if len(buffered) >= 3 or bytes(buffered) not in _END_PREFIXES:
                if buffered.startswith(END):
                    await reader.readexactly(3)
                    body = b"".join(lines)
                    return data_state(body, self.data_size_limit, limit), body
                break
        try:
            rest = await reader.readuntil(b"\r\n.\r\n")
        except asyncio.LimitOverrunError:
            return await self._read_data_slowly(lines)
        lines.append(rest[:-3])
        body = b"".join(lines)
        return data_state(body, self.data_size_limit, limit), body

    async def _read_data_slowly(self, lines: list[bytes]) -> tuple[DataState, bytes]:
        """aiosmtpd's line loop, after `lines` (complete, already read): for data
        with more than the stream limit before its end."""
        reader = self._reader
        scan = DataScan(self.data_size_limit, self.line_length_limit)
        scan.feed_all(len(line) for line in lines)
        if scan.state is not DataState.NOMINAL:
            lines = []
        while self.transport is not None:  # pragma: no branch
            try:
                line = await reader.readuntil(CRLF)
            except asyncio.LimitOverrunError as e:
                if scan.state is DataState.NOMINAL:
                    scan.state = DataState.TOO_LONG
                lines = []
                # The rest of this line, in pieces; whatever they hold, not the end.
                line = await reader.read(e.consumed)
                while not line.endswith(CRLF):
                    try:
                        line = await reader.readuntil(CRLF)
                    except asyncio.LimitOverrunError as more:
                        line = await reader.read(more.consumed)
                continue
            if line == END:
                break
            scan.feed(len(line))
            if scan.state is DataState.NOMINAL:
                lines.append(line)
            else:
                lines = []
        return scan.state, b"".join(lines)
