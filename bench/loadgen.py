"""The one SMTP load generator every benchmark target is measured with.

A small asyncio client on raw streams (lighter than smtplib or aiosmtplib, so
the generator costs as little CPU as possible on a 2-core machine): each
worker sends its share of messages, on one reused connection or a new
connection per message, checks every reply, and records the time from the
end of DATA (the final ".") to the server's reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # end of DATA -> reply
    replies: list[str] = field(default_factory=list)  # the final replies, in send order per worker
    done_at: dict[int, float] = field(default_factory=dict)  # message index -> time of its 250

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class SmtpError(Exception):
    pass


REPLY_TIMEOUT_S = 120.0  # a stalled server fails the run instead of hanging it


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):  # cheaper than wait_for: no task
                line = await reader.readline()
        except TimeoutError as err:
            raise SmtpError(f"no reply within {REPLY_TIMEOUT_S:.0f}s") from err
        if not line:
            raise SmtpError("connection closed")
        lines.append(line.decode("latin-1").rstrip())
        if len(line) < 4 or line[3:4] != b"-":
            break
    return int(lines[-1][:3]), "\n".join(lines)


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> str:
    got, text = await _reply(reader)
    if got != code:
        raise SmtpError(f"{what}: expected {code}, got {text!r}")
    return text


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        await _expect(self.reader, 220, "greeting")
        self.writer.write(b"EHLO loadgen.test\r\n")
        await _expect(self.reader, 250, "EHLO")

    async def send(self, mail_from: str, rcpt: str, data: bytes) -> tuple[float, str]:
        """One transaction; returns (end-of-DATA latency, final reply)."""
        assert self.reader is not None and self.writer is not None
        w, r = self.writer, self.reader
        w.write(f"MAIL FROM:<{mail_from}>\r\n".encode())
        await _expect(r, 250, "MAIL")
        w.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        await _expect(r, 250, "RCPT")
        w.write(b"DATA\r\n")
        await _expect(r, 354, "DATA")
        w.write(data)
        start = time.perf_counter()
        w.write(b".\r\n")
        text = await _expect(r, 250, "end of DATA")
        return time.perf_counter() - start, text

    async def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.write(b"QUIT\r\n")
                await self.writer.drain()
                self.writer.close()
                await self.writer.wait_closed()
            except OSError:
                pass


def to_wire(message: bytes) -> bytes:
    """CRLF line ends, dot-stuffing, final CRLF: ready to write after DATA."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


async def run_load(
    host: str,
    port: int,
    messages: Sequence[bytes],
    *,
    concurrency: int,
    reuse: bool,
    mail_from: str,
    rcpt: str,
) -> LoadResult:
    """Send every message with `concurrency` workers; every reply is checked."""
    result = LoadResult()
    wire = [to_wire(m) for m in messages]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(wire)):
        queue.put_nowait(i)

    async def worker() -> None:
        conn: Connection | None = None
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            try:
                if conn is None:
                    conn = Connection(host, port)
                    await conn.open()
                latency, text = await conn.send(mail_from, rcpt, wire[i])
                result.latencies_s.append(latency)
                result.replies.append(text)
                result.done_at[i] = time.time()
                result.sent += 1
            except (SmtpError, OSError) as err:
                result.errors.append(f"message {i}: {err}")
                if conn is not None:
                    await conn.close()
                conn = None
                continue
            if not reuse:
                await conn.close()
                conn = None
        if conn is not None:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    return result
