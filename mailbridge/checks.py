"""The request's fields -> recipients with their final text or their code.

Input: the `<envoi>` fields, the named attachments, the account's rules and the
time. Output: a `CheckedRequest`: the Ack code (0, 2 or 3; 1 is decided by
the store), and for Ack 0 every recipient either with a code already (6, 7,
11, 16, 21, 23, 24, 27, 33, 34, 999) or with the exact text to send.
Pure: no I/O, never raises on client input.

Precedence, decided here once: request-wide codes first (23, 16, 33, 34, 24),
then the number's own (6, 7, 21, 27, 11), then a missing text (999).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from mailbridge import gsm
from mailbridge.attachments import AttachmentError, filler, iter_mobiles, read_message
from mailbridge.codes import Ack, Code
from mailbridge.config import SENDER_ID_RE, AccountConfig
from mailbridge.envoi import Envoi
from mailbridge.model import RecipientDraft
from mailbridge.numbers import check_number
from mailbridge.quiet_hours import QuietHours

MAX_NUMBERS = 500
LINE_BREAK = "Ö"  # iSendPro: this character stands for a line break in messages
_NUM_TAG = re.compile(r"^num(\d+)$")
_SMS_TAG = re.compile(r"^sms(\d+)$")
_SMSLONG = re.compile(r"^[0-9]+$")


@dataclass(frozen=True)
class AccountRules:
    """An account with what checking needs precomputed (built once at start)."""

    account: AccountConfig
    blacklist: frozenset[str]  # E.164: the account's and the global blacklist
    quiet: QuietHours


@dataclass
class CheckedRequest:
    ack_code: int
    numbered: bool = False
    sender: str | None = None
    reference: str | None = None
    due_at: datetime | None = None  # set when quiet_hours: defer holds the request
    recipients: list[RecipientDraft] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # why, for the log line


class _Target(NamedTuple):
    tel: str
    text: str | None  # None: no message for this recipient


class _FormatProblem(Exception):
    """The email cannot be read as a request: Ack 3."""


def _numbered_targets(envoi: Envoi) -> tuple[list[_Target], bool, bool]:
    """Targets from num/numX/sms/smsX tags -> (targets, numbered, too_many)."""
    numbered: dict[int, str] = {}
    texts: dict[int, str] = {}
    for name, value in envoi.fields.items():
        if m := _NUM_TAG.match(name):
            numbered[int(m.group(1))] = value
        elif m := _SMS_TAG.match(name):
            texts[int(m.group(1))] = value
    single = envoi.get("num")
    common = envoi.get("sms")
    if single is None and not numbered:
        return [], False, False
    if common is None and not texts:
        raise _FormatProblem("no <sms> for the numbers")
    too_many = len(numbered) + (single is not None) > MAX_NUMBERS or any(
        x > MAX_NUMBERS for x in numbered
    )
    targets: list[_Target] = []
    if single is not None:
        targets.append(_Target(single, common))
    for x in sorted(numbered):
        targets.append(_Target(numbered[x], texts.get(x, common)))
    return targets, bool(numbered), too_many


def _csv_targets(envoi: Envoi, attachments: dict[str, bytes]) -> Iterator[_Target]:
    """Targets from mobiles.csv and message.csv (or <sms> as the template)."""
    if "message.csv" in attachments:
        template = read_message(attachments["message.csv"])
    else:
        sms = envoi.get("sms")
        if sms is None:
            raise _FormatProblem("mobiles.csv without message.csv or <sms>")
        template = sms
    fill = filler(template)
    for tel, fields in iter_mobiles(attachments["mobiles.csv"]):
        yield _Target(tel, fill(fields))


def stop_mention(account: AccountConfig) -> str:
    """The line appended to commercial SMS sent under a sender id."""
    return f"STOP SMS au {account.stop_number}"


def _sender(envoi: Envoi, account: AccountConfig) -> tuple[str | None, int | None]:
    """The sender id to use, or the request-wide code refusing it."""
    value = envoi.get("emetteur")
    if value is None:
        return account.default_sender, None
    if value == "":
        return None, Code.EMPTY_SENDER
    if not SENDER_ID_RE.match(value):
        return None, Code.SENDER_NOT_ALLOWED
    if account.senders is not None and value not in account.senders:
        return None, Code.SENDER_NOT_ALLOWED
    return value, None


def _part_limit(envoi: Envoi, account: AccountConfig) -> tuple[int, int | None]:
    """Parts a message may use: smslong capped by max_parts, or code 34."""
    value = envoi.get("smslong")
    if value is None:
        return account.max_parts, None
    value = value.strip()
    if not _SMSLONG.match(value) or int(value) < 1:
        return account.max_parts, Code.SMSLONG_NOT_INTEGER
    return min(int(value), account.max_parts), None


class _TextMaker:
    """Raw message -> final text; one instance per request, cached per text."""

    def __init__(
        self, account: AccountConfig, suffix: str, limit: int, line_break: str | None
    ) -> None:
        self.account = account
        self.line_break = line_break
        self.suffix = suffix
        self.limit = limit
        self.cut = 0  # how many texts had to be cut (for the log)
        self._cache: dict[str, tuple[str, gsm.Segmentation]] = {}

    def make(self, raw: str) -> tuple[str, gsm.Segmentation]:
        hit = self._cache.get(raw)
        if hit is not None:
            return hit
        # NFC: Apple Mail sends "é" as "e" + a combining accent, which is not
        # GSM-7; composed, the same text is GSM-7 and costs half as much.
        body = raw if raw.isascii() else unicodedata.normalize("NFC", raw)
        if self.line_break is not None and self.line_break in body:
            body = body.replace(self.line_break, "\n")
        if self.account.transliterate:
            body = gsm.transliterate(body)
        text = body + self.suffix
        seg = gsm.segment(text)
        if seg.parts > self.limit:  # only then cut (fit would count the whole text again)
            fitted = gsm.fit(body, self.suffix, self.limit)
            if fitted != body:
                self.cut += 1
            text = fitted + self.suffix
            seg = gsm.segment(text)
        result = (text, seg)
        if len(self._cache) < 10_000:  # personalised CSVs would only fill memory
            self._cache[raw] = result
        return result


def _wants_stop(envoi: Envoi, account: AccountConfig, sender: str | None) -> bool:
    if not account.commercial or sender is None or not any(c.isalpha() for c in sender):
        return False
    return not (account.nostop_allowed and (envoi.get("nostop") or "").strip() == "1")


def check_request(
    envoi: Envoi,
    attachments: dict[str, bytes],
    rules: AccountRules,
    now: datetime,
    *,
    line_break: str | None = LINE_BREAK,
) -> CheckedRequest:
    """Check one email's request; see the module docstring for the codes.

    `line_break`: the character that stands for a line break in texts (`Ö` in
    `<envoi>` requests; None in plain mode, whose texts keep their own)."""
    email_id = envoi.get("emailid")
    if email_id is None or not email_id.strip():
        return CheckedRequest(Ack.MISSING_EMAIL_ID, notes=["no emailId"])
    try:
        return _check(envoi, attachments, rules, now, line_break)
    except (_FormatProblem, AttachmentError) as err:
        return CheckedRequest(Ack.INVALID_FORMAT, notes=[str(err)])


def _check(
    envoi: Envoi,
    attachments: dict[str, bytes],
    rules: AccountRules,
    now: datetime,
    line_break: str | None,
) -> CheckedRequest:
    account = rules.account
    result = CheckedRequest(Ack.PROCESSED, reference=envoi.get("tracker"))
    targets: Iterable[_Target]
    if "mobiles.csv" in attachments:
        targets, result.numbered, too_many = list(_csv_targets(envoi, attachments)), True, False
    else:
        targets, result.numbered, too_many = _numbered_targets(envoi)
    if not targets:
        # No number at all: one empty recipient carries code 6.
        targets = [_Target("", envoi.get("sms"))]
    sender, sender_code = _sender(envoi, account)
    result.sender = sender
    limit, smslong_code = _part_limit(envoi, account)
    request_code: int | None = None
    if too_many:
        request_code = Code.TOO_MANY_NUMBERS
    elif sender_code is not None:
        request_code = sender_code
    elif smslong_code is not None:
        request_code = smslong_code
    elif account.commercial and rules.quiet.is_quiet(now):
        if account.quiet_hours == "reject":
            request_code = Code.QUIET_HOURS
        else:
            result.due_at = rules.quiet.next_allowed(now)
    suffix = "\n" + stop_mention(account) if _wants_stop(envoi, account, sender) else ""
    maker = _TextMaker(account, suffix, limit, line_break)
    for target in targets:
        result.recipients.append(_recipient(target, request_code, rules, maker, limit))
    if request_code is not None:
        result.notes.append(f"every recipient gets code {request_code}")
    if maker.cut:
        result.notes.append(f"{maker.cut} text(s) cut to {limit} part(s)")
    return result


def _recipient(
    target: _Target, request_code: int | None, rules: AccountRules, maker: _TextMaker, limit: int
) -> RecipientDraft:
    if request_code is not None:
        return RecipientDraft(tel=target.tel, code=request_code)
    account = rules.account
    number = check_number(
        target.tel,
        default_region=account.default_region,
        countries=account.countries,
        blacklist=rules.blacklist,
    )
    if number.code is not None or number.e164 is None:
        return RecipientDraft(tel=target.tel, code=number.code or Code.MALFORMED_NUMBER)
    if target.text is None or not target.text.strip():
        return RecipientDraft(tel=target.tel, number=number.e164, code=Code.ERROR)
    text, seg = maker.make(target.text)
    # The path of every valid recipient: RecipientDraft's fields in order, built
    # by tuple.__new__ (a keyword call costs five times as much).
    return tuple.__new__(
        RecipientDraft, (target.tel, number.e164, text, seg.encoding, seg.parts, limit, None)
    )
