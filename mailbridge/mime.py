"""Raw RFC 5322 bytes -> the parts of a mail the later pipeline stages read.

Input: the message exactly as received (bytes, any line endings).
Output: a `MailContent` with the first text/plain body (or, when there is none,
an HTML body converted to text), the wanted attachments by lower-cased file
name, and the few headers the daemon needs (From addresses, Auto-Submitted,
Message-ID, Subject).

Failure behaviour: `read_mail` never raises. Broken structure (missing
boundary, truncated or bad base64, undecodable charsets, binary garbage,
absurd nesting) gives whatever could be read and human-readable notes in
`MailContent.problems` for the logs. Deciding what a broken mail deserves
(Ack 3, a 5xx reply...) is policy and lives elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.errors
import email.policy
import email.utils
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser

import lxml.etree
import lxml.html
import lxml.html.defs

DEFAULT_WANTED: frozenset[str] = frozenset({"mobiles.csv", "message.csv"})

# A mail with thousands of broken parts must not give thousands of log lines.
MAX_PROBLEMS = 30

_BASE64_DEFECTS = (
    email.errors.InvalidBase64PaddingDefect,
    email.errors.InvalidBase64CharactersDefect,
    email.errors.InvalidBase64LengthDefect,
)

# RFC 2047 encoded word, plus the white space separating it from a following
# encoded word (RFC 2047 section 6.2 says that white space is not displayed).
_ENCODED_WORD_RE = re.compile(
    r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=(?:\s+(?==\?[^?\s]+\?[QqBb]\?[^?\s]*\?=))?"
)
_FOLD_RE = re.compile(r"\r?\n(?=[ \t])")
# A bare dot-atom address, as almost every machine writes From: and <emailAck>:
# the stdlib's address parser returns it unchanged, at a fifth of examine's cost.
BARE_ADDRESS = (
    r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+\.)*[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    r"@(?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+"
)  # the pattern; intake's MAIL/RCPT fast path uses it too
_BARE_ADDRESS_RE = re.compile(BARE_ADDRESS)
_NOT_BASE64_RE = re.compile(rb"[^A-Za-z0-9+/]")

# Elements after which a reader sees a line break.
_BLOCK_TAGS = frozenset(
    "address article aside blockquote dd div dl dt footer form h1 h2 h3 h4 h5 h6 header hr "
    "li ol p pre section table tbody td th thead tr ul".split()
)
_INVISIBLE_TAGS = ("script", "style", "head", "title", "template", "noscript")
_PLAIN_TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
# Characters XML (and so lxml, when text is set) refuses.
_NON_XML_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


@dataclass(frozen=True, kw_only=True)
class MailContent:
    """What the later stages need from one received mail."""

    text: str | None
    html_text: str | None
    attachments: dict[str, bytes] = field(default_factory=dict)
    from_addresses: tuple[str, ...] = ()
    auto_submitted: str | None = None
    message_id: str | None = None
    subject: str | None = None
    problems: tuple[str, ...] = ()


class _Problems:
    """Collects notes for the logs, capped at MAX_PROBLEMS."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.dropped = 0

    def add(self, note: str) -> None:
        if note not in self.notes:
            if len(self.notes) < MAX_PROBLEMS:
                self.notes.append(note)
            else:
                self.dropped += 1

    def result(self) -> tuple[str, ...]:
        more = (f"... and {self.dropped} more problems",) if self.dropped else ()
        return (*self.notes, *more)


def read_mail(raw: bytes, wanted: frozenset[str] = DEFAULT_WANTED) -> MailContent:
    """Read one raw mail; see the module docstring. Never raises."""
    simple = read_simple_mail(raw)
    if simple is not None:
        return simple
    return read_mail_stdlib(raw, wanted)


def read_mail_stdlib(raw: bytes, wanted: frozenset[str] = DEFAULT_WANTED) -> MailContent:
    """read_mail through the stdlib's parser, for every shape of mail."""
    problems = _Problems()
    try:
        msg: Message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # RecursionError on absurd nesting, MemoryError...
        problems.add(f"message body unreadable ({type(exc).__name__}); headers only")
        try:
            msg = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        except Exception as exc2:
            problems.add(f"message unreadable ({type(exc2).__name__})")
            return MailContent(text=None, html_text=None, problems=problems.result())
        return _content(msg, None, None, {}, problems)

    wanted_lower = frozenset(name.lower() for name in wanted)
    text: str | None = None
    html_part: tuple[Message, str] | None = None
    attachments: dict[str, bytes] = {}
    try:
        for part, label in _leaves(msg, problems):
            try:
                filename = _filename(part)
                if part.get_content_disposition() == "attachment" or filename is not None:
                    if filename is not None:
                        label = f"attachment {filename}"
                        if filename in wanted_lower and filename not in attachments:
                            attachments[filename] = _payload_bytes(part, label, problems)
                elif part.get_content_type() == "text/plain" and text is None:
                    text = _decode_text(part, label, problems)
                elif part.get_content_type() == "text/html" and html_part is None:
                    html_part = (part, label)  # converted only if no text/plain turns up
            except Exception as exc:
                problems.add(f"{label}: unreadable ({type(exc).__name__})")
            _note_defects(part, label, problems)
    except Exception as exc:
        problems.add(f"message structure unreadable ({type(exc).__name__})")

    html_text: str | None = None
    if text is None and html_part is not None:
        try:
            html_text = _html_to_text(_decode_text(*html_part, problems))
        except Exception as exc:
            problems.add(f"{html_part[1]}: HTML unreadable ({type(exc).__name__})")
    if text is None and html_text is None:
        problems.add("no text/plain body")
    return _content(msg, text, html_text, attachments, problems)


def _content(
    msg: Message,
    text: str | None,
    html_text: str | None,
    attachments: dict[str, bytes],
    problems: _Problems,
) -> MailContent:
    values: dict[str, list[str]] = {}
    try:
        for name, value in msg.raw_items():
            values.setdefault(str(name).strip().lower(), []).append(str(value))
    except Exception:
        problems.add("headers unreadable")
    return _content_of(values, text, html_text, attachments, problems)


def _content_of(
    values: dict[str, list[str]],
    text: str | None,
    html_text: str | None,
    attachments: dict[str, bytes],
    problems: _Problems,
) -> MailContent:
    """The MailContent of headers (lower-cased name -> raw values, in order) and a body."""

    def first(name: str) -> str | None:
        found = values.get(name)
        if not found:
            return None
        try:
            return _decode_header(found[0]).strip()
        except Exception:
            return None

    auto = first("auto-submitted")
    if auto is not None:
        # "auto-replied; owner-email=..." or "auto-replied (vacation)": keep the keyword.
        auto = re.split(r"[;(]", auto, maxsplit=1)[0].strip().lower() or None
    return MailContent(
        text=text,
        html_text=html_text,
        attachments=attachments,
        from_addresses=_addresses(values.get("from", [])),
        auto_submitted=auto,
        message_id=first("message-id") or None,
        subject=first("subject"),
        problems=problems.result(),
    )


# -- the fast path: one text/plain part -------------------------------------------------
#
# Almost every request is a single text/plain part written by a program. The
# stdlib's parser builds a Message (a feed parser, a policy, header objects)
# for it at a third of the intake's CPU per mail; read_simple_mail reads that
# shape directly and gives exactly what read_mail_stdlib gives (property-tested
# in tests/test_mime.py). Whatever it is not sure of, it leaves to the stdlib.

# A header as the stdlib's feed parser takes it (its headerRE, but for the
# "From " envelope line, which is left to the stdlib): a name, its first line
# without the blanks after the colon, its continuation lines.
_HEADER_RE = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\n]*\n(?:[ \t][^\n]*\n)*)")
_WSP = r"[ \t\r\n]*"
_TOKEN = r"[A-Za-z0-9._:+-]"
# text/plain with nothing but charset, format and delsp parameters, each a token
# or a quoted token: the values the stdlib's get_param() gives back unchanged.
_SIMPLE_TYPE_RE = re.compile(
    rf"{_WSP}text/plain{_WSP}((?:;{_WSP}(?:charset|format|delsp){_WSP}={_WSP}"
    rf'(?:"{_TOKEN}*"|{_TOKEN}+){_WSP})*)',
    re.IGNORECASE | re.ASCII,
)
_SIMPLE_PARAM_RE = re.compile(
    rf'(charset|format|delsp){_WSP}={_WSP}(?:"({_TOKEN}*)"|({_TOKEN}+))', re.IGNORECASE | re.ASCII
)
# The transfer encodings the stdlib decodes; with any other it gives the body as it is.
_DECODED_BY_STDLIB = frozenset(
    {"quoted-printable", "base64", "x-uuencode", "uuencode", "uue", "x-uue"}
)


def read_simple_mail(raw: bytes) -> MailContent | None:
    """read_mail of a single text/plain part with well-formed headers, without
    the stdlib's parser; None for any other mail (read_mail_stdlib reads it)."""
    split = _simple_headers(raw)
    if split is None:
        return None
    values, body = split
    if "content-disposition" in values:
        return None  # maybe an attachment, maybe a file name
    params = _simple_type_params(values.get("content-type"))
    if params is None:
        return None
    # As the stdlib's get_payload(): the first header, lower-cased, not stripped.
    data = _simple_payload(body, values.get("content-transfer-encoding", [""])[0].lower())
    if data is None:
        return None
    problems = _Problems()
    charset = params.get("charset")
    text, note = _decode_bytes(data, None if charset is None else charset.lower())
    if note:
        problems.add(f"message: {note}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if params.get("format", "").lower() == "flowed":
        text = unflow(text, delsp=params.get("delsp", "").lower() == "yes")
    return _content_of(values, text, None, {}, problems)


def _simple_headers(raw: bytes) -> tuple[dict[str, list[str]], bytes] | None:
    """The headers (as _content reads them from the stdlib's Message) and the
    body, or None where the stdlib would see a defect or an unusual line end."""
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if i >= 0]
    if not ends or raw.startswith((b"\n", b"\r")):
        return None
    end = min(ends)
    head = raw[: end + 1]
    if head.count(b"\r") != head.count(b"\r\n"):
        return None  # a bare CR: a line end for the stdlib
    body = raw[end + (2 if raw[end + 1] == 0x0A else 3) :]
    text = head.decode("ascii", "surrogateescape")
    values: dict[str, list[str]] = {}
    pos = 0
    while pos < len(text):
        # Not a header line (an envelope "From ", a continuation first, no
        # colon...): a defect for the stdlib, which then reads it.
        header = _HEADER_RE.match(text, pos)
        if header is None:
            return None
        pos = header.end()
        # The compat32 policy's header_source_parse, then _content's key.
        name, value = header.groups()
        values.setdefault(name.lower(), []).append(value.rstrip("\r\n"))
    return values, body


def _simple_type_params(content_types: list[str] | None) -> dict[str, str] | None:
    """charset, format and delsp of a simple text/plain Content-Type (the first
    one, as the stdlib reads it); {} without one; None for anything else."""
    if content_types is None:
        return {}  # text/plain, us-ascii by default
    match = _SIMPLE_TYPE_RE.fullmatch(content_types[0])
    if match is None:
        return None
    params: dict[str, str] = {}
    for param in _SIMPLE_PARAM_RE.finditer(match.group(1)):
        value = param.group(2) if param.group(2) is not None else param.group(3)
        params.setdefault(param.group(1).lower(), value)  # the first one counts
    return params


def _simple_payload(body: bytes, cte: str) -> bytes | None:
    """The stdlib's get_payload(decode=True) where it notes no defect, else None."""
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    if cte == "base64":
        data = b"".join(body.splitlines())
        if len(data) % 4:
            return None
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error:
            return None
    if cte in _DECODED_BY_STDLIB:
        return None  # uuencode
    return body


# -- structure ---------------------------------------------------------------------------


def _leaves(msg: Message, problems: _Problems) -> Iterator[tuple[Message, str]]:
    """Non-multipart parts in document order, with a label for the logs.

    Iterative (an explicit stack) so nesting depth cannot exhaust recursion.
    Attached messages (message/rfc822, bounces) are not entered: a quoted or
    bounced request is not a request.
    """
    stack: list[Iterator[Message]] = [iter([msg])]
    number = 0  # parts numbered in document order, the whole message being 0
    while stack:
        part = next(stack[-1], None)
        if part is None:
            stack.pop()
            continue
        label = f"part {number} ({part.get_content_type()})" if number else "message"
        number += 1
        # is_multipart() first: get_payload() on a leaf may decode it (and fail).
        if part.is_multipart() and part.get_content_maintype() != "message":
            _note_defects(part, label, problems)
            payload = part.get_payload()
            stack.append(iter([p for p in payload if isinstance(p, Message)]))
        else:
            yield part, label


def _note_defects(part: Message, label: str, problems: _Problems) -> None:
    for defect in part.defects:
        if isinstance(defect, email.errors.InvalidBase64LengthDefect):
            problems.add(f"{label}: truncated or bad base64, partly recovered")
        elif isinstance(defect, _BASE64_DEFECTS):
            problems.add(f"{label}: bad base64")
        else:
            doc = (type(defect).__doc__ or type(defect).__name__).strip().splitlines()[0]
            problems.add(f"{label}: {doc}")


def _filename(part: Message) -> str | None:
    """Lower-cased bare file name (Content-Disposition or Content-Type name), or None."""
    raw = part.get_filename()  # handles RFC 2231, continuations included
    if raw is None:
        return None
    name = _decode_header(str(raw))
    # Some old clients send the sender's full path.
    name = name.replace("\\", "/").rsplit("/", 1)[-1].strip().lower()
    return name or None


# -- payloads ----------------------------------------------------------------------------


def _payload_bytes(part: Message, label: str, problems: _Problems) -> bytes:
    """The part's decoded bytes; truncated base64 gives the whole 4-char groups it has."""
    before = len(part.defects)
    data = part.get_payload(decode=True)
    new = part.defects[before:]
    if any(isinstance(d, email.errors.InvalidBase64LengthDefect) for d in new):
        data = _salvage_base64(part)
    if not isinstance(data, bytes):  # None for an empty payload
        if data is not None:
            problems.add(f"{label}: no readable content")
        return b""
    return data


def _salvage_base64(part: Message) -> bytes:
    # The stdlib gives back the *encoded* text when the length is impossible
    # (a truncated mail); decode the complete groups instead.
    try:
        raw = part.get_payload(decode=False)
        chars = _NOT_BASE64_RE.sub(b"", str(raw).encode("utf-8", "surrogateescape"))
        chars = chars[: len(chars) - len(chars) % 4] if len(chars) % 4 == 1 else chars
        return base64.b64decode(chars + b"=" * (-len(chars) % 4))
    except Exception:  # get_payload() may try the part's (bogus) charset
        return b""


def _decode_text(part: Message, label: str, problems: _Problems) -> str:
    text, note = _decode_bytes(_payload_bytes(part, label, problems), part.get_content_charset())
    if note:
        problems.add(f"{label}: {note}")
    # SMTP gives CRLF; the later stages work on \n.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if part.get_content_type() == "text/plain" and _param(part, "format") == "flowed":
        text = unflow(text, delsp=_param(part, "delsp") == "yes")
    return text


def _param(part: Message, name: str) -> str:
    value = part.get_param(name)
    return value.strip().lower() if isinstance(value, str) else ""


def unflow(text: str, *, delsp: bool = False) -> str:
    """A `format=flowed` body (RFC 3676) as the lines its writer meant.

    A line ending in a space is a soft break: it is joined with the next line
    of the same quote depth (`delsp=yes`: without that space). A leading
    space is space-stuffing and is removed; `-- ` (the signature separator)
    is never a soft break. Quoted lines keep their `>` marks.
    """
    out: list[str] = []
    paragraph: list[str] = []
    depth = 0

    def emit() -> None:
        line = "".join(paragraph)
        if depth:
            line = ">" * depth + (" " + line if line else "")
        out.append(line)
        paragraph.clear()

    for raw in text.split("\n"):
        stripped = raw.lstrip(">")
        line_depth = len(raw) - len(stripped)
        content = stripped[1:] if stripped.startswith(" ") else stripped
        soft = content.endswith(" ") and content != "-- "
        if paragraph and line_depth != depth:
            emit()  # a quote depth change ends an (improperly) flowed paragraph
        depth = line_depth
        paragraph.append(content[:-1] if soft and delsp else content)
        if not soft:
            emit()
    if paragraph:
        emit()
    return "\n".join(out)


def _decode_bytes(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """Decode with the declared charset, else UTF-8 (strict), else Windows-1252."""
    if charset:
        try:
            return data.decode(charset), None
        except Exception:  # LookupError, UnicodeError, "not a text encoding"...
            pass
        # A wrong label is read like no label: scripts often label UTF-8 as
        # us-ascii, and valid UTF-8 is practically never meant as cp1252.
        try:
            return data.decode("utf-8"), f"charset {charset!r} wrong, read as utf-8"
        except UnicodeDecodeError:
            note = f"charset {charset!r} unknown or wrong, read as windows-1252"
            return data.decode("cp1252", errors="replace"), note
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        # errors="replace": five byte values are undefined in cp1252.
        return data.decode("cp1252", errors="replace"), None


def _html_to_text(html: str) -> str:
    """HTML -> plain text with lxml; no network, no DTD; entities become characters.

    Tags lxml does not know as HTML (a program writing a raw <envoi> block
    into an HTML body) are written back as tags, so the block survives.
    """
    html = _NON_XML_RE.sub("", html)
    if not html.strip():
        return ""
    parser = lxml.html.HTMLParser(
        no_network=True, remove_comments=True, remove_pis=True, recover=True, encoding="utf-8"
    )
    try:
        root = lxml.html.document_fromstring(html.encode("utf-8"), parser=parser)
    except lxml.etree.ParserError:  # "Document is empty": only comments, PIs...
        return ""
    for element in list(root.iter(*_INVISIBLE_TAGS)):
        element.drop_tree()
    for element in root.iter():
        tag = element.tag
        if not isinstance(tag, str):
            continue
        tag = tag.lower()
        if tag == "br":
            element.tail = "\n" + (element.tail or "")
        elif tag in _BLOCK_TAGS:
            element.text = "\n" + (element.text or "")
            element.tail = "\n" + (element.tail or "")
        elif tag not in lxml.html.defs.tags and _PLAIN_TAG_RE.match(tag):
            element.text = f"<{tag}>" + (element.text or "")
            element.tail = f"</{tag}>" + (element.tail or "")
    return str(root.text_content()).replace("\r\n", "\n").replace("\r", "\n")


# -- headers -----------------------------------------------------------------------------


def parse_address(value: str) -> str:
    """The address in `value` as `email.utils.parseaddr` reads it ('' if none),
    without running its parser for a bare `local@domain` (property-tested equal)."""
    value = value.strip()
    if _BARE_ADDRESS_RE.fullmatch(value):
        return value
    return email.utils.parseaddr(value)[1]


def _addresses(raw_values: Iterable[str]) -> tuple[str, ...]:
    found: list[str] = []
    for raw in raw_values:
        bare = raw.strip()
        try:
            if _BARE_ADDRESS_RE.fullmatch(bare):
                pairs = [("", bare)]  # what getaddresses makes of it, property-tested
            else:
                pairs = email.utils.getaddresses([_FOLD_RE.sub("", _undo_surrogates(raw))])
        except Exception:
            continue
        for _display, address in pairs:
            address = address.strip().lower()
            if "@" in address and address not in found:
                found.append(address)
    return tuple(found)


def _decode_header(raw: str) -> str:
    """Unfolded header text: raw 8-bit bytes and RFC 2047 encoded words decoded."""
    return _ENCODED_WORD_RE.sub(_decode_encoded_word, _FOLD_RE.sub("", _undo_surrogates(raw)))


def _undo_surrogates(value: str) -> str:
    # The parser keeps raw 8-bit header bytes as surrogate escapes.
    if value.isascii() or not any("\udc80" <= ch <= "\udcff" for ch in value):
        return value
    return _decode_bytes(value.encode("utf-8", "surrogateescape"), None)[0]


def _decode_encoded_word(match: re.Match[str]) -> str:
    charset, encoding, payload = match.group(1), match.group(2).lower(), match.group(3)
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix
    try:
        data = payload.encode("utf-8")
        if encoding == "q":
            decoded = binascii.a2b_qp(data, header=True)
        else:
            decoded = base64.b64decode(data + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return match.group(0)
    return _decode_bytes(decoded, charset)[0]
