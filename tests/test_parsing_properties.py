"""Property tests for the parsers: they never crash, and well-formed input round-trips."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.attachments import AttachmentError, MobileLine, iter_mobiles
from mailbridge.envoi import _read_fields, _Spans, parse_envoi
from mailbridge.mime import MailContent, read_mail

# Fragments that drive the scanner into its corner cases, mixed with free text.
TOKENS = [
    "<envoi>", "</envoi>", "<ENVOI a='1'>", "<envoi/>", "<sms>", "</sms>", "<SMS>", "<num1>",
    "</num1>", "<keyid/>", "<![CDATA[", "]]>", "<!--", "-->", "&amp;", "&#", "&#x", "&#0;",
    "&#xD800;", "&#233;", ";", "<", ">", "/", "&", "<!", "<!DOCTYPE", "<!ENTITY", "\n", " ",
]  # fmt: skip

scanner_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=5)), max_size=40).map("".join),
)


@given(scanner_text)
@settings(max_examples=500)
def test_parse_envoi_never_raises(text: str) -> None:
    envoi = parse_envoi(text)
    assert all(name == name.lower() for name in envoi.fields)
    assert all(value == value.strip() for value in envoi.fields.values())


# The scanner's fragments that cannot start a comment or CDATA section, and
# whole elements (repeated names: the first occurrence wins).
NO_SPAN_TOKENS = [t for t in TOKENS if "<!" not in t and t != "<"] + ["</sms >", "<sms/>"]
short_text = st.text(st.characters(exclude_characters="<"), max_size=5)
element = st.builds(
    "<{}>{}</{}>".format,
    st.sampled_from(["sms", "SMS", "num1", "keyid", "envoi"]),
    short_text,
    st.sampled_from(["sms", "Sms", "num1", "keyid", "envoi"]),
)
no_span_text = st.lists(
    st.one_of(st.sampled_from(NO_SPAN_TOKENS), short_text, element), max_size=40
).map("".join)


@given(no_span_text, st.booleans())
@settings(max_examples=500)
def test_fields_without_spans_read_as_the_span_aware_scanner(text: str, only: bool) -> None:
    """The fast path for texts without comments or CDATA reads what the general
    scanner reads (forced here by a span lying past the end of the text)."""
    spans = _Spans(text)
    assert not spans.starts
    far = _Spans("")
    far.starts, far.ends, far.is_cdata = [len(text) + 1], [len(text) + 2], [False]
    fast = _read_fields(text, 0, len(text), spans, only_request_tags=only)
    assert fast == _read_fields(text, 0, len(text), far, only_request_tags=only)


TAG_NAMES = [
    "keyid", "num", "num1", "num500", "sms", "sms2", "emetteur", "tracker", "smslong",
    "emailId", "emailAck", "emailNot", "nostop",
]  # fmt: skip

# Value alphabet: any character except `/`, `!` and `;`. Without `/` a value can
# never contain a closing tag (`</name`, `</envoi`); without `!` no comment,
# CDATA or declaration can start (`<!`); without `;` no entity reference can
# be complete, so raw `&` and `<` must come back exactly as written.
VALUE_ALPHABET = st.characters(exclude_characters="/!;", codec="utf-8")
values = st.text(VALUE_ALPHABET, max_size=40)
# Text around the block: no `<` at all, so it holds no tag, block or declaration.
around = st.text(st.characters(exclude_characters="<", codec="utf-8"), max_size=40)
whitespace = st.text(" \t\r\n", max_size=3)


def random_case(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(ch.upper() if flip else ch.lower() for ch, flip in zip(name, flips, strict=True))


@st.composite
def envoi_requests(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    names = draw(st.lists(st.sampled_from(TAG_NAMES), unique=True, max_size=len(TAG_NAMES)))
    expected: dict[str, str] = {}
    parts = [draw(around), f"<{random_case(draw, 'envoi')}>", draw(whitespace)]
    for name in names:
        value = draw(values)
        # A raw line break and the white space around it read as one space (SPEC 2).
        expected[name.lower()] = re.sub(r"[ \t\r]*\n[ \t\r\n]*", " ", value).strip()
        opening, closing = random_case(draw, name), random_case(draw, name)
        parts.append(f"<{opening}>{value}</{closing}>{draw(whitespace)}")
    if draw(st.booleans()):  # a missing </envoi> reads to the end
        parts.append(f"</{random_case(draw, 'envoi')}>")
    parts.append(draw(around))
    return "".join(parts), expected


@given(envoi_requests())
@settings(max_examples=500)
def test_well_formed_fields_round_trip(request: tuple[str, dict[str, str]]) -> None:
    text, expected = request
    assert parse_envoi(text).fields == expected


@given(st.binary(max_size=2000))
@settings(max_examples=300)
def test_iter_mobiles_only_raises_attachment_error(data: bytes) -> None:
    try:
        lines = list(iter_mobiles(data))
    except AttachmentError:
        assert b"\x00" in data
        return
    assert all(isinstance(line, MobileLine) for line in lines)
    assert all(line.tel or any(line.fields) for line in lines)


numbers = st.text("0123456789 .-+", min_size=1, max_size=16).filter(lambda s: s.strip() != "")
# Fields: no separator, quote or line break; NUL excluded (it makes a file binary).
field_text = st.text(st.characters(exclude_characters=';"\r\n\x00', codec="utf-8"), max_size=20)


@given(
    st.lists(st.tuples(numbers, st.lists(field_text, min_size=1, max_size=4)), max_size=20),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),
)
def test_generated_mobile_lines_round_trip(
    rows: list[tuple[str, list[str]]], line_end: str, bom: bool
) -> None:
    text = line_end.join(";;".join([num, *fields]) for num, fields in rows)
    data = ("\ufeff" if bom else "").encode() + text.encode("utf-8")
    expected = [MobileLine(num.strip(), tuple(f.strip() for f in fields)) for num, fields in rows]
    assert list(iter_mobiles(data)) == expected


@given(st.binary(max_size=3000))
@settings(max_examples=200)
def test_read_mail_never_raises(raw: bytes) -> None:
    assert isinstance(read_mail(raw), MailContent)
