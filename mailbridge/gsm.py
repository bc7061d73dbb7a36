"""SMS length, encoding choice, cutting and transliteration (SPEC §3 "Length", §8 "Cutting").

Input: message text as a Python ``str``. Output: a :class:`Segmentation` (encoding, units,
parts), a cut body that fits a part limit, or a transliterated text. Nothing here raises on
odd input: characters the ``gsm0338`` codec cannot encode simply make the text UCS-2.

GSM-7 text is 160 septets in one SMS, 153 per part when concatenated; extension characters
(``€ [ ] { } ^ ~ \\ |`` and form feed) are an escape plus a septet and count 2. UCS-2 text is
70 UTF-16 units, then 67 per part; characters outside the BMP are a surrogate pair (2 units).
A part never ends inside an escape sequence or a surrogate pair, so parts are counted by
greedy packing of whole characters, not by ``ceil(units / 153)``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Literal, NamedTuple

import gsm0338  # noqa: F401  (importing it registers the "gsm03.38" codec)

Encoding = Literal["gsm7", "ucs2"]

_CODEC = "gsm03.38"
_ESC = "\x1b"
# (single-SMS capacity, per-part capacity of a concatenated SMS: the UDH takes the rest).
_LIMITS: dict[Encoding, tuple[int, int]] = {"gsm7": (160, 153), "ucs2": (70, 67)}


class Segmentation(NamedTuple):
    """How a text is sent: its encoding, its length in units and its number of SMS parts."""

    encoding: Encoding
    units: int  # septets for gsm7 (extension chars count 2), UTF-16 code units for ucs2
    parts: int  # SMS parts (1 for empty text)


@lru_cache(maxsize=4096)
def _gsm_cost(ch: str) -> int:
    """Septets needed for one character, 0 if it is not GSM-7."""
    # The codec maps U+001B to the bare escape septet; a literal ESC in a text would merge
    # with the next septet into an extension character, so it is not sendable as GSM-7.
    if ch == _ESC:
        return 0
    try:
        return len(ch.encode(_CODEC))
    except UnicodeEncodeError:
        return 0


def _ucs2_cost(ch: str) -> int:
    return 2 if ch > "\uffff" else 1


# ASCII fast path, derived from the codec rather than hard-coded: ASCII characters that are
# not GSM-7 at all (backtick, most controls, DEL) and those from the extension table.
_ASCII_NON_GSM = frozenset(c for c in map(chr, range(128)) if _gsm_cost(c) == 0)
_ASCII_EXTENSION = frozenset(c for c in map(chr, range(128)) if _gsm_cost(c) == 2)
# Either kind in one C scan: the usual text has neither (a quarter of the two set scans).
_ASCII_NOT_PLAIN = re.compile(
    "[" + re.escape("".join(sorted(_ASCII_NON_GSM | _ASCII_EXTENSION))) + "]"
).search


def is_gsm7(text: str) -> bool:
    """True if every character is in the GSM 03.38 basic or extension table."""
    if text.isascii():
        return _ASCII_NON_GSM.isdisjoint(text)
    return all(map(_gsm_cost, text))


def _pack(costs: Iterable[int], cap: int) -> tuple[int, int]:
    """Greedily pack whole characters into parts of ``cap`` units: (parts, fill of the last).

    Greedy is optimal here: it uses the fewest parts and, among those, the least-filled last.
    """
    parts, fill = 0, cap
    for c in costs:
        if fill + c > cap:
            parts, fill = parts + 1, c
        else:
            fill += c
    return parts, fill if parts else 0


def _parts(units: int, costs: Callable[[], Iterable[int]], uniform: bool, enc: Encoding) -> int:
    single, cap = _LIMITS[enc]
    if units <= single:
        return 1
    if uniform:  # every character costs 1: nothing can straddle a boundary
        return -(-units // cap)
    return _pack(costs(), cap)[0]


@lru_cache(maxsize=2048)
def _plain_gsm7(units: int) -> Segmentation:
    """A GSM-7 text of `units` characters that each cost one septet."""
    return Segmentation("gsm7", units, _parts(units, lambda: (), True, "gsm7"))


def segment(text: str) -> Segmentation:
    """Encoding, length in units and number of SMS parts of ``text`` (empty: gsm7, 0, 1)."""
    if not text:
        return Segmentation("gsm7", 0, 1)
    if text.isascii():
        if _ASCII_NOT_PLAIN(text) is None:  # the usual text: its length says it all
            return _plain_gsm7(len(text))
        if _ASCII_NON_GSM.isdisjoint(text):
            units = len(text) + sum(map(text.count, _ASCII_EXTENSION))
            parts = _parts(units, lambda: map(_gsm_cost, text), False, "gsm7")
            return Segmentation("gsm7", units, parts)
    costs = list(map(_gsm_cost, text))
    if 0 not in costs:
        units = sum(costs)
        return Segmentation("gsm7", units, _parts(units, lambda: costs, False, "gsm7"))
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    parts = _parts(units, lambda: map(_ucs2_cost, text), units == len(text), "ucs2")
    return Segmentation("ucs2", units, parts)


def fit(body: str, suffix: str, max_parts: int) -> str:
    """Longest prefix of ``body`` such that ``prefix + suffix`` takes at most ``max_parts``.

    ``suffix`` (the STOP mention) is never cut. ``body`` is returned unchanged when
    ``body + suffix`` fits, and ``""`` when even ``suffix`` alone does not. The cut is on a
    whole character (never inside an escape or a surrogate pair) and never splits ``\\r\\n``.
    Units are counted in the encoding of ``body + suffix``: if the cut drops every UCS-2
    character the result is GSM-7, which only fits better (a part then holds more characters).
    """
    if max_parts < 1:
        return ""
    whole = segment(body + suffix)
    if whole.parts <= max_parts:
        return body
    single, cap = _LIMITS[whole.encoding]
    cost = _gsm_cost if whole.encoding == "gsm7" else _ucs2_cost
    suffix_costs = [cost(c) for c in suffix]
    suffix_units = sum(suffix_costs)
    # Packing the suffix backwards gives its fewest parts and the least-filled first part,
    # so prefix + suffix fits iff the prefix's greedy packing plus this, sharing one part
    # when the prefix's last part and the suffix's first part fit together, is <= max_parts.
    s_parts, s_fill = _pack(reversed(suffix_costs), cap)

    def fits(units: int, parts: int, fill: int) -> bool:
        if units + suffix_units <= single:
            return True
        if parts == 0 or s_parts == 0:
            return parts + s_parts <= max_parts
        shared = 1 if fill + s_fill <= cap else 0
        return parts + s_parts - shared <= max_parts

    if not fits(0, 0, 0):
        return ""
    # One forward walk; "fits" only gets worse as the prefix grows, so stop at the first miss.
    units = parts = fill = end = 0
    for ch in body:
        c = cost(ch)
        units += c
        if parts == 0 or fill + c > cap:
            parts, fill = parts + 1, c
        else:
            fill += c
        if not fits(units, parts, fill):
            break
        end += 1
    if end and body[end - 1] == "\r" and body[end : end + 1] == "\n":
        end -= 1  # do not leave half of a line break
    return body[:end]


_QUOTE = "'"
_DQUOTE = '"'
# Explicit closest-GSM-7 forms; every value is GSM-7 (checked by the tests). Characters that
# are already GSM-7 (è é à ù Ç æ € …) must not appear here.
_TRANSLIT: dict[str, str] = {
    "ç": "c",
    "ê": "e",
    "ë": "e",
    "â": "a",
    "î": "i",
    "ï": "i",
    "ô": "o",
    "û": "u",
    "œ": "oe",
    "Œ": "OE",
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2039\u203a`", _QUOTE),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", _DQUOTE),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212", "-"),
    "\u2026": "...",
    # Tab, no-break space, narrow no-break space (French "; : ! ?"), other Unicode spaces.
    **dict.fromkeys("\t\u00a0\u202f\u2000\u2001\u2002\u2003\u2004\u2005", " "),
    **dict.fromkeys("\u2006\u2007\u2008\u2009\u200a\u205f\u3000", " "),
    "\u00ad": "",  # soft hyphen: invisible
}


@lru_cache(maxsize=4096)
def _translit_char(ch: str) -> str:
    """GSM-7 form of one non-GSM-7 character, or the character itself if there is none."""
    mapped = _TRANSLIT.get(ch)
    if mapped is not None:
        return mapped
    stripped = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return stripped if stripped and is_gsm7(stripped) else ch


def transliterate(text: str) -> str:
    """Replace characters that are not GSM-7 by their closest GSM-7 form.

    GSM-7 characters are never changed; characters with no GSM-7 form (emoji, CJK, …) are
    kept, so the text then stays UCS-2. A combining mark (decomposed accent, as macOS mail
    sends) is dropped after a GSM-7 character: ``e`` + U+0302 becomes ``e``.
    """
    if is_gsm7(text):
        return text
    out: list[str] = []
    after_gsm = False  # whether the last character written is GSM-7
    for ch in text:
        if _gsm_cost(ch):
            out.append(ch)
            after_gsm = True
        elif after_gsm and unicodedata.combining(ch):
            continue  # the base letter is already GSM-7; the accent alone would force UCS-2
        else:
            mapped = _translit_char(ch)
            out.append(mapped)
            if mapped:
                after_gsm = is_gsm7(mapped)
    return "".join(out)
