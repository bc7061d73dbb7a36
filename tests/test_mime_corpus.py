"""Real-world MIME shapes, end to end (issue 4, item 4: the MIME corpus).

Each mail is written out byte for byte (CRLF on the wire), submitted to the
real daemon (one module-scoped `DaemonProcess`), and its outcome is asserted
precisely: the SMTP reply, the Ack code, the Not codes and the SMS text in
the outbox. After every refusal the same daemon goes on serving the next
case, and `test_daemon_still_serves_after_the_corpus` checks it once more
at the end.

The daemon's `smtp.max_message_bytes` is raised to 4 MB for the mail with
10 000 attachments (1.7 MB on the wire); nothing else depends on the limit.
"""

from __future__ import annotations

import base64
import quopri
import re
import secrets
import smtplib
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

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
    wait_reports,
)

MAX_BYTES = 4_000_000
REPLY_NO_KEYID = "5.7.1 Request refused: no <envoi> block with a <keyid> found"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    tmp = tmp_path_factory.mktemp("mime_corpus")
    cfg = config_dict(tmp)
    cfg["smtp"]["max_message_bytes"] = MAX_BYTES
    proc = DaemonProcess(tmp, cfg).start()
    yield proc
    proc.stop()


# -- building mails ----------------------------------------------------------------------


def crlf(data: bytes) -> bytes:
    """Every line end as CRLF, as on the wire."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def mail(headers: str, body: bytes | str, subject: str = "corpus") -> bytes:
    """A whole mail: the usual From/To/Subject/Date/Message-ID, then `headers`."""
    head = (
        f"From: ERP <{SENDER}>\nTo: {INTAKE}\nSubject: {subject}\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\n"
        f"Message-ID: <{secrets.token_hex(8)}@client.test>\n{headers}"
    )
    raw_body = body.encode("ascii") if isinstance(body, str) else body
    return crlf(head.encode("ascii") + b"\n" + raw_body)


def block(email_id: str, sms: str = "corpus", **fields: str) -> str:
    """An <envoi> for one number, with Ack and Not to REPORTS_TO."""
    values = {"keyid": KEYID, "num": "0601020304", "sms": sms, "emailId": email_id}
    values.update(fields)
    return envoi_body(**values, emailAck=REPORTS_TO, emailNot=REPORTS_TO)


def new_id() -> str:
    return secrets.token_hex(5)


def qp(text: str, charset: str = "utf-8") -> bytes:
    return quopri.encodestring(crlf(text.encode(charset)))


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data)


# -- submitting and reading outcomes ---------------------------------------------------------


def transact(smtp: smtplib.SMTP, raw: bytes) -> tuple[int, str]:
    """One transaction on an open connection: the reply to the end of DATA."""
    smtp.ehlo_or_helo_if_needed()
    assert smtp.mail(SENDER)[0] == 250
    assert smtp.rcpt(INTAKE)[0] == 250
    code, text = smtp.data(raw)
    return code, text.decode()


def submit(daemon: DaemonProcess, raw: bytes) -> tuple[int, str]:
    with daemon.smtp() as smtp:
        return transact(smtp, raw)


@dataclass
class Outcome:
    request_id: int
    ack: int
    nots: list[tuple[str, int]]  # (tel, code) of the Not, in order
    not_body: bytes
    sms: list[tuple[str, str, str]]  # (to, text, encoding) of the outbox lines


def processed(daemon: DaemonProcess, reply: tuple[int, str], email_id: str) -> Outcome:
    """A request answered 250: wait for its Ack and Not, read its SMS."""
    code, text = reply
    assert code == 250 and text.startswith("2.0.0 Ok: queued as "), reply
    request_id = int(text.rsplit(" ", 1)[1])
    reports = wait_reports(daemon.maildir, email_id)
    assert len(reports["ack"]) == 1 and len(reports["not"]) == 1, reports
    # The outbox line is written before the recipient gets its code, so before the Not.
    sms = [
        (str(x["to"]), str(x["text"]), str(x["encoding"]))
        for x in outbox_lines(daemon.outbox)
        if x["request_id"] == request_id
    ]
    not_body = reports["not"][0]
    return Outcome(request_id, ack_code(reports["ack"][0]), not_codes(not_body), not_body, sms)


def refused(daemon: DaemonProcess, raw: bytes, email_id: str | None = None) -> tuple[int, str]:
    """Submit a mail expected to be refused; check that no report was made for it."""
    reply = submit(daemon, raw)
    if email_id is not None:
        assert reports_for(daemon.maildir, email_id) == {"ack": [], "not": []}
    return reply


ONE_SMS = [("0601020304", 0)]


# -- multipart structure -------------------------------------------------------------------


def test_nested_mixed_alternative_related(daemon: DaemonProcess) -> None:
    """mixed > (alternative > (text/plain, related > (html, image)), pdf): the plain text."""
    email_id = new_id()
    html = block(email_id, sms="HTML version").replace("<", "&lt;").replace(">", "&gt;")
    body = f"""This is a multi-part message in MIME format.
--mixed-1
Content-Type: multipart/alternative; boundary="alt-2"

--alt-2
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

Bonjour,
{block(email_id, sms="Version texte: réunion à 18h")}
Cordialement
--alt-2
Content-Type: multipart/related; boundary="rel-3"; type="text/html"

--rel-3
Content-Type: text/html; charset=utf-8

<html><body><p>{html}</p><img src="cid:logo@x"></body></html>
--rel-3
Content-Type: image/png
Content-ID: <logo@x>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--rel-3--
--alt-2--
--mixed-1
Content-Type: application/pdf; name="facture.pdf"
Content-Disposition: attachment; filename="facture.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--mixed-1--
"""
    raw = mail(
        'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="mixed-1"\n',
        body.encode("utf-8"),
    )
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "Version texte: réunion à 18h", "gsm7")]


def test_text_attachment_before_the_body_is_not_the_body(daemon: DaemonProcess) -> None:
    email_id = new_id()
    body = f"""--b
Content-Type: text/plain; charset=utf-8
Content-Disposition: attachment; filename="notes.txt"

{block(new_id(), sms="from the attachment")}
--b
Content-Type: text/plain; charset=utf-8

{block(email_id, sms="from the body")}
--b--
"""
    raw = mail("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n", body)
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert [text for _, text, _ in out.sms] == ["from the body"]


@pytest.mark.parametrize("shape", ["no_boundary_parameter", "wrong_boundary"])
def test_multipart_without_its_boundary_is_refused(daemon: DaemonProcess, shape: str) -> None:
    """No part can be found, so no body and no keyid: 550 5.7.1, no report."""
    email_id = new_id()
    declared = "" if shape == "no_boundary_parameter" else '; boundary="declared"'
    body = f"""--actual
Content-Type: text/plain; charset=utf-8

{block(email_id)}
--actual--
"""
    raw = mail(f"MIME-Version: 1.0\nContent-Type: multipart/mixed{declared}\n", body)
    assert refused(daemon, raw, email_id) == (550, REPLY_NO_KEYID)


def test_multipart_without_its_closing_boundary_is_read(daemon: DaemonProcess) -> None:
    """A truncated multipart (no `--b--`): the parts that are there are read."""
    email_id = new_id()
    body = f"--b\nContent-Type: text/plain; charset=utf-8\n\n{block(email_id, sms='tronqué')}"
    raw = mail("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n", body.encode())
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "tronqué", "gsm7")]


# -- charsets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "encode"),
    [
        # Declared UTF-8, but the bytes are Windows-1252: read as Windows-1252.
        ("Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n", "cp1252"),
        # Declared US-ASCII with 8-bit Windows-1252 bytes: read as Windows-1252.
        ("Content-Type: text/plain; charset=us-ascii\n", "cp1252"),
        # No MIME headers at all, 8-bit UTF-8: read as UTF-8.
        ("", "utf-8"),
        # No MIME headers at all, 8-bit Windows-1252: not UTF-8, so Windows-1252.
        ("", "cp1252"),
    ],
    ids=["utf8_declared_cp1252_bytes", "ascii_declared_cp1252_bytes", "undeclared_utf8",
         "undeclared_cp1252"],
)  # fmt: skip
def test_wrong_or_missing_charset(daemon: DaemonProcess, headers: str, encode: str) -> None:
    email_id = new_id()
    text = "Réunion à 18h, prix 50€ déjà payé"
    head = ("MIME-Version: 1.0\n" + headers) if headers else ""
    raw = mail(head, block(email_id, sms=text).encode(encode))
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", text, "gsm7")]


def test_ascii_declared_with_utf8_bytes_reads_as_utf8(daemon: DaemonProcess) -> None:
    email_id = new_id()
    raw = mail(
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n",
        block(email_id, sms="Réunion à 18h").encode("utf-8"),
    )
    out = processed(daemon, submit(daemon, raw), email_id)
    assert out.sms == [("+33601020304", "Réunion à 18h", "gsm7")]


# -- transfer encodings --------------------------------------------------------------------


def test_base64_body(daemon: DaemonProcess) -> None:
    email_id = new_id()
    raw = mail(
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: base64\n",
        b64(block(email_id, sms="Déjà en base64 ! 100€").encode("utf-8")),
    )
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "Déjà en base64 ! 100€", "gsm7")]


def test_quoted_printable_body_with_soft_breaks_inside_tags(daemon: DaemonProcess) -> None:
    email_id = new_id()
    encoded = qp(block(email_id, sms="Fermé le 14 juillet = jour férié"), "iso-8859-1")
    # Soft line breaks in the middle of tag names and of the text: decoded before reading.
    encoded = encoded.replace(b"<keyid>", b"<ke=\nyid>").replace(b"juillet", b"juil=\nlet")
    assert b"=E9" in encoded and b"=3D" in encoded
    raw = mail(
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: quoted-printable\n",
        encoded,
    )
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "Fermé le 14 juillet = jour férié", "gsm7")]


# -- mail clients --------------------------------------------------------------------------


OUTLOOK_HTML = """<html xmlns:v="urn:schemas-microsoft-com:vml"
 xmlns:o="urn:schemas-microsoft-com:office:office">
<head><meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">
<style><!-- p.MsoNormal {{margin:0cm; font-family:"Calibri",sans-serif;}} --></style></head>
<body lang="FR" link="#0563C1"><div class="WordSection1">
<p class="MsoNormal">{html}<o:p></o:p></p></div></body></html>
"""


@pytest.mark.parametrize("plain_first", [True, False], ids=["plain_first", "html_first"])
def test_outlook_alternative_uses_the_plain_text(daemon: DaemonProcess, plain_first: bool) -> None:
    email_id = new_id()
    plain = block(email_id, sms="Rappel: rendez-vous à 9h, merci d'être à l'heure")
    html = block(email_id, sms="VERSION HTML").replace("<", "&lt;").replace(">", "&gt;")
    plain_part = (
        b'Content-Type: text/plain; charset="iso-8859-1"\n'
        b"Content-Transfer-Encoding: quoted-printable\n\n" + qp(plain, "iso-8859-1")
    )
    html_part = (
        b'Content-Type: text/html; charset="iso-8859-1"\n'
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        + qp(OUTLOOK_HTML.format(html=html.replace("\n", "<br>\n")), "iso-8859-1")
    )
    first, second = (plain_part, html_part) if plain_first else (html_part, plain_part)
    boundary = b"_000_DB7PR02MB4011C2D3E5F0A1B2C3D4E5F6DB7PR02MB4011eurp_"
    body = (
        b"--" + boundary + b"\n" + first + b"\n--" + boundary + b"\n" + second
        + b"\n--" + boundary + b"--\n"
    )  # fmt: skip
    raw = mail(
        "Thread-Topic: sms\nThread-Index: AdnQ1234abcd==\nContent-Language: fr-FR\n"
        "X-MS-Has-Attach:\nX-MS-TNEF-Correlator:\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/alternative;\n\tboundary="{boundary.decode()}"\n',
        body,
    )
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "Rappel: rendez-vous à 9h, merci d'être à l'heure", "ucs2")]


def apple_mail(email_id: str, text: str) -> bytes:
    boundary = "Apple-Mail=_5B7A9C2E-1D3F-4A6B-8C0D-2E4F6A8B0C1D"
    plain = qp(block(email_id, sms=text))
    html = block(email_id, sms=text).replace("<", "&lt;").replace(">", "&gt;")
    html_doc = qp(
        '<html><head><meta http-equiv="content-type" content="text/html; charset=utf-8"></head>'
        f'<body style="overflow-wrap: break-word;">{html}</body></html>'
    )
    body = (
        (
            f"--{boundary}\nContent-Transfer-Encoding: quoted-printable\n"
            "Content-Type: text/plain;\n\tcharset=utf-8\n\n"
        ).encode()
        + plain
        + (
            f"\n--{boundary}\nContent-Transfer-Encoding: quoted-printable\n"
            "Content-Type: text/html;\n\tcharset=utf-8\n\n"
        ).encode()
        + html_doc
        + f"\n--{boundary}--\n".encode()
    )
    return mail(
        f'Content-Type: multipart/alternative;\n\tboundary="{boundary}"\n'
        "Mime-Version: 1.0 (Mac OS X Mail 16.0 \\(3774.600.62\\))\n"
        "X-Mailer: Apple Mail (2.3774.600.62)\n",
        body,
    )


def test_apple_mail_decomposed_accents_are_composed(daemon: DaemonProcess) -> None:
    email_id = new_id()
    text = unicodedata.normalize("NFD", "Été: réunion à 18h")
    out = processed(daemon, submit(daemon, apple_mail(email_id, text)), email_id)
    assert out.sms == [("+33601020304", "Été: réunion à 18h", "gsm7")]


# -- forwarded messages --------------------------------------------------------------------


def forwarded(inner_id: str, outer_text: str) -> bytes:
    inner = mail(
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n",
        block(inner_id, sms="the forwarded request", num="0601020399"),
        subject="the original request",
    )
    body = (
        b"--fwd\nContent-Type: text/plain; charset=utf-8\n\n" + outer_text.encode()
        + b"\n--fwd\nContent-Type: message/rfc822\nContent-Disposition: inline\n\n"
        + inner + b"\n--fwd--\n"
    )  # fmt: skip
    return mail("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=fwd\n", body)


def test_forwarded_request_is_not_a_request(daemon: DaemonProcess) -> None:
    inner_id = new_id()
    raw = forwarded(inner_id, "FYI, the request below was sent twice.\n")
    assert refused(daemon, raw, inner_id) == (550, REPLY_NO_KEYID)


def test_forward_with_its_own_request_uses_only_the_outer_one(daemon: DaemonProcess) -> None:
    outer_id, inner_id = new_id(), new_id()
    raw = forwarded(inner_id, "Please resend:\n" + block(outer_id, sms="the outer request"))
    out = processed(daemon, submit(daemon, raw), outer_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", "the outer request", "gsm7")]
    assert reports_for(daemon.maildir, inner_id) == {"ack": [], "not": []}
    assert not any(line["to"] == "+33601020399" for line in outbox_lines(daemon.outbox))


# -- line lengths --------------------------------------------------------------------------


def one_line_request(email_id: str, length: int) -> tuple[bytes, str]:
    """The whole <envoi> on one line of exactly `length` bytes (before CRLF): a
    700-character text (5 SMS parts) and a filler after the block (ignored)."""
    head = (
        f"<envoi><keyid>{KEYID}</keyid><num>0601020304</num><emailId>{email_id}</emailId>"
        f"<emailAck>{REPORTS_TO}</emailAck><emailNot>{REPORTS_TO}</emailNot><sms>"
    )
    sms = ("Bonjour " * 100)[:699].rstrip() + "."
    line = head + sms + "</sms></envoi> -- "
    line += "x" * (length - len(line))
    assert len(line) == length and len(sms) == 700
    return mail("", line + "\n"), sms


@pytest.mark.parametrize("length", [900, 998, 1000, 5000, 200_000])
def test_long_line_is_accepted(daemon: DaemonProcess, length: int) -> None:
    """SPEC 1: 998 bytes is RFC 5321's maximum, but scripts and PHP send longer
    lines and the hosted service took them: any line up to the size limit."""
    email_id = new_id()
    raw, sms = one_line_request(email_id, length)
    assert max(len(line) for line in raw.split(b"\r\n")) == length
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, ONE_SMS)
    assert out.sms == [("+33601020304", sms, "gsm7")]


def test_bare_lf_mail_is_one_long_line_and_is_read(daemon: DaemonProcess) -> None:
    """`curl --upload-file` sends a bare-LF file as is, ended by CRLF.CRLF: on the
    wire the whole mail is one CRLF "line" of several kilobytes."""
    email_id = new_id()
    text = ("Bonjour, " + "votre rendez-vous est confirme. " * 22).strip()  # 5 parts, not cut
    raw = mail("", block(email_id, sms=text)).replace(b"\r\n", b"\n")
    assert b"\r" not in raw and len(raw) > 1001
    with daemon.smtp() as smtp:
        first = transact(smtp, raw)
        next_id = new_id()
        second = transact(smtp, mail("", block(next_id, sms="after the long line")))
    out = processed(daemon, first, email_id)
    assert out.sms == [("+33601020304", text, "gsm7")]
    assert processed(daemon, second, next_id).sms == [
        ("+33601020304", "after the long line", "gsm7")
    ]


def test_command_lines_keep_their_limit(daemon: DaemonProcess) -> None:
    """Only DATA lines may be long: a 5 000-byte command is still a 500."""
    with daemon.smtp() as smtp:
        smtp.ehlo()
        code, _ = smtp.docmd("NOOP", "x" * 5000)
        assert code == 500
        assert smtp.noop()[0] == 250  # the connection goes on


# -- attachments ---------------------------------------------------------------------------


def attachment(name: str, data: bytes, content_type: str = "application/octet-stream") -> bytes:
    return (
        f'Content-Type: {content_type}; name="{name}"\n'
        f'Content-Disposition: attachment; filename="{name}"\n'
        "Content-Transfer-Encoding: base64\n\n"
    ).encode() + b64(data)


def with_attachments(body_text: str, parts: list[bytes], boundary: str = "att") -> bytes:
    chunks = [
        f"--{boundary}\nContent-Type: text/plain; charset=utf-8\n\n{body_text}".encode()
    ]  # fmt: skip
    chunks += [f"\n--{boundary}\n".encode() + part for part in parts]
    payload = b"".join(chunks) + f"\n--{boundary}--\n".encode()
    return mail(f"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary={boundary}\n", payload)


def test_ten_thousand_attachments(daemon: DaemonProcess) -> None:
    """mobiles.csv is number 7000 of 10 000 attachments, message.csv number 3000;
    a second MOBILES.CSV at the end is ignored (the first file of a name wins)."""
    email_id = new_id()
    mobiles = "0601020304;;Ana\r\n0601020305;;Bruno\r\n12;;Chloé\r\n".encode("cp1252")
    parts = [attachment(f"scan{i:05d}.pdf", b"%PDF-1.4\n") for i in range(10_000)]
    parts[3000] = attachment("message.csv", b"Bonjour [1] !\n", "text/csv")
    parts[7000] = attachment("mobiles.csv", mobiles, "text/csv")
    parts[9999] = attachment("MOBILES.CSV", b"0601020399;;Intrus\n", "text/csv")
    raw = with_attachments(envoi_body(keyid=KEYID, emailId=email_id, emailAck=REPORTS_TO,
                                      emailNot=REPORTS_TO), parts)  # fmt: skip
    assert 1_000_000 < len(raw) < MAX_BYTES
    assert raw.count(b'Content-Disposition: attachment; filename="') == 10_000
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots) == (0, [("0601020304", 0), ("0601020305", 0), ("12", 7)])
    assert sorted(out.sms) == [
        ("+33601020304", "Bonjour Ana !", "gsm7"),
        ("+33601020305", "Bonjour Bruno !", "gsm7"),
    ]


def test_zero_byte_mobiles_csv_reports_code_6(daemon: DaemonProcess) -> None:
    email_id = new_id()
    body = envoi_body(keyid=KEYID, sms="Bonjour", emailId=email_id, emailAck=REPORTS_TO,
                      emailNot=REPORTS_TO)  # fmt: skip
    raw = with_attachments(body, [attachment("mobiles.csv", b"", "text/csv")])
    out = processed(daemon, submit(daemon, raw), email_id)
    assert (out.ack, out.nots, out.sms) == (0, [("", 6)], [])


def test_zero_byte_message_csv(daemon: DaemonProcess) -> None:
    """An empty message.csv is an empty text: code 999 for every (valid) number,
    the malformed one keeps its own code; no SMS."""
    email_id = new_id()
    body = envoi_body(keyid=KEYID, sms="ignored: message.csv wins", emailId=email_id,
                      emailAck=REPORTS_TO, emailNot=REPORTS_TO)  # fmt: skip
    parts = [
        attachment("mobiles.csv", b"0601020304;;Ana\n0601020305;;Bruno\nabc;;X\n", "text/csv"),
        attachment("message.csv", b"", "text/csv"),
    ]
    out = processed(daemon, submit(daemon, with_attachments(body, parts)), email_id)
    assert (out.ack, out.sms) == (0, [])
    assert out.nots == [("0601020304", 999), ("0601020305", 999), ("abc", 7)]


def test_daemon_still_serves_after_the_corpus(daemon: DaemonProcess) -> None:
    email_id = new_id()
    out = processed(daemon, submit(daemon, mail("", block(email_id, sms="still here"))), email_id)
    assert out.sms == [("+33601020304", "still here", "gsm7")]
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log()
