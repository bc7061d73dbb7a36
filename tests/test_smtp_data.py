"""DATA read in chunks (mailbridge.smtp_data) answers as aiosmtpd's line loop does.

Each check runs the same bytes, cut into the same TCP writes, through two
servers that differ only in smtp_DATA: ours and aiosmtpd 1.4's own. The
replies (all of them, the dialogue after DATA too) and the message each
handler received must be identical. Limits are small here so that generated
data crosses them; the edge cases the brief names also go through smtplib,
against the real IntakeSMTP.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.intake import IntakeSMTP
from mailbridge.limits import ConnectionGate
from mailbridge.smtp_data import ChunkedDataMixin, DataScan, DataState, data_state, unstuff

REPLY_TIMEOUT_S = 10.0


class Recorder:
    """A handler that keeps what DATA delivered and accepts it."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []
        self.replies: list[Any] = []  # every reply the server pushed, in order

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        self.contents.append(envelope.original_content)
        return "250 OK"


def server_classes(line_limit: int) -> tuple[type[SMTP], type[SMTP]]:
    """(ours, aiosmtpd's) with a stream and line limit of `line_limit`."""

    class Ours(ChunkedDataMixin, SMTP):
        line_length_limit = line_limit

        async def push(self, status: Any) -> None:
            self.event_handler.replies.append(status)
            await super().push(status)

    class Theirs(SMTP):
        line_length_limit = line_limit

        async def push(self, status: Any) -> None:
            self.event_handler.replies.append(status)
            await super().push(status)

    return Ours, Theirs


async def dialogue(port: int, chunks: list[bytes]) -> None:
    """Write `chunks` one by one (the server reads between them), then QUIT;
    read until the server closes (the replies are recorded on its side: a
    server that closes on its own, after too many bogus commands, may reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for chunk in [*chunks, b"QUIT\r\n"]:
            writer.write(chunk)
            await writer.drain()
            for _ in range(3):  # let the server's loop read this write on its own
                await asyncio.sleep(0)
        async with asyncio.timeout(REPLY_TIMEOUT_S):
            await reader.read()
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()


async def both(
    chunks: list[bytes], line_limit: int, data_limit: int | None
) -> list[tuple[list[Any], list[bytes]]]:
    results = []
    loop = asyncio.get_running_loop()
    for cls in server_classes(line_limit):
        recorder = Recorder()
        server = await loop.create_server(
            lambda cls=cls, recorder=recorder: cls(recorder, data_size_limit=data_limit),  # type: ignore[misc]
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        try:
            await dialogue(port, chunks)
        finally:
            server.close()
            await server.wait_closed()
        results.append((recorder.replies, recorder.contents))
    return results


OPEN = b"EHLO test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n"
AFTER = b"MAIL FROM:<e@f.test>\r\nRCPT TO:<g@h.test>\r\nDATA\r\nsecond\r\n.\r\n"

# Lines made of what matters to DATA: dots, bare CR and LF, CRLF, lengths.
pieces = st.sampled_from(
    [b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"a", b"abcdefgh", b"x" * 13, b"\r\n.\r\n"]
)
payload = st.lists(pieces, max_size=30).map(b"".join)


@st.composite
def streams(draw: Any) -> tuple[list[bytes], int, int | None]:
    line_limit = draw(st.sampled_from([6, 8, 12, 30, 1001]))
    data_limit = draw(st.sampled_from([None, 10, 25, 60, 1000]))
    stream = OPEN + draw(payload) + draw(st.sampled_from([b"\r\n.\r\n", b".\r\n"])) + AFTER
    cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return chunks, line_limit, data_limit


@settings(max_examples=300, deadline=None)
@given(streams())
def test_same_replies_and_content_as_aiosmtpd(case: tuple[list[bytes], int, int | None]) -> None:
    chunks, line_limit, data_limit = case
    ours, theirs = asyncio.run(both(chunks, line_limit, data_limit))
    assert ours == theirs


@pytest.mark.parametrize(
    "body",
    [
        b"",  # DATA then "." at once
        b"\r\n",
        b".\r\n",  # a body of exactly "." (sent as "..")
        b"..\r\n.x\r\n",
        b"line\r\n.\r\nnot the end\r\n",
        b"bare\nLF\nonly\r\n",
        b"bare\rCR\r\n",
        b"y" * 5000 + b"\r\n",
    ],
)
def test_fixed_cases_equal(body: bytes) -> None:
    stuffed = b"".join(b"." + ln if ln.startswith(b".") else ln for ln in body.splitlines(True))
    for cut in (None, 1, len(OPEN) + 1, len(OPEN) + len(stuffed) // 2 + 1):
        stream = OPEN + stuffed + b".\r\n" + AFTER
        chunks = [stream] if cut is None else [stream[:cut], stream[cut:]]
        for line_limit, data_limit in ((1001, None), (1001, 100), (20_002, 20_000)):
            ours, theirs = asyncio.run(both(chunks, line_limit, data_limit))
            assert ours == theirs, (body, cut, line_limit, data_limit)


def test_lines_around_the_limits_equal() -> None:
    """Each side of both line checks (content over the stream limit; the line
    with its CRLF over line_length_limit) and of the size limit."""
    for k in range(4, 12):
        stream = OPEN + b"ab\r\n" + b"x" * k + b"\r\n.\r\n" + AFTER
        for line_limit in (6, 7, 8, 9, 10):
            for data_limit in (None, 12, 13, 14):
                ours, theirs = asyncio.run(both([stream], line_limit, data_limit))
                assert ours == theirs, (k, line_limit, data_limit)


def test_data_state_against_the_scan() -> None:
    """The whole-body shortcut is the per-line scan when either could apply."""
    for body in (b"", b"ab\r\n", b"abcdef\r\n" * 3, b"a" * 9 + b"\r\n", b"a" * 7 + b"\r\n"):
        for data_limit in (None, 5, 10, 30):
            for line_limit in (6, 8, 9, 100):
                scan = DataScan(data_limit, line_limit)
                scan.feed_all(len(ln) + 2 for ln in body.split(b"\r\n")[:-1])
                assert data_state(body, data_limit, line_limit) is scan.state


def test_unstuff() -> None:
    assert unstuff(b"") == b""
    assert unstuff(b"..\r\n") == b".\r\n"
    assert unstuff(b"a\r\n..b\r\n.c\r\nd.\r\n") == b"a\r\n.b\r\nc\r\nd.\r\n"
    assert unstuff(b".a\r\n.\r\n") == b"a\r\n\r\n"  # (not a final line: an inner one)


def test_scan_order_follows_aiosmtpd() -> None:
    # Content over the stream limit: "too long" before the size is looked at.
    scan = DataScan(5, 6)
    scan.feed(9)
    assert scan.state is DataState.TOO_LONG
    # The line fits the stream but, with its CRLF, not the line limit: size first.
    scan = DataScan(5, 6)
    scan.feed(8)
    assert scan.state is DataState.TOO_MUCH
    # Without the size limit, the same line is too long (aiosmtpd's joined-line check).
    scan = DataScan(None, 6)
    scan.feed(7)
    assert scan.state is DataState.TOO_LONG


# -- the real intake class, through smtplib --------------------------------------


class Reference(IntakeSMTP):
    """IntakeSMTP with aiosmtpd's own DATA: what ours must equal."""

    smtp_DATA = SMTP.smtp_DATA


@contextmanager
def intake_servers(data_limit: int) -> Iterator[list[tuple[int, Recorder]]]:
    """IntakeSMTP and Reference on one event loop in a thread: [(port, recorder)]."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers, out = [], []

    async def start(cls: type[IntakeSMTP], recorder: Recorder) -> asyncio.Server:
        gate = ConnectionGate(10, 10)
        return await loop.create_server(
            lambda: cls(recorder, gate, data_size_limit=data_limit, loop=loop),  # type: ignore[arg-type]
            "127.0.0.1",
            0,
        )

    try:
        for cls in (IntakeSMTP, Reference):
            recorder = Recorder()
            server = asyncio.run_coroutine_threadsafe(start(cls, recorder), loop).result(10)
            servers.append(server)
            out.append((server.sockets[0].getsockname()[1], recorder))
        yield out
    finally:
        for server in servers:
            loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def send_raw(port: int, payload: bytes) -> tuple[int, bytes]:
    """smtplib: MAIL, RCPT, DATA, then `payload` as the data (smtplib dot-stuffs
    it and adds the final dot), then a second transaction on the same connection."""
    with smtplib.SMTP("127.0.0.1", port, timeout=REPLY_TIMEOUT_S) as smtp:
        smtp.ehlo()
        smtp.mail("a@b.test")
        smtp.rcpt("c@d.test")
        try:
            code, text = smtp.data(payload)
        except smtplib.SMTPDataError as err:
            code, error = err.smtp_code, err.smtp_error
            text = error if isinstance(error, bytes) else error.encode()
        assert smtp.noop()[0] == 250  # the session goes on
        assert smtp.sendmail("e@f.test", ["g@h.test"], b"second\r\n") == {}
    return code, text


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b".",
        b".\r\n",
        b"..\r\n",
        b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nend.\r\n",
        b"x" * 1200 + b"\r\nshort\r\n",  # a line of 1000+ characters
        b"Subject: s\r\n\r\n" + b"y" * 70 + b"\r\n" * 40,
        b"caf\xc3\xa9 8bit\r\n\xff\xfe\r\n",
        (b"z" * 98 + b"\r\n") * 21,  # over the 2 000-byte limit: 552 5.3.4
        b"z" * 3000,  # one line over the limit: 500 (aiosmtpd: longer than the stream limit)
        b"z" * 1998,  # exactly the limit with the CRLF smtplib adds
    ],
)
def test_smtplib_edge_cases_equal_on_the_intake(payload: bytes) -> None:
    with intake_servers(2000) as [(ours, ours_got), (theirs, theirs_got)]:
        got = send_raw(ours, payload)
        want = send_raw(theirs, payload)
        assert got == want
        assert ours_got.contents == theirs_got.contents
    if len(payload) == 3000:
        assert got[0] == 500
    elif len(payload) > 2000:
        assert got[0] == 552 and got[1].startswith(b"5.3.4")
    else:
        assert got[0] == 250
