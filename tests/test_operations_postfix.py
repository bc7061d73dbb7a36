"""The worked Postfix setup of docs/operations.md, run as written: its main.cf
lines, its master.cf line, its transport, recipient and number tables (real
hash: files made with postmap, the regexp table as is) and mailbridge's side
of the YAML, on a private Postfix (tests.postfix) with only the sandbox's
own settings (directories, ports, no DNS, no TLS) added, and `mynetworks` narrowed to
127.0.0.1 because the test's clients are on loopback too (from 127.0.0.2).

Checked: a request relayed and its reports back through Postfix; a plain-mode
mail to 60 numbers sends 60 SMS in one request (the transport's limit of 500
recipients per delivery; Postfix's default of 50 would split it in two,
tests/test_plain.py shows both parts are still sent); other addresses refused
by Postfix.
"""

from __future__ import annotations

import re
import secrets
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.postfix import MASTER_CF, PortTaken, PostfixInstance, free_port, postfix_unavailable
from tests.support import (
    KEYID,
    DaemonProcess,
    config_dict,
    envoi_body,
    not_codes,
    outbox_lines,
    wait_for,
)
from tests.test_postfix import payload, require

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
DOMAIN = "sms.example.com"  # the doc's domains, used as written
NUM_DOMAIN = "num.example.com"
CLIENT = "masociete.com"  # the doc's account's sender domain
ERP = f"erp@{CLIENT}"
ALARM = f"alarm@{CLIENT}"
DOC_PORT = "2525"
CLIENT_IP = "127.0.0.2"  # a client from outside mynetworks


def postfix_files(text: str) -> dict[str, str]:
    """The code blocks of the Postfix section, by the file each is for: the last
    `/etc/postfix/<file>` named before the block, or in its first line."""
    section = text.split("### Postfix's side", 1)[1].split("\n### ", 1)[0]
    files: dict[str, str] = {}
    named = None
    chunks = re.split(r"^```.*$", section, flags=re.M)
    for i, chunk in enumerate(chunks):
        if i % 2 == 0:  # prose
            names = re.findall(r"/etc/postfix/([\w.]+)", chunk)
            named = names[-1] if names else named
            continue
        body = chunk.strip("\n") + "\n"
        first = re.match(r"# /etc/postfix/([\w.]+)", body)
        files[first[1] if first else str(named)] = body
    return files


def mailbridge_side(text: str) -> dict[str, Any]:
    """The YAML block of "mailbridge's side", `${…}` and `# ...` lines left out."""
    section = text.split("### mailbridge's side", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    loaded = yaml.safe_load(block.replace('"${ERP_KEYID}"', KEYID))
    assert isinstance(loaded, dict)
    return loaded


def test_the_doc_has_each_file() -> None:
    files = postfix_files(OPERATIONS.read_text())
    assert {"main.cf", "master.cf", "transport", "mailbridge_recipients"} <= set(files)
    assert "mailbridge_numbers" in files


class DocPostfix(PostfixInstance):
    """A PostfixInstance whose relay settings are the doc's, not the harness's."""

    def __init__(self, doc: dict[str, str], relay_port: int, **kw: Any) -> None:
        super().__init__(relay_port=relay_port, relay_recipients=[], **kw)
        self.doc = doc

    def main_cf(self) -> str:
        base = super().main_cf()
        own = {"relay_domains", "relay_recipient_maps", "transport_maps", "mynetworks"}
        own.add("smtpd_relay_restrictions")
        kept = [ln for ln in base.splitlines() if ln.split(" = ", 1)[0] not in own]
        etc = str(self.etc)
        doc = self.doc["main.cf"].replace("/etc/postfix", etc)
        # Here the clients are on loopback too: only mailbridge's 127.0.0.1 is
        # "my network", and the clients connect from CLIENT_IP.
        doc, n = re.subn(r"^mynetworks = .*$", "mynetworks = 127.0.0.1/32", doc, flags=re.M)
        assert n == 1, "the doc's mynetworks line"
        return "\n".join(kept) + "\n" + doc

    def _write_config(self) -> None:
        super()._write_config()
        (self.etc / "master.cf").write_text(
            MASTER_CF.format(listen=f"127.0.0.1:{self.port}") + self.doc["master.cf"],
            encoding="ascii",
        )
        transport = self.doc["transport"].replace(f":{DOC_PORT}", f":{self.relay_port}")
        (self.etc / "transport").write_text(transport, encoding="ascii")
        (self.etc / "mailbridge_recipients").write_text(
            self.doc["mailbridge_recipients"], encoding="ascii"
        )
        (self.etc / "mailbridge_numbers").write_text(
            self.doc["mailbridge_numbers"], encoding="ascii"
        )
        postmap = shutil.which("postmap") or "/usr/sbin/postmap"
        for table in ("transport", "mailbridge_recipients"):
            done = subprocess.run(
                [postmap, "-c", str(self.etc), str(self.etc / table)],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, DocPostfix]]:
    require(postfix_unavailable())
    text = OPERATIONS.read_text()
    files = postfix_files(text)
    side = mailbridge_side(text)
    tmp = tmp_path_factory.mktemp("ops-postfix")
    for _attempt in range(3):
        postfix_port = free_port()
        cfg = config_dict(
            tmp,
            sender_domains=[CLIENT],
            plain={"enabled": True, "senders": [ALARM]},
            allowed_ips=side["accounts"][0]["allowed_ips"],
        )
        cfg["smtp"] = dict(side["smtp"], listen="127.0.0.1:0")
        cfg["reports"] = {
            **side["reports"],
            "smtp": {**side["reports"]["smtp"], "port": postfix_port},
            "retry_backoff_s": 1,
            "retry_max_backoff_s": 2,
        }
        daemon = DaemonProcess(tmp, cfg).start()
        postfix = DocPostfix(files, daemon.port, mailboxes={ERP: "erp", ALARM: "alarm"})
        try:
            postfix.start(port=postfix_port)
            break
        except PortTaken:
            postfix.cleanup()
            daemon.stop()
        except BaseException:
            print(postfix.log())
            postfix.cleanup()
            daemon.stop()
            raise
    else:
        raise AssertionError("no free port for Postfix after 3 attempts")
    try:
        yield daemon, postfix
    finally:
        postfix.stop()
        daemon.stop()
        if postfix.log_path.exists():
            shutil.copy(postfix.log_path, tmp / "postfix.log")
        postfix.cleanup()


def submit(postfix: DocPostfix, msg: EmailMessage, sender: str, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=60, source_address=(CLIENT_IP, 0)) as smtp:
        assert smtp.send_message(msg, sender, rcpts) == {}


def test_request_relayed_and_reports_back(setup: tuple[DaemonProcess, DocPostfix]) -> None:
    daemon, postfix = setup
    email_id = secrets.token_hex(5)
    msg = EmailMessage()
    msg["From"] = ERP
    msg["To"] = f"sendsms@{DOMAIN}"
    msg["Subject"] = "request"
    body = envoi_body(
        keyid=KEYID, num1="0601020304", num2="12", sms="via the documented Postfix",
        emailId=email_id, emailAck=ERP, emailNot=ERP,
    )  # fmt: skip
    msg.set_content(body)
    submit(postfix, msg, ERP, [f"sendsms@{DOMAIN}"])

    def reports() -> list[Any]:
        found = [m for m in postfix.messages(ERP) if str(m["Subject"]).endswith(email_id)]
        return found if len(found) == 2 else []

    ack, not_ = sorted(
        wait_for(reports, what="Ack and Not via Postfix"), key=lambda m: m["Subject"]
    )
    assert b"<code>0</code>" in payload(ack)
    assert not_codes(payload(not_)) == [("0601020304", 0), ("12", 7)]
    assert not_["Return-Path"] == "<>"
    log = postfix.log()
    relay = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{daemon.port}, "
    assert re.search(relay + r".*status=sent \(250 2\.0\.0 Ok: queued as \d+\)", log)


def test_plain_mail_to_60_numbers_sends_60(setup: tuple[DaemonProcess, DocPostfix]) -> None:
    daemon, postfix = setup
    before = len(outbox_lines(daemon.outbox))
    numbers = [f"06010299{i:02d}@{NUM_DOMAIN}" for i in range(60)]
    msg = EmailMessage()
    msg["From"] = ALARM
    msg["To"] = ", ".join(numbers)
    msg["Subject"] = "Alarme"
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@{CLIENT}>"
    msg.set_content("Coupure secteur")
    submit(postfix, msg, ALARM, numbers)
    sent = wait_for(
        lambda: (n := len(outbox_lines(daemon.outbox)) - before) >= 60 and n,
        what="60 SMS in the outbox",
    )
    assert sent == 60
    assert " ack 1," not in daemon.log()  # one delivery, not a duplicate


def test_other_addresses_refused_by_postfix(setup: tuple[DaemonProcess, DocPostfix]) -> None:
    _, postfix = setup
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=60, source_address=(CLIENT_IP, 0)) as smtp:
        smtp.ehlo()
        assert smtp.mail(ERP)[0] == 250
        code, text = smtp.rcpt("victim@elsewhere.test")
        assert (code, text) == (554, b"5.7.1 <victim@elsewhere.test>: Relay access denied")
        code, text = smtp.rcpt(f"other@{DOMAIN}")
        assert code == 550 and b"Recipient address rejected" in text, text
        assert smtp.rcpt(f"sendsms@{DOMAIN}")[0] == 250
        assert smtp.rcpt(f"06.01.02.03.04@{NUM_DOMAIN}")[0] == 250
        code, text = smtp.rcpt(f"alarm@{NUM_DOMAIN}")
        assert code == 550 and b"Recipient address rejected" in text, text
        smtp.rset()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Both logs after each test that uses Postfix: pytest shows them only on failure."""
    yield
    if "setup" not in request.fixturenames:
        return
    daemon, postfix = request.getfixturevalue("setup")
    print("---- postfix.log (tail) ----\n" + "\n".join(postfix.log().splitlines()[-60:]))
    print("---- daemon.log (tail) ----\n" + "\n".join(daemon.log().splitlines()[-60:]))
