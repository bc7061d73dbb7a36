"""The store: the durable queue every stage after the 250 works from.

One interface, `Store`; SQLite is the default backend (`store.sqlite`). States:
- requests: `queued` (to send; `due_at` holds deferred and retried work,
  `claimed_until` is a worker's lease) -> `done` (every recipient has its
  code; the Not report row exists) or `quarantined` (kept for a human).
- recipients: code NULL while pending; `submitting` marks an attempt that may
  have reached a provider, so a crash makes it `in_doubt`, never forgotten.
- reports: `pending` -> `sent`, with `due_at` for retries; never deleted.

Every method is a single transaction: a crash leaves the state before or after
it, nothing in between.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mailbridge.config import StoreConfig
from mailbridge.model import (
    Admission,
    ClaimedRequest,
    InboundEvent,
    NewRequest,
    PendingRecipient,
    RecipientResult,
    ReportData,
    ReportJob,
)

if TYPE_CHECKING:
    from mailbridge.feedback import FeedbackPass, FeedbackRules
    from mailbridge.store.admin import QueueEntry, RequestDetail
    from mailbridge.store.sqlstore import SqlStore


class StoreUnavailable(Exception):
    """The store could not take the write (disk full, locked too long, I/O error)."""


@dataclass(frozen=True, kw_only=True)
class StoreStatus:
    """What `mailbridge status` shows: counts by state and the last errors."""

    requests: dict[str, int]  # by state; "waiting" for queued ones due later
    recipients_pending: int
    reports: dict[str, int]  # by state
    last_errors: list[str]
    database_bytes: int  # watch it against store.max_size_mb and the free disk
    database_max_bytes: int | None


@dataclass(frozen=True)
class StoreMetrics:
    """What /metrics reads from the store: counters (name, label values, value)
    kept in the same transactions as the work they count, and the gauges of
    the current state (see store/sqlite_feedback.gauges)."""

    counters: list[tuple[str, tuple[str, ...], float]]
    gauges: dict[str, Any]


class Store(Protocol):
    instance_id: str  # random, made when the store is created: keeps idempotency keys unique
    owner: str  # this process, in the leases it takes (host:pid:random)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_request(self, request: NewRequest) -> Admission:
        """Store an accepted email (Ack 1 if its emailId was seen); durable on return."""
        ...

    async def recover(self, owner: str | None = None) -> int:
        """Take back the leases of `owner` (a process known to be dead), or, with
        None, of a previous run where one daemon owns the store (SQLite); their
        recipients being submitted become in doubt. How many requests it held."""
        ...

    async def claim_requests(self, now: float, lease_s: float, limit: int) -> list[ClaimedRequest]:
        """Take a lease on up to `limit` due requests, oldest first (they are then
        sent together, so that several emails share provider requests)."""
        ...

    async def claim_requests_with_page(
        self, now: float, lease_s: float, limit: int, page: int
    ) -> tuple[list[ClaimedRequest], list[PendingRecipient] | None]:
        """claim_requests, and pending_recipients(their ids, now, page) read once
        the claim is committed, in one call (None: it could not be read; the
        claim stands)."""
        ...

    async def next_due(self) -> float | None:
        """When the earliest queued request or pending report becomes due."""
        ...

    async def pending_recipients(
        self,
        request_ids: Sequence[int],
        now: float,
        limit: int,
        after: Mapping[int, int] | None = None,
    ) -> list[PendingRecipient]:
        """Recipients of these requests without a code whose retry time has come,
        by request then index; at most `limit`. With `after` (request id -> idx),
        only those past that idx in their request: a page read continues where
        the last one ended instead of stepping over the finished rows again."""
        ...

    async def mark_submitting(
        self, recipients: Sequence[tuple[int, int]], provider: str, lease_s: float
    ) -> set[int]:
        """Record that these (request id, index) are about to be handed to
        `provider`; renew their requests' leases. Returns the requests this
        process still holds: the others' recipients must not be submitted."""
        ...

    async def renew_leases(self, request_ids: Sequence[int], lease_s: float) -> set[int]:
        """Extend this process's leases; the ids it still holds."""
        ...

    async def reserve_credit(self, account: str, parts: int, credit: int) -> bool:
        """Take `parts` from the account's credit if that many remain."""
        ...

    async def record_results(
        self,
        results: Sequence[RecipientResult],
        now: float,
        calls: Sequence[tuple[str, float]] = (),
        finish: Sequence[int] = (),
    ) -> list[int]:
        """Record codes (or the next retry) for recipients; refund unused credit;
        count the provider calls that gave them ((provider, seconds), /metrics).
        Then, in the same transaction, finish_if_done for the requests in
        `finish`; return those finished."""
        ...

    async def release_requests(
        self,
        request_ids: Sequence[int],
        due_at: float | None,
        error: str | None,
        count_attempt: bool,
    ) -> None:
        """Give the leases back; due again at `due_at` (None: when the first
        pending recipient of each is)."""
        ...

    async def finish_if_done(self, request_ids: Sequence[int], now: float) -> list[int]:
        """Mark done the requests whose every recipient has a code, queueing their
        Not report; return their ids."""
        ...

    async def quarantine(self, request_id: int, error: str) -> None: ...

    async def claim_reports(self, now: float, limit: int, lease_s: float) -> list[ReportJob]:
        """Take a lease on due pending reports."""
        ...

    async def claim_reports_with_data(
        self, now: float, limit: int, lease_s: float
    ) -> tuple[list[ReportJob], dict[int, ReportData] | None]:
        """claim_reports, and report_data_many of their requests read once the
        claim is committed, in one call (None: it could not be read; the claim
        stands); rows only where a claimed report renders them (KINDS_WITH_ROWS)."""
        ...

    async def report_data(self, request_id: int) -> ReportData:
        """What a report of this request is rendered from."""
        ...

    async def report_data_many(
        self, request_ids: Sequence[int], rows_of: Collection[int] | None = None
    ) -> dict[int, ReportData]:
        """report_data of several requests in one read (an unreadable one is left
        out); their recipient rows only for those in `rows_of` (None: all)."""
        ...

    async def report_sent(self, report_id: int, now: float) -> None: ...

    async def reports_sent(self, report_ids: Sequence[int], now: float) -> None:
        """report_sent of several reports in one transaction."""
        ...

    async def report_failed(self, report_id: int, due_at: float, error: str) -> None:
        """A temporary failure: pending again at `due_at`."""
        ...

    async def report_given_up(self, report_id: int, now: float, error: str) -> None:
        """A permanent failure: state `failed`, kept for a human."""
        ...

    async def status(self, now: float) -> StoreStatus:
        """Counts by state and the last errors, for `mailbridge status`."""
        ...

    # -- after "sent" (SPEC section 7; rules in mailbridge.feedback) --------

    async def add_events(self, events: Sequence[InboundEvent], now: float) -> list[bool]:
        """Store delivery/reply events durably, once each (by dedupe key); True for new ones."""
        ...

    async def process_events(self, now: float, limit: int, rules: FeedbackRules) -> FeedbackPass:
        """Match due events to their recipients; apply statuses, STOP, reply mails."""
        ...

    async def queue_delivery_reports(self, now: float, rules: FeedbackRules) -> int:
        """Queue the etatDlr mails that are due; return how many."""
        ...

    async def next_feedback_due(self, rules: FeedbackRules) -> float | None: ...

    async def delivery_rows(self, report_id: int) -> list[tuple[int, str, str, str, float]]:
        """(idx, tel, status, provider's text, time) of one etatDlr report."""
        ...

    async def reply_data(self, report_id: int) -> tuple[str, str, str, bool] | None:
        """(tel as written, E.164, text, is STOP) of one reply report."""
        ...

    async def blacklisted(self, account: str, numbers: Sequence[str]) -> set[str]:
        """Which of these E.164 numbers are on the account's STOP list."""
        ...

    async def heartbeat(self, process: str, now: float, pid: int) -> None: ...

    async def heartbeats(self) -> dict[str, float]:
        """process -> the time of its last heartbeat."""
        ...

    async def set_provider_state(
        self, name: str, up: bool, now: float, error: str | None = None
    ) -> None: ...

    async def metrics(self, now: float) -> StoreMetrics: ...

    # -- the operator's commands (SPEC 11; store/admin.py) ----------------

    async def queue_list(
        self, now: float, state: str | None = None, account: str | None = None, limit: int = 1000
    ) -> list[QueueEntry]: ...

    async def queue_show(self, request_id: int) -> RequestDetail | None: ...

    async def queue_retry(self, request_ids: Sequence[int] | None, now: float) -> int:
        """Held, deferred or quarantined work due now (None: all of it); how many."""
        ...

    async def queue_drop(self, request_id: int, now: float, why: str) -> tuple[int, int] | None:
        """Pending recipients get 999, the Not follows: (dropped, still in flight)."""
        ...

    async def reports_list(
        self, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...

    async def reports_retry(self, report_id: int, now: float) -> bool: ...

    async def reports_drop(self, report_id: int, why: str) -> bool: ...

    async def purge(self, before: float, limit: int = 500) -> int:
        """Finished requests done before `before` lose their rows (not their emailId)."""
        ...

    async def oldest_pending(self) -> float | None: ...

    async def provider_errors(self) -> list[tuple[str, bool, float, str | None]]: ...

    async def watch(self, on_wake: Callable[[], None]) -> None:
        """Call `on_wake` when another process adds work (PostgreSQL NOTIFY);
        a no-op where the intake's pipe already says so."""
        ...


def open_store(
    config: StoreConfig, owner: str | None = None, *, commit_wait_s: float = 0.0
) -> Store:
    """The backend the configuration names (not yet opened); `owner`: the name
    its leases carry (default: this process's host, pid and a random tag);
    `commit_wait_s`: how long a write may wait for company while the store is
    busy (store/engine.py; the worker's, whose writes keep no client waiting)."""
    store: SqlStore
    if config.sqlite is not None:
        from mailbridge.store.sqlite import SqliteStore

        store = SqliteStore(
            config.sqlite,
            synchronous=config.synchronous,
            busy_timeout_s=config.busy_timeout_s,
            max_size_mb=config.max_size_mb,
        )
    else:
        from mailbridge.store.postgres import PostgresStore

        store = PostgresStore(config)
    if owner is not None:
        store.owner = owner
    store.engine.commit_wait_s = commit_wait_s
    return store


async def acquire_store_lock(config: StoreConfig) -> int | None:
    """Take the store for this daemon where a store takes one daemon (a SQLite
    file: its lock file, inherited by the worker); None for PostgreSQL, which
    takes any number of instances. Waits while a previous run's worker dies."""
    if config.sqlite is None:
        return None
    from mailbridge.store.sqlite import acquire_lock

    return await acquire_lock(config.sqlite)
