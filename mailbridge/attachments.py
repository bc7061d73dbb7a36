"""The `mobiles.csv` and `message.csv` attachments (seed 001 section 3, SPEC section 2).

Input: the decoded bytes of each attachment (from `mime.read_mail`).
Output: the recipient lines of `mobiles.csv` (number as written, dynamic
fields), the message of `message.csv`, and the personalised text per line.

Files may be UTF-8 (with or without BOM) or Windows-1252 / ISO-8859-1, with
CRLF, LF or CR line ends. No header line is expected. Blank lines (only white
space or only separators) are skipped.

Failure behaviour: a file that is not text at all (NUL bytes) raises
`AttachmentError`; anything else is read as well as it can be. Which codes a
bad number or an empty message deserve is decided by the checks, not here.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

_LINE_END_RE = re.compile(r"\r\n|\r|\n")
_PLACEHOLDER_RE = re.compile(r"\[([1-9][0-9]*)\]")


class AttachmentError(Exception):
    """The attachment is not readable text (e.g. a binary file under a .csv name)."""


class MobileLine(NamedTuple):
    """One recipient line of `mobiles.csv` (a NamedTuple: one per line of 100 000)."""

    tel: str  # as written, trimmed; spaces, dots and dashes kept
    fields: tuple[str, ...]  # dynamic data [1], [2], ... (trimmed)


def _windows_1252_table() -> dict[int, str]:
    # cp1252 is latin-1 except for 0x80-0x9F; five of those bytes are undefined
    # in cp1252 and stay the latin-1 control characters, so decoding never fails.
    table: dict[int, str] = {}
    for byte in range(0x80, 0xA0):
        try:
            table[byte] = bytes([byte]).decode("cp1252")
        except UnicodeDecodeError:
            pass
    return table


_CP1252_TABLE = _windows_1252_table()


def decode_text(data: bytes) -> str:
    """Decode an attachment: UTF-8 (BOM optional) if valid, else Windows-1252.

    ISO-8859-1 files read correctly too (their printable characters are the
    same in Windows-1252). Raises AttachmentError on NUL bytes (not text).
    """
    if b"\x00" in data:
        raise AttachmentError("not a text file (NUL bytes)")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1").translate(_CP1252_TABLE)


def _lines(text: str) -> Iterator[str]:
    """Lines split on CRLF, LF or CR only (not on the other Unicode breaks)."""
    if "\r" in text:
        pos = 0
        for match in _LINE_END_RE.finditer(text):
            yield text[pos : match.start()]
            pos = match.end()
        if pos < len(text):
            yield text[pos:]
        return
    # LF only (the usual case): one C-level split, the same lines.
    lines = text.split("\n")
    if not lines[-1]:
        lines.pop()
    yield from lines


def _unquote(value: str) -> str:
    # Spreadsheets quote a cell holding `;` or `"`; strip such quotes in the
    # `;;` format too (the `;` format goes through the csv module).
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('""', '"').strip()
    return value


def _split_line(line: str) -> list[str]:
    if ";;" in line:
        return [_unquote(part) for part in line.split(";;")]
    try:
        row = next(csv.reader([line], delimiter=";", skipinitialspace=True), [])
    except csv.Error:  # e.g. a field over csv.field_size_limit()
        row = line.split(";")
    return [cell.strip() for cell in row]


def iter_mobiles(data: bytes) -> Iterator[MobileLine]:
    """Yield one MobileLine per non-blank line of `mobiles.csv`, in file order.

    Format `num;;[1];;[2];;[3]`; a line without `;;` is read as `;`-separated
    CSV (double-quoted cells allowed). Raises AttachmentError (on the first
    iteration) when the file is not text.
    """
    for line in _lines(decode_text(data)):
        if not line.replace(";", "").strip():  # only white space and separators
            continue
        if ";;" in line and '"' not in line:  # the usual line: no quotes to undo
            cells = [part.strip() for part in line.split(";;")]
        else:
            cells = _split_line(line)
        if not any(cells):
            continue
        yield MobileLine(cells[0], tuple(cells[1:]))


def read_message(data: bytes) -> str:
    """The message of `message.csv`: its first non-blank line, trimmed; "" if none.

    Raises AttachmentError when the file is not text.
    """
    for line in _lines(decode_text(data)):
        if line.strip():
            return line.strip()
    return ""


def personalise(template: str, fields: Sequence[str]) -> str:
    """Replace `[1]`, `[2]`... by fields[0], fields[1]...; a missing field becomes "".

    One pass: text coming from a field is never substituted again. `[0]`,
    `[x]` or `[01]` are not placeholders and stay as written.
    """
    return filler(template)(fields)


def filler(template: str) -> Callable[[Sequence[str]], str]:
    """`personalise` with the template read once: the function that fills it."""
    # re.split with one group: literal, digits, literal, digits, ..., literal.
    pieces = _PLACEHOLDER_RE.split(template)
    if len(pieces) == 1:
        return lambda fields: template
    literals = pieces[0::2]
    # A placeholder beyond 9 digits can never name a field (as personalise reads it).
    indexes = [int(d) - 1 if len(d) <= 9 else -1 for d in pieces[1::2]]
    if len(indexes) == 1:  # the usual template: "Bonjour [1], ..."
        (index,), (before, after) = indexes, literals
        empty = before + after

        def fill_one(fields: Sequence[str]) -> str:
            return before + fields[index] + after if 0 <= index < len(fields) else empty

        return fill_one

    def fill(fields: Sequence[str]) -> str:
        count = len(fields)
        out = [literals[0]]
        for index, literal in zip(indexes, literals[1:], strict=True):
            out.append(fields[index] if 0 <= index < count else "")
            out.append(literal)
        return "".join(out)

    return fill
