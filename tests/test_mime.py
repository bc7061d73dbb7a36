"""mime.read_mail: bodies in any charset and encoding, attachments, broken mails."""

from __future__ import annotations

import base64
import random
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.mime import (
    MAX_PROBLEMS,
    MailContent,
    read_mail,
    read_mail_stdlib,
    read_simple_mail,
)

ENVOI = "<envoi>\n<keyid>k1</keyid>\n<num>0601020304</num>\n<sms>L'été à 50€</sms>\n</envoi>\n"


def headers(body: bytes, content_type: str = "text/plain", cte: str = "8bit") -> bytes:
    return (
        b"From: Client <Client@Example.COM>\r\nTo: sendsms@localhost\r\nSubject: test\r\n"
        b"Message-ID: <abc@example.com>\r\nMIME-Version: 1.0\r\n"
        + f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n".encode()
        + body
    )


def test_simple_utf8_mail_and_headers() -> None:
    msg = EmailMessage()
    msg["From"] = "Jean Dupont <Jean.Dupont@Example.COM>"
    msg["Subject"] = "Envoi été"
    msg["Message-ID"] = "<123@example.com>"
    msg.set_content(ENVOI)
    content = read_mail(msg.as_bytes())
    assert isinstance(content, MailContent)
    assert content.text == ENVOI
    assert content.html_text is None
    assert content.attachments == {}
    assert content.from_addresses == ("jean.dupont@example.com",)
    assert content.subject == "Envoi été"
    assert content.message_id == "<123@example.com>"
    assert content.auto_submitted is None
    assert content.problems == ()


@pytest.mark.parametrize("charset", ["iso-8859-1", "latin-1", "windows-1252", "utf-8", "cp850"])
@pytest.mark.parametrize("cte", ["8bit", "quoted-printable", "base64"])
def test_declared_charsets_and_transfer_encodings(charset: str, cte: str) -> None:
    body = ENVOI.replace("€", "E") if charset in ("iso-8859-1", "latin-1", "cp850") else ENVOI
    data = body.encode(charset)
    if cte == "quoted-printable":
        import quopri

        data = quopri.encodestring(data)
    elif cte == "base64":
        data = base64.encodebytes(data)
    content = read_mail(headers(data, f"text/plain; charset={charset}", cte))
    assert content.text == body
    assert content.problems == ()


def test_mimetext_latin1_quoted_printable() -> None:
    text = MIMEText(ENVOI.replace("€", "EUR"), "plain", "iso-8859-1")
    assert "quoted-printable" in text["Content-Transfer-Encoding"] or "base64" in str(text)
    assert read_mail(text.as_bytes()).text == ENVOI.replace("€", "EUR")


def test_cp1252_euro_declared_as_latin1_is_still_read() -> None:
    # latin-1 never fails; 0x80 becomes U+0080, which is the declared charset's reading.
    content = read_mail(headers("50€".encode("cp1252"), "text/plain; charset=iso-8859-1"))
    assert content.text == "50\x80"


def test_unknown_charset_decodes_as_windows_1252() -> None:
    content = read_mail(headers("L'été 50€".encode("cp1252"), "text/plain; charset=x-unknown"))
    assert content.text == "L'été 50€"
    assert any("x-unknown" in note for note in content.problems)


@pytest.mark.parametrize("charset", ["us-ascii", "utf-8", "base64", "rot13", "hex", "undefined"])
def test_wrong_charset_falls_back_to_windows_1252(charset: str) -> None:
    content = read_mail(headers("été 50€".encode("cp1252"), f"text/plain; charset={charset}"))
    assert content.text == "été 50€"


def test_undefined_cp1252_bytes_are_replaced() -> None:
    content = read_mail(headers(b"a\x81b\xe9", "text/plain; charset=x-nope"))
    assert content.text == "a\ufffdbé"


def test_8bit_body_without_charset_utf8() -> None:
    content = read_mail(headers(ENVOI.encode("utf-8"), "text/plain"))
    assert content.text == ENVOI


def test_8bit_body_without_charset_cp1252() -> None:
    content = read_mail(headers(ENVOI.encode("cp1252"), "text/plain"))
    assert content.text == ENVOI


def test_no_content_type_at_all() -> None:
    raw = b"From: a@b.c\r\n\r\n" + ENVOI.encode("utf-8")
    assert read_mail(raw).text == ENVOI


def test_crlf_becomes_lf() -> None:
    content = read_mail(headers(b"<envoi>\r\n<sms>a\r\nb\rc</sms>\r\n</envoi>\r\n"))
    assert content.text == "<envoi>\n<sms>a\nb\nc</sms>\n</envoi>\n"


def test_multipart_alternative_picks_text_plain() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg.set_content(ENVOI)
    msg.add_alternative("<p>&lt;envoi&gt;other&lt;/envoi&gt;</p>", subtype="html")
    content = read_mail(msg.as_bytes())
    assert content.text == ENVOI
    assert content.html_text is None


def test_multipart_alternative_html_first_still_picks_text_plain() -> None:
    outer = MIMEMultipart("alternative")
    outer.attach(MIMEText("<p>html</p>", "html", "utf-8"))
    outer.attach(MIMEText(ENVOI, "plain", "utf-8"))
    assert read_mail(outer.as_bytes()).text == ENVOI


def test_html_only_gives_html_text() -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<p>Bonjour,</p><div>&lt;envoi&gt;<br>&lt;keyid&gt;k1&lt;/keyid&gt;<br/>"
        "&lt;emailId&gt;12&lt;/emailId&gt;<br>&lt;emailAck&gt;ack@x.fr&lt;/emailAck&gt;<br>"
        "&lt;sms&gt;Tom &amp; Jerry&lt;/sms&gt;&lt;/envoi&gt;</div>"
        "<script>alert(1)</script></body></html>"
    )
    msg = EmailMessage()
    msg.set_content(html, subtype="html")
    content = read_mail(msg.as_bytes())
    assert content.text is None
    assert content.html_text is not None
    assert "<envoi>\n<keyid>k1</keyid>\n<emailId>12</emailId>" in content.html_text
    assert "<sms>Tom & Jerry</sms></envoi>" in content.html_text
    assert "Bonjour," in content.html_text
    assert "alert" not in content.html_text
    assert "color" not in content.html_text


def test_html_with_raw_envoi_tags_keeps_them() -> None:
    msg = EmailMessage()
    msg.set_content("<envoi><keyid>k1</keyid><emailId>5</emailId></envoi>", subtype="html")
    html_text = read_mail(msg.as_bytes()).html_text
    assert html_text is not None
    assert "<envoi><keyid>k1</keyid><emailid>5</emailid></envoi>" in html_text


def test_html_latin1_with_meta_charset() -> None:
    html = '<html><head><meta charset="utf-8"></head><body>&lt;sms&gt;été</body></html>'
    raw = headers(html.encode("latin-1"), "text/html; charset=iso-8859-1")
    assert read_mail(raw).html_text == "<sms>été"


def test_empty_html() -> None:
    content = read_mail(headers(b"   ", "text/html"))
    assert content.text is None
    assert content.html_text == ""


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<!-- only a comment -->", ""),
        ("<?php echo 1 ?>", ""),
        ("<p>a\x01b\x1f&lt;c&gt;</p>", "ab<c>"),
        ("<p>line1<br>line2</p><div>line3</div>", "line1\nline2\n\nline3"),
        ('<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><p>&e;</p>', "]>\n&e;"),
    ],
)
def test_html_edge_cases(html: str, expected: str) -> None:
    content = read_mail(headers(html.encode(), "text/html; charset=utf-8"))
    assert content.html_text is not None
    assert content.html_text.strip() == expected
    assert not any("unreadable" in note for note in content.problems)


def test_nested_multipart() -> None:
    related = MIMEMultipart("related")
    related.attach(MIMEText("<p>html</p>", "html"))
    related.attach(MIMEBase("image", "png"))
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText(ENVOI, "plain", "utf-8"))
    alternative.attach(related)
    mixed = MIMEMultipart("mixed")
    mixed.attach(alternative)
    csv = MIMEApplication(b"0601020304;;Michel\r\n", "octet-stream")
    csv.add_header("Content-Disposition", "attachment", filename="mobiles.csv")
    mixed.attach(csv)
    content = read_mail(mixed.as_bytes())
    assert content.text == ENVOI
    assert content.attachments == {"mobiles.csv": b"0601020304;;Michel\r\n"}


def test_nested_html_only() -> None:
    related = MIMEMultipart("related")
    related.attach(MIMEText("<p>&lt;envoi&gt;</p>", "html"))
    mixed = MIMEMultipart("mixed")
    mixed.attach(related)
    content = read_mail(mixed.as_bytes())
    assert content.text is None
    assert content.html_text is not None and "<envoi>" in content.html_text


def test_text_attachment_is_not_the_body() -> None:
    msg = EmailMessage()
    msg.set_content("<p>only html</p>", subtype="html")
    msg.add_attachment("notes", filename="notes.txt")
    content = read_mail(msg.as_bytes())
    assert content.text is None
    assert content.html_text is not None and content.html_text.strip() == "only html"


def test_attached_message_is_not_entered() -> None:
    inner = EmailMessage()
    inner.set_content(ENVOI)
    outer = EmailMessage()
    outer.set_content("<p>bounce</p>", subtype="html")
    outer.add_attachment(inner)
    content = read_mail(outer.as_bytes())
    assert content.text is None


def test_attachments_names_are_case_insensitive() -> None:
    msg = EmailMessage()
    msg.set_content(ENVOI)
    msg.add_attachment(b"0601;;A\n", maintype="text", subtype="csv", filename="Mobiles.CSV")
    msg.add_attachment(
        b"Bonjour [1]\n", maintype="application", subtype="octet-stream", filename="MESSAGE.csv"
    )
    msg.add_attachment(b"ignored", maintype="text", subtype="csv", filename="other.csv")
    content = read_mail(msg.as_bytes())
    assert content.text == ENVOI
    assert content.attachments == {"mobiles.csv": b"0601;;A\n", "message.csv": b"Bonjour [1]\n"}


def test_first_attachment_of_a_name_wins() -> None:
    msg = EmailMessage()
    msg.set_content(ENVOI)
    msg.add_attachment(b"first", maintype="text", subtype="csv", filename="mobiles.csv")
    msg.add_attachment(b"second", maintype="text", subtype="csv", filename="MOBILES.csv")
    assert read_mail(msg.as_bytes()).attachments == {"mobiles.csv": b"first"}


def test_custom_wanted_names() -> None:
    msg = EmailMessage()
    msg.set_content(ENVOI)
    msg.add_attachment(b"x", maintype="text", subtype="csv", filename="mobiles.csv")
    msg.add_attachment(b"y", maintype="text", subtype="csv", filename="Other.csv")
    assert read_mail(msg.as_bytes(), frozenset({"OTHER.CSV"})).attachments == {"other.csv": b"y"}


def test_rfc2231_and_rfc2047_file_names() -> None:
    raw = (
        b"From: a@b.c\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n<envoi></envoi>\r\n"
        b"--XX\r\nContent-Type: text/csv\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''Mobiles%2ECSV\r\n\r\n"
        b"0601\r\n"
        b"--XX\r\nContent-Type: text/csv\r\n"
        b"Content-Disposition: attachment; filename*0*=utf-8''mess; filename*1=\"age.csv\"\r\n\r\n"
        b"hello\r\n"
        b"--XX--\r\n"
    )
    content = read_mail(raw)
    assert content.text == "<envoi></envoi>"
    assert content.attachments == {"mobiles.csv": b"0601", "message.csv": b"hello"}


def test_rfc2047_name_and_content_type_name_and_path() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b'--XX\r\nContent-Type: text/csv; name="=?UTF-8?Q?Mobiles=2Ecsv?="\r\n\r\n'
        b"0601\r\n"
        b'--XX\r\nContent-Type: text/csv; name="C:\\\\Users\\\\me\\\\message.csv"\r\n\r\n'
        b"hi\r\n"
        b"--XX--\r\n"
    )
    content = read_mail(raw)
    assert content.attachments == {"mobiles.csv": b"0601", "message.csv": b"hi"}
    assert content.text is None  # a named part is an attachment, never the body


def test_zero_byte_attachment() -> None:
    msg = EmailMessage()
    msg.set_content(ENVOI)
    msg.add_attachment(b"", maintype="text", subtype="csv", filename="message.csv")
    assert read_mail(msg.as_bytes()).attachments == {"message.csv": b""}


def test_thousand_attachments() -> None:
    mixed = MIMEMultipart("mixed")
    mixed.attach(MIMEText(ENVOI, "plain", "utf-8"))
    for i in range(1000):
        part = MIMEApplication(f"data {i}".encode(), "octet-stream")
        part.add_header("Content-Disposition", "attachment", filename=f"file{i}.bin")
        mixed.attach(part)
    wanted = MIMEApplication(b"0601020304\n", "octet-stream")
    wanted.add_header("Content-Disposition", "attachment", filename="mobiles.csv")
    mixed.attach(wanted)
    content = read_mail(mixed.as_bytes())
    assert content.text == ENVOI
    assert content.attachments == {"mobiles.csv": b"0601020304\n"}


def test_missing_boundary() -> None:
    raw = headers(b"--XX\r\nContent-Type: text/plain\r\n\r\n" + ENVOI.encode(), "multipart/mixed")
    content = read_mail(raw)
    assert content.text is None
    assert content.problems


def test_boundary_never_found() -> None:
    raw = headers(b"no parts here\r\n" + ENVOI.encode(), "multipart/mixed; boundary=ZZ")
    content = read_mail(raw)
    assert content.text is None
    assert content.problems


def test_missing_closing_boundary_keeps_parts() -> None:
    raw = headers(
        b"--XX\r\nContent-Type: text/plain\r\n\r\n" + ENVOI.encode() + b"--XX\r\n"
        b"Content-Type: text/csv; name=mobiles.csv\r\n\r\n0601\r\n",
        "multipart/mixed; boundary=XX",
    )
    content = read_mail(raw)
    assert content.text == ENVOI.rstrip("\n")  # the line end before a boundary is the boundary's
    assert content.attachments["mobiles.csv"].startswith(b"0601")


def test_truncated_base64_body() -> None:
    encoded = base64.b64encode(ENVOI.encode("utf-8"))
    cut = encoded[: (len(encoded) // 4) * 4 - 3]  # one character past a 4-char group
    content = read_mail(headers(cut, "text/plain; charset=utf-8", "base64"))
    assert content.text is not None
    assert ENVOI.startswith(content.text[:-1])
    assert any("base64" in note for note in content.problems)


def test_bad_base64_attachment() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
        b"--XX\r\nContent-Type: text/csv; name=message.csv\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nQm9uam91!!ciBbMV0\r\n"
        b"--XX--\r\n"
    )
    content = read_mail(raw)
    assert content.attachments["message.csv"].startswith(b"Bonjour")
    assert any(note.startswith("attachment message.csv") for note in content.problems)


@pytest.mark.parametrize("seed", range(20))
def test_binary_garbage_never_raises(seed: int) -> None:
    rng = random.Random(seed)
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 5000)))
    assert isinstance(read_mail(raw), MailContent)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n",
        b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n--a\r\n--a\r\n--a--',
        b"Content-Type: text/plain; charset*=''\r\n\r\nx",
        b'Content-Type: text/plain; charset="\xff\xfe"\r\n\r\nx',
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 1\n",
        b"From: =?x-bad?B?!!!?= <a@b.c>\r\nSubject: =?utf-8?B?@@@?=\r\n\r\nx",
        b"Content-Type: message/rfc822\r\n\r\nnot really a message",
        b"Content-Type: text/plain; name=mobiles.csv\r\nContent-Transfer-Encoding: base64\r\n\r\n=",
    ],
)
def test_broken_structures_never_raise(raw: bytes) -> None:
    assert isinstance(read_mail(raw), MailContent)


def test_deep_nesting_keeps_headers() -> None:
    depth = 3000
    raw = b"From: deep@example.com\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, depth):
        raw += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
    raw += b"--b%d\r\nContent-Type: text/plain\r\n\r\nhi\r\n" % (depth - 1)
    content = read_mail(raw)
    assert content.from_addresses == ("deep@example.com",)
    assert content.problems


def test_very_long_lines() -> None:
    body = "<envoi><sms>" + "x" * 2_000_000 + "</sms></envoi>"
    content = read_mail(headers(body.encode()))
    assert content.text == body


def test_problems_are_capped() -> None:
    part = b"--XX\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n"
    raw = b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n" + part * 500
    problems = read_mail(raw).problems
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[-1].endswith("more problems")


def test_from_addresses() -> None:
    raw = (
        b'From: "Dupont, Jean" <Jean@Example.com>, other@EXAMPLE.org\r\n'
        b"From: =?utf-8?q?J=C3=A9r=C3=B4me?= <jerome@example.net>\r\n\r\nx"
    )
    assert read_mail(raw).from_addresses == (
        "jean@example.com",
        "other@example.org",
        "jerome@example.net",
    )


@pytest.mark.parametrize("value", [b"", b"garbage", b"<<<>>>", b"\xff\xfe"])
def test_unparsable_from_gives_empty(value: bytes) -> None:
    assert read_mail(b"From: " + value + b"\r\n\r\nx").from_addresses == ()


def test_missing_headers() -> None:
    content = read_mail(b"\r\nbody")
    assert content.from_addresses == ()
    assert content.subject is None
    assert content.message_id is None
    assert content.auto_submitted is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"auto-replied", "auto-replied"),
        (b" Auto-Replied ", "auto-replied"),
        (b'auto-replied; owner-email="x@y.z"', "auto-replied"),
        (b"auto-generated (cron)", "auto-generated"),
        (b"No", "no"),
        (b"", None),
    ],
)
def test_auto_submitted(value: bytes, expected: str | None) -> None:
    raw = b"From: a@b.c\r\nAuto-Submitted: " + value + b"\r\n\r\nx"
    assert read_mail(raw).auto_submitted == expected


def test_encoded_and_8bit_subjects() -> None:
    raw = b"Subject: =?iso-8859-1?q?=E9t=E9?= =?utf-8?b?w6l0w6k=?= et caf\xc3\xa9\r\n\r\nx"
    assert read_mail(raw).subject == "étéété et café"
    raw = b"Subject: =?x-unknown?q?=E9t=E9?=\r\n\r\nx"
    assert read_mail(raw).subject == "été"
    raw = b"Subject: long\r\n folded\r\n\tsubject\r\n\r\nx"
    assert read_mail(raw).subject == "long folded\tsubject"


# -- the fast path for one text/plain part (read_simple_mail) ------------------------------

HEADER_VARIANTS = [
    "From: erp@client.test", "From: ERP <Erp@Client.TEST>", "From erp@client.test", "To: a@b.c",
    "Subject: sms x", "Subject: =?utf-8?q?=C3=A9t=C3=A9?=", "Subject:\tfolded\r\n  line",
    "Message-ID: <1@client.test>", "MIME-Version: 1.0", "Content-Type: text/plain",
    'Content-Type: text/plain; charset="utf-8"', "Content-Type: TEXT/PLAIN; Charset=ISO-8859-1",
    "Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes",
    "Content-Type: text/plain;\r\n charset=us-ascii", "Content-Type: text/html",
    "Content-Type: text/plain; name=x.txt", "Content-Type: multipart/mixed; boundary=b",
    "Content-Type: text/plain; charset=bogus", "Content-Type: text/plain; charset=",
    "Content-Transfer-Encoding: 7bit", "Content-Transfer-Encoding: 8bit",
    "Content-Transfer-Encoding: quoted-printable", "Content-Transfer-Encoding: base64",
    "Content-Transfer-Encoding: Base64 ", "Content-Transfer-Encoding: x-uuencode",
    "Content-Disposition: attachment; filename=mobiles.csv", "Auto-Submitted: auto-replied",
    " continuation first", ":no name", "no colon here", "X-8bit: caf\xe9", "X-Empty:",
]  # fmt: skip
BODY_PIECES = [
    ENVOI, "=C3=A9t=C3=A9=\r\n", "PGVudm9pPg==", "PGVudm9p", "caf\xe9 ", "\r", "\n", "\r\n",
    ". ", "-- \r\n", "> quoted \r\n", "\x00", "=", "line \r\nnext",
]  # fmt: skip


@st.composite
def simple_mails(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(HEADER_VARIANTS), max_size=8))
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    head = "".join(h.replace("\r\n", eol) + eol for h in names)
    body = "".join(draw(st.lists(st.sampled_from(BODY_PIECES) | st.text(max_size=8), max_size=8)))
    sep = draw(st.sampled_from([eol, "\r\n", "\n", ""]))
    return (head + sep + body).encode("utf-8", "surrogateescape")


@given(simple_mails())
@settings(max_examples=1500, deadline=None)
def test_fast_path_reads_as_the_stdlib(raw: bytes) -> None:
    fast = read_simple_mail(raw)
    assert fast is None or fast == read_mail_stdlib(raw)
    assert read_mail(raw) == read_mail_stdlib(raw)


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_fast_path_on_any_bytes(raw: bytes) -> None:
    fast = read_simple_mail(raw)
    assert fast is None or fast == read_mail_stdlib(raw)


@pytest.mark.parametrize("cte", ["7bit", "8bit", "quoted-printable", "base64"])
def test_fast_path_takes_the_common_requests(cte: str) -> None:
    """A program's single text/plain request is read without the stdlib parser."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "erp@client.test", "sendsms@bridge.test", "sms"
    msg.set_content(ENVOI, cte=cte if cte != "7bit" else None)
    for raw in (msg.as_bytes(), msg.as_bytes().replace(b"\n", b"\r\n")):
        fast = read_simple_mail(raw)
        assert fast is not None and fast == read_mail_stdlib(raw)
        assert fast.text == ENVOI
