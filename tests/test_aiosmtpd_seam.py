"""The aiosmtpd internals intake.py relies on: an upgrade must fail here, loudly.

intake.IntakeSMTP overrides or reads private parts of aiosmtpd's SMTP and
Session (pyproject pins aiosmtpd below its next minor version for that
reason). Each check names what intake does with the part, so that whoever
upgrades aiosmtpd knows what to re-read. The checks look both at the
attribute and at aiosmtpd's own source calling it: an attribute kept but no
longer called would make an override silently dead.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import inspect
import smtplib
import socket
import ssl
import struct
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosmtpd
import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, Session

from mailbridge.app import build_rules
from mailbridge.auth import IntakeSession
from mailbridge.clock import SystemClock
from mailbridge.config import parse_config
from mailbridge.intake import IntakeHandler, IntakeSMTP, smtp_protocol
from mailbridge.smtp_data import ChunkedDataMixin
from tests.support import config_dict
from tests.tls import self_signed

SOURCE = inspect.getsource(aiosmtpd.smtp)

# (attribute of SMTP, a call aiosmtpd must still make, what intake does with it)
SMTP_SEAMS = [
    ("_reset_timeout", "self._reset_timeout(", "one idle deadline, not a timer per command"),
    ("_timeout_cb", "self._timeout_cb", "writes 421 4.4.2 before aiosmtpd closes"),
    ("_getaddr", "self._getaddr(arg)", "fast path for plain <local@domain> at MAIL and RCPT"),
    ("_create_session", "self._create_session()", "IntakeSession, without login_data's warning"),
    ("line_length_limit", "limit=self.line_length_limit", "raised to the message size (SPEC 1)"),
    ("line_length_limit", "len(line) > self.line_length_limit", "the per-line DATA check"),
    ("command_size_limit", "self.command_size_limit", "command lines stay bounded (512)"),
]  # fmt: skip


def test_version_is_the_one_pinned() -> None:
    major, minor = (int(x) for x in aiosmtpd.__version__.split(".")[:2])
    assert (major, minor) == (1, 4), (
        f"aiosmtpd {aiosmtpd.__version__}: re-check every seam in this file, then move the pin"
    )


@pytest.mark.parametrize("attribute, call, why", SMTP_SEAMS)
def test_smtp_seam(attribute: str, call: str, why: str) -> None:
    assert hasattr(SMTP, attribute), f"aiosmtpd.SMTP.{attribute} is gone; intake {why}"
    assert call in SOURCE, f"aiosmtpd no longer calls {call!r}; intake {why}"


def test_timeout_handle_is_the_instance_timer() -> None:
    """_arm_timer cancels and replaces `_timeout_handle`, aiosmtpd's idle timer."""
    loop = asyncio.new_event_loop()
    try:
        smtp = SMTP(object(), loop=loop)
        assert hasattr(smtp, "_timeout_handle")
        assert "self._timeout_handle = self.loop.call_later(" in SOURCE
    finally:
        loop.close()


def test_session_login_data_slot() -> None:
    """IntakeSession's login_data property reads and writes `_login_data`."""
    session = Session(asyncio.new_event_loop())
    assert hasattr(session, "_login_data")
    assert isinstance(inspect.getattr_static(Session, "login_data"), property)
    intake_session = IntakeSession(asyncio.new_event_loop())
    intake_session.login_data = "x"
    assert intake_session._login_data == "x"


def test_intake_overrides_exist_on_the_base() -> None:
    """Every method IntakeSMTP overrides is still a method of aiosmtpd's SMTP."""
    overrides = [
        name
        for name, value in vars(IntakeSMTP).items()
        if callable(value) and name.startswith("_") and not name.startswith("__")
    ]
    ours = {"_arm_timer", "_idle_timer", "_forget"}  # helpers of our own, not overrides
    missing = [n for n in overrides if n not in ours and not hasattr(SMTP, n)]
    assert missing == [], f"IntakeSMTP overrides what aiosmtpd no longer has: {missing}"


# aiosmtpd 1.4.6's SMTP.smtp_DATA: mailbridge.smtp_data replaces it with the
# same dialogue read in chunks (its rules are written out in that module).
SMTP_DATA_SHA256 = "3a33f30d3fd6d02f39c7d78a08288bffea9170525b62e2161568041ae7e018df"


def test_smtp_data_is_the_one_replaced() -> None:
    source = inspect.getsource(SMTP.smtp_DATA)
    assert hashlib.sha256(source.encode()).hexdigest() == SMTP_DATA_SHA256, (
        "aiosmtpd's smtp_DATA changed: re-read mailbridge/smtp_data.py against it"
        " (tests/test_smtp_data.py compares both), then update the hash"
    )
    assert IntakeSMTP.smtp_DATA is ChunkedDataMixin.smtp_DATA


def test_stream_reader_buffer_for_the_peek() -> None:
    """ChunkedDataMixin peeks at StreamReader._buffer (read only) after a line."""
    loop = asyncio.new_event_loop()
    try:
        reader = asyncio.StreamReader(loop=loop)
        reader.feed_data(b"a\r\n.\r\n")
        assert isinstance(reader._buffer, bytearray)  # type: ignore[attr-defined]
        assert bytes(reader._buffer) == b"a\r\n.\r\n"  # type: ignore[attr-defined]
    finally:
        loop.close()


class _FullDirSMTP(IntakeSMTP):
    """IntakeSMTP as aiosmtpd sees an ordinary class: dir() with every name."""

    def __dir__(self) -> Iterable[str]:
        return object.__dir__(self)


class _FullDirHandler(IntakeHandler):
    def __dir__(self) -> Iterable[str]:
        return object.__dir__(self)


def _tables(smtp: SMTP) -> dict[str, Any]:
    """What SMTP.__init__ builds from dir(): by name, the function behind each entry."""

    def func(m: Any) -> Any:
        return getattr(m, "__func__", m)

    return {
        "commands": {k: func(v) for k, v in smtp._smtp_methods.items()},
        "auth": {k: (func(v.method), v.is_builtin) for k, v in smtp._auth_methods.items()},
        "hooks": {k: func(v) for k, v in smtp._handle_hooks.items()},
        "ehlo": smtp._ehlo_hook_ver,
    }


async def test_hook_names_only_gives_aiosmtpd_the_same_tables(tmp_path: Path) -> None:
    """intake.HookNamesOnly lists the hook names once per class (aiosmtpd read
    every attribute of the connection and its handler on each connection): the
    command, AUTH and hook tables must be those of an ordinary dir()."""
    assert "for mname, mfunc in inspect.getmembers(obj)" in SOURCE
    assert "for m in dir(self)" in SOURCE and "for m in dir(handler)" in SOURCE
    cert, key = self_signed(tmp_path)
    cfg = config_dict(tmp_path, smtp_password="s3cret-passphrase")
    cfg["smtp"]["tls"] = {"cert": str(cert), "key": str(key)}
    config = parse_config(cfg, base_dir=tmp_path)
    rules = build_rules(config)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    kw: dict[str, Any] = {"tls_context": tls, "loop": asyncio.get_running_loop()}
    fast_handler = IntakeHandler(config, rules, None, SystemClock(), lambda _: None)  # type: ignore[arg-type]
    full_handler = _FullDirHandler(config, rules, None, SystemClock(), lambda _: None)  # type: ignore[arg-type]
    fast = smtp_protocol(fast_handler, config.smtp, tls=tls)()
    full = _FullDirSMTP(full_handler, fast._gate, hostname=fast.hostname, **kw)
    assert _tables(fast) == _tables(full)
    assert {"DATA", "MAIL", "RCPT", "STARTTLS", "AUTH"} <= set(_tables(fast)["commands"])
    assert {"DATA", "MAIL", "RCPT", "exception"} <= set(_tables(fast)["hooks"])
    assert set(_tables(fast)["auth"]) == {"LOGIN", "PLAIN"}


async def test_a_closed_connection_is_freed_without_the_cyclic_gc(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd's connection refers to itself (its command tables, stream writer,
    handler task): intake empties it once the connection is over, so that
    reference counting frees it, not a 100+ ms collection every ~1 700
    connections. With the GC off, each connection's protocol must die: after
    QUIT, after the client just hangs up, and when turned away by the gate."""
    cert, key = self_signed(tmp_path)
    cfg = config_dict(tmp_path)
    cfg["smtp"]["tls"] = {"cert": str(cert), "key": str(key)}
    cfg["smtp"]["max_connections"] = 2
    config = parse_config(cfg, base_dir=tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    handler = IntakeHandler(config, build_rules(config), None, SystemClock(), lambda _: None)  # type: ignore[arg-type]
    make = smtp_protocol(handler, config.smtp, tls=tls)
    made: list[weakref.ref[IntakeSMTP]] = []

    def protocol() -> IntakeSMTP:
        p = make()
        made.append(weakref.ref(p))
        return p

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def clients() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:  # a dialogue, then QUIT
            c.ehlo("client.test")
            c.starttls(context=ssl._create_unverified_context())
            c.ehlo("client.test")
            c.mail("erp@client.test")
        c = smtplib.SMTP("127.0.0.1", port, timeout=10)  # in TLS, then a reset
        c.starttls(context=ssl._create_unverified_context())
        assert c.sock is not None
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
        hang_up = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert hang_up.recv(100).startswith(b"220")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)  # the 2nd slot
        assert held.recv(100).startswith(b"220")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as refused:
            assert refused.recv(100).startswith(b"421")  # turned away: over max_connections
        hang_up.close()
        held.close()

    gc.collect()
    gc.disable()
    try:
        await asyncio.to_thread(clients)
        deadline = loop.time() + 10
        while any(ref() is not None for ref in made) or len(made) < 5:
            assert loop.time() < deadline, (
                f"{sum(r() is not None for r in made)} left of {len(made)}"
            )
            await asyncio.sleep(0.01)  # polled: the closes are callbacks of the loop
    finally:
        gc.enable()
        server.close()
        await server.wait_closed()
    # Emptied, each still said what it would have said as it died: no error left unseen.
    assert "never retrieved" not in caplog.text
