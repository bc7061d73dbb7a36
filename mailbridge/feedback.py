"""After "sent": delivery reports, replies and STOP (SPEC section 7), the rules.

Input: delivery and reply events the HTTP receiver (or an SMPP bind) stored,
and the recipients they name. Output: each recipient's delivery status, the
etatDlr mails, reply mails to the client, and STOP numbers on the account's
blacklist. This module holds the rules, pure and backend-neutral; the store
applies them inside its transactions, and `FeedbackStage` runs them in the
worker, from the store, so the receiver only has to store and answer.

- Precedence: a final status (DELIVRE, NON_DELIVRE, EXPIRE, REJETE) is never
  replaced; an intermediate one (EN_COURS) is replaced by any later report.
  Between two finals the first wins (a provider contradicting itself).
- An event whose message is not known yet (its report raced the provider's
  answer, or the id is not committed yet) is kept and tried again with
  backoff (EVENT_RETRY_S doubling to EVENT_RETRY_MAX_S), and matched at once
  when the dispatcher records that id; after EVENT_MAX_AGE_S it is an orphan:
  logged at WARNING, counted, kept in the store for the operator, never mailed.
- STOP: a reply whose text starts with the word STOP, in any case, with or
  without text after it ("Stop", "STOP 36xxx"), puts the number on the
  blacklist of the account its request belongs to (code 11 from then on).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailbridge.clock import Clock, nap
from mailbridge.model import FINAL_STATUSES
from mailbridge.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

EVENT_RETRY_S = 30.0
EVENT_RETRY_MAX_S = 3600.0
EVENT_MAX_AGE_S = 7 * 86400.0  # a report later than a week is not coming for a known id
EVENT_BATCH = 500
_STOP_RE = re.compile(r"\s*stop\b", re.IGNORECASE)


def is_final(status: str | None) -> bool:
    """Whether a delivery status is final (never replaced)."""
    return status in FINAL_STATUSES


def replaces(current: str | None, new: str) -> bool:
    """Whether a report of `new` status replaces the recipient's `current` one."""
    return not is_final(current)


def is_stop(text: str) -> bool:
    """Whether a reply asks to stop: the word STOP first, any case, anything after."""
    return _STOP_RE.match(text) is not None


def event_retry_delay(tries: int) -> float:
    """How long an unmatched event waits before it is tried again."""
    return float(min(EVENT_RETRY_S * 2 ** min(tries, 20), EVENT_RETRY_MAX_S))


@dataclass(frozen=True)
class FeedbackRules:
    """What the store needs from the configuration to apply the rules."""

    # provider type ("cm") -> the names of the configured providers of that type
    providers_by_type: Mapping[str, tuple[str, ...]]
    # account keyid -> its reply_to address (None: replies go to the request's sender)
    reply_to: Mapping[str, str | None]
    delivery_report_delay_s: float
    # After the Not, how long etatDlr mails may still follow for recipients
    # whose final status has not come (then the request's delivery is closed).
    delivery_report_max_age_s: float


@dataclass
class FeedbackPass:
    """What one pass over the events did, for the log and the metrics."""

    matched: int = 0
    waiting: int = 0  # not matched yet, to be tried again
    orphans: list[str] = field(default_factory=list)  # a line each, for the log
    stops: list[str] = field(default_factory=list)  # "account number", for the log
    dlr_reports: int = 0  # etatDlr mails queued
    reply_reports: int = 0


class FeedbackStage:
    """The worker stage: match stored events, queue etatDlr and reply mails."""

    def __init__(
        self, store: Store, rules: FeedbackRules, clock: Clock, linger_s: float = 0.0
    ) -> None:
        self.store = store
        self.rules = rules
        self.clock = clock
        # After a wake, wait this long so that a burst of callbacks is matched in
        # one transaction, not one each (dispatch.linger_s, as for requests).
        self.linger_s = linger_s

    async def run_once(self) -> FeedbackPass:
        """Process the due events and the due etatDlr mails once."""
        total = FeedbackPass()
        while True:
            done = await self.store.process_events(self.clock.time(), EVENT_BATCH, self.rules)
            total.matched += done.matched
            total.waiting += done.waiting
            total.orphans += done.orphans
            total.stops += done.stops
            total.reply_reports += done.reply_reports
            if done.matched + done.waiting + len(done.orphans) < EVENT_BATCH:
                break
        total.dlr_reports = await self.store.queue_delivery_reports(self.clock.time(), self.rules)
        for line in total.orphans:
            log.warning("delivery/reply event never matched, kept as orphan: %s", line)
        for stop in total.stops:
            log.info("STOP reply: %s added to the blacklist", stop)
        if total.matched or total.dlr_reports:
            log.info(
                "feedback: %d event(s) matched, %d waiting for their message, %d etatDlr and"
                " %d reply mail(s) queued",
                total.matched, total.waiting, total.dlr_reports, total.reply_reports,
            )  # fmt: skip
        return total

    async def run(
        self, wake: asyncio.Event, stopping: asyncio.Event, reports: asyncio.Event
    ) -> None:
        """Run until `stopping`; `wake` says events arrived; `reports` is set
        when mails were queued (the mailer then looks at once)."""
        while not stopping.is_set():
            wake.clear()
            idle = 60.0
            try:
                done = await self.run_once()
                if done.dlr_reports or done.reply_reports:
                    reports.set()
                due = await self.store.next_feedback_due(self.rules)
                if due is not None:
                    idle = max(0.05, min(60.0, due - self.clock.time()))
            except StoreUnavailable as err:
                log.error("feedback: store unavailable: %s", err)
                idle = 5.0
            except Exception:
                log.exception("feedback: unexpected error; retrying")
                idle = 5.0
            await nap(wake, stopping, idle)
            if self.linger_s > 0 and wake.is_set():
                await nap(stopping, stopping, self.linger_s)
