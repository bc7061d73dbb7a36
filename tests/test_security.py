"""Access control and hostile clients (docs/security.md): STARTTLS, SMTP AUTH
per account, rate limits, connection limits and timeouts, relay attempts,
null senders, secrets in logs, constant-time lookups.

The real daemon runs as a subprocess (tests.support.DaemonProcess) for
everything that is about sockets; the rate limits run the daemon in-process
with a FakeClock so that time moves when the test says so. Clients are
smtplib, swaks and raw sockets. Waits are bounded polls, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import secrets
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

import mailbridge.intake
from mailbridge.app import Daemon, build_rules
from mailbridge.auth import Authenticator, find_account
from mailbridge.clock import FakeClock, SystemClock
from mailbridge.config import AccountConfig, Config, ConfigError, parse_config
from mailbridge.intake import IntakeHandler, _ip_allowed
from mailbridge.limits import ConnectionGate, RateLimiter, client_key
from tests.support import (
    INTAKE,
    KEYID,
    SENDER,
    DaemonProcess,
    ack_code,
    config_dict,
    maildir_reports,
    make_config,
    outbox_lines,
    reports_for,
    request_mail,
    send_on,
    wait_for,
    wait_reports,
    wire_bytes,
)
from tests.tls import client_context, self_signed

T = TypeVar("T")
PASSWORD = "correct-horse-battery-7Qx"  # account "test" (KEYID, client.test)
KEYID2 = "b7c1e0f2a9d84c3e5f60"  # account "other": no password, client.test and other.test
KEYID3 = "c0ffee00c0ffee00c0ff"  # account "fenced": password, allowed_ips 10.0.0.0/8
FENCED_PASSWORD = "fenced-pass-Zr81kq"
UNKNOWN_KEYID = "f00dfacef00dfacef00d"
WRONG_PASSWORD = "wrong-but-secret-P4ss"
NOON = datetime(2026, 11, 24, 11, 0, tzinfo=UTC)
needs_swaks = pytest.mark.skipif(
    shutil.which("swaks") is None, reason="scripts/test.sh installs it"
)


# -- helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def tls_config(tmp: Path, certs: tuple[Path, Path], required: bool = False, **smtp: Any) -> Any:
    """config_dict with STARTTLS and the three accounts described at the top."""
    cfg = config_dict(tmp, smtp_password=PASSWORD)
    cfg["smtp"].update(tls={"cert": str(certs[0]), "key": str(certs[1]), "required": required})
    cfg["smtp"].update(smtp)
    common = {"provider": "outbox", "commercial": False, "default_sender": "MaSociete"}
    cfg["accounts"] += [
        {"keyid": KEYID2, "name": "other", "sender_domains": ["client.test", "other.test"],
         **common},
        {"keyid": KEYID3, "name": "fenced", "sender_domains": ["fenced.test"],
         "smtp_password": FENCED_PASSWORD, "allowed_ips": ["10.0.0.0/8"], **common},
    ]  # fmt: skip
    return cfg


def starttls(port: int, cert: Path) -> smtplib.SMTP:
    """A session upgraded with STARTTLS; the certificate is verified against `cert`."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    smtp.ehlo()
    smtp.starttls(context=client_context(cert))
    smtp.ehlo()
    return smtp


def auth(smtp: smtplib.SMTP, mechanism: str, user: str, password: str) -> tuple[int, str]:
    """One AUTH exchange with `mechanism` only (smtp.login would try several)."""
    smtp.user, smtp.password = user, password
    method = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
    try:
        code, text = smtp.auth(mechanism, method)
    except smtplib.SMTPAuthenticationError as err:
        code, error = err.smtp_code, err.smtp_error
        assert isinstance(error, bytes)  # smtplib's replies are bytes
        text = error
    return code, text.decode()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def report_count(daemon: DaemonProcess) -> int:
    return len(maildir_reports(daemon.maildir))


def queued(reply: tuple[int, str]) -> bool:
    return reply[0] == 250 and "queued as" in reply[1]


def other_mail(**fields: str) -> Any:
    return request_mail(sender="erp@other.test", **{"keyid": KEYID2, **fields})


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]
) -> Iterator[DaemonProcess]:
    """STARTTLS offered (not required), AUTH for "test" and "fenced", DEBUG logs."""
    tmp = tmp_path_factory.mktemp("security")
    cfg = tls_config(tmp, certs, auth_failure_limit=1000)
    cfg["log_level"] = "DEBUG"
    proc = DaemonProcess(tmp, cfg).start()
    yield proc
    proc.stop()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """A daemon of its own for one test, with `smtp` overrides."""
    started: list[DaemonProcess] = []

    def run(cfg: dict[str, Any] | None = None, **smtp: Any) -> DaemonProcess:
        cfg = cfg or config_dict(tmp_path)
        cfg["smtp"].update(smtp)
        started.append(DaemonProcess(tmp_path, cfg).start())
        return started[-1]

    yield run
    for proc in started:
        proc.stop()


# -- STARTTLS --------------------------------------------------------------------


def test_tls_required_refuses_mail_before_starttls(
    start: Callable[..., DaemonProcess], tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    proc = start(tls_config(tmp_path, certs, required=True))
    with proc.smtp() as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, text = smtp.mail(SENDER)
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        assert smtp.docmd("AUTH", "PLAIN")[0] == 530
    email_id = secrets.token_hex(5)
    with starttls(proc.port, certs[0]) as smtp:  # verified against our certificate
        assert smtp.has_extn("auth") and "PLAIN" in smtp.esmtp_features["auth"]
        assert auth(smtp, "PLAIN", "test", PASSWORD)[0] == 235
        assert queued(send_on(smtp, request_mail(num="0601020304", sms="tls", emailId=email_id)))
    assert ack_code(wait_reports(proc.maildir, email_id)["ack"][0]) == 0


@needs_swaks
def test_swaks_starttls_with_auth_plain_and_login(
    daemon: DaemonProcess, certs: tuple[Path, Path]
) -> None:
    for mechanism in ("PLAIN", "LOGIN"):
        email_id = secrets.token_hex(5)
        body = wire_bytes(request_mail(num="0601020304", sms=mechanism, emailId=email_id))
        out = swaks(
            daemon.port, "-tls", "--tls-verify", "--tls-ca-path", str(certs[0]),
            "--from", SENDER, "--to", INTAKE, "--auth", mechanism, "--auth-user", "test",
            "--auth-password", PASSWORD, "--data", body.decode(),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "235 2.7.0 Authentication successful" in out.stdout
        assert "250 2.0.0 Ok: queued as" in out.stdout
        assert ack_code(wait_reports(daemon.maildir, email_id)["ack"][0]) == 0
    # Without -tls, AUTH is neither offered nor accepted: swaks cannot log in.
    out = swaks(daemon.port, "--from", SENDER, "--to", INTAKE, "--auth", "PLAIN",
                "--auth-user", "test", "--auth-password", PASSWORD)  # fmt: skip
    assert out.returncode != 0 and "<-  235" not in out.stdout


# -- SMTP AUTH -------------------------------------------------------------------


def test_auth_only_after_starttls(daemon: DaemonProcess, certs: tuple[Path, Path]) -> None:
    with daemon.smtp() as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, reply = smtp.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0test\0x").decode())
        assert (code, reply[:8]) == (538, b"5.7.11 E")
        # The password account's only sender domain is shared with "other", so
        # MAIL passes; the request itself needs an authenticated session.
        code, text = send_on(smtp, request_mail(num="0601020304", sms="x"))
        assert (code, text) == (530, "5.7.0 Authentication required for this account")
        # A sender that only password accounts allow is refused at MAIL already.
        assert smtp.mail("x@fenced.test") == (
            530,
            b"5.7.0 Authentication required for this account",
        )


def test_wrong_password_gets_535_at_once(daemon: DaemonProcess, certs: tuple[Path, Path]) -> None:
    with starttls(daemon.port, certs[0]) as smtp:
        for mechanism, user, password in (
            ("PLAIN", "test", WRONG_PASSWORD),
            ("LOGIN", "test", WRONG_PASSWORD),
            ("PLAIN", "nobody", PASSWORD),
            ("PLAIN", "TEST", PASSWORD),  # user names are exact
            ("PLAIN", "test", PASSWORD + " "),
            ("PLAIN", KEYID, PASSWORD),  # the keyid is not the user name
        ):
            began = time.monotonic()
            assert auth(smtp, mechanism, user, password) == (
                535, "5.7.8 Authentication credentials invalid"
            ), (mechanism, user, password)  # fmt: skip
            assert time.monotonic() - began < 10  # no hang until the client's timeout
        # The session may try again; LOGIN works as well as PLAIN.
        assert auth(smtp, "LOGIN", "test", PASSWORD)[0] == 235


def test_authentication_binds_the_session_to_its_account(
    daemon: DaemonProcess, certs: tuple[Path, Path]
) -> None:
    before = report_count(daemon)
    with starttls(daemon.port, certs[0]) as smtp:
        assert auth(smtp, "PLAIN", "test", PASSWORD)[0] == 235
        # Another account's keyid, even one that needs no password: refused.
        code, text = send_on(smtp, request_mail(num="0601020304", sms="x", keyid=KEYID2))
        assert (code, text.split()[0]) == (550, "5.7.1") and "another account" in text
        # A sender only another account allows: refused at MAIL.
        assert smtp.mail("erp@other.test")[0] == 550
        smtp.rset()
        # Sender checks still apply to an authenticated session.
        msg = request_mail(num="0601020304", sms="x", sender="boss@evil.test")
        assert send_on(smtp, msg, sender=SENDER)[0] == 550
    with starttls(daemon.port, certs[0]) as smtp:
        # So do IP checks: "fenced" authenticates but 127.0.0.1 is not in its allowed_ips.
        assert auth(smtp, "PLAIN", "fenced", FENCED_PASSWORD)[0] == 235
        msg = request_mail(num="0601020304", sms="x", keyid=KEYID3, sender="erp@fenced.test")
        code, text = send_on(smtp, msg)
        assert (code, text.split()[0]) == (550, "5.7.1") and "127.0.0.1" in text
    assert report_count(daemon) == before  # refusals mail nothing
    # An account without a password still takes plain, unauthenticated mail.
    email_id = secrets.token_hex(5)
    assert queued(daemon.send(other_mail(num="0601020304", sms="plain", emailId=email_id)))
    wait_reports(daemon.maildir, email_id)


# -- not an open relay, no backscatter -----------------------------------------------


@needs_swaks
def test_swaks_relay_attempts_and_null_sender(daemon: DaemonProcess) -> None:
    before = (report_count(daemon), len(outbox_lines(daemon.outbox)))
    foreign = "victim@gmail.com,abuse@example.org,sendsms@bridge.test.evil.test"
    out = swaks(daemon.port, "--from", "erp@other.test", "--to", foreign)
    assert out.returncode != 0
    assert out.stdout.count("550 5.1.1") == 3 and "-> DATA" not in out.stdout
    # One intake address among foreign ones: the foreign ones are still refused.
    out = swaks(daemon.port, "--from", "erp@other.test", "--to", f"victim@gmail.com,{INTAKE}",
                "--quit-after", "RCPT")  # fmt: skip
    assert "550 5.1.1 <victim@gmail.com>" in out.stdout and "250 2.1.5" in out.stdout
    # A bounce (null sender) carrying a perfectly valid request: refused at MAIL.
    body = wire_bytes(other_mail(num="0601020304", sms="bounce")).decode()
    out = swaks(daemon.port, "--from", "<>", "--to", INTAKE, "--data", body)
    assert out.returncode != 0
    assert "550 5.7.1 Null sender <> refused" in out.stdout and "-> DATA" not in out.stdout
    assert (report_count(daemon), len(outbox_lines(daemon.outbox))) == before


def test_relay_tricks_in_rcpt(daemon: DaemonProcess) -> None:
    with daemon.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail("erp@other.test")[0] == 250
        for trick in (
            "victim%gmail.com@bridge.test",  # percent hack
            "@bridge.test:victim@gmail.com",  # source route
            '"sendsms@bridge.test"@evil.test',
            "sendsms@bridge.test.",
            "victim@gmail.com",
        ):
            code, text = smtp.rcpt(trick)
            assert code in (550, 553), (trick, code, text)
        assert smtp.rcpt(INTAKE.upper())[0] == 250  # addresses compare case-insensitively


def test_command_flood_is_cut(daemon: DaemonProcess) -> None:
    with daemon.smtp() as smtp:
        for _ in range(mailbridge.intake.COMMAND_LIMITS["NOOP"]):
            assert smtp.noop()[0] == 250
        assert smtp.noop() == (421, b"4.7.0 NOOP sent too many times")


# -- connection limit and timeouts ---------------------------------------------------


def connect(port: int) -> tuple[socket.socket, bytes]:
    """A raw connection and its first line (the greeting or a refusal)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock, sock.makefile("rb").readline()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before {marker!r}: {data!r}"
        data += chunk
    return data


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def greeted(port: int, n: int) -> list[socket.socket] | None:
    """n connections that all got 220, or None (and all closed) if one did not."""
    opened = [connect(port) for _ in range(n)]
    if all(line.startswith(b"220 ") for _, line in opened):
        return [sock for sock, _ in opened]
    for sock, _ in opened:
        sock.close()
    return None


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_connection_limit_421_and_a_freed_slot_serves_at_once(
    start: Callable[..., DaemonProcess],
) -> None:
    limit = 5
    proc = start(max_connections=limit, max_connections_per_ip=100, timeout_s=120)
    idle = greeted(proc.port, limit)
    assert idle is not None
    for _ in range(limit + 5):  # over the limit: a reply that says so, then closed
        sock, line = connect(proc.port)
        assert line == b"421 4.7.0 Too many connections, try again later\r\n"
        assert read_to_eof(sock) == b""
        sock.close()
    idle.pop().close()  # one slot frees: a normal client is served
    reply = wait_for(lambda: try_send(proc), what="a slot after one client left")
    assert queued(reply)
    close_all(idle)
    # Nothing leaked, in either direction: exactly `limit` slots again.
    full = wait_for(lambda: greeted(proc.port, limit), what="every slot free again")
    sock, line = connect(proc.port)
    assert line.startswith(b"421 4.7.0")
    close_all([*full, sock])


def try_send(proc: DaemonProcess) -> tuple[int, str] | None:
    try:
        return proc.send(request_mail(num="0601020304", sms="x"))
    except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected):
        return None  # still full: the slot is released when the server sees the close


def test_connection_limit_per_client_address(start: Callable[..., DaemonProcess]) -> None:
    proc = start(max_connections=50, max_connections_per_ip=3)
    held = greeted(proc.port, 3)
    assert held is not None
    sock, line = connect(proc.port)
    assert line == b"421 4.7.0 Too many connections from your address, try again later\r\n"
    close_all([*held, sock])


def test_starttls_sessions_do_not_leak_connection_slots(
    start: Callable[..., DaemonProcess], tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    """aiosmtpd calls connection_made again after STARTTLS, and connection_lost
    itself after a failed handshake; the count must not drift either way."""
    proc = start(tls_config(tmp_path, certs), max_connections=3)
    for _ in range(4):
        with starttls(proc.port, certs[0]) as smtp:
            assert smtp.noop()[0] == 250
    for _ in range(3):  # STARTTLS, then not TLS at all
        sock, _ = connect(proc.port)
        sock.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        read_until(sock, b"220 Ready")
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(300))
        read_to_eof(sock)
        sock.close()
    full = wait_for(lambda: greeted(proc.port, 3), what="3 free slots after TLS sessions")
    sock, line = connect(proc.port)
    assert line.startswith(b"421 4.7.0")  # and still no more than 3
    close_all([*full, sock])


def test_idle_dribbling_and_slow_data_clients_are_cut_after_timeout(
    start: Callable[..., DaemonProcess],
) -> None:
    timeout = 2.0
    proc = start(timeout_s=timeout, hostname="mx.bridge.test")
    email_id = secrets.token_hex(5)
    results: dict[str, tuple[bytes, float]] = {}

    def client(name: str, prelude: bytes, drip: bytes) -> None:
        sock, _ = connect(proc.port)
        sock.sendall(prelude)
        began, seen = time.monotonic(), b""
        sock.settimeout(0.3)
        while time.monotonic() - began < 60:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:  # quiet: drip one more byte, never a whole line
                with contextlib.suppress(OSError):
                    sock.sendall(drip)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break  # closed by the server
            seen += chunk
        results[name] = (seen, time.monotonic() - began)
        sock.close()

    data = wire_bytes(request_mail(num="0601020304", sms="slow", emailId=email_id))
    clients = {
        "idle": (b"", b""),  # connects and says nothing
        "dribble": (b"", b"N"),  # a command that never ends
        "slow_data": (f"EHLO x\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{INTAKE}>\r\nDATA\r\n".encode()
                      + data[:200], b"x"),  # a body that never ends
    }  # fmt: skip
    threads = [threading.Thread(target=client, args=(n, *a)) for n, a in clients.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    for name in clients:
        seen, elapsed = results[name]
        assert seen.endswith(b"421 4.4.2 mx.bridge.test Error: timeout exceeded\r\n"), (name, seen)
        assert timeout * 0.25 <= elapsed < 50, (name, elapsed)  # cut, though never silent
    assert queued(proc.send(request_mail(num="0601020304", sms="x")))  # still serving
    assert reports_for(proc.maildir, email_id) == {"ack": [], "not": []}  # nothing stored


def test_slow_clients_in_data_do_not_stall_the_others(start: Callable[..., DaemonProcess]) -> None:
    proc = start(max_connections=20, timeout_s=120)
    slow_ids = [secrets.token_hex(5) for _ in range(10)]
    slow = []
    for email_id in slow_ids:
        sock, _ = connect(proc.port)
        sock.sendall(f"EHLO x\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{INTAKE}>\r\nDATA\r\n".encode())
        msg = wire_bytes(request_mail(num="0601020304", sms="slow", emailId=email_id))
        sock.sendall(msg[: len(msg) // 2])  # half a message, then nothing
        slow.append(sock)
    for sock in slow:
        read_until(sock, b"354 ")
    email_id = secrets.token_hex(5)
    began = time.monotonic()
    assert queued(proc.send(request_mail(num="0601020304", sms="fast", emailId=email_id)))
    assert time.monotonic() - began < 30  # not held up behind the slow ones
    wait_reports(proc.maildir, email_id)
    close_all(slow)  # cut mid-DATA: nothing of theirs is stored
    assert all(reports_for(proc.maildir, i) == {"ack": [], "not": []} for i in slow_ids)


# -- rate limits, with the daemon in-process and a FakeClock ------------------------


@pytest.fixture
async def inproc(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """start(cfg=None, **smtp) -> (daemon, clock, port): time moves only on clock.advance."""
    started: list[Daemon] = []

    async def run(cfg: dict[str, Any] | None = None, **smtp: Any) -> tuple[Daemon, FakeClock, int]:
        cfg = cfg or config_dict(tmp_path)
        cfg["smtp"].update(smtp)
        # One process: the FakeClock must rule the send and report stages too.
        cfg.setdefault("dispatch", {})["separate_process"] = False
        clock = FakeClock(NOON)
        daemon = Daemon(parse_config(cfg, base_dir=tmp_path), clock=clock)
        await daemon.start()
        started.append(daemon)
        return daemon, clock, daemon.addresses[0][1]

    yield run
    for daemon in started:
        await daemon.stop()


async def eventually(predicate: Callable[[], T], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
    return value


async def stored(daemon: Daemon, clock: FakeClock) -> int:
    assert daemon.store is not None
    counts = (await daemon.store.status(clock.time())).requests
    assert isinstance(counts, dict)
    return sum(counts.values())


def submit(port: int, msg: Any, sender: str | None = None) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return send_on(smtp, msg, sender)


async def test_ip_rate_limit_450_at_mail_then_accepted_later(
    inproc: Callable[..., Any], tmp_path: Path
) -> None:
    daemon, clock, port = await inproc(ip_rate_limit=3, rate_window_s=60)
    ids = [secrets.token_hex(5) for _ in range(4)]
    for email_id in ids[:3]:
        msg = request_mail(num="0601020304", sms="x", emailId=email_id)
        assert queued(await asyncio.to_thread(submit, port, msg))
    late = request_mail(num="0601020304", sms="late", emailId=ids[3])
    reply = await asyncio.to_thread(submit, port, late)
    assert reply == (450, "4.7.1 Too much mail from 127.0.0.1, try again later")
    assert await stored(daemon, clock) == 3  # nothing stored for the refused one
    clock.advance(60 / 3 - 1)  # not yet a whole token back
    assert (await asyncio.to_thread(submit, port, late))[0] == 450
    clock.advance(1.5)
    assert queued(await asyncio.to_thread(submit, port, late))  # the client's retry
    await eventually(lambda: reports_for(tmp_path / "reports", ids[3])["not"])
    texts = [line["text"] for line in outbox_lines(tmp_path / "outbox.jsonl")]
    assert texts.count("late") == 1


async def test_account_rate_limit_450_after_data_then_accepted_later(
    inproc: Callable[..., Any], tmp_path: Path
) -> None:
    cfg = config_dict(tmp_path, rate_limit=2)
    daemon, clock, port = await inproc(cfg, rate_window_s=60)
    # A refused message does not spend the account's budget.
    forged = request_mail(num="0601020304", sms="x", sender="boss@evil.test")
    assert (await asyncio.to_thread(submit, port, forged, SENDER))[0] == 550
    for _ in range(2):
        assert queued(
            await asyncio.to_thread(submit, port, request_mail(num="0601020304", sms="x"))
        )
    email_id = secrets.token_hex(5)
    third = request_mail(num="0601020304", sms="third", emailId=email_id)

    def dialogue() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            return [smtp.mail(SENDER), smtp.rcpt(INTAKE), smtp.data(wire_bytes(third))]

    mail, rcpt, data = await asyncio.to_thread(dialogue)
    assert (mail[0], rcpt[0]) == (250, 250)  # the account is only known after DATA
    assert data == (450, b"4.7.1 Too many messages for this account, try again later")
    assert await stored(daemon, clock) == 2
    clock.advance(60 / 2 + 0.5)
    assert queued(await asyncio.to_thread(submit, port, third))
    nots = await eventually(lambda: reports_for(tmp_path / "reports", email_id)["not"])
    assert len(nots) == 1
    assert [line["text"] for line in outbox_lines(tmp_path / "outbox.jsonl")].count("third") == 1


async def test_auth_failures_lock_out_a_client_then_recover(
    inproc: Callable[..., Any], tmp_path: Path, certs: tuple[Path, Path]
) -> None:
    daemon, clock, port = await inproc(tls_config(tmp_path, certs), auth_failure_limit=3)

    def attempt(password: str) -> tuple[int, str]:
        with starttls(port, certs[0]) as smtp:
            return auth(smtp, "PLAIN", "test", password)

    for _ in range(3):
        assert (await asyncio.to_thread(attempt, WRONG_PASSWORD))[0] == 535
    # Locked: even the right password gets a temporary refusal, not a verdict.
    locked = await asyncio.to_thread(attempt, PASSWORD)
    assert locked == (454, "4.7.0 Too many failed authentications, try again later")
    clock.advance(60 / 3 + 0.5)
    assert (await asyncio.to_thread(attempt, PASSWORD))[0] == 235


def test_config_with_auth_but_no_tls_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path, smtp_password=PASSWORD)
    assert "accounts[0].smtp_password: needs smtp.tls" in "\n".join(err.value.problems)


# -- units: lookups, addresses, limiters, config -----------------------------------


def test_find_account_only_on_an_exact_match(tmp_path: Path) -> None:
    cfg = config_dict(tmp_path)
    unicode_key = "cl\u00e9-\u03a9-2024"  # precomposed é
    cfg["accounts"].append({**cfg["accounts"][0], "keyid": unicode_key, "name": "u"})
    config = parse_config(cfg, base_dir=tmp_path)
    assert find_account(config, KEYID) is config.accounts[0]
    assert find_account(config, unicode_key) is config.accounts[1]
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in KEYID)
    for variant in (
        KEYID.upper(), f" {KEYID}", f"{KEYID}\n", f"{KEYID}\u00a0", KEYID[:-1], KEYID + "0",
        KEYID[:10] + "\u200b" + KEYID[10:], fullwidth, "", "\udcff" + KEYID,
        "cle\u0301-\u03a9-2024",  # the same text, decomposed (NFD)
        "CL\u00c9-\u03a9-2024",
    ):  # fmt: skip
        assert find_account(config, variant) is None, repr(variant)


def test_keyids_go_through_find_account_which_compares_every_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(tls_config(tmp_path, self_signed(tmp_path)), base_dir=tmp_path)
    calls: list[int] = []
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counted)
    for keyid in (KEYID, KEYID3, "nope"):  # first, last, none: the same work every time
        calls.clear()
        find_account(config, keyid)
        assert len(calls) == len(config.accounts)
    monkeypatch.setattr(hmac, "compare_digest", real)
    seen: list[str] = []

    def recorded(cfg: Config, keyid: str) -> AccountConfig | None:
        seen.append(keyid)
        return find_account(cfg, keyid)

    monkeypatch.setattr(mailbridge.intake, "find_account", recorded)
    handler = IntakeHandler(config, build_rules(config), None, SystemClock(), lambda _: None)  # type: ignore[arg-type]
    raw = wire_bytes(other_mail(num="0601020304", sms="x", keyid=f"  {KEYID2}\t"))
    examined = handler.examine(raw, "erp@other.test", ("127.0.0.1", 1), "127.0.0.1")
    assert examined is not None and examined.account is config.accounts[1]
    assert seen == [KEYID2]  # trimmed (SPEC), then compared exactly


def test_ipv4_mapped_and_ipv6_client_addresses(tmp_path: Path) -> None:
    account = make_config(tmp_path, allowed_ips=["127.0.0.0/8", "2001:db8::/32"]).accounts[0]
    for peer, allowed in (
        (("::ffff:127.0.0.1", 2525, 0, 0), True),  # a dual-stack socket's view of IPv4
        (("::ffff:10.0.0.1", 2525, 0, 0), False),
        (("::1", 2525, 0, 0), False),  # ::1 is not 127.0.0.1
        (("2001:db8:5::1", 2525, 0, 0), True),
        (("fe80::1%eth0", 2525, 0, 2), False),
        ("not an address", False),
    ):
        assert _ip_allowed(peer, account) is allowed, peer
    assert client_key(("::ffff:192.0.2.7", 1, 0, 0)) == client_key(("192.0.2.7", 1)) == "192.0.2.7"
    # One IPv6 host holds a /64: its addresses share one budget; the next /64 does not.
    assert client_key(("2001:db8:1:2::1", 1)) == client_key(("2001:db8:1:2:ffff::9", 1))
    assert client_key(("2001:db8:1:2::1", 1)) != client_key(("2001:db8:1:3::1", 1))


def test_rate_limiter_is_a_token_bucket() -> None:
    clock = FakeClock(NOON)
    limiter = RateLimiter(3, 60, clock)
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # keys are independent
    clock.advance(19)
    assert not limiter.available("a")
    clock.advance(1.5)
    assert limiter.allow("a") and not limiter.allow("a")
    clock.advance(-3600)  # a clock going backwards gives nothing back
    assert not limiter.allow("a")
    limiter.charge("a")  # failures count even past the limit, never below zero
    clock.set(NOON)
    unlimited = RateLimiter(0, 60, clock)
    assert all(unlimited.allow("a") for _ in range(10_000)) and len(unlimited) == 0
    small = RateLimiter(1, 60, clock, max_keys=2)
    for key in "abc":
        small.allow(key)
    assert len(small) == 2  # bounded memory: the least recently used key went


def test_connection_gate_counts_admitted_connections_only() -> None:
    gate = ConnectionGate(total=3, per_key=2)
    assert [gate.admit("a"), gate.admit("a"), gate.admit("a")] == [None, None, "per_key"]
    assert gate.admit("b") is None and gate.admit("c") == "total"
    assert gate.open == 3  # the refused ones took no slot
    gate.release("a")
    assert gate.admit("c") is None and gate.open == 3


def test_config_checks_for_tls_and_auth(tmp_path: Path, certs: tuple[Path, Path]) -> None:
    def problems(cfg: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config(cfg, base_dir=tmp_path)
        assert "too-short" not in str(err.value)  # a password is never echoed
        return "\n".join(err.value.problems)

    assert "accounts[0].smtp_password: at least 12 characters" in problems(
        config_dict(tmp_path, smtp_password="too-short")
    )
    assert "accounts[0]: an account with smtp_password needs a name" in problems(
        config_dict(tmp_path, smtp_password=PASSWORD, name=None)
    )
    cfg = config_dict(tmp_path)
    cfg["smtp"]["tls"] = {"cert": str(tmp_path / "missing.pem"), "key": str(certs[1])}
    assert "smtp.tls: cert: cannot read" in problems(cfg)
    other = self_signed(tmp_path)
    cfg["smtp"]["tls"] = {"cert": str(certs[0]), "key": str(other[1])}
    assert "smtp.tls: cert/key: not a matching PEM certificate and key" in problems(cfg)
    # Across sections: AUTH needs TLS, and AUTH user names are unique.
    assert "accounts[0].smtp_password: needs smtp.tls (AUTH is only accepted over TLS)" in (
        problems(config_dict(tmp_path, smtp_password=PASSWORD))
    )
    cfg = tls_config(tmp_path, certs)
    cfg["accounts"][2]["name"] = "test"
    assert (
        "accounts[2].name: 'test' is also the name of accounts[0]; AUTH user names must be unique"
        in problems(cfg)
    )
    config = parse_config(tls_config(tmp_path, certs), base_dir=tmp_path)
    assert PASSWORD not in repr(config) and KEYID not in repr(config)
    unnamed = make_config(tmp_path, name=None).accounts[0]
    assert unnamed.label.startswith("key-") and KEYID[:4] not in unnamed.label


def test_authenticator_compares_names_and_passwords_exactly(tmp_path: Path) -> None:
    config = parse_config(tls_config(tmp_path, self_signed(tmp_path)), base_dir=tmp_path)
    clock = FakeClock(NOON)
    authenticator = Authenticator(
        config.accounts, RateLimiter(5, 60, clock), RateLimiter(1, 60, clock)
    )
    assert authenticator.find(b"test", PASSWORD.encode()) is config.accounts[0]
    assert authenticator.find(b"fenced", FENCED_PASSWORD.encode()) is config.accounts[2]
    for user, password in (
        (b"test", FENCED_PASSWORD.encode()),  # another account's password
        (b"other", b""),  # an account without a password cannot log in
        (b"test", PASSWORD.encode() + b"\0"),
        (b"test\0", PASSWORD.encode()),
        (b"", b""),
    ):
        assert authenticator.find(user, password) is None, (user, password)


# -- last: everything above went through this daemon's log ---------------------------


def test_secrets_never_reach_the_log(daemon: DaemonProcess, certs: tuple[Path, Path]) -> None:
    email_id = secrets.token_hex(5)
    with starttls(daemon.port, certs[0]) as smtp:
        assert auth(smtp, "PLAIN", "test", WRONG_PASSWORD)[0] == 535
        assert auth(smtp, "LOGIN", "test", WRONG_PASSWORD)[0] == 535
        assert auth(smtp, "PLAIN", "test", PASSWORD)[0] == 235
        assert queued(send_on(smtp, request_mail(num="0601020304", sms="x", emailId=email_id)))
    with starttls(daemon.port, certs[0]) as smtp:
        assert auth(smtp, "LOGIN", "fenced", FENCED_PASSWORD)[0] == 235
    assert daemon.send(other_mail(num="0601020304", sms="x", keyid=UNKNOWN_KEYID))[0] == 550
    assert daemon.send(request_mail(num="0601020304", sms="x"))[0] == 530  # no AUTH
    wait_reports(daemon.maildir, email_id)
    log = wait_for(lambda: (text := daemon.log()) and "request" in text and text)
    # The events were logged...
    for event in ("authenticated as test", "authenticated as fenced", "failed (535)",
                  "unknown keyid", "Authentication required", f"emailId {email_id}"):  # fmt: skip
        assert event in log, event
    # ...and no secret, plain or base64 as on the wire, is in there.
    plain = [PASSWORD, WRONG_PASSWORD, FENCED_PASSWORD, KEYID, KEYID2, KEYID3, UNKNOWN_KEYID]
    wire = [f"\0test\0{PASSWORD}", f"\0test\0{WRONG_PASSWORD}", PASSWORD, WRONG_PASSWORD,
            FENCED_PASSWORD]  # fmt: skip
    for secret in plain + [base64.b64encode(w.encode()).decode() for w in wire]:
        assert secret not in log, secret
    assert "Traceback" not in log and "deprecated" not in log  # hostile input is no error
