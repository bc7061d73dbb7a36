"""Tests for mailbridge.gsm: SMS length, encoding, cutting and transliteration."""

from __future__ import annotations

import time

import gsm0338  # noqa: F401  (registers the codec used by the reference model below)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbridge.gsm import _TRANSLIT, Segmentation, fit, is_gsm7, segment, transliterate

EURO = "€"
EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16
STOP = "\nSTOP SMS au 36111"
FRENCH_NON_GSM = "çêâîôûëïœ"
FRENCH_GSM = "éèàùÉÇÄÖÑÜüß"


def ref_units(text: str, encoding: str) -> list[int]:
    """Per-character cost straight from the codec / UTF-16, no caching or fast paths."""
    if encoding == "gsm7":
        return [len(c.encode("gsm03.38")) for c in text]
    return [len(c.encode("utf-16-le", "surrogatepass")) // 2 for c in text]


def ref_parts(text: str, encoding: str) -> int:
    """Reference part count: re-pack character by character, simplest possible way."""
    single, cap = (160, 153) if encoding == "gsm7" else (70, 67)
    costs = ref_units(text, encoding)
    if sum(costs) <= single:
        return 1
    parts, fill = 1, 0
    for c in costs:
        if fill + c > cap:
            parts, fill = parts + 1, 0
        fill += c
    return parts


# --- segment -----------------------------------------------------------------------------


def test_empty() -> None:
    assert segment("") == Segmentation("gsm7", 0, 1)


@pytest.mark.parametrize(
    ("n", "parts"),
    [(1, 1), (160, 1), (161, 2), (306, 2), (307, 3), (459, 3), (460, 4), (765, 5), (766, 6)],
)
def test_gsm7_boundaries(n: int, parts: int) -> None:
    assert segment("a" * n) == Segmentation("gsm7", n, parts)


@pytest.mark.parametrize(
    ("n", "parts"), [(1, 1), (70, 1), (71, 2), (134, 2), (135, 3), (201, 3), (202, 4)]
)
def test_ucs2_boundaries(n: int, parts: int) -> None:
    assert segment("ç" + "a" * (n - 1)) == Segmentation("ucs2", n, parts)


@pytest.mark.parametrize("ch", list("€[]{}^~\\|\f"))
def test_extension_characters_count_two(ch: str) -> None:
    assert segment(ch) == Segmentation("gsm7", 2, 1)
    assert segment("a" * 158 + ch) == Segmentation("gsm7", 160, 1)
    assert segment("a" * 159 + ch) == Segmentation("gsm7", 161, 2)


def test_escape_never_split_at_part_boundary() -> None:
    # 152 + 2 + 152 = 306 septets = 2 * 153, so ceil(units / 153) says 2 parts; but the euro
    # sign cannot start at septet 153 of part 1, so it moves whole and a third part is needed.
    text = "a" * 152 + EURO + "a" * 152
    assert -(-306 // 153) == 2
    assert segment(text) == Segmentation("gsm7", 306, 3)
    # One septet earlier it fits exactly in part 1.
    assert segment("a" * 151 + EURO + "a" * 153) == Segmentation("gsm7", 306, 2)


def test_surrogate_pair_never_split() -> None:
    # 66 + 2 + 66 = 134 units = 2 * 67, but the emoji cannot straddle parts 1 and 2.
    text = "a" * 66 + EMOJI + "a" * 66
    assert segment(text) == Segmentation("ucs2", 134, 3)
    assert segment("a" * 65 + EMOJI + "a" * 67) == Segmentation("ucs2", 134, 2)
    assert segment(EMOJI * 35) == Segmentation("ucs2", 70, 1)
    assert segment(EMOJI * 36) == Segmentation("ucs2", 72, 2)


@pytest.mark.parametrize("ch", list(FRENCH_NON_GSM))
def test_french_letters_not_gsm7(ch: str) -> None:
    assert not is_gsm7(ch)
    assert segment("Bonjour " + ch).encoding == "ucs2"


@pytest.mark.parametrize("ch", list(FRENCH_GSM))
def test_french_letters_gsm7(ch: str) -> None:
    assert is_gsm7(ch)
    assert segment("Bonjour " + ch) == Segmentation("gsm7", 9, 1)


def test_ascii_that_is_not_plain_gsm7() -> None:
    assert not is_gsm7("`")
    assert not is_gsm7("a\tb")
    assert not is_gsm7("\x1b")  # a bare escape would swallow the next septet
    assert is_gsm7("line\r\nbreak @$_")
    assert segment("\r\n") == Segmentation("gsm7", 2, 1)


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("ab€[\r\nçé" + EMOJI) | st.characters(), max_size=400))
def test_segment_matches_reference(text: str) -> None:
    seg = segment(text)
    assert seg.encoding == ("gsm7" if is_gsm7(text) else "ucs2")
    if "\x1b" not in text:
        assert seg.units == sum(ref_units(text, seg.encoding))
        assert seg.parts == ref_parts(text, seg.encoding)


# --- fit -----------------------------------------------------------------------------------


def test_fit_unchanged_when_it_fits() -> None:
    body = "a" * 300
    assert fit(body, STOP, 5) is body
    assert fit("", STOP, 1) == ""


def test_fit_without_suffix() -> None:
    assert fit("a" * 400, "", 1) == "a" * 160
    assert fit("a" * 400, "", 2) == "a" * 306
    assert fit("a" * 152 + EURO + "a" * 200, "", 1) == "a" * 152 + EURO + "a" * 6


def test_fit_with_suffix() -> None:
    cut = fit("a" * 400, STOP, 1)
    assert cut == "a" * (160 - len(STOP))
    assert segment(cut + STOP).parts == 1
    cut = fit("a" * 1000, STOP, 3)
    assert len(cut) == 3 * 153 - len(STOP)


def test_fit_keeps_escape_whole() -> None:
    # Room for 152 septets before the suffix in part 1: the euro sign (2) must go entirely.
    body = "a" * 151 + EURO + "b" * 10
    assert fit(body, "x" * 8, 1) == "a" * 151
    assert fit(body, "x" * 7, 1) == "a" * 151 + EURO


def test_fit_keeps_surrogate_pair_whole() -> None:
    body = "a" * 69 + EMOJI + "b"
    assert fit(body, "", 1) == "a" * 69
    # 66 + 34 * 2 = 134 units = 2 * 67, yet the first emoji opens part 2 and the last part 3.
    assert fit("a" * 66 + EMOJI * 34, "", 2) == "a" * 66 + EMOJI * 33


def test_fit_ucs2_body_gsm_suffix() -> None:
    body = "ç" * 200
    cut = fit(body, STOP, 2)
    assert cut == "ç" * (2 * 67 - len(STOP))
    assert segment(cut + STOP) == Segmentation("ucs2", 134, 2)


def test_fit_does_not_split_crlf() -> None:
    body = "a" * 159 + "\r\nrest"
    assert fit(body, "", 1) == "a" * 159  # not "a" * 159 + "\r"
    assert fit("a" * 158 + "\r\nrest", "", 1) == "a" * 158 + "\r\n"


def test_fit_suffix_alone_too_big() -> None:
    assert fit("hello" * 100, "s" * 161, 1) == ""
    assert fit("hello", "s" * 200, 0) == ""


def test_fit_is_fast_on_long_bodies() -> None:
    for body in ("a" * 100_000, "é€ç" * 35_000, EMOJI * 50_000):
        start = time.perf_counter()
        cut = fit(body, STOP, 5)
        assert time.perf_counter() - start < 0.5
        assert segment(cut + STOP).parts <= 5


TEXT = st.text(alphabet=st.sampled_from("ab €[ç\r\né" + EMOJI) | st.characters(), max_size=900)


@settings(max_examples=300, deadline=None)
@given(
    TEXT, st.text(alphabet=st.sampled_from("STOP 0€ç\n" + EMOJI), max_size=180), st.integers(1, 5)
)
def test_fit_property(body: str, suffix: str, k: int) -> None:
    cut = fit(body, suffix, k)
    assert body.startswith(cut)
    if segment(suffix).parts <= k:
        assert segment(cut + suffix).parts <= k
    if segment(body + suffix).parts <= k:
        assert cut == body
    # Longest prefix, counted in the encoding of the uncut text (\r\n may cost one more).
    if "\x1b" not in body + suffix and cut != body:
        enc = segment(body + suffix).encoding
        longer = body[: len(cut) + 1 + (body[len(cut)] == "\r")]
        assert ref_parts(longer + suffix, enc) > k
        if cut:
            assert ref_parts(cut + suffix, enc) <= k


# --- transliterate -----------------------------------------------------------------------


def test_transliterate_french_sentence() -> None:
    text = "L’été, ça coûte 5 € — « Noël » à Saint-Étienne… Où êtes-vous ? Cœur naïf"
    assert segment(text).encoding == "ucs2"
    out = transliterate(text)
    assert out == 'L\'été, ca coute 5 € - " Noel " à Saint-Étienne... Où etes-vous ? Coeur naif'
    assert segment(out).encoding == "gsm7"


def test_transliterate_spaces_and_decomposed_accents() -> None:
    assert transliterate("a\u00a0b\u202f!\tc") == "a b ! c"
    assert transliterate("for\u00eat") == "foret"
    assert transliterate("fore\u0302t") == "foret"  # NFD, as some mail clients send
    assert transliterate("\u00c2ME") == "AME"  # NFKD fallback for letters not in the map


def test_transliterate_keeps_unmappable() -> None:
    assert transliterate("ok " + EMOJI) == "ok " + EMOJI
    assert transliterate("日本") == "日本"
    assert transliterate("\u0645\u064e") == "\u0645\u064e"  # mark after non-GSM base stays


def test_transliterate_map_is_sound() -> None:
    for ch, to in _TRANSLIT.items():
        assert not is_gsm7(ch), ch
        assert is_gsm7(to), ch
    for ch in "èéàùÇæÆ€ÄÖÑÜüß":
        assert transliterate(ch) == ch


@settings(max_examples=500)
@given(st.text(alphabet=st.sampled_from(list(_TRANSLIT) + list("aé€[")) | st.characters()))
def test_transliterate_properties(text: str) -> None:
    out = transliterate(text)
    gsm_in = "".join(c for c in text if is_gsm7(c))
    gsm_out = "".join(c for c in out if is_gsm7(c))
    # GSM-7 characters all survive, in order (mapped characters only add more of them).
    it = iter(gsm_out)
    assert all(c in it for c in gsm_in)
    if all(is_gsm7(c) or c in _TRANSLIT for c in text):
        assert is_gsm7(out)
        assert out == "".join(c if is_gsm7(c) else _TRANSLIT[c] for c in text)
    if is_gsm7(text):
        assert out == text
    assert transliterate(out) == out
