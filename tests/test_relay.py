"""The report relay client (mailbridge.relay) against relays that misbehave on
cue: a scripted SMTP server in the test's loop (exact replies, timeouts, a
dropped connection), aiosmtpd with STARTTLS, implicit TLS and AUTH, and a
real Postfix (PIPELINING, STARTTLS, refusals per RCPT and at the end of DATA)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailbridge.config import RelayConfig
from mailbridge.mailer import Letter, SmtpRelaySink
from mailbridge.model import ReportJob
from mailbridge.relay import Outgoing, RelayConnection, RelayUnavailable
from tests.postfix import PostfixInstance, free_port, postfix_unavailable
from tests.tls import self_signed

# -- a scripted relay ----------------------------------------------------------------


@dataclass
class Script:
    """What the scripted relay answers. Replies are full lines ("550 5.1.1 no")."""

    pipelining: bool = True
    size: int | None = None
    rcpt: dict[str, str] = field(default_factory=dict)  # recipient -> reply to RCPT
    data_end: dict[str, str] = field(default_factory=dict)  # recipient -> reply to "."
    mail_421_at: int | None = None  # the nth MAIL (1-based) gets 421 and the connection closes
    silent_at: str | None = None  # "MAIL" or "DATA-END": from there on, never answer
    drop_at_data_end: int | None = None  # close the connection on the nth message's "."
    data_without_rcpt: bool = False  # 354 to DATA even with no valid recipient


@dataclass
class Transaction:
    recipient: str
    content: bytes  # as received (dot-stuffing undone, CRLF)


class ScriptedSmtp(asyncio.Protocol):
    """One connection of the scripted relay. With PIPELINING, holds the
    replies to MAIL, RCPT and RSET until DATA comes (a client that waits for
    them before sending DATA never gets them): only a pipelining client gets
    through."""

    def __init__(self, relay: ScriptedRelay) -> None:
        self.relay = relay
        self.script = relay.script
        self.buffer = b""
        self.held: list[bytes] = []
        self.in_data = False
        self.content = b""
        self.rcpt_ok: list[str] = []
        self.mails = 0
        self.silent = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.relay.connections += 1
        transport.write(b"220 scripted ESMTP\r\n")

    def reply(self, line: str, hold: bool = False) -> None:
        if self.silent:
            return
        self.held.append(line.encode() + b"\r\n")
        if not hold:
            assert self.transport is not None
            self.transport.write(b"".join(self.held))
            self.held = []

    def data_received(self, data: bytes) -> None:
        self.relay.chunks.append(data)
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            line += b"\n"
            if self.in_data:
                self.content_line(line)
            else:
                self.command(line.rstrip(b"\r\n").decode())
            if self.transport is None or self.transport.is_closing():
                return

    def content_line(self, line: bytes) -> None:
        if line != b".\r\n":
            self.content += line[1:] if line.startswith(b".") else line
            return
        self.in_data = False
        self.relay.ends += 1
        if self.script.silent_at == "DATA-END":
            self.silent = True
        if self.script.drop_at_data_end == self.relay.ends:
            assert self.transport is not None
            self.transport.close()
            return
        if not self.rcpt_ok:
            self.reply("554 5.5.1 Error: no valid recipients")
            return
        recipient = self.rcpt_ok[0]
        answer = self.script.data_end.get(recipient, "250 2.0.0 queued")
        if answer.startswith("250"):
            self.relay.received.append(Transaction(recipient, self.content))
        self.reply(answer)
        self.rcpt_ok = []

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        self.relay.commands.append(line)
        hold = self.script.pipelining
        if verb == "EHLO":
            ext = ["PIPELINING"] if self.script.pipelining else []
            if self.script.size is not None:
                ext.append(f"SIZE {self.script.size}")
            lines = ["scripted", *ext]
            for i, text in enumerate(lines):
                self.reply(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
        elif verb == "MAIL":
            self.relay.mails += 1
            if self.script.silent_at == "MAIL":
                self.silent = True
            if self.script.mail_421_at == self.relay.mails:
                self.reply("421 4.3.2 shutting down")
                assert self.transport is not None
                self.transport.close()
                return
            self.rcpt_ok = []
            self.reply("250 2.1.0 ok", hold)
        elif verb == "RCPT":
            recipient = line.split(":", 1)[1].strip().strip("<>")
            answer = self.script.rcpt.get(recipient, "250 2.1.5 ok")
            if answer.startswith("25"):
                self.rcpt_ok.append(recipient)
            self.reply(answer, hold)
        elif verb == "DATA":
            if self.rcpt_ok or self.script.data_without_rcpt:
                self.in_data, self.content = True, b""
                self.reply("354 go ahead")
            else:
                self.reply("554 5.5.1 Error: no valid recipients")
        elif verb == "RSET":
            self.rcpt_ok = []
            self.reply("250 2.0.0 ok", hold)
        elif verb == "QUIT":
            self.reply("221 bye")
            assert self.transport is not None
            self.transport.close()
        else:
            self.reply("502 5.5.2 unknown")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


@dataclass
class ScriptedRelay:
    script: Script
    port: int = 0
    connections: int = 0
    mails: int = 0
    ends: int = 0
    chunks: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    received: list[Transaction] = field(default_factory=list)

    def config(self, **kw: Any) -> RelayConfig:
        return RelayConfig(host="127.0.0.1", port=self.port, **{"timeout_s": 5.0, **kw})


async def serve(script: Script) -> tuple[ScriptedRelay, asyncio.Server]:
    relay = ScriptedRelay(script)
    server = await asyncio.get_running_loop().create_server(
        lambda: ScriptedSmtp(relay), "127.0.0.1", 0
    )
    relay.port = server.sockets[0].getsockname()[1]
    return relay, server


def letter(to: str, body: str = "hello\n") -> Outgoing:
    mail = f"From: mb@bridge.test\nTo: {to}\nSubject: t\n\n{body}".encode()
    return Outgoing("", to, mail)


async def send(relay: ScriptedRelay, letters: list[Outgoing], **kw: Any) -> list[Any]:
    conn = await RelayConnection.open(relay.config(**kw))
    try:
        return await conn.send(letters)
    finally:
        await conn.quit()


def kinds(outcomes: list[Any]) -> list[str]:
    return [type(o).__name__ if o is not None else "sent" for o in outcomes]


# -- the scripted relay: pipelining and the replies of each transaction ---------------


async def test_a_group_is_pipelined_and_each_message_arrives_intact() -> None:
    relay, server = await serve(Script())
    try:
        bodies = ["one\n", ".starts with a dot\n..two dots\n.\n", "no final newline"]
        outcomes = await send(relay, [letter(f"r{i}@client.test", b) for i, b in enumerate(bodies)])
    finally:
        server.close()
    assert outcomes == [None, None, None]
    assert [t.recipient for t in relay.received] == [
        "r0@client.test",
        "r1@client.test",
        "r2@client.test",
    ]
    for t, body in zip(relay.received, bodies, strict=True):
        sent = letter(t.recipient, body).mail
        crlf = sent.replace(b"\n", b"\r\n")
        assert t.content == (crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n")
    # MAIL, RCPT and DATA of a transaction went in one write; the content of
    # one and the envelope of the next in one write too.
    envelopes = [c for c in relay.chunks if c.startswith(b"MAIL")]
    assert envelopes and all(b"RCPT TO:" in c and c.endswith(b"DATA\r\n") for c in envelopes)
    assert any(b"\r\n.\r\nMAIL FROM:<>" in c for c in relay.chunks)


async def test_each_taken_letter_is_told_before_the_next_content_goes() -> None:
    # The mailer records `sent` there: a crash then repeats only what it had not
    # recorded, not the whole group (mailer.SentMarks).
    relay, server = await serve(Script(rcpt={"r1@client.test": "550 5.1.1 no such user"}))
    told: list[tuple[int, int]] = []  # (letter, messages the relay had by then)

    async def accepted(i: int) -> None:
        told.append((i, len(relay.received)))

    conn = await RelayConnection.open(relay.config())
    try:
        letters = [letter(f"r{i}@client.test") for i in range(4)]
        outcomes = await conn.send(letters, accepted)
    finally:
        await conn.quit()
        server.close()
    assert kinds(outcomes) == ["sent", "ReportRefused", "sent", "sent"]
    assert told == [(0, 1), (2, 2), (3, 3)]  # refused r1 is never told


async def test_a_refused_recipient_fails_its_report_only() -> None:
    script = Script(
        rcpt={"gone@client.test": "550 5.1.1 no such user", "busy@client.test": "451 4.3.0 later"}
    )
    relay, server = await serve(script)
    try:
        to = ["a@client.test", "gone@client.test", "busy@client.test", "b@client.test"]
        outcomes = await send(relay, [letter(t) for t in to])
    finally:
        server.close()
    assert kinds(outcomes) == ["sent", "ReportRefused", "RelayUnavailable", "sent"]
    assert "550 5.1.1" in str(outcomes[1]) and "451 4.3.0" in str(outcomes[2])
    assert [t.recipient for t in relay.received] == ["a@client.test", "b@client.test"]
    # After each refused envelope, RSET before the next MAIL.
    verbs = [c.split(" ")[0].split(":")[0] for c in relay.commands if not c.startswith("EHLO")]
    assert verbs[:13] == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "RSET",
                          "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT"]  # fmt: skip


async def test_a_refused_content_fails_its_report_only() -> None:
    script = Script(
        data_end={"spam@client.test": "554 5.7.1 rejected", "full@client.test": "452 4.3.1 full"}
    )
    relay, server = await serve(script)
    try:
        to = ["spam@client.test", "a@client.test", "full@client.test", "b@client.test"]
        outcomes = await send(relay, [letter(t) for t in to])
    finally:
        server.close()
    assert kinds(outcomes) == ["ReportRefused", "sent", "RelayUnavailable", "sent"]
    assert [t.recipient for t in relay.received] == ["a@client.test", "b@client.test"]


async def test_data_accepted_after_a_refused_recipient_gets_an_empty_message() -> None:
    script = Script(rcpt={"gone@client.test": "550 5.1.1 no such user"}, data_without_rcpt=True)
    relay, server = await serve(script)
    try:
        outcomes = await send(relay, [letter("gone@client.test"), letter("a@client.test")])
    finally:
        server.close()
    assert kinds(outcomes) == ["ReportRefused", "sent"]
    assert [t.recipient for t in relay.received] == ["a@client.test"]


async def test_without_pipelining_one_command_at_a_time() -> None:
    relay, server = await serve(Script(pipelining=False, rcpt={"gone@client.test": "550 no"}))
    try:
        outcomes = await send(
            relay, [letter(t) for t in ("a@client.test", "gone@client.test", "b@client.test")]
        )
    finally:
        server.close()
    assert kinds(outcomes) == ["sent", "ReportRefused", "sent"]
    # Every read of the relay held one command or one message, never more.
    commands = [c for c in relay.chunks if not c.startswith((b"From:", b"EHLO"))]
    assert all(c.count(b"\r\n") == 1 for c in commands), commands
    # No DATA after the refused RCPT: the next command is RSET.
    i = relay.commands.index("RCPT TO:<gone@client.test>")
    assert relay.commands[i + 1] == "RSET"


async def test_over_the_advertised_size_is_refused_without_sending() -> None:
    relay, server = await serve(Script(size=200))
    try:
        outcomes = await send(
            relay, [letter("a@client.test"), letter("big@client.test", "x" * 300)]
        )
    finally:
        server.close()
    assert kinds(outcomes) == ["sent", "ReportRefused"]
    assert "SIZE limit of 200" in str(outcomes[1])
    assert not any("big@" in c for c in relay.commands)
    assert any(c.startswith("MAIL FROM:<> SIZE=") for c in relay.commands)


async def test_an_address_that_would_inject_a_command_is_refused() -> None:
    relay, server = await serve(Script())
    try:
        outcomes = await send(relay, [letter("a@client.test>\r\nRSET"), letter("b@client.test")])
    finally:
        server.close()
    assert kinds(outcomes) == ["ReportRefused", "sent"]


# -- the scripted relay: what ends a connection ---------------------------------------


async def test_a_silent_relay_times_out_every_unanswered_report() -> None:
    relay, server = await serve(Script(silent_at="DATA-END"))
    try:
        started = time.monotonic()
        outcomes = await send(
            relay, [letter("a@client.test"), letter("b@client.test")], timeout_s=0.3
        )
        took = time.monotonic() - started
    finally:
        server.close()
    assert kinds(outcomes) == ["RelayUnavailable", "RelayUnavailable"]
    assert "did not answer in 0.3 s" in str(outcomes[0])
    assert took < 5


async def test_a_relay_silent_at_mail_times_out_too() -> None:
    relay, server = await serve(Script(silent_at="MAIL"))
    try:
        outcomes = await send(relay, [letter("a@client.test")], timeout_s=0.3)
    finally:
        server.close()
    assert kinds(outcomes) == ["RelayUnavailable"]


async def test_a_dropped_connection_fails_the_unanswered_then_a_new_one_is_used() -> None:
    relay, server = await serve(Script(drop_at_data_end=2))
    sink = SmtpRelaySink(relay.config(connections=1))
    try:
        to = ["a@client.test", "b@client.test", "c@client.test"]
        first = await sink.deliver_lane([report(t, i) for i, t in enumerate(to)], "")
        again = await sink.deliver_lane([report(t, i) for i, t in enumerate(to[1:])], "")
    finally:
        await sink.aclose()
        server.close()
    assert kinds(first) == ["sent", "RelayUnavailable", "RelayUnavailable"]
    assert kinds(again) == ["sent", "sent"]
    assert relay.connections == 2
    assert [t.recipient for t in relay.received] == [
        "a@client.test",
        "b@client.test",
        "c@client.test",
    ]


async def test_421_ends_the_connection_and_fails_the_rest_for_now() -> None:
    relay, server = await serve(Script(mail_421_at=2))
    try:
        outcomes = await send(
            relay, [letter("a@client.test"), letter("b@client.test"), letter("c@client.test")]
        )
    finally:
        server.close()
    assert kinds(outcomes) == ["sent", "RelayUnavailable", "RelayUnavailable"]
    assert "421" in str(outcomes[1])


def report(to: str, n: int) -> Letter:
    job = ReportJob(id=n, request_id=n, kind="ack", to_addr=to, created_at=0.0, attempts=0)
    return Letter(job, letter(to).mail)


async def test_warm_connections_are_reused() -> None:
    relay, server = await serve(Script())
    sink = SmtpRelaySink(relay.config(connections=2))
    try:
        for n in range(5):
            assert await sink.deliver_lane([report(f"r{n}@client.test", n)], "") == [None]
    finally:
        await sink.aclose()
        server.close()
    assert relay.connections == 1
    assert relay.commands[-1] == "QUIT"


# -- aiosmtpd: STARTTLS, implicit TLS and AUTH, then pipelined transactions -------------


class Recorder:
    """An aiosmtpd handler that advertises PIPELINING and records mail."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, bytes]] = []
        self.logins: list[str] = []
        self.tls: list[bool] = []  # per mail: whether it came over TLS

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        self.tls.append(server.transport.get_extra_info("ssl_object") is not None)
        self.mails.append((envelope.rcpt_tos[0], envelope.original_content or b""))
        return "250 2.0.0 queued"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth: Any
    ) -> AuthResult:
        ok = isinstance(auth, LoginPassword) and (auth.login, auth.password) == (
            b"mailbridge",
            b"s3cret",
        )
        if ok:
            self.logins.append(mechanism)
        return AuthResult(success=ok, handled=False)  # aiosmtpd answers 235 or 535


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("relay-tls"))


@pytest.fixture
def trust(certs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # aiosmtplib verifies the relay against the default trust store: make it ours.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs[0]))


def server_context(certs: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certs[0]), str(certs[1]))
    return context


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # implicit TLS
@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_tls_and_auth_then_pipelined_transactions(
    mode: str, certs: tuple[Path, Path], trust: None
) -> None:
    handler = Recorder()
    context = server_context(certs)
    loop = asyncio.get_running_loop()
    if mode == "starttls":
        server = await loop.create_server(
            lambda: SMTP(handler, tls_context=context, require_starttls=True,
                         authenticator=handler.authenticate, auth_required=True),
            "127.0.0.1", 0,
        )  # fmt: skip
    else:
        server = await loop.create_server(
            lambda: SMTP(handler, authenticator=handler.authenticate, auth_required=True,
                         auth_require_tls=False),
            "127.0.0.1", 0, ssl=context,
        )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    config = RelayConfig(
        host="localhost", port=port, starttls=mode == "starttls", tls=mode == "tls",
        username="mailbridge", password="s3cret", timeout_s=10,
    )  # fmt: skip
    sink = SmtpRelaySink(config)
    try:
        lane = [report(f"r{n}@client.test", n) for n in range(4)]
        assert await sink.deliver_lane(lane, "") == [None] * 4
    finally:
        await sink.aclose()
        server.close()
    assert len(handler.logins) == 1
    assert handler.tls == [True] * 4
    assert [to for to, _ in handler.mails] == [f"r{n}@client.test" for n in range(4)]


async def test_a_wrong_password_is_a_temporary_failure(
    certs: tuple[Path, Path], trust: None
) -> None:
    handler = Recorder()
    context = server_context(certs)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(handler, tls_context=context, require_starttls=True,
                     authenticator=handler.authenticate, auth_required=True),
        "127.0.0.1", 0,
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    config = RelayConfig(
        host="localhost", port=port, starttls=True, username="mailbridge", password="wrong",
        timeout_s=10,
    )  # fmt: skip
    sink = SmtpRelaySink(config)
    try:
        (outcome,) = await sink.deliver_lane([report("a@client.test", 1)], "")
    finally:
        await sink.aclose()
        server.close()
    # Kept pending and retried with backoff: a fixed password lets it through.
    assert isinstance(outcome, RelayUnavailable) and "535" in str(outcome)
    assert handler.mails == []


# -- a real Postfix as the relay ------------------------------------------------------

POSTFIX_BOXES = {
    "ack@client.test": "ack",
    "not@client.test": "not",
    "defer@client.test": "defer",
    "spam@client.test": "spam",
}


class RelayPostfix(PostfixInstance):
    """Postfix delivering to Maildirs, with STARTTLS, a recipient it defers
    (451), one it does not know (550) and a Subject it rejects at the end of
    DATA (550)."""

    def __init__(self, certs: tuple[Path, Path]) -> None:
        super().__init__(
            relay_port=free_port(), relay_recipients=["sms@bridge.test"], mailboxes=POSTFIX_BOXES
        )
        # Under its root (world-traversable): pytest's own temporary directories
        # are private to root, and Postfix reads the key as it starts its smtpd.
        (self.root / "tls").mkdir()
        self.certs = (self.root / "tls" / "cert.pem", self.root / "tls" / "key.pem")
        for source, copy in zip(certs, self.certs, strict=True):
            shutil.copyfile(source, copy)
        self.certs[1].chmod(0o600)

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.etc / "master.cf", "a", encoding="ascii") as master:
            master.write("tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n")

    def main_cf(self) -> str:
        cert, key = self.certs
        extra = {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_recipient_restrictions": (
                "check_recipient_access inline:{ {defer@client.test=451 4.3.0 try later} }"
            ),
            "header_checks": f"regexp:{self.root / 'tls' / 'header_checks'}",
        }
        (self.root / "tls" / "header_checks").write_text("/^Subject: reject me/ REJECT no thanks\n")
        base = super().main_cf().replace("smtpd_tls_security_level = none\n", "")
        return base + "".join(f"{k} = {v}\n" for k, v in extra.items())


@pytest.fixture(scope="module")
def postfix(certs: tuple[Path, Path]) -> Iterator[RelayPostfix]:
    why = postfix_unavailable()
    if why is not None:
        pytest.skip(why)
    instance = RelayPostfix(certs)
    instance.start()
    try:
        yield instance
    finally:
        instance.cleanup()


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.02
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def postfix_report(to: str, n: int, subject: str = "etatAck x") -> Letter:
    job = ReportJob(id=n, request_id=n, kind="ack", to_addr=to, created_at=0.0, attempts=0)
    mail = (
        f"From: mailbridge@bridge.test\nTo: {to}\nSubject: {subject}\n"
        f"Message-ID: <r{n}@bridge.test>\n\n.line {n}\n"
    ).encode()
    return Letter(job, mail)


async def test_postfix_takes_a_pipelined_group_over_starttls(
    postfix: RelayPostfix, trust: None
) -> None:
    sink = SmtpRelaySink(
        RelayConfig(host="localhost", port=postfix.port, starttls=True, timeout_s=30)
    )
    to = ["ack@client.test", "not@client.test"] * 10
    try:
        outcomes = await sink.deliver_lane([postfix_report(t, n) for n, t in enumerate(to)], "")
    finally:
        await sink.aclose()
    assert outcomes == [None] * 20
    wait_for(
        lambda: (
            len(postfix.messages("ack@client.test")) + len(postfix.messages("not@client.test"))
            >= 20
        )
    )
    got = postfix.messages("ack@client.test") + postfix.messages("not@client.test")
    assert sorted(m["Message-ID"] for m in got) == sorted(f"<r{n}@bridge.test>" for n in range(20))
    assert all(".line " in m.get_payload() for m in got)  # dot-stuffing undone
    assert all("with ESMTPS" in m["Received"] for m in got)  # over TLS
    assert "improper command pipelining" not in postfix.log()


async def test_postfix_refusals_per_recipient_and_at_end_of_data(postfix: RelayPostfix) -> None:
    sink = SmtpRelaySink(RelayConfig(host="127.0.0.1", port=postfix.port, timeout_s=30))
    lane = [
        postfix_report("ack@client.test", 100),
        postfix_report("nobody@client.test", 101),  # unknown: 550 at RCPT
        postfix_report("defer@client.test", 102),  # 451 at RCPT
        postfix_report("spam@client.test", 103, subject="reject me"),  # 550 after the "."
        postfix_report("not@client.test", 104),
    ]
    try:
        outcomes = await sink.deliver_lane(lane, "")
    finally:
        await sink.aclose()
    assert kinds(outcomes) == ["sent", "ReportRefused", "RelayUnavailable", "ReportRefused", "sent"]
    assert "550" in str(outcomes[1]) and "451 4.3.0" in str(outcomes[2])
    assert "550" in str(outcomes[3]) and "no thanks" in str(outcomes[3])
    wait_for(
        lambda: any(
            m["Message-ID"] == "<r104@bridge.test>" for m in postfix.messages("not@client.test")
        )
    )
    assert any(m["Message-ID"] == "<r100@bridge.test>" for m in postfix.messages("ack@client.test"))
    assert postfix.messages("spam@client.test") == []
    assert "improper command pipelining" not in postfix.log()
