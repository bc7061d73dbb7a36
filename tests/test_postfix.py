"""A real MTA in front (issue 4, item 6): Postfix receives the client's mail
and relays it to mailbridge; mailbridge's reports go back through Postfix into
a Maildir. Everything is a real process on loopback: the daemon
(tests.support.DaemonProcess) and a private Postfix (tests.postfix).

    client --smtplib/swaks--> Postfix --smtp:[127.0.0.1]:<bridge>--> mailbridge
    mailbridge --reports.smtp (MAIL FROM:<>)--> Postfix --virtual--> Maildir

Skipped when Postfix cannot run here, except under CI (CI must run it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from tests.postfix import PortTaken, PostfixInstance, free_port, postfix_unavailable
from tests.support import (
    INTAKE,
    KEYID,
    REPORTS_TO,
    SENDER,
    DaemonProcess,
    config_dict,
    envoi_body,
    not_codes,
    outbox_lines,
    request_mail,
    send_on,
    wait_for,
)

GOLDEN = Path(__file__).parent / "golden"


def require(reason: str | None) -> None:
    """Skip for a missing tool, but fail under CI, which must run these tests."""
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Postfix tests: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Bridge:
    daemon: DaemonProcess
    postfix: PostfixInstance

    def submit(self, msg: EmailMessage, sender: str | None = None) -> tuple[int, str]:
        """Submit to Postfix (not to mailbridge) and return Postfix's reply."""
        with smtplib.SMTP("127.0.0.1", self.postfix.port, timeout=60) as smtp:
            return send_on(smtp, msg, sender)

    def reports(self, email_id: str) -> dict[str, list[Message]]:
        """Report mails Postfix delivered to reports@client.test for `email_id`."""
        out: dict[str, list[Message]] = {"ack": [], "not": []}
        for msg in self.postfix.messages(REPORTS_TO):
            label, _, subject_id = str(msg["Subject"]).partition(" ")
            if subject_id == email_id:
                out["ack" if label == "etatAck" else "not"].append(msg)
        return out

    def wait_reports(self, email_id: str) -> tuple[Message, Message]:
        def both() -> dict[str, list[Message]] | None:
            r = self.reports(email_id)
            return r if r["ack"] and r["not"] else None

        found = wait_for(
            both,
            what=f"Ack and Not for emailId {email_id} in Postfix's Maildir",
        )
        assert len(found["ack"]) == 1 and len(found["not"]) == 1, found
        return found["ack"][0], found["not"][0]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    require(postfix_unavailable())
    tmp = tmp_path_factory.mktemp("postfix")
    # Chicken and egg: mailbridge needs Postfix's port (reports.smtp) and Postfix
    # needs mailbridge's (transport_maps). Pick a free port for Postfix, start
    # mailbridge on an ephemeral port, then Postfix on the picked port; if that
    # port was taken meanwhile, start both again on another.
    for _attempt in range(3):
        postfix_port = free_port()
        cfg = config_dict(tmp)
        cfg["reports"] = {
            "from": "mailbridge@bridge.test",
            "smtp": {"host": "127.0.0.1", "port": postfix_port, "timeout_s": 30},
            "retry_backoff_s": 1,
            "retry_max_backoff_s": 2,
        }
        daemon = DaemonProcess(tmp, cfg).start()
        postfix = PostfixInstance(
            relay_port=daemon.port,
            relay_recipients=[INTAKE],
            mailboxes={REPORTS_TO: "reports", SENDER: "erp"},
        )
        try:
            postfix.start(port=postfix_port)
            break
        except PortTaken:
            postfix.cleanup()
            daemon.stop()
        except BaseException:
            postfix.cleanup()
            daemon.stop()
            raise
    else:
        raise AssertionError("no free port for Postfix after 3 attempts")
    try:
        yield Bridge(daemon, postfix)
    finally:
        postfix.stop()
        daemon.stop()
        # Keep the logs next to the daemon's for a failed run.
        if postfix.log_path.exists():
            shutil.copy(postfix.log_path, tmp / "postfix.log")
        postfix.cleanup()


@pytest.fixture(autouse=True)
def _logs_on_failure(bridge: Bridge) -> Iterator[None]:
    """Print both logs after each test: pytest shows them only when it failed."""
    yield
    print("---- postfix.log (tail) ----\n" + "\n".join(bridge.postfix.log().splitlines()[-80:]))
    print("---- daemon.log (tail) ----\n" + "\n".join(bridge.daemon.log().splitlines()[-80:]))


def postfix_line(bridge: Bridge, needle: str) -> str:
    """The first line of Postfix's log containing `needle` (waits for it, bounded)."""
    return wait_for(
        lambda: next((ln for ln in bridge.postfix.log().splitlines() if needle in ln), None),
        what=f"{needle!r} in Postfix's log",
    )


def relayed(bridge: Bridge, queue_id: str) -> str:
    """Postfix's log line for the relay of `queue_id` to mailbridge."""
    return postfix_line(
        bridge, f"{queue_id}: to=<{INTAKE}>, relay=127.0.0.1[127.0.0.1]:{bridge.daemon.port}"
    )


def queue_id(reply: tuple[int, str]) -> str:
    code, text = reply
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), reply
    return text.rsplit(" ", 1)[1]


def payload(msg: Message) -> bytes:
    data = msg.get_payload(decode=True)
    assert isinstance(data, bytes)
    return data


def test_request_through_postfix_sms_and_reports_back_through_postfix(bridge: Bridge) -> None:
    msg = request_mail(num="0601020304", sms="L'été est fini! -10% à partir de 50€", emailId="1548")
    qid = queue_id(bridge.submit(msg))
    # Postfix relayed it to mailbridge, which stored it (250 with its request id).
    line = relayed(bridge, qid)
    assert "status=sent (250 2.0.0 Ok: queued as " in line, line
    request_id = int(line.rsplit("queued as ", 1)[1].rstrip(")"))
    # mailbridge saw Postfix as the client, and the client's envelope sender.
    seen = f"request {request_id} emailId 1548: account test envoi from <{SENDER}> at 127.0.0.1"
    assert seen in bridge.daemon.log()
    sms = wait_for(
        lambda: [x for x in outbox_lines(bridge.daemon.outbox) if x["request_id"] == request_id],
        what="the SMS in the outbox",
    )
    assert [(x["to"], x["text"], x["encoding"], x["parts"]) for x in sms] == [
        ("+33601020304", "L'été est fini! -10% à partir de 50€", "gsm7", 1)
    ]

    ack, not_ = bridge.wait_reports("1548")
    assert payload(ack) == (GOLDEN / "ack_0.xml").read_bytes()
    assert payload(not_) == (GOLDEN / "not_single.xml").read_bytes()
    for report in (ack, not_):
        assert report["Auto-Submitted"] == "auto-replied"
        # Delivered by Postfix (virtual) with the null envelope sender of RFC 3834.
        assert report["Return-Path"] == "<>"
        assert report["Delivered-To"] == REPORTS_TO
        assert "by mta.postfix.test (Postfix) with ESMTP" in str(report["Received"])
        assert report["From"] == "mailbridge@bridge.test"
        assert report["To"] == REPORTS_TO
        assert report.get_content_type() == "text/plain"
        assert report.get_content_charset() == "iso-8859-1"
    # Postfix logs a delivery just after the file is in the Maildir: wait for the lines.
    for message_id in (ack["Message-ID"], not_["Message-ID"]):
        report_qid = postfix_line(bridge, f": message-id={message_id}").split(": ")[1]
        assert postfix_line(bridge, f"{report_qid}: from=<>, size=")
        assert "status=sent (delivered to maildir)" in postfix_line(
            bridge, f"{report_qid}: to=<{REPORTS_TO}>, relay=virtual"
        )
    log = bridge.postfix.log()
    # The reports answer the request: In-Reply-To is its Message-ID (added by Postfix).
    (original_id,) = [
        ln.split("message-id=", 1)[1] for ln in log.splitlines() if f"{qid}: message-id=" in ln
    ]
    assert ack["In-Reply-To"] == not_["In-Reply-To"] == original_id
    bridge.postfix.wait_queue_empty()


@pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("CI"),
    reason="swaks is installed by scripts/test.sh",
)
def test_swaks_through_postfix_numbered_request(bridge: Bridge) -> None:
    email_id = secrets.token_hex(5)
    body = envoi_body(
        keyid=KEYID, num1="0601020304", num2="12", sms="via Postfix", emailId=email_id,
        emailAck=REPORTS_TO, emailNot=REPORTS_TO,
    )  # fmt: skip
    out = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(bridge.postfix.port),
         "--from", SENDER, "--to", INTAKE, "--header", f"From: {SENDER}",
         "--header", "Subject: swaks via postfix", "--body", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<-  250 2.0.0 Ok: queued as " in out.stdout  # Postfix's reply, not mailbridge's
    qid = out.stdout.split("<-  250 2.0.0 Ok: queued as ", 1)[1].split()[0]
    assert "status=sent (250 2.0.0 Ok: queued as " in relayed(bridge, qid)
    ack, not_ = bridge.wait_reports(email_id)
    assert b"<code>0</code>" in payload(ack)
    assert not_codes(payload(not_)) == [("0601020304", 0), ("12", 7)]
    assert any(
        x["text"] == "via Postfix" and x["to"] == "+33601020304"
        for x in outbox_lines(bridge.daemon.outbox)
    )
    assert not_["Return-Path"] == "<>"


def test_refused_request_bounces_from_postfix_and_no_report(bridge: Bridge) -> None:
    email_id = secrets.token_hex(5)
    msg = request_mail(num="0601020304", sms="x", keyid="unknown-key", emailId=email_id)
    del msg["Subject"]
    msg["Subject"] = subject = f"refused {email_id}"
    # Postfix accepts the mail (it cannot know); mailbridge refuses it in the dialogue.
    qid = queue_id(bridge.submit(msg))
    line = relayed(bridge, qid)
    assert "status=bounced (host 127.0.0.1[127.0.0.1] said: " in line, line
    assert "550 5.7.1 Request refused: unknown keyid (in reply to end of DATA command)" in line

    def bounce() -> Message | None:
        for m in bridge.postfix.messages(SENDER):
            if subject.encode() in m.as_bytes():
                return m
        return None

    dsn = wait_for(bounce, what="Postfix's bounce to the client")
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"] == "Mail Delivery System <MAILER-DAEMON@mta.postfix.test>"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    parsed = message_from_bytes(dsn.as_bytes(), policy=policy.default)
    parts = {part.get_content_type(): part for part in parsed.walk()}
    status = parts["message/delivery-status"].as_string()
    assert f"Final-Recipient: rfc822; {INTAKE}" in status
    assert "Action: failed" in status
    assert "Status: 5.7.1" in status
    assert "Diagnostic-Code: smtp; 550 5.7.1 Request refused: unknown keyid" in status
    assert f"Subject: {subject}" in parts["message/rfc822"].as_string()

    assert f"refused mail from <{SENDER}> at 127.0.0.1: 550 5.7.1" in bridge.daemon.log()
    bridge.postfix.wait_queue_empty()
    # No backscatter: mailbridge stored nothing and mailed nothing for it.
    assert bridge.reports(email_id) == {"ack": [], "not": []}
    assert not any(email_id in m.as_string() for m in bridge.postfix.messages(REPORTS_TO))
    assert f"emailId {email_id}" not in bridge.daemon.log()


def test_postfix_in_front_relays_only_the_intake_address(bridge: Bridge) -> None:
    with smtplib.SMTP("127.0.0.1", bridge.postfix.port, timeout=60) as smtp:
        smtp.ehlo()
        assert smtp.mail(SENDER)[0] == 250
        code, text = smtp.rcpt("victim@elsewhere.test")
        assert (code, text) == (554, b"5.7.1 <victim@elsewhere.test>: Relay access denied")
        code, text = smtp.rcpt("other@bridge.test")
        assert code == 550 and text.startswith(b"5.1.1 <other@bridge.test>: Recipient address"), (
            text
        )
        assert smtp.rcpt(INTAKE)[0] == 250
        smtp.rset()
