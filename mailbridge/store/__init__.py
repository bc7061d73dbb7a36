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

from collections.abc import Sequence
from typing import Protocol

from mailbridge.config import StoreConfig
from mailbridge.model import (
    Admission,
    ClaimedRequest,
    NewRequest,
    PendingRecipient,
    RecipientResult,
    ReportData,
    ReportJob,
)


class StoreUnavailable(Exception):
    """The store could not take the write (disk full, locked too long, I/O error)."""


class Store(Protocol):
    instance_id: str  # random, made when the store is created: keeps idempotency keys unique

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def add_request(self, request: NewRequest) -> Admission:
        """Store an accepted email (Ack 1 if its emailId was seen); durable on return."""
        ...

    async def recover(self) -> int:
        """At start: release leases of a previous run; return how many were released."""
        ...

    async def claim_requests(self, now: float, lease_s: float, limit: int) -> list[ClaimedRequest]:
        """Take a lease on up to `limit` due requests, oldest first (they are then
        sent together, so that several emails share provider requests)."""
        ...

    async def next_due(self) -> float | None:
        """When the earliest queued request or pending report becomes due."""
        ...

    async def pending_recipients(
        self, request_ids: Sequence[int], now: float, limit: int
    ) -> list[PendingRecipient]:
        """Recipients of these requests without a code whose retry time has come,
        by request then index; at most `limit`."""
        ...

    async def mark_submitting(
        self, recipients: Sequence[tuple[int, int]], provider: str, lease_until: float
    ) -> None:
        """Record that these (request id, index) are about to be handed to
        `provider`; renew their requests' leases."""
        ...

    async def reserve_credit(self, account: str, parts: int, credit: int) -> bool:
        """Take `parts` from the account's credit if that many remain."""
        ...

    async def record_results(self, results: Sequence[RecipientResult], now: float) -> None:
        """Record codes (or the next retry) for recipients; refund unused credit."""
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

    async def report_data(self, request_id: int) -> ReportData:
        """What a report of this request is rendered from."""
        ...

    async def report_data_many(self, request_ids: Sequence[int]) -> dict[int, ReportData]:
        """report_data of several requests in one read (an unreadable one is left out)."""
        ...

    async def report_sent(self, report_id: int, now: float) -> None: ...

    async def report_failed(self, report_id: int, due_at: float, error: str) -> None: ...

    async def status(self, now: float) -> dict[str, object]:
        """Counts by state and the last errors, for `mailbridge status`."""
        ...


def open_store(config: StoreConfig) -> Store:
    """The backend the configuration names (not yet opened)."""
    if config.sqlite is not None:
        from mailbridge.store.sqlite import SqliteStore

        return SqliteStore(
            config.sqlite,
            synchronous=config.synchronous,
            busy_timeout_s=config.busy_timeout_s,
            max_size_mb=config.max_size_mb,
        )
    raise StoreUnavailable("store.postgresql is not implemented yet; use store.sqlite")
