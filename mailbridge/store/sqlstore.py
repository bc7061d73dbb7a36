"""The `Store` over SQL, for every backend: the engine runs the rules of
store/queue.py and store/events.py; a backend (store/sqlite.py,
store/postgres.py) gives the connection, its schema and its few differences.

Each method is one transaction. `owner` names this process in the leases it
takes (`claimed_by`): host, pid and a random tag, so two processes never
share one, even on two hosts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from mailbridge.feedback import FeedbackPass, FeedbackRules
from mailbridge.model import (
    Admission,
    ClaimedRequest,
    InboundEvent,
    NewRequest,
    PendingRecipient,
    RecipientResult,
    ReportData,
    ReportJob,
    rows_needed,
)
from mailbridge.store import StoreMetrics, StoreStatus, admin
from mailbridge.store import events as ev
from mailbridge.store import queue as q
from mailbridge.store.engine import Backend, Engine, Tx

T = TypeVar("T")


class SqlBackend(Backend, Protocol):
    """A Backend that also knows its schema, its size and its exclusivity."""

    @property
    def exclusive(self) -> bool:
        """True when one daemon owns the store (SQLite's lock file): a start may
        then take back every lease at once instead of waiting for them to expire."""
        ...

    def prepare(self, conn: Any) -> str:
        """Create or migrate the schema; return the store's instance id."""
        ...

    def size(self, tx: Tx) -> tuple[int, int | None]:
        """(bytes used, the cap or None)."""
        ...

    async def watch(self, on_wake: Callable[[], None]) -> None:
        """Call `on_wake` when another process adds work (PostgreSQL NOTIFY)."""
        ...

    async def unwatch(self) -> None: ...


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class SqlStore:
    """A `Store`; construct with its backend, then `await open()`."""

    def __init__(self, backend: SqlBackend) -> None:
        self.backend = backend
        self.owner = new_owner()  # may be set before open() (the worker's is its parent's choice)
        self.instance_id = ""
        self.engine = Engine(backend)

    @property
    def commits(self) -> int:
        return self.engine.commits

    async def open(self) -> None:
        self.engine.shard = self.owner
        conn = await asyncio.to_thread(self.backend.connect)
        try:
            self.instance_id = await asyncio.to_thread(self.backend.prepare, conn)
        except BaseException:
            self.backend.close(conn)
            raise
        self.engine.start(conn)

    async def close(self) -> None:
        await self.backend.unwatch()
        await self.engine.stop()

    async def _write(self, fn: Callable[[Tx], T]) -> T:
        return await self.engine.run(fn, True)

    async def _poll(self, fn: Callable[[Tx], T]) -> T:
        """A write that mostly finds nothing to do: its opening SELECT is tried
        outside the transaction, and answered there when nothing is due
        (store/engine.py, read_first)."""
        return await self.engine.run(fn, True, read_first=True)

    async def _read(self, fn: Callable[[Tx], T]) -> T:
        return await self.engine.run(fn, False)

    def _notify(self, tx: Tx) -> None:
        # Work for every instance: NOTIFY is delivered at commit (PostgreSQL).
        if tx.dialect.notify:
            tx.execute(tx.dialect.notify)

    # -- intake ----------------------------------------------------------

    async def add_request(self, request: NewRequest) -> Admission:
        def add(tx: Tx) -> Admission:
            admission = q.add_request(tx, request)
            self._notify(tx)
            return admission

        return await self._write(add)

    # -- dispatch --------------------------------------------------------

    async def recover(self, owner: str | None = None) -> int:
        if owner is None and not self.backend.exclusive:
            return 0  # other instances hold leases: they expire by themselves
        return await self._write(lambda tx: q.release_owned(tx, owner))

    async def claim_requests(self, now: float, lease_s: float, limit: int) -> list[ClaimedRequest]:
        return await self._poll(lambda tx: q.claim_requests(tx, now, lease_s, limit, self.owner))

    async def claim_requests_with_page(
        self, now: float, lease_s: float, limit: int, page: int
    ) -> tuple[list[ClaimedRequest], list[PendingRecipient] | None]:
        def first_page(tx: Tx, claims: list[ClaimedRequest]) -> list[PendingRecipient]:
            return q.pending_recipients(tx, [c.id for c in claims], now, page) if claims else []

        return await self.engine.run_then(
            lambda tx: q.claim_requests(tx, now, lease_s, limit, self.owner),
            first_page,
            read_first=True,
        )

    async def renew_leases(self, request_ids: Sequence[int], lease_s: float) -> set[int]:
        return await self._write(lambda tx: q.renew_leases(tx, request_ids, lease_s, self.owner))

    async def next_due(self) -> float | None:
        return await self._read(q.next_due)

    async def pending_recipients(
        self,
        request_ids: Sequence[int],
        now: float,
        limit: int,
        after: Mapping[int, int] | None = None,
    ) -> list[PendingRecipient]:
        return await self._read(lambda tx: q.pending_recipients(tx, request_ids, now, limit, after))

    async def mark_submitting(
        self, recipients: Sequence[tuple[int, int]], provider: str, lease_s: float
    ) -> set[int]:
        return await self._write(
            lambda tx: q.mark_submitting(tx, recipients, provider, lease_s, self.owner)
        )

    async def reserve_credit(self, account: str, parts: int, credit: int) -> bool:
        return await self._write(lambda tx: q.reserve_credit(tx, account, parts, credit))

    async def record_results(
        self,
        results: Sequence[RecipientResult],
        now: float,
        calls: Sequence[tuple[str, float]] = (),
        finish: Sequence[int] = (),
    ) -> list[int]:
        def record(tx: Tx) -> list[int]:
            q.record_results(tx, results, now, calls)
            return self._finish(tx, finish, now) if finish else []

        return await self._write(record)

    async def release_requests(
        self,
        request_ids: Sequence[int],
        due_at: float | None,
        error: str | None,
        count_attempt: bool,
    ) -> None:
        await self._write(
            lambda tx: q.release_requests(tx, request_ids, due_at, error, count_attempt, self.owner)
        )

    async def finish_if_done(self, request_ids: Sequence[int], now: float) -> list[int]:
        return await self._write(lambda tx: self._finish(tx, request_ids, now))

    def _finish(self, tx: Tx, request_ids: Sequence[int], now: float) -> list[int]:
        done = q.finish_if_done(tx, request_ids, now, self.owner)
        if done:
            self._notify(tx)  # reports are due
        return done

    async def quarantine(self, request_id: int, error: str) -> None:
        await self._write(lambda tx: q.quarantine(tx, request_id, error, self.owner))

    # -- reports ---------------------------------------------------------

    async def claim_reports(self, now: float, limit: int, lease_s: float) -> list[ReportJob]:
        return await self._poll(lambda tx: q.claim_reports(tx, now, limit, lease_s, self.owner))

    async def claim_reports_with_data(
        self, now: float, limit: int, lease_s: float
    ) -> tuple[list[ReportJob], dict[int, ReportData] | None]:
        def data(tx: Tx, jobs: list[ReportJob]) -> dict[int, ReportData]:
            return q.report_data_many(tx, [j.request_id for j in jobs], rows_needed(jobs))

        return await self.engine.run_then(
            lambda tx: q.claim_reports(tx, now, limit, lease_s, self.owner), data, read_first=True
        )

    async def report_data(self, request_id: int) -> ReportData:
        return await self._read(lambda tx: q.report_data(tx, request_id))

    async def report_data_many(
        self, request_ids: Sequence[int], rows_of: Collection[int] | None = None
    ) -> dict[int, ReportData]:
        return await self._read(lambda tx: q.report_data_many(tx, request_ids, rows_of))

    async def report_sent(self, report_id: int, now: float) -> None:
        await self._write(lambda tx: q.report_sent(tx, report_id, now))

    async def reports_sent(self, report_ids: Sequence[int], now: float) -> None:
        await self._write(lambda tx: q.reports_sent(tx, report_ids, now))

    async def report_failed(self, report_id: int, due_at: float, error: str) -> None:
        await self._write(lambda tx: q.report_failed(tx, report_id, due_at, error, self.owner))

    async def report_given_up(self, report_id: int, now: float, error: str) -> None:
        await self._write(lambda tx: q.report_given_up(tx, report_id, now, error))

    async def status(self, now: float) -> StoreStatus:
        return await self._read(lambda tx: q.status(tx, now, self.backend.size(tx)))

    # -- after "sent" ----------------------------------------------------

    async def add_events(self, events: Sequence[InboundEvent], now: float) -> list[bool]:
        def add(tx: Tx) -> list[bool]:
            new = ev.add_events(tx, events, now)
            if any(new):
                self._notify(tx)
            return new

        return await self._write(add)

    async def process_events(self, now: float, limit: int, rules: FeedbackRules) -> FeedbackPass:
        return await self._poll(lambda tx: ev.process_events(tx, now, limit, rules))

    async def queue_delivery_reports(self, now: float, rules: FeedbackRules) -> int:
        return await self._poll(lambda tx: ev.queue_delivery_reports(tx, now, rules))

    async def next_feedback_due(self, rules: FeedbackRules) -> float | None:
        return await self._read(lambda tx: ev.next_feedback_due(tx, rules))

    async def delivery_rows(self, report_id: int) -> list[tuple[int, str, str, str, float]]:
        return await self._read(lambda tx: ev.delivery_rows(tx, report_id))

    async def reply_data(self, report_id: int) -> tuple[str, str, str, bool] | None:
        return await self._read(lambda tx: ev.reply_data(tx, report_id))

    async def blacklisted(self, account: str, numbers: Sequence[str]) -> set[str]:
        return await self._read(lambda tx: ev.blacklisted(tx, account, numbers))

    async def heartbeat(self, process: str, now: float, pid: int) -> None:
        await self._write(lambda tx: ev.beat(tx, process, now, pid))

    async def heartbeats(self) -> dict[str, float]:
        return await self._read(ev.heartbeats)

    async def set_provider_state(
        self, name: str, up: bool, now: float, error: str | None = None
    ) -> None:
        await self._write(lambda tx: ev.set_provider_state(tx, name, up, now, error))

    async def metrics(self, now: float) -> StoreMetrics:
        return await self._read(lambda tx: StoreMetrics(ev.counters(tx), ev.gauges(tx, now)))

    # -- the operator (SPEC 11; store/admin.py) ----------------------------

    async def queue_list(
        self, now: float, state: str | None = None, account: str | None = None, limit: int = 1000
    ) -> list[admin.QueueEntry]:
        return await self._read(lambda tx: admin.queue_list(tx, now, state, account, limit))

    async def queue_show(self, request_id: int) -> admin.RequestDetail | None:
        return await self._read(lambda tx: admin.queue_show(tx, request_id))

    async def queue_retry(self, request_ids: Sequence[int] | None, now: float) -> int:
        def retry(tx: Tx) -> int:
            n = admin.queue_retry(tx, request_ids, now)
            self._notify(tx)
            return n

        return await self._write(retry)

    async def queue_drop(self, request_id: int, now: float, why: str) -> tuple[int, int] | None:
        def drop(tx: Tx) -> tuple[int, int] | None:
            result = admin.queue_drop(tx, request_id, now, why)
            self._notify(tx)
            return result

        return await self._write(drop)

    async def reports_list(
        self, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        return await self._read(lambda tx: admin.reports_list(tx, state, limit))

    async def reports_retry(self, report_id: int, now: float) -> bool:
        def retry(tx: Tx) -> bool:
            ok = admin.reports_retry(tx, report_id, now)
            self._notify(tx)
            return ok

        return await self._write(retry)

    async def reports_drop(self, report_id: int, why: str) -> bool:
        return await self._write(lambda tx: admin.reports_drop(tx, report_id, why))

    async def purge(self, before: float, limit: int = 500) -> int:
        return await self._write(lambda tx: admin.purge(tx, before, limit))

    async def oldest_pending(self) -> float | None:
        return await self._read(admin.oldest_pending)

    async def provider_errors(self) -> list[tuple[str, bool, float, str | None]]:
        return await self._read(admin.provider_errors)

    async def watch(self, on_wake: Callable[[], None]) -> None:
        """Wake `on_wake` when any instance adds work (no-op where only we do)."""
        await self.backend.watch(on_wake)
