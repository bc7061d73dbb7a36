"""Outcomes -> Ack and Not report mails, rendered from templates/*.j2.

Input: the stored facts of a request (`ReportData`). Output: the report body,
ISO-8859-1 bytes byte-exact to SPEC section 5 (plain mode, SPEC section 9: a
short UTF-8 text instead of the Not), and the whole RFC 5322 mail around it.
No I/O besides loading the templates once. The mail is identical at every
retry (Date and Message-ID come from the stored report), so a receiver can
recognise a report delivered twice.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo

import jinja2

from mailbridge.codes import ack_message, not_message
from mailbridge.model import ReportData, ReportJob

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
PARIS = ZoneInfo("Europe/Paris")  # etatDlr dates (SPEC section 7)
# Plain mode's delivery mails (SPEC section 9) in words.
_PLAIN_STATUS = {
    "DELIVRE": "distribué", "NON_DELIVRE": "non distribué", "EXPIRE": "expiré",
    "REJETE": "rejeté",
}  # fmt: skip


def find_templates() -> Path:
    """The templates/ folder: beside the package (checkout, editable install),
    else where a wheel install puts it (share/mailbridge/templates)."""
    candidates = [
        Path(__file__).resolve().parent.parent / "templates",
        Path(sys.prefix) / "share" / "mailbridge" / "templates",
    ]
    for path in candidates:
        if (path / "ack.xml.j2").is_file():
            return path
    raise FileNotFoundError("report templates not found in " + ", ".join(map(str, candidates)))


def xml_text(value: object) -> str:
    """SPEC section 8: values as-is, except & < > written as entities."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class NotRow(NamedTuple):
    """One recipient's line in a Not report (`row.n`, `row.tel`... in the template).

    Attributes, not dict keys: jinja2 tries an attribute first, and a dict would
    make every `row.x` raise and catch an AttributeError (a quarter of the cost
    of a 500-number Not)."""

    n: int
    tel: str
    code: int
    message: str


class DlrRow(NamedTuple):
    """One recipient's line in an etatDlr mail (numbered as in its request)."""

    n: int
    tel: str
    statut: str
    message: str
    date: str
    label: str  # the status in words, for plain mode


class ReplyContent(NamedTuple):
    """A reply SMS to forward: the number as the request wrote it, in E.164,
    the text, and whether it is a STOP."""

    tel: str
    number: str
    text: str
    stop: bool


@dataclass(frozen=True)
class Rendered:
    """A report's Subject, body and what its headers need."""

    subject: str
    body: bytes
    charset: str = "ISO-8859-1"
    headers: tuple[tuple[str, str], ...] = ()


class Skeleton:
    """A template's output with holes where values go: rendered once with a
    marker in place of each value, then filled by joining bytes. Exact for
    values the template writes through `| x` (markers hold no & < >)."""

    def __init__(self, text: str, markers: Mapping[str, str]) -> None:
        names = {marker: name for name, marker in markers.items()}
        pattern = re.compile("|".join(re.escape(m) for m in markers.values()))
        self.literals: list[bytes] = []
        self.holes: list[str] = []
        pos = 0
        for found in pattern.finditer(text):
            self.literals.append(_latin1(text[pos : found.start()]))
            self.holes.append(names[found.group()])
            pos = found.end()
        self.literals.append(_latin1(text[pos:]))

    def fill(self, values: Mapping[str, str]) -> bytes:
        """The output with each hole given its value, XML-escaped (SPEC section 8)."""
        out = [self.literals[0]]
        for hole, literal in zip(self.holes, self.literals[1:], strict=True):
            out.append(_latin1(xml_text(values[hole])))
            out.append(literal)
        return b"".join(out)


# Stand-ins for values while a skeleton renders (no & < >, nothing a value holds).
_MARKERS = {"email_id": "\x00email_id\x00", "tel": "\x00tel\x00"}
_ROW_N = "\x00n\x00"  # a Not row's number, where the numbered form writes it


class _NoSkeleton(Exception):
    """The template's rows cannot be cut out as skeletons: jinja2 renders it all."""


_RowPieces = tuple[list[str], list[str]]  # a Not row: the text before its tel, and after


class _NotForm:
    """A multi-row Not of one form (numbered or single) as skeletons: the document
    around the rows (emailId filled in), and per code one row as a format string
    of its number ({0}) and its escaped tel ({1}). Rendered from the template
    (rows=[] and one row per code), so each piece is jinja2's own output.

    A row is kept as the text before its tel and the text after, each split
    where the row's number goes: `n.join(before) + tel + n.join(after)` is a
    third of the cost of a str.format of the row."""

    def __init__(self, template: jinja2.Template, numbered: bool) -> None:
        self._template = template
        self._numbered = numbered
        self._empty = template.render(email_id=_MARKERS["email_id"], numbered=numbered, rows=[])
        self._split: int | None = None  # where the rows go in `_empty`
        self.rows: dict[int, _RowPieces] = {}  # code -> its row (the class docstring)
        # The document before and after the rows; split where they go by the first row.
        self.head, self.tail = Skeleton(self._empty, _MARKERS), Skeleton("", _MARKERS)

    def row(self, code: int) -> _RowPieces:
        """The pieces of a row of `code` (rendered once per code)."""
        one = self._template.render(
            email_id=_MARKERS["email_id"],
            numbered=self._numbered,
            rows=[NotRow(_ROW_N, _MARKERS["tel"], code, not_message(code))],  # type: ignore[arg-type]
        )
        if self._split is None:
            # The rows go where the two renderings part (any point of a common
            # stretch gives the same documents: the row is then only rotated).
            common = os.path.commonprefix([self._empty, one])
            self._split = len(common)
            self.head = Skeleton(self._empty[: self._split], _MARKERS)
            self.tail = Skeleton(self._empty[self._split :], _MARKERS)
        head, tail = self._empty[: self._split], self._empty[self._split :]
        if not (one.startswith(head) and one.endswith(tail)) or len(one) < len(self._empty):
            raise _NoSkeleton("not.xml.j2: a row is not a stretch of its own")
        text = one[len(head) : len(one) - len(tail)]
        if _MARKERS["email_id"] in text:
            raise _NoSkeleton("not.xml.j2: a row writes the emailId")
        before, tel, after = text.partition(_MARKERS["tel"])
        if not tel or _MARKERS["tel"] in after:
            raise _NoSkeleton("not.xml.j2: a row does not write its tel once")
        pieces = self.rows[code] = (before.split(_ROW_N), after.split(_ROW_N))
        return pieces


def paris_time(timestamp: float) -> str:
    """`YYYY-MM-DD HH:MM:SS` in Europe/Paris, as etatDlr writes dates."""
    return datetime.fromtimestamp(timestamp, PARIS).strftime("%Y-%m-%d %H:%M:%S")


class ReportRenderer:
    """The jinja2 environment, built once; renders report bodies."""

    def __init__(self, templates: Path | None = None) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(templates or find_templates())),
            autoescape=False,  # XML escaping is exactly `x` (SPEC section 8), no more
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
        )
        self._env.filters["x"] = xml_text
        self._ack = self._env.get_template("ack.xml.j2")
        self._not = self._env.get_template("not.xml.j2")
        self._plain = self._env.get_template("plain.txt.j2")
        self._dlr = self._env.get_template("dlr.xml.j2")
        self._plain_dlr = self._env.get_template("plain_dlr.txt.j2")
        self._reply = self._env.get_template("reply.txt.j2")
        # The Ack of each code and the one-row Not of each (form, code), rendered
        # once: most reports are these, and jinja2's per-render cost is most of theirs.
        self._ack_skeletons: dict[int, Skeleton] = {}
        self._not_skeletons: dict[tuple[bool, int], Skeleton] = {}
        # Nots of several rows (numX, CSV) from a row skeleton per code.
        self._not_forms: dict[bool, _NotForm] = {}

    def ack_body(self, email_id: str | None, code: int) -> bytes:
        """The etatAck document; `?` stands for a missing emailId."""
        skeleton = self._ack_skeletons.get(code)
        if skeleton is None:
            text = self._ack.render(
                email_id=_MARKERS["email_id"], code=code, message=ack_message(code)
            )
            skeleton = self._ack_skeletons[code] = Skeleton(text, _MARKERS)
        return skeleton.fill({"email_id": email_id or "?"})

    def not_body(self, data: ReportData) -> bytes:
        """The etatNot document, single or numbered form."""
        if len(data.rows) == 1:
            ((tel, code),) = data.rows
            skeleton = self._not_skeletons.get((data.numbered, code))
            if skeleton is None:
                row = NotRow(1, _MARKERS["tel"], code, not_message(code))
                text = self._not.render(
                    email_id=_MARKERS["email_id"], numbered=data.numbered, rows=[row]
                )
                skeleton = self._not_skeletons[(data.numbered, code)] = Skeleton(text, _MARKERS)
            return skeleton.fill({"email_id": data.email_id or "?", "tel": tel})
        form = self._not_forms.get(data.numbered)
        if form is None:
            form = self._not_forms[data.numbered] = _NotForm(self._not, data.numbered)
        forms, new_row = form.rows, form.row
        out = []
        try:
            for n, (tel, code) in enumerate(data.rows, start=1):
                before, after = forms.get(code) or new_row(code)
                if not tel.isdigit():  # digits need no escaping: most tels skip xml_text
                    tel = xml_text(tel)
                number = str(n)
                out.append(number.join(before) + tel + number.join(after))
        except _NoSkeleton:
            return self._not_body(data)
        values = {"email_id": data.email_id or "?"}
        return form.head.fill(values) + _latin1("".join(out)) + form.tail.fill(values)

    def _not_body(self, data: ReportData) -> bytes:
        """The etatNot document by jinja2 alone (the reference the skeletons match)."""

        def rows() -> Iterator[NotRow]:
            for n, (tel, code) in enumerate(data.rows, start=1):
                yield NotRow(n, tel, code, not_message(code))

        text = self._not.render(email_id=data.email_id or "?", numbered=data.numbered, rows=rows())
        return _latin1(text)

    def plain_body(self, data: ReportData) -> bytes:
        """Plain mode's report: the numbers that failed (or all, with `reports: all`)."""
        shown = [
            NotRow(n, tel, code, not_message(code))
            for n, (tel, code) in enumerate(data.rows, start=1)
            if code != 0 or data.plain_reports == "all"
        ]
        failed = sum(1 for _, code in data.rows if code != 0)
        text = self._plain.render(failed=failed, total=len(data.rows), rows=shown)
        return text.encode("utf-8")

    def body(self, kind: str, data: ReportData) -> bytes:
        if kind == "ack":
            return self.ack_body(data.email_id, data.ack_code)
        if kind == "plain":
            return self.plain_body(data)
        return self.not_body(data)

    def render(
        self,
        kind: str,
        data: ReportData,
        dlr_rows: Sequence[tuple[int, str, str, str, float]] = (),
        reply: ReplyContent | None = None,
    ) -> Rendered:
        """Subject and body of a report of `kind` (ack, not, plain, dlr, reply);
        `dlr_rows` for dlr, `reply` for reply (as the store gives them)."""
        email_id = data.email_id or "?"
        if kind == "dlr":
            rows = [
                DlrRow(
                    n=n,
                    tel=tel,
                    statut=status,
                    message=text,
                    date=paris_time(at),
                    label=_PLAIN_STATUS.get(status, status),
                )
                for n, tel, status, text, at in dlr_rows
            ]
            if data.plain_reports is not None:
                delivered = all(r.statut == "DELIVRE" for r in rows)
                subject = "SMS distribué" if delivered else "SMS non distribué"
                body = self._plain_dlr.render(rows=rows).encode("utf-8")
                return Rendered(subject, body, "utf-8")
            body = _latin1(self._dlr.render(email_id=email_id, rows=rows))
            return Rendered(f"etatDlr {email_id}", body)
        if kind == "reply":
            assert reply is not None
            text = self._reply.render(tel=reply.tel, text=reply.text, stop=reply.stop)
            headers = (("X-Mailbridge-Stop", "yes"),) if reply.stop else ()
            return Rendered(f"SMS de {reply.tel}", text.encode("utf-8"), "utf-8", headers)
        if kind == "plain":
            failed = any(code != 0 for _, code in data.rows)
            subject = "SMS non envoyé" if failed else "SMS envoyé"
            return Rendered(subject, self.plain_body(data), "utf-8")
        label = "etatAck" if kind == "ack" else "etatNot"
        return Rendered(f"{label} {email_id}", self.body(kind, data))


def _latin1(text: str) -> bytes:
    # Characters outside ISO-8859-1 (a client's emailId in Cyrillic…) become
    # numeric references, which every XML reader understands.
    return text.encode("iso-8859-1", errors="xmlcharrefreplace")


def _header(value: str) -> str:
    if value.isascii() and value.isprintable():  # the usual case: nothing to replace
        return value.strip()
    value = _CONTROL.sub(" ", value).strip()
    if value.isascii():
        return value
    return Header(value, "utf-8").encode()


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def rfc5322_date(timestamp: float) -> str:
    """`Mon, 24 Nov 2026 12:00:00 +0000`: email.utils.format_datetime of the UTC
    time, without building a datetime (rounded to the microsecond as it does)."""
    frac, whole = math.modf(timestamp)
    if round(frac * 1e6) >= 1_000_000:
        whole += 1
    t = time.gmtime(whole)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d}"
        f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def report_message_id(job: ReportJob, instance_id: str, from_address: str) -> str:
    """A Message-ID stable across retries of the same report."""
    domain = from_address.rpartition("@")[2] or "localhost"
    return f"<{job.kind}.{job.request_id}.{job.id}.{instance_id}@{domain}>"


def compose_mail(
    job: ReportJob,
    data: ReportData,
    rendered: Rendered,
    *,
    from_address: str,
    instance_id: str,
) -> bytes:
    """The whole report mail (LF line ends; SMTP delivery turns them into CRLF)."""
    headers = [
        ("From", from_address),
        ("To", job.to_addr),
        ("Subject", rendered.subject),
        ("Date", rfc5322_date(job.created_at)),
        ("Message-ID", report_message_id(job, instance_id, from_address)),
        ("Auto-Submitted", "auto-replied"),
        ("MIME-Version", "1.0"),
        ("Content-Type", f"text/plain; charset={rendered.charset}"),
        ("Content-Transfer-Encoding", "8bit"),
        ("X-Mailbridge-Request", str(job.request_id)),
        *rendered.headers,
    ]
    if data.in_reply_to:
        headers += [("In-Reply-To", data.in_reply_to), ("References", data.in_reply_to)]
    head = "".join(f"{name}: {_header(value)}\n" for name, value in headers)
    return head.encode("ascii") + b"\n" + rendered.body
