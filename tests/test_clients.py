"""The mail clients and scripts legacy systems really use, against the real daemon.

Each test sends the bytes a real client sends: mutt (format=flowed), curl
(`--upload-file` of a bare-LF file, with a 5 000-byte line), msmtp (a file
hard-wrapped at 76 columns), swaks (format=flowed with delsp=yes as Apple
Mail writes it; a misspelled `<envoi>` wrapper). SPEC sections 1, 2 and 8.
The clients are installed by scripts/test.sh; outside CI a missing one skips.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
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
    wait_for,
    wait_reports,
)


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(tool) is None and not os.environ.get("CI"),
        reason=f"scripts/test.sh installs {tool}",
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("clients")
    proc = DaemonProcess(tmp, config_dict(tmp)).start()
    yield proc
    proc.stop()


def run(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        list(args), input=stdin, capture_output=True, timeout=60, env=env or dict(os.environ)
    )
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def sms_for(daemon: DaemonProcess, email_id: str) -> list[tuple[str, str]]:
    """Wait for the Not of `email_id`, then the SMS its request sent."""
    reports = wait_reports(daemon.maildir, email_id)
    assert ack_code(reports["ack"][0]) == 0
    assert all(code == 0 for _, code in not_codes(reports["not"][0]))
    request = next(
        line["request_id"] for line in reversed(outbox_lines(daemon.outbox))
        if line["reference"] == email_id
    )  # fmt: skip
    return [
        (str(x["to"]), str(x["text"]))
        for x in outbox_lines(daemon.outbox)
        if x["request_id"] == request
    ]


def request(email_id: str, sms: str) -> str:
    """An <envoi> whose tracker is its emailId (to find its outbox lines)."""
    return envoi_body(
        keyid=KEYID, num="0601020304", sms=sms, tracker=email_id, emailId=email_id,
        emailAck=REPORTS_TO, emailNot=REPORTS_TO,
    )  # fmt: skip


SENTENCE = (
    "Votre colis 4521 est arrivé au point relais Tabac de la Gare et peut être "
    "récupéré dès demain matin avec une pièce d'identité."
)


@needs("mutt")
def test_mutt_format_flowed(daemon: DaemonProcess, tmp_path: Path) -> None:
    """mutt with text_flowed sends format=flowed: a line ending in a space is a
    soft break. The SMS is the sentence, not its wrapping."""
    email_id = secrets.token_hex(5)
    # Soft breaks as a flowed-writing editor leaves them (trailing spaces).
    body = request(email_id, "").replace(
        "<sms></sms>",
        "<sms>Votre colis 4521 est arrivé au point relais Tabac de la Gare et peut \n"
        "être récupéré dès demain matin avec une pièce \nd'identité.</sms>",
    )
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set smtp_url="smtp://127.0.0.1:{daemon.port}/"\nset from="{SENDER}"\n'
        "set use_from=yes\nset realname=''\nset text_flowed=yes\nset send_charset=utf-8\n"
        "set charset=utf-8\nset copy=no\nset record=''\nset ssl_starttls=no\n"
        "set ssl_force_tls=no\nset hostname=client.test\n",
        encoding="utf-8",
    )
    env = {**os.environ, "HOME": str(tmp_path), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    run("mutt", "-n", "-F", str(muttrc), "-s", "sms", "--", INTAKE, stdin=body.encode(), env=env)
    assert sms_for(daemon, email_id) == [("+33601020304", SENTENCE)]


@needs("swaks")
def test_swaks_flowed_delsp_yes(daemon: DaemonProcess) -> None:
    """format=flowed; delsp=yes (Apple Mail): the space before a soft break is
    an artefact of the wrapping and goes, so a word cut in two comes back whole."""
    email_id = secrets.token_hex(5)
    body = request(email_id, "").replace(
        "<sms></sms>",
        "<sms>Rendez-vous confirmé pour le 12/01 à 14h30 au cabinet du Dr Mar \n"
        "tin, 3 rue des Lilas.</sms>",
    )
    data = (
        f"From: {SENDER}\r\nTo: {INTAKE}\r\nSubject: sms\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace("\n", "\r\n")
    )
    run("swaks", "--server", "127.0.0.1", "--port", str(daemon.port), "--from", SENDER,
        "--to", INTAKE, "--data", "-", stdin=data.encode())  # fmt: skip
    assert sms_for(daemon, email_id) == [
        ("+33601020304", "Rendez-vous confirmé pour le 12/01 à 14h30 au cabinet du Dr Martin,"
                         " 3 rue des Lilas.")
    ]  # fmt: skip


@needs("curl")
def test_curl_upload_of_a_bare_lf_file_with_a_5000_byte_line(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """`curl --upload-file mail.txt smtp://…` sends the file as it is: bare LF,
    and here the whole request on one 5 000-byte line. The hosted service took
    it; so does mailbridge (SPEC section 1)."""
    email_id = secrets.token_hex(5)
    line = request(email_id, SENTENCE).replace("\n", "") + " " + "x" * 5000
    mail = tmp_path / "mail.txt"
    mail.write_bytes(f"From: {SENDER}\nTo: {INTAKE}\nSubject: sms\n\n{line[:5000]}\n".encode())
    assert b"\r" not in mail.read_bytes()
    run("curl", "-sS", f"smtp://127.0.0.1:{daemon.port}", "--mail-from", SENDER,
        "--mail-rcpt", INTAKE, "--upload-file", str(mail))  # fmt: skip
    assert sms_for(daemon, email_id) == [("+33601020304", SENTENCE)]


@needs("msmtp")
def test_msmtp_body_hard_wrapped_at_76_columns(daemon: DaemonProcess) -> None:
    """Clients that wrap plain text put raw line breaks inside <sms>: wrapping,
    not line breaks (the seed writes a line break Ö)."""
    email_id = secrets.token_hex(5)
    text = SENTENCE + " Ö Horaires : du lundi au samedi, de 9h à 19h, sans interruption."
    wrapped = textwrap.fill(request(email_id, text), width=76)
    assert "\n" in wrapped.split("<sms>")[1].split("</sms>")[0]
    mail = f"From: {SENDER}\nTo: {INTAKE}\nSubject: sms\n\n{wrapped}\n"
    run("msmtp", "--host=127.0.0.1", f"--port={daemon.port}", f"--from={SENDER}",
        "--auth=off", "--tls=off", INTAKE, stdin=mail.encode())  # fmt: skip
    expected = text.replace(" Ö ", " \n ")
    assert sms_for(daemon, email_id) == [("+33601020304", expected)]


@needs("swaks")
def test_misspelled_wrapper_gets_ack_3(daemon: DaemonProcess) -> None:
    """SPEC 8: no <envoi> wrapper but a readable keyid and emailAck: Ack 3 there."""
    email_id = secrets.token_hex(5)
    body = (
        request(email_id, "bonjour").replace("<envoi>", "<envoie>").replace("</envoi>", "</envoie>")
    )
    out = run("swaks", "--server", "127.0.0.1", "--port", str(daemon.port), "--from", SENDER,
              "--to", INTAKE, "--header", f"From: {SENDER}", "--body", body)  # fmt: skip
    assert "250 2.0.0 Ok: queued as" in out
    reports = wait_reports(daemon.maildir, email_id, nots=0)
    assert ack_code(reports["ack"][0]) == 3
    wait_for(lambda: "no <envoi> block" in daemon.log(), what="the log line saying why")
    assert not any(line["reference"] == email_id for line in outbox_lines(daemon.outbox))
