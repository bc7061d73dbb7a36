"""Plain data shared by the stages: what intake stores, what dispatch sends,
what the mailer reports. No behaviour here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from mailbridge.providers import Encoding

# The per-recipient records (RecipientDraft, PendingRecipient, RecipientResult) are
# NamedTuples: immutable like the frozen dataclasses they were, built 3-6x faster,
# which counts at 100 000 recipients a request. Build them with keywords.


class RecipientDraft(NamedTuple):
    """One recipient as checked at intake."""

    tel: str  # the number exactly as the client wrote it (reported back in the Not)
    number: str | None = None  # E.164 ('+33601020304') when the number is valid
    text: str | None = None  # the final text to send (STOP mention included, cut to fit)
    encoding: Encoding = "gsm7"
    parts: int = 0
    max_parts: int = 1
    code: int | None = None  # a final code known at intake; None: to be sent


@dataclass(frozen=True, slots=True, kw_only=True)
class NewRequest:
    """An accepted email, ready to be stored (the unit of the 250)."""

    account: str  # keyid
    email_id: str | None
    ack_code: int
    ack_to: str | None  # where the Ack goes (already checked against report rules)
    not_to: str | None
    numbered: bool  # Not form: numbered (numX, CSV) or single <etat>
    sender: str | None
    reference: str | None
    received_at: float
    due_at: float  # not before (quiet_hours: defer)
    mail_from: str
    client_ip: str
    message_id: str | None
    recipients: list[RecipientDraft] = field(default_factory=list)
    # Plain mode (SPEC section 9): the Not is a plain-text mail to `not_to`,
    # "failures" (only when a number failed) or "all"; None: the XML Not.
    plain_reports: str | None = None
    # Where etatDlr mails go (SPEC section 7): <emailDlr>, else emailNot when the
    # account has delivery_reports: true; None: no delivery mails.
    dlr_to: str | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """What the store did with a NewRequest."""

    request_id: int
    ack_code: int  # may differ from the request's: 1 when its emailId was already seen


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedRequest:
    """A request a dispatch worker holds a lease on."""

    id: int
    account: str
    email_id: str | None
    sender: str | None
    reference: str | None
    attempts: int
    received_at: float
    token: str  # random per request: makes SMS keys unique even across a restored backup
    # When it first became due: its arrival, or the end of its quiet hours when
    # deferred. The validity and the outage hold count from here (SPEC section 8).
    first_due_at: float = 0.0


class PendingRecipient(NamedTuple):
    """A recipient still waiting for its code (the store's row, in this order)."""

    request_id: int
    idx: int
    number: str
    text: str
    encoding: Encoding
    parts: int
    max_parts: int
    provider_index: int  # position in the account's route for this number
    attempts: int  # attempts on the current provider
    in_doubt: int  # nonzero: an earlier submission may have reached a provider


class RecipientResult(NamedTuple):
    """The dispatcher's decision for one recipient after an attempt."""

    request_id: int
    idx: int
    code: int | None  # final code, or None: try again at `due_at`
    provider: str | None = None
    provider_message_id: str | None = None
    detail: str = ""
    due_at: float = 0.0
    provider_index: int = 0
    attempts: int = 0
    refund_parts: int = 0  # credit reserved for this attempt and not used
    # True: nothing of this attempt reached a provider (refused bind, circuit open,
    # no connection): a retry is then not in doubt (SMPP never resends in doubt).
    unsent: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportJob:
    """A report mail waiting for delivery."""

    id: int
    request_id: int
    kind: str  # "ack" | "not" | "plain" (plain mode's text report, in place of the Not)
    to_addr: str
    created_at: float
    attempts: int


# The report kinds rendered from the request's recipient rows; the others (the
# Ack, etatDlr, a reply) need none, and a CSV request has 100 000 of them.
KINDS_WITH_ROWS = frozenset({"not", "plain"})


def rows_needed(jobs: Iterable[ReportJob]) -> set[int]:
    """The requests whose recipient rows these reports are rendered from."""
    return {j.request_id for j in jobs if j.kind in KINDS_WITH_ROWS}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportData:
    """Everything a report mail is rendered from."""

    email_id: str | None
    ack_code: int
    numbered: bool
    rows: list[tuple[str, int]]  # (tel as written, code) in request order; [] when not read
    in_reply_to: str | None
    plain_reports: str | None = None  # plain mode: "failures" or "all" (NewRequest)


# -- after "sent": delivery reports and replies (SPEC section 7) --------------------

# Final delivery statuses, as the etatDlr mail writes them; EN_COURS is a
# provider's intermediate status (kept, never mailed, never over a final one).
FINAL_STATUSES = ("DELIVRE", "NON_DELIVRE", "EXPIRE", "REJETE")
IN_PROGRESS = "EN_COURS"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryEvent:
    """A provider's delivery report for one message, as its callback said it."""

    provider_type: str  # "cm" | "smsmode" | "kcell" | "smpp": the callback it came by
    message_id: str | None  # what the recipient's provider_message_id holds
    number: str | None  # E.164 of the recipient, when the report names it
    status: str  # one of FINAL_STATUSES, or IN_PROGRESS
    text: str  # the provider's own words (error text, status description)
    occurred_at: float | None  # the provider's time of the status, when it gives one
    dedupe_key: str  # the same callback twice gives the same key
    raw: str  # the callback as received, for operators


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyEvent:
    """An SMS a recipient sent back (MO), as the provider's callback said it."""

    provider_type: str
    message_id: str | None  # the original SMS's id, when the provider names it
    number: str  # E.164 of the person who replied
    to: str | None  # our number or short code it was sent to
    text: str
    occurred_at: float | None
    dedupe_key: str
    raw: str


InboundEvent = DeliveryEvent | ReplyEvent
