"""Ack and Not bodies, byte for byte against golden files (SPEC section 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.codes import ACK_MESSAGES, NOT_MESSAGES, ack_message
from mailbridge.model import ReportData, ReportJob
from mailbridge.report import ReplyContent, ReportRenderer, compose_mail, rfc5322_date

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def renderer() -> ReportRenderer:
    return ReportRenderer()


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def test_ack_bytes(renderer: ReportRenderer) -> None:
    assert renderer.ack_body("1548", 0) == golden("ack_0.xml")
    assert renderer.ack_body(None, 2) == golden("ack_2.xml")
    assert renderer.ack_body("a&b<c>", 3) == golden("ack_3_escaped.xml")


def test_not_single_form(renderer: ReportRenderer) -> None:
    data = ReportData(
        email_id="1548", ack_code=0, numbered=False, rows=[("0601020304", 0)], in_reply_to=None
    )
    assert renderer.not_body(data) == golden("not_single.xml")


def test_not_numbered_form(renderer: ReportRenderer) -> None:
    rows = [("0601020304", 0), ("06 01 02", 7), ("+33601020305", 24)]
    data = ReportData(email_id="1548", ack_code=0, numbered=True, rows=rows, in_reply_to=None)
    assert renderer.not_body(data) == golden("not_numbered.xml")


def test_every_code_text_is_latin1(renderer: ReportRenderer) -> None:
    for code, text in NOT_MESSAGES.items():
        body = renderer.not_body(
            ReportData(
                email_id="x", ack_code=0, numbered=False, rows=[("1", code)], in_reply_to=None
            )
        )
        assert text.encode("iso-8859-1") in body


def test_values_outside_latin1_become_character_references(renderer: ReportRenderer) -> None:
    body = renderer.ack_body("Заказ-1", 0)
    assert b"<emailId>&#1047;&#1072;&#1082;&#1072;&#1079;-1</emailId>" in body


def test_report_mail_headers(renderer: ReportRenderer) -> None:
    job = ReportJob(
        id=7,
        request_id=42,
        kind="not",
        to_addr="not@client.test",
        created_at=1_800_000_000.0,
        attempts=0,
    )
    data = ReportData(
        email_id="1548",
        ack_code=0,
        numbered=False,
        rows=[("0601020304", 0)],
        in_reply_to="<orig@client.test>",
    )
    body = renderer.not_body(data)
    rendered = renderer.render("not", data)
    assert rendered.body == body
    raw = compose_mail(job, data, rendered, from_address="mb@bridge.test", instance_id="abcd1234")
    msg = message_from_bytes(raw, policy=policy.default)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"] == "not@client.test"
    assert msg["In-Reply-To"] == "<orig@client.test>"
    assert msg["Message-ID"] == "<not.42.7.abcd1234@bridge.test>"
    assert msg.get_content_charset() == "iso-8859-1"
    assert msg.get_payload(decode=True) == golden("not_single.xml")
    # The same job renders the same mail: retries are recognisable duplicates.
    assert raw == compose_mail(
        job, data, renderer.render("not", data), from_address="mb@bridge.test",
        instance_id="abcd1234",
    )  # fmt: skip


def test_header_injection_is_neutralised(renderer: ReportRenderer) -> None:
    job = ReportJob(
        id=1, request_id=1, kind="ack", to_addr="a@client.test", created_at=0.0, attempts=0
    )
    data = ReportData(
        email_id="x\r\nBcc: victim@example.com",
        ack_code=0,
        numbered=False,
        rows=[],
        in_reply_to=None,
    )
    raw = compose_mail(
        job, data, renderer.render("ack", data), from_address="mb@bridge.test", instance_id="i"
    )
    assert b"\nBcc:" not in raw.split(b"\n\n", 1)[0]  # the headers


def test_plain_report_lists_the_failures(renderer: ReportRenderer) -> None:
    rows = [("0601020304", 0), ("06.00.00.00.00", 11), ("0700000000", 21)]
    data = ReportData(
        email_id="<m@c.test>",
        ack_code=0,
        numbered=True,
        rows=rows,
        in_reply_to="<m@c.test>",
        plain_reports="failures",
    )
    body = renderer.body("plain", data)
    assert body.decode("utf-8") == (
        "Votre SMS n'a pas été envoyé à 2 numéro(s) sur 3.\n\n"
        "06.00.00.00.00 : Le numéro de téléphone est dans la liste noire (code 11)\n"
        "0700000000 : Le numéro de téléphone n'est pas attribué (code 21)\n"
    )
    job = ReportJob(
        id=7,
        request_id=3,
        kind="plain",
        to_addr="alarm@c.test",
        created_at=1_800_000_000.0,
        attempts=0,
    )
    mail = message_from_bytes(
        compose_mail(
            job, data, renderer.render("plain", data), from_address="mb@b.test", instance_id="i"
        ),  # fmt: skip
        policy=policy.default,
    )
    assert (mail["Subject"], mail["In-Reply-To"], mail["Auto-Submitted"]) == (
        "SMS non envoyé", "<m@c.test>", "auto-replied",
    )  # fmt: skip
    assert mail.get_content_charset() == "utf-8"


def test_etatdlr_bytes(renderer: ReportRenderer) -> None:
    """SPEC 7: numbered like the request, dates in Europe/Paris, ISO-8859-1."""
    rows = [
        (1, "0601020304", "DELIVRE", "", 1_790_000_000.0),  # 2026-09-21, summer time
        (3, "06 01 02 & 03", "NON_DELIVRE", "Abonné absent <27>", 1_800_000_000.0),  # winter
    ]
    rendered = renderer.render(
        "dlr",
        ReportData(email_id="1548", ack_code=0, numbered=True, rows=[], in_reply_to=None),
        dlr_rows=rows,
    )
    assert rendered.subject == "etatDlr 1548"
    assert rendered.body == golden("dlr.xml")


def test_plain_delivery_mail(renderer: ReportRenderer) -> None:
    data = ReportData(
        email_id="<m@c.test>",
        ack_code=0,
        numbered=True,
        rows=[],
        in_reply_to="<m@c.test>",
        plain_reports="failures",
    )
    rows = [(1, "0601020304", "DELIVRE", "", 1_800_000_000.0),
            (2, "0601020305", "EXPIRE", "validity", 1_800_000_000.0)]  # fmt: skip
    rendered = renderer.render("dlr", data, dlr_rows=rows)
    assert (rendered.subject, rendered.charset) == ("SMS non distribué", "utf-8")
    assert rendered.body.decode() == (
        "Distribution de votre SMS :\n\n"
        "0601020304 : distribué le 2027-01-15 09:00:00\n"
        "0601020305 : expiré le 2027-01-15 09:00:00 (validity)\n"
    )


def test_reply_mail(renderer: ReportRenderer) -> None:
    data = ReportData(
        email_id="1548", ack_code=0, numbered=True, rows=[], in_reply_to="<orig@c.test>"
    )
    reply = ReplyContent("06 01 02 03 04", "+33601020304", "Stop 36111", True)
    rendered = renderer.render("reply", data, reply=reply)
    assert (rendered.subject, rendered.charset) == ("SMS de 06 01 02 03 04", "utf-8")
    assert rendered.headers == (("X-Mailbridge-Stop", "yes"),)
    assert rendered.body.decode() == (
        "Stop 36111\n\n-- \n06 01 02 03 04 a répondu STOP : ce numéro est mis sur la liste"
        " noire du compte (code 11 pour les prochains envois).\n"
    )
    plain = renderer.render("reply", data, reply=reply._replace(text="Merci", stop=False))
    assert (plain.body, plain.headers) == (b"Merci\n", ())


# -- the rendered-once skeletons give what jinja2 gives --------------------------------

_VALUES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30
) | st.sampled_from(["", "&", "<>", "a&b<c>", "\x00email_id\x00", "Заказ", "é"])


_RENDERER = ReportRenderer()  # one for every example: its skeleton caches fill up as they go


def _jinja_ack(renderer: ReportRenderer, email_id: str | None, code: int) -> bytes:
    template = renderer._env.get_template("ack.xml.j2")
    text = template.render(email_id=email_id or "?", code=code, message=ack_message(code))
    return text.encode("iso-8859-1", errors="xmlcharrefreplace")


def _jinja_not(renderer: ReportRenderer, data: ReportData) -> bytes:
    return renderer._not_body(data)  # the jinja2 path, for any number of rows


@given(email_id=_VALUES | st.none(), code=st.sampled_from(sorted(ACK_MESSAGES)))
@settings(max_examples=100, deadline=None)
def test_ack_skeleton_is_the_template(email_id: str | None, code: int) -> None:
    renderer = _RENDERER
    assert renderer.ack_body(email_id, code) == _jinja_ack(renderer, email_id, code)


@given(
    email_id=_VALUES | st.none(),
    tel=_VALUES,
    code=st.sampled_from(sorted(NOT_MESSAGES)),
    numbered=st.booleans(),
)
@settings(max_examples=100, deadline=None)
def test_one_row_not_skeleton_is_the_template(
    email_id: str | None, tel: str, code: int, numbered: bool
) -> None:
    renderer = _RENDERER
    data = ReportData(
        email_id=email_id, ack_code=0, numbered=numbered, rows=[(tel, code)], in_reply_to=None
    )
    assert renderer.not_body(data) == _jinja_not(renderer, data)
    assert renderer.not_body(data) == renderer.not_body(data)  # from the cache too


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_report_date_is_format_datetime(timestamp: float) -> None:
    assert rfc5322_date(timestamp) == format_datetime(datetime.fromtimestamp(timestamp, UTC))


_CODES = sorted(NOT_MESSAGES) + [5, 42, 1000]  # every code, and codes the table lacks (999's text)


@given(
    email_id=_VALUES | st.none(),
    rows=st.lists(st.tuples(_VALUES, st.sampled_from(_CODES)), max_size=40),
    numbered=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_many_row_not_skeleton_is_the_template(
    email_id: str | None, rows: list[tuple[str, int]], numbered: bool
) -> None:
    """Any number of rows (0 and 1 too), any tel (& < >, markers, non-ASCII), every code."""
    data = ReportData(email_id=email_id, ack_code=0, numbered=numbered, rows=rows, in_reply_to=None)
    assert _RENDERER.not_body(data) == _jinja_not(_RENDERER, data)


@pytest.mark.parametrize("numbered", [True, False])
def test_large_not_skeleton_is_the_template(numbered: bool) -> None:
    """A CSV-sized Not of every code in turn, with tels of XML specials and outside Latin-1."""
    tels = ["0601020304", "a&b<c>d", "Заказ", "é\u20ac", "{0}{1}}{", "\x00n\x00", ""]
    rows = [(tels[i % len(tels)] + str(i), _CODES[i % len(_CODES)]) for i in range(3000)]
    data = ReportData(email_id="a&<>é", ack_code=0, numbered=numbered, rows=rows, in_reply_to=None)
    fresh = ReportRenderer()  # its row skeletons built by this request alone
    assert fresh.not_body(data) == _jinja_not(fresh, data)
    assert fresh.not_body(data) == _jinja_not(fresh, data)  # from the cache too
    empty = ReportData(email_id=None, ack_code=0, numbered=numbered, rows=[], in_reply_to=None)
    assert fresh.not_body(empty) == _jinja_not(fresh, empty)  # after its rows were cut


def test_not_without_rows_before_any_row_skeleton() -> None:
    """No rows, on a renderer that never cut a row: the document alone, once."""
    for numbered in (True, False):
        fresh = ReportRenderer()
        data = ReportData(email_id="1", ack_code=0, numbered=numbered, rows=[], in_reply_to=None)
        assert fresh.not_body(data) == _jinja_not(fresh, data)
