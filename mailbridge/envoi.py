"""The lenient `<envoi>` reader (SPEC sections 2 and 8).

Input: the decoded text body of a request mail.
Output: an `Envoi` holding every `<name>value</name>` element of the first
`<envoi>` block, tag names lower-cased, values entity-decoded and trimmed.

Legacy iSendPro clients write values raw (`<sms>Tom & Jerry <3</sms>`), so this
is not an XML parser: a value runs to the closing tag of the same name, and
only the five XML entities, numeric references and CDATA sections are
decoded. Comments `<!-- ... -->` hide the elements they contain.

Raw line breaks inside a value are a mail client's wrapping, not line breaks
(the seed writes a line break `Ö`): each run of white space holding one
becomes one space. A reference such as `&#10;` is not raw and stays.

Failure behaviour: `parse_envoi` never raises. Without an `<envoi>` block
(a misspelled or missing wrapper) the whole text is read for fields and
`has_wrapper` is False: the request is invalid (Ack 3), but its `<keyid>`
and `<emailAck>` can still be read to tell the client (SPEC section 8).
A `<!DOCTYPE` or `<!ENTITY` declaration anywhere in the text sets
`has_declarations` (the request is then invalid, Ack 3) while the fields are
still read, so that the Ack can reach `emailAck`: nothing is ever resolved,
fetched or expanded (`&xxe;` stays as written). Any other input,
however broken, gives the fields that could be read. Every step is a regex
scan or a `str.find` that never rescans text, so hostile input stays linear.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

_DECLARATION_RE = re.compile(r"<!\s*(?:doctype|entity)", re.IGNORECASE)
_ENVOI_OPEN_RE = re.compile(r"<envoi(?=[\s/>])[^<>]*>", re.IGNORECASE)
_ENVOI_CLOSE_RE = re.compile(r"</envoi\s*>", re.IGNORECASE)
# The look-ahead ends the name at a delimiter; `[^<>]*` (attributes, ignored)
# stops at the next `<`, so no two attempts scan the same text twice.
_OPEN_RE = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)(?=[\s/>])([^<>]*)>")
_CLOSE_RE = re.compile(r"</([A-Za-z][A-Za-z0-9_]*)\s*>")
_ENTITY_RE = re.compile(r"&(?:#([0-9]+)|#[xX]([0-9A-Fa-f]+)|(amp|lt|gt|quot|apos));")
_NAMED_ENTITIES = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
# The tags of a request (SPEC section 2): without an <envoi> wrapper, only these
# are read, so that a misspelled wrapper (`<envoie>…</envoie>`) does not swallow them.
_REQUEST_TAG_RE = re.compile(
    r"(?:keyid|num[0-9]*|sms[0-9]*|emetteur|tracker|smslong|emailid|emailack|emailnot"
    r"|emaildlr|nostop)\Z"
)
# A run of white space that holds at least one raw line break (SPEC section 2).
_WRAPPED_RE = re.compile(r"[ \t\r]*\n[ \t\r\n]*")

_CDATA_OPEN, _CDATA_CLOSE = "<![CDATA[", "]]>"
_COMMENT_OPEN, _COMMENT_CLOSE = "<!--", "-->"


@dataclass(frozen=True)
class Envoi:
    """The fields of one `<envoi>` block: lower-cased tag name -> value."""

    fields: dict[str, str] = field(default_factory=dict)
    # A DOCTYPE or ENTITY declaration was present (refused: Ack 3, never expanded).
    has_declarations: bool = False
    # False: no <envoi> block; the fields were read from the whole text (Ack 3).
    has_wrapper: bool = True

    def get(self, name: str) -> str | None:
        """The value of tag `name` (any case); None when absent, "" when present but empty."""
        return self.fields.get(name.lower())


def parse_envoi(text: str) -> Envoi:
    """Read the first `<envoi>` block of `text`; see the module docstring."""
    declarations = _DECLARATION_RE.search(text) is not None
    spans = _Spans(text)
    start = -1
    for match in _ENVOI_OPEN_RE.finditer(text):
        if spans.end_of_span_at(match.start()) is None and not _self_closing(match.group(0)):
            start = match.end()
            break
    if start < 0:
        fields = _read_fields(text, 0, len(text), spans, only_request_tags=True)
        return Envoi(fields, has_declarations=declarations, has_wrapper=False)
    end = len(text)  # a missing </envoi> means "to the end"
    for match in _ENVOI_CLOSE_RE.finditer(text, start):
        if spans.end_of_span_at(match.start()) is None:
            end = match.start()
            break
    return Envoi(_read_fields(text, start, end, spans), has_declarations=declarations)


def _read_fields(
    text: str, start: int, end: int, spans: _Spans, only_request_tags: bool = False
) -> dict[str, str]:
    # Index every closing tag once, so finding the one that ends a value is a
    # binary search rather than a rescan (unclosed tags would make it quadratic).
    closings: dict[str, list[tuple[int, int]]] = {}
    for closing in _CLOSE_RE.finditer(text, start, end):
        if spans.end_of_span_at(closing.start()) is None:
            closings.setdefault(closing.group(1).lower(), []).append(closing.span())

    if not spans.starts:
        return _read_fields_without_spans(text, start, end, closings, only_request_tags)
    fields: dict[str, str] = {}
    pos = start
    while True:  # one regex pass, restarted after each jump over a value or a span
        for match in _OPEN_RE.finditer(text, pos, end):
            name = match.group(1).lower()
            if only_request_tags and not _REQUEST_TAG_RE.match(name):
                continue
            attributes = match.group(2)
            self_closing = bool(attributes) and attributes.rstrip().endswith("/")
            candidates = closings.get(name)
            if candidates is None and not self_closing:  # never closed: skip the tag
                continue
            span_end = spans.end_of_span_at(match.start())
            if span_end is not None:  # inside a comment or CDATA: not a tag
                pos = span_end
                break
            if self_closing:
                fields.setdefault(name, "")
                continue
            if candidates is None:
                continue
            index = bisect.bisect_left(candidates, (match.end(), -1))
            if index == len(candidates):  # no closing tag after this one: skip it
                continue
            close_start, close_end = candidates[index]
            if name not in fields:  # the first occurrence wins
                fields[name] = spans.decode_value(text, match.end(), close_start).strip()
            pos = close_end
            break
        else:
            return fields


def _read_fields_without_spans(
    text: str,
    start: int,
    end: int,
    closings: dict[str, list[tuple[int, int]]],
    only_request_tags: bool,
) -> dict[str, str]:
    """_read_fields for a text without comments or CDATA (nearly every request):
    the same reading, without asking at each tag whether it lies in a span."""
    fields: dict[str, str] = {}
    search = _OPEN_RE.search
    pos = start
    while (match := search(text, pos, end)) is not None:
        pos = match.end()
        name = match.group(1).lower()
        if only_request_tags and not _REQUEST_TAG_RE.match(name):
            continue
        attributes = match.group(2)
        if attributes and attributes.rstrip().endswith("/"):
            fields.setdefault(name, "")
            continue
        candidates = closings.get(name)
        if candidates is None:
            continue
        index = bisect.bisect_left(candidates, (pos, -1))
        if index == len(candidates):  # no closing tag after this one: skip it
            continue
        close_start, pos = candidates[index]
        if name not in fields:  # the first occurrence wins
            fields[name] = _decode_entities(_unwrap(text[match.end() : close_start])).strip()
    return fields


def _self_closing(tag: str) -> bool:
    return tag[:-1].rstrip().endswith("/")


class _Spans:
    """The comment and CDATA sections of the text, found in one left-to-right pass.

    Tags inside them are not tags. An opener without its closer is plain text;
    once a closer is known to be missing, later openers of that kind are too,
    which keeps the pass linear.
    """

    def __init__(self, text: str) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.is_cdata: list[bool] = []
        closers_left = {_COMMENT_OPEN: True, _CDATA_OPEN: True}
        pos = 0
        while (i := text.find("<!", pos)) >= 0:
            for opener, closer, cdata in (
                (_COMMENT_OPEN, _COMMENT_CLOSE, False),
                (_CDATA_OPEN, _CDATA_CLOSE, True),
            ):
                if closers_left[opener] and text.startswith(opener, i):
                    j = text.find(closer, i + len(opener))
                    if j < 0:
                        closers_left[opener] = False
                        pos = i + len(opener)
                    else:
                        self.starts.append(i)
                        self.ends.append(j + len(closer))
                        self.is_cdata.append(cdata)
                        pos = j + len(closer)
                    break
            else:
                pos = i + 2

    def end_of_span_at(self, pos: int) -> int | None:
        """The end of the span containing `pos`, or None when `pos` is in no span."""
        k = bisect.bisect_right(self.starts, pos) - 1
        if k >= 0 and pos < self.ends[k]:
            return self.ends[k]
        return None

    def decode_value(self, text: str, start: int, end: int) -> str:
        """text[start:end] with CDATA taken literally and entities decoded elsewhere.

        The caller guarantees `end` lies in no span, so every span starting in
        the range also ends in it. Comments inside a value are kept as written.
        """
        out: list[str] = []
        pos = start
        k = bisect.bisect_left(self.starts, start)
        while k < len(self.starts) and self.starts[k] < end:
            if self.is_cdata[k]:
                out.append(_decode_entities(_unwrap(text[pos : self.starts[k]])))
                out.append(
                    _unwrap(
                        text[self.starts[k] + len(_CDATA_OPEN) : self.ends[k] - len(_CDATA_CLOSE)]
                    )
                )
                pos = self.ends[k]
            k += 1
        out.append(_decode_entities(_unwrap(text[pos:end])))
        return "".join(out)


def _unwrap(raw: str) -> str:
    """Each run of white space holding a raw line break -> one space."""
    if "\n" not in raw:
        return raw
    return _WRAPPED_RE.sub(" ", raw)


def _decode_entities(value: str) -> str:
    """Decode the five XML entities and numeric references; keep anything else as written."""
    if "&" not in value:
        return value
    return _ENTITY_RE.sub(_decode_entity, value)


def _decode_entity(match: re.Match[str]) -> str:
    named = match.group(3)
    if named:
        return _NAMED_ENTITIES[named]
    decimal, hexadecimal = match.group(1), match.group(2)
    digits = (decimal if decimal is not None else hexadecimal).lstrip("0")
    if len(digits) > 8:  # far beyond 0x10FFFF; also spares int() a huge string
        return match.group(0)
    code = int(digits or "0", 10 if decimal is not None else 16)
    return chr(code) if _is_xml_char(code) else match.group(0)


def _is_xml_char(code: int) -> bool:
    # XML 1.0 `Char`: no NUL or other C0 controls, no surrogates, no U+FFFE/U+FFFF.
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )
