"""Plain mode (SPEC section 9): numbers in the To address, a free text.

The pure reader first (mailbridge/plain.py), then the configuration rules,
then the real daemon over SMTP with smtplib and swaks: SMS in the outbox,
the plain-text failure report in the Maildir, every refusal in the dialogue.
"""

from __future__ import annotations

import os
import secrets
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailbridge.config import ConfigError, parse_config
from mailbridge.plain import clean_body, clean_subject, is_number_local_part, plain_text
from tests.support import (
    INTAKE,
    SENDER,
    DaemonProcess,
    config_dict,
    maildir_reports,
    outbox_lines,
    report_body,
    wait_for,
    wire_bytes,
)
from tests.tls import client_context, self_signed

DOMAIN = "sms.bridge.test"
ALARM = "alarm@client.test"  # a plain sender of the "test" account
PANEL = "ups@panels.test"  # a plain sender (by domain) of the "panels" account
AUTHED_PASSWORD = "plain-auth-Pw-0192"
needs_swaks = pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("CI"),
    reason="scripts/test.sh installs swaks",
)


# -- the reader -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "local, ok",
    [
        ("0601020304", True),
        ("+33601020304", True),
        ("06.01.02.03.04", True),
        ("06-01-02-03-04", True),
        ("+33.6.01", True),
        ("", False),
        ("+", False),
        ("06..01", False),
        ("06.", False),
        (".06", False),
        ("0601a", False),
        ("06 01", False),
        ("++336", False),
        ("33+6", False),
    ],
)
def test_number_local_part(local: str, ok: bool) -> None:
    assert is_number_local_part(local) is ok


@pytest.mark.parametrize(
    "subject, expected",
    [
        ("Alarme zone 3", "Alarme zone 3"),
        ("Re: Alarme", "Alarme"),
        ("RE : TR: Fwd: Alarme", "Alarme"),
        ("AW: WG: Störung", "Störung"),
        ("Re[2]: suite", "suite"),
        ("Recette: prête", "Recette: prête"),  # a word starting with "re" stays
        (None, ""),
        ("  ", ""),
    ],
)
def test_subject_prefixes(subject: str | None, expected: str) -> None:
    assert clean_subject(subject) == expected


def test_body_is_cut_at_the_signature_and_markers_and_quotes_dropped() -> None:
    body = (
        "\n  Onduleur sur batterie  \n> le message precedent\nAutonomie 12 min\n\n\n\nFin\n"
        "-- \nAdmin NAS\n06 00 00 00 00\n"
    )
    assert clean_body(body) == "Onduleur sur batterie\nAutonomie 12 min\n\nFin"
    assert clean_body("Porte ouverte --END du message\nsuite", ["--end"]) == "Porte ouverte"
    assert clean_body("Test\n\nEnvoyé de mon iPhone", ["Envoyé de mon iPhone"]) == "Test"
    assert clean_body("a\n--\nsig") == "a"  # the separator without its space


def test_text_forms() -> None:
    assert plain_text("Sujet", "Corps", "body") == "Corps"
    assert plain_text("Re: Sujet", "\n-- \nsig", "body") == "Sujet"  # empty body: the Subject
    assert plain_text("Sujet", "Corps", "subject") == "Sujet"
    assert plain_text("Sujet", "Corps\nligne 2", "subject_body") == "Sujet\nCorps\nligne 2"
    assert plain_text(None, "Corps", "subject_body") == "Corps"
    assert plain_text(None, None, "body") == ""


# -- configuration --------------------------------------------------------------------


def plain_config(tmp: Path, **plain: Any) -> dict[str, Any]:
    cfg = config_dict(tmp, plain={"enabled": True, "senders": [ALARM], **plain})
    cfg["smtp"]["number_domains"] = [DOMAIN]
    return cfg


def problems(cfg: dict[str, Any], tmp: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, base_dir=tmp)
    return err.value.problems


def test_config_plain_needs_number_domains_and_senders(tmp_path: Path) -> None:
    cfg = plain_config(tmp_path)
    cfg["smtp"]["number_domains"] = []
    assert problems(cfg, tmp_path) == [
        "accounts[0].plain.enabled: no mail can reach it without smtp.number_domains"
    ]
    cfg = plain_config(tmp_path, senders=[])
    (problem,) = problems(cfg, tmp_path)
    assert problem.startswith("accounts[0]: plain.enabled needs plain.senders")
    cfg = plain_config(tmp_path, senders=["not an address"])
    (problem,) = problems(cfg, tmp_path)
    assert problem.startswith("accounts[0].plain.senders:")


def test_config_a_plain_sender_names_one_account(tmp_path: Path) -> None:
    cfg = plain_config(tmp_path)
    second = {**cfg["accounts"][0], "keyid": "b" * 20, "name": "second"}
    cfg["accounts"].append(second)
    assert problems(cfg, tmp_path) == [
        f"accounts[1].plain.senders: {ALARM} is also a plain sender of accounts[0];"
        " a plain mail must name one account"
    ]


def test_config_number_domains_are_lowercased(tmp_path: Path) -> None:
    cfg = plain_config(tmp_path)
    cfg["smtp"]["number_domains"] = ["@SMS.Example"]
    assert parse_config(cfg, base_dir=tmp_path).smtp.number_domains == ["sms.example"]


# -- the daemon -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]
) -> Iterator[DaemonProcess]:
    """Three plain accounts: "test" (alarm@client.test, failure reports, cut
    markers), "panels" (@panels.test, reports: all, text: subject_body) and
    "authed" (AUTH required)."""
    tmp = tmp_path_factory.mktemp("plain")
    cfg = plain_config(
        tmp,
        cut_markers=["--end", "Envoyé de mon iPhone"],
    )
    cfg["accounts"][0]["blacklist"] = ["0600000000"]
    cfg["smtp"]["tls"] = {"cert": str(certs[0]), "key": str(certs[1])}
    common = {"provider": "outbox", "commercial": False, "default_sender": "Panels"}
    cfg["accounts"] += [
        {"keyid": "b" * 20, "name": "panels", "sender_domains": ["panels.test"], **common,
         "plain": {"enabled": True, "senders": ["@panels.test"], "reports": "all",
                   "text": "subject_body"}},
        {"keyid": "c" * 20, "name": "authed", "sender_domains": ["authed.test"], **common,
         "smtp_password": AUTHED_PASSWORD,
         "plain": {"enabled": True, "senders": ["nas@authed.test"]}},
    ]  # fmt: skip
    proc = DaemonProcess(tmp, cfg).start()
    yield proc
    proc.stop()


def plain_mail(
    *numbers: str, body: str = "", sender: str = ALARM, subject: str = "Alarme", **headers: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(f"{n}@{DOMAIN}" for n in numbers)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@client.test>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg


def send(
    daemon: DaemonProcess, msg: EmailMessage, *numbers: str, mail_from: str | None = None
) -> tuple[int, str]:
    """One transaction; the first refusal or the reply to DATA, as (code, text)."""
    with daemon.smtp() as smtp:
        return transaction(smtp, msg, numbers, mail_from)


def transaction(
    smtp: smtplib.SMTP, msg: EmailMessage, numbers: tuple[str, ...], mail_from: str | None
) -> tuple[int, str]:
    smtp.ehlo_or_helo_if_needed()
    code, text = smtp.mail(mail_from if mail_from is not None else str(msg["From"]))
    if code != 250:
        smtp.rset()
        return code, text.decode()
    for number in numbers:
        code, text = smtp.rcpt(number if "@" in number else f"{number}@{DOMAIN}")
        if code != 250:
            smtp.rset()
            return code, text.decode()
    code, text = smtp.data(wire_bytes(msg))
    return code, text.decode()


def request_id(reply: tuple[int, str]) -> int:
    assert reply[0] == 250 and "queued as" in reply[1], reply
    return int(reply[1].rsplit(" ", 1)[1])


def sms_of(daemon: DaemonProcess, rid: int, count: int) -> list[tuple[str, str]]:
    lines = wait_for(
        lambda: (
            found := [x for x in outbox_lines(daemon.outbox) if x["request_id"] == rid]
        ) and len(found) >= count and found,
        what=f"{count} SMS of request {rid}",
    )  # fmt: skip
    return [(str(x["to"]), str(x["text"])) for x in lines]


def reports_to(daemon: DaemonProcess, message_id: str) -> list[EmailMessage]:
    return [m for m in maildir_reports(daemon.maildir) if m["In-Reply-To"] == message_id]


def wait_plain_report(daemon: DaemonProcess, message_id: str) -> EmailMessage:
    (report,) = wait_for(
        lambda: reports_to(daemon, message_id), what=f"the report in reply to {message_id}"
    )
    return report


def swaks_plain(daemon: DaemonProcess, numbers: list[str], body: str, message_id: str) -> int:
    """swaks to number addresses, as an admin would test a device's setup; the request id."""
    out = subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(daemon.port), "--from", ALARM,
         "--to", ",".join(f"{n}@{DOMAIN}" for n in numbers),
         "--header", f"From: {ALARM}", "--header", f"Message-Id: {message_id}",
         "--header", "Subject: Alarme", "--body", body],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if "queued as" in ln]
    return int(line.rsplit(" ", 1)[1])


@needs_swaks
def test_swaks_two_numbers_two_sms_and_no_report_when_all_sent(daemon: DaemonProcess) -> None:
    message_id = f"<{secrets.token_hex(8)}@client.test>"
    rid = swaks_plain(
        daemon, ["0601020304", "06.12.34.56.78"], "Porte du local ouverte", message_id
    )
    assert sorted(sms_of(daemon, rid, 2)) == [
        ("+33601020304", "Porte du local ouverte"),
        ("+33612345678", "Porte du local ouverte"),
    ]
    # A later request whose report arrives proves this one had none.
    other = plain_mail("0600000000", body="marker")
    request_id(send(daemon, other, "0600000000"))
    wait_plain_report(daemon, str(other["Message-ID"]))
    assert reports_to(daemon, message_id) == []


@needs_swaks
def test_swaks_two_numbers_one_blacklisted_one_failure_report(daemon: DaemonProcess) -> None:
    message_id = f"<{secrets.token_hex(8)}@client.test>"
    body = "Coupure secteur, bascule sur onduleur"
    rid = swaks_plain(daemon, ["0601020304", "0600000000"], body, message_id)
    assert sms_of(daemon, rid, 1) == [("+33601020304", "Coupure secteur, bascule sur onduleur")]
    report = wait_plain_report(daemon, message_id)
    assert str(report["Subject"]) == "SMS non envoyé"
    assert (report["To"], report["Auto-Submitted"]) == (ALARM, "auto-replied")
    assert report.get_content_type() == "text/plain" and report.get_content_charset() == "utf-8"
    assert report_body(report).decode("utf-8") == (
        "Votre SMS n'a pas été envoyé à 1 numéro(s) sur 2.\n\n"
        "0600000000 : Le numéro de téléphone est dans la liste noire (code 11)\n"
    )
    assert len(sms_of(daemon, rid, 1)) == 1  # the blacklisted number was not sent


def test_forged_sender_gets_550_and_nothing_else(daemon: DaemonProcess) -> None:
    before = (len(outbox_lines(daemon.outbox)), len(maildir_reports(daemon.maildir)))
    # MAIL FROM is in no account's senders.
    msg = plain_mail("0601020304", body="forged", sender="intruder@evil.test")
    code, text = send(daemon, msg, "0601020304")
    assert code == 550 and text.startswith("5.7.1"), text
    # MAIL FROM is an allowed <envoi> sender, not a plain one: refused at RCPT.
    code, text = send(daemon, msg, "0601020304", mail_from=SENDER)
    assert (code, text) == (550, f"5.7.1 Sender <{SENDER}> may not send SMS to number addresses")
    # The envelope is right, the From: header is forged: refused at the end of DATA.
    code, text = send(daemon, msg, "0601020304", mail_from=ALARM)
    assert (code, text) == (
        550,
        "5.7.1 Request refused: sender <intruder@evil.test> is not allowed for this account",
    )
    assert (len(outbox_lines(daemon.outbox)), len(maildir_reports(daemon.maildir))) == before


def test_dialogue_refusals(daemon: DaemonProcess) -> None:
    with daemon.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail(ALARM)[0] == 250
        assert smtp.rcpt(f"06x1@{DOMAIN}") == (
            550, f"5.1.3 <06x1@{DOMAIN}>: the local part is not a phone number".encode()
        )  # fmt: skip
        assert smtp.rcpt(f"0601020304@{DOMAIN}")[0] == 250
        code, text = smtp.rcpt(INTAKE)
        assert (code, text[:5]) == (550, b"5.5.1")
        smtp.rset()
        assert smtp.mail(ALARM)[0] == 250
        assert smtp.rcpt(INTAKE)[0] == 250
        code, text = smtp.rcpt(f"0601020304@{DOMAIN}")
        assert (code, text[:5]) == (550, b"5.5.1")
        smtp.rset()
        assert smtp.mail(ALARM)[0] == 250
        for i in range(500):
            assert smtp.rcpt(f"06010{i:05d}@{DOMAIN}")[0] == 250
        assert smtp.rcpt(f"0699999999@{DOMAIN}") == (
            452, b"4.5.3 Too many recipients: at most 500 numbers per mail"
        )  # fmt: skip
        smtp.rset()
        # No text at all.
        code, answer = transaction(
            smtp, plain_mail("0601020304", subject=""), ("0601020304",), None
        )
        assert (code, answer) == (550, "5.6.0 No text to send: the Subject and the body are empty")


def test_same_message_id_sends_nothing_twice(daemon: DaemonProcess) -> None:
    msg = plain_mail("0601020305", body="une seule fois")
    first = request_id(send(daemon, msg, "0601020305"))
    second = request_id(send(daemon, msg, "0601020305"))
    assert sms_of(daemon, first, 1) == [("+33601020305", "une seule fois")]

    def intake_line() -> list[str]:
        lines = daemon.log().splitlines()
        return [
            ln for ln in lines if f"request {second} emailId " in ln and "account test plain" in ln
        ]

    assert "ack 1" in wait_for(intake_line, what="the duplicate")[0]
    assert [x for x in outbox_lines(daemon.outbox) if x["request_id"] == second] == []


def test_one_mail_delivered_in_parts_sends_every_part(daemon: DaemonProcess) -> None:
    """An MTA splits a mail with many recipients into several deliveries with the
    same Message-ID (Postfix: 50 per delivery): each part is sent, once."""
    numbers = ("0601020371", "0601020372", "0601020373")
    msg = plain_mail(*numbers, body="en deux livraisons")
    first = request_id(send(daemon, msg, *numbers[:2]))
    second = request_id(send(daemon, msg, numbers[2]))
    assert sms_of(daemon, first, 2) == [("+33601020371", "en deux livraisons"),
                                        ("+33601020372", "en deux livraisons")]  # fmt: skip
    assert sms_of(daemon, second, 1) == [("+33601020373", "en deux livraisons")]
    # The same part delivered again (a lost 250) is a duplicate: nothing twice.
    third = request_id(send(daemon, msg, numbers[2]))

    def intake_line() -> list[str]:
        lines = daemon.log().splitlines()
        return [ln for ln in lines if f"request {third} emailId " in ln and " ack " in ln]

    assert "ack 1" in wait_for(intake_line, what="the duplicate")[0]
    assert [x for x in outbox_lines(daemon.outbox) if x["request_id"] == third] == []


def test_text_is_trimmed_and_subject_used_when_body_is_empty(daemon: DaemonProcess) -> None:
    body = (
        "Bonjour,\n> ancien message cité\nLe serveur NAS1 ne répond plus.\n"
        "--end\nlignes techniques\n"
    )
    rid = request_id(send(daemon, plain_mail("0601020306", body=body), "0601020306"))
    assert sms_of(daemon, rid, 1) == [("+33601020306", "Bonjour,\nLe serveur NAS1 ne répond plus.")]
    msg = plain_mail("0601020307", body="\n-- \nsignature\n", subject="RE: Alerte température")
    rid = request_id(send(daemon, msg, "0601020307"))
    assert sms_of(daemon, rid, 1) == [("+33601020307", "Alerte température")]


def test_html_only_body_is_converted(daemon: DaemonProcess) -> None:
    msg = plain_mail("0601020308")
    msg.set_content("<html><body><p>Niveau <b>critique</b></p><p>Cuve 2</p></body></html>",
                    subtype="html")  # fmt: skip
    rid = request_id(send(daemon, msg, "0601020308"))
    assert sms_of(daemon, rid, 1) == [("+33601020308", "Niveau critique\n\nCuve 2")]


def test_flowed_body_is_unwrapped(daemon: DaemonProcess) -> None:
    msg = plain_mail("0601020309")
    msg.set_content("Le groupe electrogene a demarre a \n06:12 et tourne \ntoujours.\n",
                    params={"format": "flowed"})  # fmt: skip
    rid = request_id(send(daemon, msg, "0601020309"))
    assert sms_of(daemon, rid, 1) == [
        ("+33601020309", "Le groupe electrogene a demarre a 06:12 et tourne toujours.")
    ]


def test_reports_all_and_subject_body_on_a_domain_sender(daemon: DaemonProcess) -> None:
    msg = plain_mail("+33601020310", body="Sur batterie", sender=PANEL, subject="UPS 3")
    rid = request_id(send(daemon, msg, "+33601020310"))
    assert sms_of(daemon, rid, 1) == [("+33601020310", "UPS 3\nSur batterie")]
    report = wait_plain_report(daemon, str(msg["Message-ID"]))
    assert str(report["Subject"]) == "SMS envoyé"
    assert report_body(report).decode() == (
        "Votre SMS a été envoyé à 1 numéro(s).\n\n"
        "+33601020310 : Votre message a bien été envoyé (code 0)\n"
    )


def test_automatic_reply_sends_nothing(daemon: DaemonProcess) -> None:
    msg = plain_mail("0601020311", body="Je suis absent", Auto_Submitted="auto-replied")
    code, text = send(daemon, msg, "0601020311")
    assert code == 250 and "automatic reply ignored" in text
    assert [x for x in outbox_lines(daemon.outbox) if x["to"] == "+33601020311"] == []


def test_account_with_password_needs_auth(daemon: DaemonProcess, certs: tuple[Path, Path]) -> None:
    nas = "nas@authed.test"
    msg = plain_mail("0601020312", body="Disque 3 en panne", sender=nas)
    with daemon.smtp() as smtp:
        smtp.ehlo()
        assert smtp.mail(nas) == (530, b"5.7.0 Authentication required for this account")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as smtp:
        smtp.starttls(context=client_context(certs[0]))
        smtp.login("authed", AUTHED_PASSWORD)
        rid = request_id(transaction(smtp, msg, ("0601020312",), None))
    assert sms_of(daemon, rid, 1) == [("+33601020312", "Disque 3 en panne")]


def test_intake_address_in_a_number_domain_is_still_a_request(tmp_path: Path) -> None:
    """smtp.recipients win over smtp.number_domains: with the intake's own domain
    also a number domain, requests are still requests and numbers still numbers."""
    from tests.support import not_codes, request_mail, wait_reports

    cfg = plain_config(tmp_path)
    cfg["smtp"]["number_domains"] = [DOMAIN, INTAKE.rpartition("@")[2]]
    proc = DaemonProcess(tmp_path, cfg).start()
    try:
        code, text = proc.send(request_mail(num="0601020381", sms="requête", emailId="in-dom"))
        assert code == 250, text
        assert not_codes(wait_reports(proc.maildir, "in-dom")["not"][0]) == [("0601020381", 0)]
        number = "0601020382@" + INTAKE.rpartition("@")[2]
        rid = request_id(send(proc, plain_mail("x", body="numéro"), number))
        assert sms_of(proc, rid, 1) == [("+33601020382", "numéro")]
    finally:
        proc.stop()
