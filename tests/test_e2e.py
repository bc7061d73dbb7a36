"""End to end: the real daemon (a subprocess), real SMTP clients, the outbox
file and the Maildir it writes. One daemon serves the whole module; every test
uses its own emailIds, so tests do not see each other's reports."""

from __future__ import annotations

import json
import random
import secrets
import shutil
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support import (
    INTAKE,
    KEYID,
    REPORTS_TO,
    SENDER,
    DaemonProcess,
    ack_code,
    config_dict,
    envoi_body,
    not_codes,
    outbox_lines,
    reports_for,
    request_mail,
    send_on,
    wait_for,
    wait_reports,
    wire_bytes,
)

GOLDEN = Path(__file__).parent / "golden"
LIMIT = 1_000_000  # smtp.max_message_bytes in tests.support.config_dict


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def daemon(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[DaemonProcess]:
    """The daemon on each store backend: the whole module runs on both."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = config_dict(tmp, blacklist=["0600000000"], report_domains=["client.test"])
    if request.param == "postgresql":
        cfg["store"] = {"postgresql": request.getfixturevalue("pg_cluster").new_database()}
    proc = DaemonProcess(tmp, cfg).start()
    yield proc
    proc.stop()


def lines_for(daemon: DaemonProcess, request_id: int) -> list[dict[str, object]]:
    return [line for line in outbox_lines(daemon.outbox) if line["request_id"] == request_id]


def request_id(reply: tuple[int, str]) -> int:
    code, text = reply
    assert code == 250, reply
    return int(text.rsplit(" ", 1)[1])


def test_single_number_outbox_ack_and_not(daemon: DaemonProcess) -> None:
    email_id = "1548"
    msg = request_mail(num="0601020304", sms="L'été est fini! -10% à partir de 50€", emailId="1548")
    rid = request_id(daemon.send(msg))
    reports = wait_reports(daemon.maildir, email_id)
    assert reports["ack"] == [(GOLDEN / "ack_0.xml").read_bytes()]
    assert reports["not"] == [(GOLDEN / "not_single.xml").read_bytes()]
    (line,) = lines_for(daemon, rid)
    assert line["to"] == "+33601020304"
    assert line["text"] == "L'été est fini! -10% à partir de 50€"
    assert (line["sender"], line["encoding"], line["parts"]) == ("MaSociete", "gsm7", 1)


def test_numbered_request_with_personal_texts_and_bad_numbers(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    msg = request_mail(
        num1="0601020304",
        num2="06 01 02 03 05",
        num3="0700000000",
        num4="12",
        num5="0600000000",
        num6="",
        sms1="Bonjour Michel",
        sms2="Bonjour Sarah",
        sms="Bonjour à tous",
        tracker="camp-42",
        emailId=email_id,
    )
    rid = request_id(daemon.send(msg))
    reports = wait_reports(daemon.maildir, email_id)
    assert not_codes(reports["not"][0]) == [
        ("0601020304", 0),
        ("06 01 02 03 05", 0),
        ("0700000000", 21),
        ("12", 7),
        ("0600000000", 11),
        ("", 6),
    ]
    lines = {line["to"]: line for line in lines_for(daemon, rid)}
    assert lines["+33601020304"]["text"] == "Bonjour Michel"
    assert lines["+33601020305"]["text"] == "Bonjour Sarah"
    assert {line["reference"] for line in lines.values()} == {"camp-42"}
    assert len(lines) == 2


def test_csv_attachments(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    msg = request_mail(emailId=email_id, emetteur="MaSociete")
    mobiles = "0601020304;;Michel;;Martin;;10/10/2015\r\n\r\n06 01 02 03 05;;Sarah;;Dupont\r\n"
    message = "Bonjour [1] [2], votre carte sera disponible le [3]\r\n"
    msg.add_attachment(
        mobiles.encode("cp1252"), maintype="text", subtype="csv", filename="Mobiles.csv"
    )
    msg.add_attachment(
        message.encode("utf-8-sig"), maintype="text", subtype="csv", filename="message.csv"
    )
    rid = request_id(daemon.send(msg))
    reports = wait_reports(daemon.maildir, email_id)
    assert not_codes(reports["not"][0]) == [("0601020304", 0), ("06 01 02 03 05", 0)]
    assert b"<etat1>" in reports["not"][0]  # CSV requests use the numbered form
    texts = sorted(str(line["text"]) for line in lines_for(daemon, rid))
    assert texts == [
        "Bonjour Michel Martin, votre carte sera disponible le 10/10/2015",
        "Bonjour Sarah Dupont, votre carte sera disponible le ",
    ]


def test_raw_ampersand_and_less_than_survive(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    body = envoi_body(
        keyid=KEYID, num="0601020304", sms="Tom & Jerry <3 &amp; co", emailId=email_id,
        emailAck=REPORTS_TO, emailNot=REPORTS_TO,
    )  # fmt: skip
    rid = request_id(daemon.send(request_mail(body, charset="iso-8859-1")))
    wait_reports(daemon.maildir, email_id)
    (line,) = lines_for(daemon, rid)
    assert line["text"] == "Tom & Jerry <3 & co"


def test_greeting_and_signature_around_the_block(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    body = (
        "Bonjour,\n\nVoici l'envoi:\n"
        + envoi_body(keyid=KEYID, num="0601020304", sms="x", emailId=email_id, emailAck=REPORTS_TO)
        + "\n-- \nERP Corp, 1 rue de la Paix\n"
    )
    request_id(daemon.send(request_mail(body)))
    assert ack_code(wait_reports(daemon.maildir, email_id, nots=0)["ack"][0]) == 0


def test_duplicate_email_id_gets_ack_1_and_no_sms(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    first = request_id(daemon.send(request_mail(num="0601020304", sms="once", emailId=email_id)))
    second = request_id(daemon.send(request_mail(num="0601020304", sms="once", emailId=email_id)))
    reports = wait_reports(daemon.maildir, email_id, acks=2)
    assert sorted(ack_code(b) for b in reports["ack"]) == [0, 1]
    assert len(reports["not"]) == 1
    assert len(lines_for(daemon, first)) == 1
    assert lines_for(daemon, second) == []


def test_simultaneous_duplicates_on_two_connections(daemon: DaemonProcess) -> None:
    """Both emails are in DATA at once; exactly one is processed."""
    email_id = secrets.token_hex(5)
    barrier = threading.Barrier(2)
    replies: list[tuple[int, str]] = []

    def client() -> None:
        msg = request_mail(num="0601020304", sms="race", emailId=email_id)
        with daemon.smtp() as smtp:
            smtp.ehlo()
            smtp.mail(SENDER)
            smtp.rcpt(INTAKE)
            barrier.wait(timeout=30)  # both connections reach DATA together
            replies.append(send_data(smtp, msg))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [code for code, _ in replies] == [250, 250]
    reports = wait_reports(daemon.maildir, email_id, acks=2)
    assert sorted(ack_code(b) for b in reports["ack"]) == [0, 1]
    assert len(reports["not"]) == 1
    ids = [int(text.rsplit(" ", 1)[1]) for _, text in replies]
    assert sorted(len(lines_for(daemon, i)) for i in ids) == [0, 1]


def send_data(smtp: smtplib.SMTP, msg: EmailMessage) -> tuple[int, str]:
    code, text = smtp.data(wire_bytes(msg))
    return code, text.decode()


def test_missing_email_id_gets_ack_2_with_question_mark(daemon: DaemonProcess) -> None:
    ack_to = f"ack-{secrets.token_hex(4)}@client.test"
    body = envoi_body(keyid=KEYID, num="0601020304", sms="x", emailAck=ack_to)
    request_id(daemon.send(request_mail(body)))
    msg = wait_for(lambda: [m for m in maildir_all(daemon) if m["To"] == ack_to], what="Ack 2")[0]
    assert msg.get_payload(decode=True) == (GOLDEN / "ack_2.xml").read_bytes()


def maildir_all(daemon: DaemonProcess) -> list[EmailMessage]:
    from tests.support import maildir_reports

    return maildir_reports(daemon.maildir)


@pytest.mark.parametrize(
    "case",
    ["html_only", "doctype", "xxe", "billion_laughs", "no_sms"],
)
def test_invalid_requests_get_ack_3_and_no_sms(daemon: DaemonProcess, case: str) -> None:
    email_id = secrets.token_hex(5)
    fields = dict(keyid=KEYID, num="0601020304", emailId=email_id, emailAck=REPORTS_TO)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, INTAKE, "x"
    if case == "html_only":
        block = envoi_body(**fields, sms="x").replace("<", "&lt;").replace(">", "&gt;")
        msg.set_content(f"<html><body><p>{block}</p></body></html>", subtype="html")
    elif case == "doctype":
        msg.set_content(
            '<!DOCTYPE envoi SYSTEM "http://evil.test/x.dtd">\n' + envoi_body(**fields, sms="x")
        )
    elif case == "xxe":
        msg.set_content(
            '<!DOCTYPE e [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
            + envoi_body(**fields, sms="&xxe;")
        )
    elif case == "billion_laughs":
        lol = '<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        msg.set_content(lol + envoi_body(**fields, sms="&b;"))
    else:
        msg.set_content(envoi_body(**fields))
    request_id(daemon.send(msg))
    reports = wait_reports(daemon.maildir, email_id, nots=0)
    assert ack_code(reports["ack"][0]) == 3
    assert b"Format d'email invalide" in reports["ack"][0]
    assert not any(email_id in json.dumps(line) for line in outbox_lines(daemon.outbox))


def test_refusals_in_the_dialogue_send_no_report(daemon: DaemonProcess) -> None:
    before = len(maildir_all(daemon))
    with daemon.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        code, reply = smtp.rcpt("someone@elsewhere.test")
        assert (code, reply[:5]) == (550, b"5.1.1")
        smtp.rset()
        assert smtp.mail("spoof@evil.test")[0] == 550
        smtp.rset()
        # Unknown keyid.
        msg = request_mail(num="0601020304", sms="x", keyid="nope")
        code, text = send_on(smtp, msg)
        assert (code, text.split()[0]) == (550, "5.7.1")
        assert "keyid" in text
        # From: header outside the account's domains (envelope is fine).
        msg = request_mail(num="0601020304", sms="x", sender="boss@other.test")
        assert send_on(smtp, msg, sender=SENDER)[0] == 550
        # No <envoi> at all.
        code, text = send_on(smtp, request_mail("Hello, no request here"))
        assert code == 550 and "keyid" in text
        # Invalid request and no emailAck: nobody to tell, so the dialogue says it.
        body = envoi_body(keyid=KEYID, num="0601020304", sms="x")
        code, text = send_on(smtp, request_mail(body))
        assert (code, text.split()[0]) == (550, "5.6.0")
    assert len(maildir_all(daemon)) == before


def test_client_ip_outside_allowed_ips(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, config_dict(tmp_path, allowed_ips=["10.0.0.0/8"])).start()
    try:
        code, text = proc.send(request_mail(num="0601020304", sms="x"))
        assert (code, text.split()[0]) == (550, "5.7.1")
        assert "127.0.0.1" in text
    finally:
        proc.stop()
    assert not (tmp_path / "reports" / "new").exists() or not any(
        (tmp_path / "reports" / "new").iterdir()
    )


def wire_size(msg: EmailMessage) -> int:
    """The DATA size aiosmtpd counts: CRLF line ends, dot-stuffed, final CRLF."""
    data = smtplib._quote_periods(wire_bytes(msg))  # type: ignore[attr-defined]
    return len(data if data.endswith(b"\r\n") else data + b"\r\n")


def sized_mail(size: int, email_id: str) -> EmailMessage:
    """A valid request whose DATA is exactly `size` bytes on the wire."""
    head = envoi_body(keyid=KEYID, num="0601020304", sms="size", emailId=email_id,
                      emailAck=REPORTS_TO)  # fmt: skip
    filler = ""
    for _ in range(5):  # converges in two rounds: each filler byte is one wire byte
        missing = size - wire_size(request_mail(head + filler))
        if missing == 0:
            return request_mail(head + filler)
        lines, rest = divmod(len(filler) + missing, 71)
        filler = ("y" * 70 + "\n") * lines + "z" * rest
    raise AssertionError("could not size the mail")


def test_size_limit_exactly_and_one_byte_more(daemon: DaemonProcess) -> None:
    ok_id, big_id = secrets.token_hex(5), secrets.token_hex(5)
    at_limit = sized_mail(LIMIT, ok_id)
    over = sized_mail(LIMIT + 1, big_id)
    assert daemon.send(at_limit)[0] == 250
    code, text = daemon.send(over)
    assert (code, text.split()[0]) == (552, "5.3.4")
    # Declared in advance with SIZE=: refused at MAIL.
    with daemon.smtp() as smtp:
        smtp.ehlo()
        code, reply = smtp.mail(SENDER, [f"SIZE={LIMIT + 1}"])
        assert (code, reply.split()[:2]) == (552, [b"5.3.4", b"Message"])
    assert ack_code(wait_reports(daemon.maildir, ok_id, nots=0)["ack"][0]) == 0


def test_hostile_input_gets_an_answer_and_the_daemon_keeps_serving(
    daemon: DaemonProcess,
) -> None:
    rng = random.Random(7)
    garbage_lines = b"\r\n".join(rng.randbytes(rng.randrange(1, 500)) for _ in range(300))
    garbage_line = bytes(range(256)) * 200  # one 51 200-byte line: read, no keyid in it
    broken_mime = (
        b"From: erp@client.test\r\nTo: sendsms@bridge.test\r\n"
        b'Content-Type: multipart/mixed; boundary="never"\r\n\r\n'
        b"--wrong\r\nContent-Type: text/plain\r\n\r\n<envoi><keyid>"
        + KEYID.encode()
        + b"</keyid></envoi>\r\n"
    )
    bad_charset = (
        b"From: erp@client.test\r\nTo: sendsms@bridge.test\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\n"
        + envoi_body(keyid=KEYID, num="0601020304", sms="\xe9t\xe9", emailId="cs1",
                     emailAck=REPORTS_TO).encode("latin-1")
    )  # fmt: skip
    with daemon.smtp() as smtp:
        smtp.ehlo()
        for raw, expected in (
            (garbage_line, 550),
            (garbage_lines, 550),
            (broken_mime, 550),
            (bad_charset, 250),
        ):
            smtp.mail(SENDER)
            smtp.rcpt(INTAKE)
            code, text = smtp.data(raw)
            assert code == expected, (code, text)
    # The unknown charset was read as Windows-1252.
    wait_for(
        lambda: any(line["text"] == "été" for line in outbox_lines(daemon.outbox)),
        what="the SMS of the request with an unknown charset",
    )
    # Still serving: a normal request goes through.
    email_id = secrets.token_hex(5)
    request_id(daemon.send(request_mail(num="0601020304", sms="alive", emailId=email_id)))
    wait_reports(daemon.maildir, email_id)


def test_report_domains_withhold_reports_but_not_the_sms(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    msg = request_mail(
        num="0601020304", sms="x", emailId=email_id, emailAck="boss@elsewhere.test",
        emailNot=INTAKE,  # our own intake address: never
    )  # fmt: skip
    rid = request_id(daemon.send(msg))
    wait_for(lambda: lines_for(daemon, rid), what="the SMS")
    assert reports_for(daemon.maildir, email_id) == {"ack": [], "not": []}
    assert "outside report_domains" in daemon.log()
    assert "own intake address" in daemon.log()


def test_auto_replies_are_ignored(daemon: DaemonProcess) -> None:
    msg = request_mail(num="0601020304", sms="x")
    msg["Auto-Submitted"] = "auto-replied"
    code, text = daemon.send(msg)
    assert code == 250 and "ignored" in text
    cron = request_mail(num="0601020304", sms="x", emailId=(email_id := secrets.token_hex(5)))
    cron["Auto-Submitted"] = "auto-generated"  # cron jobs and ERPs: normal requests
    request_id(daemon.send(cron))
    wait_reports(daemon.maildir, email_id)


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is installed by scripts/test.sh")
def test_swaks_client(daemon: DaemonProcess) -> None:
    email_id = secrets.token_hex(5)
    body = envoi_body(
        keyid=KEYID, num="0601020304", sms="via swaks", emailId=email_id,
        emailAck=REPORTS_TO, emailNot=REPORTS_TO,
    )  # fmt: skip
    out = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(daemon.port), "--from", SENDER,
         "--to", INTAKE, "--header", f"From: {SENDER}", "--body", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    # swaks against another domain: not an open relay.
    relay = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(daemon.port), "--from", SENDER,
         "--to", "victim@gmail.com"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert relay.returncode != 0
    assert "550 5.1.1" in relay.stdout
    assert not_codes(wait_reports(daemon.maildir, email_id)["not"][0]) == [("0601020304", 0)]


def test_many_messages_on_one_connection(daemon: DaemonProcess) -> None:
    ids = [secrets.token_hex(5) for _ in range(20)]
    with daemon.smtp() as smtp:
        for email_id in ids:
            assert (
                send_on(smtp, request_mail(num="0601020304", sms="n", emailId=email_id))[0] == 250
            )
    for email_id in ids:
        wait_reports(daemon.maildir, email_id)


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path, config_dict(tmp_path)).start()
    email_id = secrets.token_hex(5)
    request_id(proc.send(request_mail(num="0601020304", sms="x", emailId=email_id)))
    assert proc.terminate() == 0
    assert "stopped" in proc.log()


def test_cli_send_and_status(daemon: DaemonProcess, tmp_path: Path) -> None:
    import sys

    email_id = secrets.token_hex(5)
    mobiles = tmp_path / "m.csv"
    mobiles.write_text("0601020304;;Ana\n0601020305;;Bo\n", encoding="utf-8")
    message = tmp_path / "msg.csv"
    message.write_text("Salut [1]\n", encoding="utf-8")
    base = [sys.executable, "-m", "mailbridge"]
    sent = subprocess.run(
        [*base, "send", "-c", str(daemon.config_path), "--server", f"127.0.0.1:{daemon.port}",
         "--mobiles", str(mobiles), "--message", str(message), "--email-id", email_id,
         "--from", SENDER, "--tracker", "cli"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout + sent.stderr
    reports = wait_reports(daemon.maildir, email_id)
    assert not_codes(reports["not"][0]) == [("0601020304", 0), ("0601020305", 0)]
    assert any(line["text"] == "Salut Ana" for line in outbox_lines(daemon.outbox))
    refused = subprocess.run(
        [*base, "send", "-c", str(daemon.config_path), "--server", f"127.0.0.1:{daemon.port}",
         "--num", "0601020304", "--sms", "x", "--from", "nobody@evil.test"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 1 and "550" in refused.stdout
    status = subprocess.run(
        [*base, "status", "--json", "-c", str(daemon.config_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    found = json.loads(status.stdout)
    assert found["status"]["requests"]["done"] >= 1 and "reports" in found["status"]
    if daemon.config["store"].get("sqlite"):
        assert found["daemon"].startswith("a daemon is running on this store (pid ")
    else:
        assert found["senders_alive"]  # PostgreSQL: the worker's heartbeat
