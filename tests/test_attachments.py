"""mobiles.csv / message.csv: formats, encodings, line ends, personalisation."""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbridge.attachments import (
    AttachmentError,
    MobileLine,
    _lines,
    decode_text,
    filler,
    iter_mobiles,
    personalise,
    read_message,
)

SEED_MOBILES = b"0601020304;;Michel;;Martin;;10/10/2015\n0601020305;;Sarah;;Dupont;;02/08/2015\n"
SEED_MESSAGE = b"Bonjour [1] [2], votre nouvelle carte sera disponible le [3]\n"


def test_decode_utf8_with_and_without_bom() -> None:
    assert decode_text("été 50€".encode()) == "été 50€"
    assert decode_text(codecs.BOM_UTF8 + "été 50€".encode()) == "été 50€"


def test_decode_cp1252_and_latin1() -> None:
    assert decode_text("été 50€ – œ".encode("cp1252")) == "été 50€ – œ"
    assert decode_text("Éloïse à Noël".encode("latin-1")) == "Éloïse à Noël"


def test_decode_undefined_cp1252_bytes_never_fails() -> None:
    assert decode_text(b"a\x81\x8d\x8f\x90\x9db\xe9") == "a\x81\x8d\x8f\x90\x9dbé"


def test_decode_empty() -> None:
    assert decode_text(b"") == ""
    assert decode_text(codecs.BOM_UTF8) == ""


@pytest.mark.parametrize("data", [b"\x00", b"0601\x00;;a", "0601".encode("utf-16")])
def test_nul_bytes_are_not_text(data: bytes) -> None:
    with pytest.raises(AttachmentError):
        decode_text(data)
    with pytest.raises(AttachmentError):
        list(iter_mobiles(data))
    with pytest.raises(AttachmentError):
        read_message(data)


def test_seed_example() -> None:
    lines = list(iter_mobiles(SEED_MOBILES))
    assert lines == [
        MobileLine("0601020304", ("Michel", "Martin", "10/10/2015")),
        MobileLine("0601020305", ("Sarah", "Dupont", "02/08/2015")),
    ]
    template = read_message(SEED_MESSAGE)
    assert template == "Bonjour [1] [2], votre nouvelle carte sera disponible le [3]"
    assert [personalise(template, line.fields) for line in lines] == [
        "Bonjour Michel Martin, votre nouvelle carte sera disponible le 10/10/2015",
        "Bonjour Sarah Dupont, votre nouvelle carte sera disponible le 02/08/2015",
    ]


def test_number_only_lines() -> None:
    assert list(iter_mobiles(b"0601020304\n0601020305")) == [
        MobileLine("0601020304", ()),
        MobileLine("0601020305", ()),
    ]


def test_single_semicolon_format() -> None:
    assert list(iter_mobiles(b"0601020304;Michel;Martin\n")) == [
        MobileLine("0601020304", ("Michel", "Martin")),
    ]


def test_quoted_fields_in_semicolon_format() -> None:
    data = b'0601020304;"Dupont; Sarah";"dit ""Sa""" ; x\n0601020305; "a;b"\n'
    assert list(iter_mobiles(data)) == [
        MobileLine("0601020304", ("Dupont; Sarah", 'dit "Sa"', "x")),
        MobileLine("0601020305", ("a;b",)),
    ]


def test_quoted_fields_in_double_semicolon_format() -> None:
    data = b'"0601020304";;"Dupont; Sarah";; "dit ""Sa""" ;;"\n'
    assert list(iter_mobiles(data)) == [
        MobileLine("0601020304", ("Dupont; Sarah", 'dit "Sa"', '"')),
    ]


def test_double_semicolon_keeps_single_semicolons_in_fields() -> None:
    assert list(iter_mobiles(b"0601;;a;b;;c\n")) == [MobileLine("0601", ("a;b", "c"))]


def test_empty_fields_kept_in_place() -> None:
    assert list(iter_mobiles(b"0601;;Michel;;;;10/10\n0602;;\n")) == [
        MobileLine("0601", ("Michel", "", "10/10")),
        MobileLine("0602", ("",)),
    ]


@pytest.mark.parametrize("sep", [b"\r\n", b"\n", b"\r"])
def test_line_ends(sep: bytes) -> None:
    data = sep.join([b"0601020304;;A", b"0601020305;;B", b""])
    assert [line.tel for line in iter_mobiles(data)] == ["0601020304", "0601020305"]
    assert [line.fields for line in iter_mobiles(data)] == [("A",), ("B",)]


def test_mixed_line_ends_and_blank_lines() -> None:
    data = b"\r\n\r\n0601;;A\r\n   \r\n\t\n;;\n;;;;\n; ;\n;\n0602;;B\r0603\n\n"
    assert list(iter_mobiles(data)) == [
        MobileLine("0601", ("A",)),
        MobileLine("0602", ("B",)),
        MobileLine("0603", ()),
    ]


def test_line_without_number_is_not_blank() -> None:
    # An empty number with data is a recipient line the checks must answer (code 6).
    assert list(iter_mobiles(b";;Michel\n")) == [MobileLine("", ("Michel",))]


def test_first_line_is_not_a_header() -> None:
    assert [line.tel for line in iter_mobiles(b"num;;prenom\n0601;;A\n")] == ["num", "0601"]


def test_spaced_dotted_dashed_numbers_kept_as_written() -> None:
    data = b"  06 01 02 03 04 ;;A\n06.01.02.03.05;;B\n06-01-02-03-06\n+33 6 01 02 03 07;x\n"
    assert [line.tel for line in iter_mobiles(data)] == [
        "06 01 02 03 04",
        "06.01.02.03.05",
        "06-01-02-03-06",
        "+33 6 01 02 03 07",
    ]


def test_bom_and_cp1252_mobiles() -> None:
    bom = codecs.BOM_UTF8 + "0601;;Éloïse;;50€\r\n".encode()
    assert list(iter_mobiles(bom)) == [MobileLine("0601", ("Éloïse", "50€"))]
    cp = "0601;;Éloïse;;50€\r\n".encode("cp1252")
    assert list(iter_mobiles(cp)) == [MobileLine("0601", ("Éloïse", "50€"))]


def test_unicode_line_separators_do_not_split() -> None:
    data = "0601;;a\u2028b\x0bc\x85d\n".encode()
    assert list(iter_mobiles(data)) == [MobileLine("0601", ("a\u2028b\x0bc\x85d",))]


def test_iter_mobiles_is_lazy() -> None:
    lines = iter_mobiles(b"0601\n" * 100_000)
    assert next(lines) == MobileLine("0601", ())


def test_huge_quoted_field_does_not_crash() -> None:
    data = b'0601;"' + b"x" * 300_000 + b'"\n'
    (line,) = list(iter_mobiles(data))
    assert line.tel == "0601"


def test_read_message_first_non_blank_line() -> None:
    assert read_message(b"\r\n  \r\n  Bonjour [1]  \r\nsecond line\r\n") == "Bonjour [1]"
    assert read_message(codecs.BOM_UTF8 + "Été\n".encode()) == "Été"
    assert read_message("Promo 50€ – été".encode("cp1252")) == "Promo 50€ – été"
    assert read_message(b"only line") == "only line"


def test_read_message_keeps_content_as_written() -> None:
    assert read_message(b'a;;b;c "q" [1]\n') == 'a;;b;c "q" [1]'


def test_read_message_empty() -> None:
    assert read_message(b"") == ""
    assert read_message(b"\r\n \n\t\n") == ""


def test_personalise_missing_fields_become_empty() -> None:
    template = "Bonjour [1] [2], le [3]"
    assert personalise(template, ["Michel"]) == "Bonjour Michel , le "
    assert personalise(template, []) == "Bonjour  , le "


def test_personalise_non_placeholders_kept() -> None:
    template = "[0] [x] [01] [ 1] [1 ] [-1] [] [1"
    assert personalise(template, ["A"]) == template


def test_personalise_is_single_pass() -> None:
    assert personalise("[1] [2]", ["[2]", "B"]) == "[2] B"
    assert personalise("[1]", ["[1]"]) == "[1]"


def test_personalise_repeated_and_large_indexes() -> None:
    assert personalise("[1][1][10]", [str(i) for i in range(1, 11)]) == "1110"
    assert personalise("[99999999999999999999999999]", ["a"]) == ""
    assert personalise("[" + "9" * 5000 + "]", ["a"]) == ""


# -- the fast paths against the plain regex readings they replaced -------------------

_PIECES = st.sampled_from(["[1]", "[2]", "[12]", "[0]", "[01]", "[1234567890]", "[", "]", "a", " "])


def _personalise_by_regex(template: str, fields: Sequence[str]) -> str:
    def field_for(match: re.Match[str]) -> str:
        digits = match.group(1)
        index = int(digits) - 1 if len(digits) <= 9 else len(fields)
        return fields[index] if index < len(fields) else ""

    return re.sub(r"\[([1-9][0-9]*)\]", field_for, template)


@given(
    st.lists(_PIECES | st.text(max_size=3), max_size=12).map("".join),
    st.lists(st.text(max_size=4), max_size=14),
)
def test_filler_is_the_regex_substitution(template: str, fields: list[str]) -> None:
    assert filler(template)(fields) == _personalise_by_regex(template, fields)
    assert personalise(template, fields) == _personalise_by_regex(template, fields)


_LINE_PIECES = st.sampled_from(["\n", "\r", "\r\n", "a", ";", " ", "06"])


@given(st.lists(_LINE_PIECES, max_size=20).map("".join))
def test_lines_split_like_the_line_end_regex(text: str) -> None:
    pieces = re.split(r"\r\n|\r|\n", text)
    expected = pieces[:-1] + ([pieces[-1]] if pieces[-1] else [])
    assert list(_lines(text)) == expected
