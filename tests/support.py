"""Test support: configs, requests, the daemon as a real subprocess, and
reading what it produced (outbox lines, Maildir reports).

`DaemonProcess` runs `python -m mailbridge serve` exactly as systemd would:
it waits for READY=1 on a notify socket (no polling, no sleeps) and reads the
bound SMTP port from the STATUS line, so tests use ephemeral ports.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mailbridge.config import Config, parse_config

KEYID = "a296464ce012b8ab710a"
INTAKE = "sendsms@bridge.test"
SENDER = "erp@client.test"
REPORTS_TO = "reports@client.test"
T = TypeVar("T")


def config_dict(tmp: Path, **account: Any) -> dict[str, Any]:
    """A working config in `tmp`: outbox provider, Maildir reports, SQLite."""
    acc: dict[str, Any] = {
        "keyid": KEYID,
        "name": "test",
        "sender_domains": ["client.test"],
        "provider": "outbox",
        "default_sender": "MaSociete",
        # Not commercial by default: the real clock must not make tests depend
        # on the hour (quiet hours are tested with a fake clock).
        "commercial": False,
        "stop_number": "36111",
    }
    acc.update(account)
    return {
        "smtp": {"listen": "127.0.0.1:0", "recipients": [INTAKE], "max_message_bytes": 1_000_000},
        "store": {"sqlite": str(tmp / "mailbridge.db")},
        "reports": {"from": "mailbridge@bridge.test", "maildir": str(tmp / "reports")},
        "providers": {"outbox": {"type": "outbox", "path": str(tmp / "outbox.jsonl")}},
        "accounts": [acc],
        "dispatch": {"workers": 2},
    }


def make_config(tmp: Path, **account: Any) -> Config:
    return parse_config(config_dict(tmp, **account), base_dir=tmp)


def envoi_body(**fields: str) -> str:
    """An <envoi> block; keys are tag names (num1, sms, emailId…), in order."""
    inner = "".join(f"<{k}>{v}</{k}>\n" for k, v in fields.items())
    return f"<envoi>\n{inner}</envoi>\n"


def request_mail(
    body: str | None = None,
    *,
    sender: str = SENDER,
    to: str = INTAKE,
    charset: str = "utf-8",
    **fields: str,
) -> EmailMessage:
    """A request email; without `body`, an <envoi> of `fields` with keyid,
    emailId, emailAck and emailNot filled in unless given."""
    if body is None:
        defaults = {
            "keyid": KEYID,
            "emailId": secrets.token_hex(6),
            "emailAck": REPORTS_TO,
            "emailNot": REPORTS_TO,
        }
        body = envoi_body(**{**defaults, **fields})
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = "sms"
    msg.set_content(body, charset=charset)
    return msg


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    timeout: float = 30.0,
    what: str = "condition",
) -> T:
    """Poll `predicate` until truthy, with a bound; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def outbox_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def maildir_reports(path: Path) -> list[EmailMessage]:
    """Every report mail delivered into the Maildir, by report id."""
    new = path / "new"
    if not new.exists():
        return []
    # File names are "<time>.M<report id>I<instance>.<host>" (mailer.MaildirSink).
    files = sorted(new.iterdir(), key=lambda f: int(f.name.split(".M")[1].split("I")[0]))
    return [message_from_bytes(f.read_bytes(), policy=policy.default) for f in files]


def reports_for(path: Path, email_id: str) -> dict[str, list[bytes]]:
    """Report bodies for one emailId: {"ack": [...], "not": [...]}."""
    out: dict[str, list[bytes]] = {"ack": [], "not": []}
    for msg in maildir_reports(path):
        label, _, subject_id = str(msg["Subject"]).partition(" ")
        if subject_id == email_id:
            out["ack" if label == "etatAck" else "not"].append(report_body(msg))
    return out


def wait_reports(path: Path, email_id: str, acks: int = 1, nots: int = 1) -> dict[str, list[bytes]]:
    """Wait until the Ack(s) and Not(s) of `email_id` are in the Maildir."""
    return wait_for(
        lambda: (
            (r := reports_for(path, email_id))
            and len(r["ack"]) >= acks
            and len(r["not"]) >= nots
            and r
        ),
        what=f"{acks} Ack and {nots} Not for emailId {email_id}",
    )


def ack_code(body: bytes) -> int:
    return int(body.split(b"<code>")[1].split(b"</code>")[0])


def not_codes(body: bytes) -> list[tuple[str, int]]:
    """(tel, code) pairs of a Not body, single or numbered form."""
    import re

    text = body.decode("iso-8859-1")
    codes = re.findall(r"<code\d*>(\d+)</code\d*>", text)
    tels = re.findall(r"<tel\d*>(.*?)</tel\d*>", text)
    return list(zip(tels, map(int, codes), strict=True))


def report_body(msg: EmailMessage) -> bytes:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


class DaemonProcess:
    """`mailbridge serve` as a child process on an ephemeral port."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.http_port = 0  # when the config has an http: block
        self.env: dict[str, str] = {}  # more environment for the daemon (JOURNAL_STREAM…)

    @property
    def outbox(self) -> Path:
        return Path(self.config["providers"]["outbox"]["path"])

    @property
    def maildir(self) -> Path:
        return Path(self.config["reports"]["maildir"])

    def start(self, timeout: float = 60.0) -> DaemonProcess:
        name = f"mailbridge-test-{secrets.token_hex(8)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        env = {**os.environ, "NOTIFY_SOCKET": "@" + name, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailbridge", "serve", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        sock.settimeout(0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    data = sock.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:  # it refused to start: say why at once
                        raise AssertionError(f"daemon exited at start:\n{self.log()}") from None
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"daemon not ready in {timeout}s:\n{self.log()}"
                        ) from None
                    continue
                if "READY=1" in data:
                    break
        finally:
            sock.close()
        # "STATUS=listening on smtp 127.0.0.1:P[, …][; http 127.0.0.1:Q]"
        status = [ln for ln in data.splitlines() if ln.startswith("STATUS=")][0]
        smtp, _, http = status.partition("; http ")
        self.port = int(smtp.split(",")[0].rsplit(":", 1)[1])
        self.http_port = int(http.rsplit(":", 1)[1]) if http else 0
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=60)

    def send(self, msg: EmailMessage, sender: str | None = None) -> tuple[int, str]:
        """Submit one mail; the reply to DATA (or the refusal) as (code, text)."""
        with self.smtp() as smtp:
            return send_on(smtp, msg, sender)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def send_on(smtp: smtplib.SMTP, msg: EmailMessage, sender: str | None = None) -> tuple[int, str]:
    """Send `msg` on an open connection; return the final reply (code, text)."""
    mail_from = sender if sender is not None else str(msg["From"])
    smtp.ehlo_or_helo_if_needed()
    code, text = smtp.mail(mail_from)
    if code != 250:
        smtp.rset()
        return code, text.decode()
    code, text = smtp.rcpt(str(msg["To"]))
    if code not in (250, 251):
        smtp.rset()
        return code, text.decode()
    code, text = smtp.data(wire_bytes(msg))
    return code, text.decode()


def wire_bytes(msg: EmailMessage) -> bytes:
    """The message with CRLF line ends (smtplib.data sends bytes unchanged)."""
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
