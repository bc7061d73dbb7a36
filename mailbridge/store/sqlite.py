"""SQLite backend of the store: one file, WAL, one connection on one thread.

Every call runs on a single dedicated thread, so writes are serialised without
lock contention, and the event loop never blocks on disk. Calls that wait at
the same moment share one transaction (group commit, see SqliteStore).
`synchronous=FULL` (the default) fsyncs the WAL at each commit: a 250
survives power loss.
SQLite errors that mean "cannot write now" (disk full, I/O error, locked past
the busy timeout) become `StoreUnavailable`, which intake answers with 451.
`max_size_mb` caps the file (`PRAGMA max_page_count`): past it SQLite raises
its real SQLITE_FULL, exactly as on a full disk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

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
)
from mailbridge.store import StoreMetrics, StoreUnavailable
from mailbridge.store import sqlite_feedback as fb
from mailbridge.store.sqlite_feedback import FEEDBACK_SCHEMA

log = logging.getLogger(__name__)
T = TypeVar("T")
# Version 1 is SCHEMA below, frozen; every later change is a migration, applied
# in order at open, to new files too (so the schema is written in one place).
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE requests ADD COLUMN plain_reports TEXT"],  # plain mode (SPEC 9)
    3: FEEDBACK_SCHEMA,  # delivery reports, replies, STOP, metrics (SPEC 7)
}
SCHEMA_VERSION = max(MIGRATIONS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    account TEXT NOT NULL,
    email_id TEXT,
    ack_code INTEGER NOT NULL,
    state TEXT NOT NULL,                 -- queued | done | quarantined
    numbered INTEGER NOT NULL,
    sender TEXT,
    reference TEXT,
    not_to TEXT,
    mail_from TEXT NOT NULL,
    client_ip TEXT NOT NULL,
    message_id TEXT,
    received_at REAL NOT NULL,
    due_at REAL NOT NULL,
    claimed_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at REAL,
    -- random, part of every SMS idempotency key: after a backup is restored,
    -- request ids repeat, keys do not (a provider would take them for retries)
    token TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_due ON requests (state, due_at);
CREATE TABLE IF NOT EXISTS email_ids (
    account TEXT NOT NULL,
    email_id TEXT NOT NULL,
    request_id INTEGER NOT NULL,
    PRIMARY KEY (account, email_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recipients (
    request_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    tel TEXT NOT NULL,
    number TEXT,
    text TEXT,
    encoding TEXT NOT NULL,
    parts INTEGER NOT NULL,
    max_parts INTEGER NOT NULL,
    code INTEGER,                        -- NULL while pending
    due_at REAL NOT NULL DEFAULT 0,
    provider TEXT,
    provider_index INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    submitting INTEGER NOT NULL DEFAULT 0,
    in_doubt INTEGER NOT NULL DEFAULT 0,
    provider_message_id TEXT,
    detail TEXT,
    done_at REAL,
    PRIMARY KEY (request_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    request_id INTEGER NOT NULL,
    kind TEXT NOT NULL,                  -- ack | not | plain
    to_addr TEXT NOT NULL,
    state TEXT NOT NULL,                 -- pending | sent
    created_at REAL NOT NULL,
    due_at REAL NOT NULL,
    claimed_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS reports_due ON reports (state, due_at);
CREATE TABLE IF NOT EXISTS credits (account TEXT PRIMARY KEY, used INTEGER NOT NULL);
"""


def _runs(idxs: list[int]) -> list[tuple[int, int]]:
    """Sorted runs of consecutive idx: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for idx in sorted(set(idxs)):
        if runs and runs[-1][1] == idx - 1:
            runs[-1] = (runs[-1][0], idx)
        else:
            runs.append((idx, idx))
    return runs


class _Op:
    """One store call waiting for the store thread."""

    __slots__ = ("fn", "write", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        write: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn = fn
        self.write = write
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def apply() -> None:
            if self.future.done():  # the caller was cancelled
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(apply)


_STOP = object()
MAX_BATCH = 512  # store calls sharing one transaction (one fsync)


class SqliteStore:
    """The default store backend. Construct, then `await open()`.

    Group commit: every call goes to one store thread, which takes all the
    calls waiting at that moment and runs them in ONE transaction, each inside
    its own SAVEPOINT (a failing call is rolled back alone), then commits once
    and only then answers them all. Under load, many SMTP transactions and
    dispatch steps share one fsync; each 250 still waits for its own commit.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        busy_timeout_s: float = 5.0,
        max_size_mb: float | None = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = busy_timeout_s
        self.max_size_mb = max_size_mb
        self.instance_id = ""
        self._queue: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self.commits = 0  # transactions committed (for the benchmark)

    # -- plumbing --------------------------------------------------------

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        if self._thread is None:
            raise StoreUnavailable("store is not open")
        op = _Op(fn, write, asyncio.get_running_loop())
        self._queue.put(op)
        try:
            result: T = await op.future
        except sqlite3.DatabaseError as err:  # locked, full, I/O error, corrupt file
            raise StoreUnavailable(f"sqlite: {err}") from err
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn in the shared transaction; return once it is committed."""
        return await self._submit(fn, True)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(fn, False)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable("store is not open")
        return self._db

    def _serve(self) -> None:
        """The store thread: batches of calls, one transaction per batch."""
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch([op for op in batch if isinstance(op, _Op)])
            if stop:
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        db = self.db
        if not any(op.write for op in batch):
            for op in batch:
                try:
                    op.settle(op.fn(db))
                except BaseException as err:
                    op.settle(error=err)
            return
        try:
            self._begin(db)
        except sqlite3.Error as err:  # locked past busy_timeout_s
            for op in batch:
                op.settle(error=err)
            return
        done: list[tuple[_Op, Any, BaseException | None]] = []
        for i, op in enumerate(batch):
            db.execute("SAVEPOINT op")
            try:
                result = op.fn(db)
                db.execute("RELEASE op")
                done.append((op, result, None))
            except BaseException as err:
                if not db.in_transaction:
                    # SQLITE_FULL, IOERR, NOMEM roll the whole transaction back
                    # themselves: nothing of this batch was kept.
                    for lost, _, _ in done:
                        lost.settle(error=err)
                    for rest in batch[i:]:
                        rest.settle(error=err)
                    return
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                done.append((op, None, err))
        try:
            db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as err:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error as rollback_err:
                    log.error("sqlite: rollback failed: %s", rollback_err)
            for op, _, _ in done:
                op.settle(error=err)
            return
        for op, result, error in done:
            op.settle(result, error)

    def _begin(self, db: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, waiting for the other process's writer in small steps.

        SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20 ms... between tries:
        while the worker process commits (about a millisecond), the intake would
        sleep far longer than the lock is held. Polling every 0.2 ms follows the
        holder closely; busy_timeout_s still bounds the wait (then 451).
        """
        db.execute("PRAGMA busy_timeout = 0")
        try:
            deadline = time.monotonic() + self.busy_timeout_s
            while True:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err) or time.monotonic() >= deadline:
                        raise
                time.sleep(0.0002)
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s
        )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._db = db
        db.executescript(SCHEMA)
        self._migrate(db)
        # After the schema: the cap stops growth, not the tables it needs.
        if self.max_size_mb is not None:
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            wanted = max(1, int(self.max_size_mb * 1024 * 1024) // page_size)
            # SQLite never sets the cap below the current size: it can only stop growth.
            pages = int(db.execute(f"PRAGMA max_page_count = {wanted}").fetchone()[0])
            if pages > wanted:
                log.warning(
                    "store: %s is already %.1f MB, over store.max_size_mb %.1f: it will not grow",
                    self.path, pages * page_size / 2**20, self.max_size_mb,
                )  # fmt: skip

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION (a new one from 1); refuse a newer one.

        One transaction (a crash leaves the old version whole) that holds the
        write lock from the first read, so two processes opening at once do not
        both migrate."""
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:  # SCHEMA just made version 1
                db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
            version = 1 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path} has schema version {version}, newer than this mailbridge"
                    f" ({SCHEMA_VERSION}): upgrade mailbridge or restore a matching backup"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if row is not None and version < SCHEMA_VERSION:
            log.info("store: %s migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    async def open(self) -> None:
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._serve, name="store", daemon=True)
        self._thread.start()

        def init(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            if row:
                return str(row[0])
            instance = secrets.token_hex(4)
            db.execute("INSERT INTO meta VALUES ('instance_id', ?)", (instance,))
            return instance

        self.instance_id = await self._write(init)

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- intake ----------------------------------------------------------

    def _add_request(self, db: sqlite3.Connection, req: NewRequest) -> Admission:
        ack = req.ack_code
        state = "queued" if ack == 0 else "done"
        cur = db.execute(
            "INSERT INTO requests (account, email_id, ack_code, state, numbered, sender, reference,"
            " not_to, mail_from, client_ip, message_id, received_at, due_at, token, plain_reports,"
            " dlr_to) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                req.account, req.email_id, ack, state, int(req.numbered), req.sender,
                req.reference, req.not_to, req.mail_from, req.client_ip, req.message_id,
                req.received_at, req.due_at, secrets.token_hex(3), req.plain_reports,
                req.dlr_to,
            ),
        )  # fmt: skip
        request_id = int(cur.lastrowid or 0)
        if ack == 0 and req.email_id is not None:
            try:
                db.execute(
                    "INSERT INTO email_ids VALUES (?,?,?)", (req.account, req.email_id, request_id)
                )
            except sqlite3.IntegrityError:
                ack = 1
                db.execute(
                    "UPDATE requests SET ack_code = 1, state = 'done', done_at = ? WHERE id = ?",
                    (req.received_at, request_id),
                )
        if req.ack_to:
            self._add_report(db, request_id, "ack", req.ack_to, req.received_at)
        outcome = {0: "accepted", 1: "duplicate"}.get(ack, "invalid")
        counts: dict[tuple[str, tuple[str, ...]], float] = {
            ("mailbridge_emails_total", (outcome,)): 1
        }
        if ack == 0:
            for r in req.recipients:  # codes known at intake: no provider
                if r.code is not None:
                    key = ("mailbridge_sms_total", ("none", str(r.code)))
                    counts[key] = counts.get(key, 0) + 1
        fb.bump(db, counts)
        if ack == 0:
            db.executemany(
                "INSERT INTO recipients (request_id, idx, tel, number, text, encoding, parts,"
                " max_parts, code, done_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    (
                        request_id, i, r.tel, r.number, r.text, r.encoding, r.parts,
                        r.max_parts, r.code, None if r.code is None else req.received_at,
                    )
                    for i, r in enumerate(req.recipients, start=1)
                ),
            )  # fmt: skip
            self._finish_if_done(db, request_id, req.received_at)
        return Admission(request_id, ack)

    @staticmethod
    def _add_report(
        db: sqlite3.Connection, request_id: int, kind: str, to: str, now: float
    ) -> None:
        db.execute(
            "INSERT INTO reports (request_id, kind, to_addr, state, created_at, due_at)"
            " VALUES (?,?,?,'pending',?,?)",
            (request_id, kind, to, now, now),
        )

    async def add_request(self, request: NewRequest) -> Admission:
        return await self._write(lambda db: self._add_request(db, request))

    # -- dispatch --------------------------------------------------------

    def _recover(self, db: sqlite3.Connection) -> int:
        n = db.execute(
            "UPDATE requests SET claimed_until = NULL WHERE claimed_until IS NOT NULL"
        ).rowcount
        db.execute("UPDATE reports SET claimed_until = NULL WHERE claimed_until IS NOT NULL")
        # An attempt cut short by the crash may have reached the provider.
        db.execute("UPDATE recipients SET in_doubt = 1, submitting = 0 WHERE submitting = 1")
        return int(n)

    async def recover(self) -> int:
        return await self._write(self._recover)

    def _claim(
        self, db: sqlite3.Connection, now: float, lease_s: float, limit: int
    ) -> list[ClaimedRequest]:
        rows = db.execute(
            "UPDATE requests SET claimed_until = ? WHERE id IN ("
            " SELECT id FROM requests WHERE state = 'queued' AND due_at <= ?"
            " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY due_at, id LIMIT ?)"
            " RETURNING id, account, email_id, sender, reference, attempts, received_at, token",
            (now + lease_s, now, now, limit),
        ).fetchall()
        return sorted((ClaimedRequest(*row) for row in rows), key=lambda c: c.id)

    async def claim_requests(self, now: float, lease_s: float, limit: int) -> list[ClaimedRequest]:
        return await self._write(lambda db: self._claim(db, now, lease_s, limit))

    def _next_due(self) -> float | None:
        row = self.db.execute(
            "SELECT min(t) FROM ("
            " SELECT min(max(due_at, coalesce(claimed_until, 0))) AS t FROM requests"
            "  WHERE state = 'queued'"
            " UNION ALL"
            " SELECT min(max(due_at, coalesce(claimed_until, 0))) FROM reports"
            "  WHERE state = 'pending')"
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def next_due(self) -> float | None:
        return await self._read(lambda db: self._next_due())

    def _pending(
        self, request_ids: Sequence[int], now: float, limit: int
    ) -> list[PendingRecipient]:
        rows: list[Any] = []
        for request_id in request_ids:
            if len(rows) >= limit:
                break
            rows += self.db.execute(
                "SELECT request_id, idx, number, text, encoding, parts, max_parts,"
                " provider_index, attempts, in_doubt OR submitting FROM recipients"
                " WHERE request_id = ? AND code IS NULL AND due_at <= ? ORDER BY idx LIMIT ?",
                (request_id, now, limit - len(rows)),
            ).fetchall()
        return [
            PendingRecipient(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], bool(r[9]))
            for r in rows
        ]

    async def pending_recipients(
        self, request_ids: Sequence[int], now: float, limit: int
    ) -> list[PendingRecipient]:
        return await self._read(lambda db: self._pending(request_ids, now, limit))

    async def mark_submitting(
        self, recipients: Sequence[tuple[int, int]], provider: str, lease_until: float
    ) -> None:
        def mark(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE requests SET claimed_until = ? WHERE id = ?",
                ((lease_until, request_id) for request_id in {r for r, _ in recipients}),
            )
            by_request: dict[int, list[int]] = {}
            for request_id, idx in recipients:
                by_request.setdefault(request_id, []).append(idx)
            db.executemany(
                "UPDATE recipients SET submitting = 1, provider = ?"
                " WHERE request_id = ? AND idx BETWEEN ? AND ?",
                (
                    (provider, request_id, first, last)
                    for request_id, idxs in by_request.items()
                    for first, last in _runs(idxs)
                ),
            )

        await self._write(mark)

    async def reserve_credit(self, account: str, parts: int, credit: int) -> bool:
        def reserve(db: sqlite3.Connection) -> bool:
            db.execute("INSERT OR IGNORE INTO credits VALUES (?, 0)", (account,))
            row = db.execute(
                "UPDATE credits SET used = used + ? WHERE account = ? AND used + ? <= ?"
                " RETURNING used",
                (parts, account, parts, credit),
            ).fetchone()
            return row is not None

        return await self._write(reserve)

    def _record(
        self, db: sqlite3.Connection, results: Sequence[RecipientResult], now: float
    ) -> None:
        # Recipients with the same outcome (500 numbers accepted by CM in one call)
        # are updated by runs of idx: one statement instead of one per recipient.
        same: dict[tuple[Any, ...], list[int]] = {}
        for r in results:
            key = (
                r.code, r.provider, r.provider_message_id, r.detail, r.due_at,
                r.provider_index, r.attempts, r.request_id,
            )  # fmt: skip
            same.setdefault(key, []).append(r.idx)
        db.executemany(
            "UPDATE recipients SET code = ?, provider = coalesce(?, provider),"
            " provider_message_id = coalesce(?, provider_message_id), detail = ?, due_at = ?,"
            " provider_index = ?, attempts = ?, submitting = 0,"
            " in_doubt = CASE WHEN ? IS NULL THEN 1 ELSE in_doubt END,"
            " done_at = CASE WHEN ? IS NULL THEN NULL ELSE ? END"
            " WHERE request_id = ? AND idx BETWEEN ? AND ?",
            (
                (*key[:7], key[0], key[0], now, key[7], first, last)
                for key, idxs in same.items()
                for first, last in _runs(idxs)
            ),
        )
        counts: dict[tuple[str, tuple[str, ...]], float] = {}
        for r in results:
            if r.code is not None:
                metric = ("mailbridge_sms_total", (r.provider or "none", str(r.code)))
                counts[metric] = counts.get(metric, 0) + 1
        fb.bump(db, counts)
        # A delivery report that came before its message id was recorded is due now.
        fb.retry_waiting_events(db, (r.provider_message_id for r in results), now)
        refunds: dict[int, int] = {}
        for r in results:
            if r.refund_parts:
                refunds[r.request_id] = refunds.get(r.request_id, 0) + r.refund_parts
        db.executemany(
            "UPDATE credits SET used = max(0, used - ?)"
            " WHERE account = (SELECT account FROM requests WHERE id = ?)",
            ((parts, request_id) for request_id, parts in refunds.items()),
        )

    async def record_results(
        self,
        results: Sequence[RecipientResult],
        now: float,
        calls: Sequence[tuple[str, float]] = (),
    ) -> None:
        def record(db: sqlite3.Connection) -> None:
            self._record(db, results, now)
            if calls:
                fb.observe_calls(db, calls)

        await self._write(record)

    async def release_requests(
        self,
        request_ids: Sequence[int],
        due_at: float | None,
        error: str | None,
        count_attempt: bool,
    ) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE requests SET claimed_until = NULL,"
                " due_at = coalesce(?, (SELECT min(due_at) FROM recipients"
                "  WHERE request_id = requests.id AND code IS NULL), due_at),"
                " last_error = coalesce(?, last_error), attempts = attempts + ? WHERE id = ?",
                ((due_at, error, int(count_attempt), request_id) for request_id in request_ids),
            )

        await self._write(release)

    def _finish_if_done(self, db: sqlite3.Connection, request_id: int, now: float) -> bool:
        left = db.execute(
            "SELECT 1 FROM recipients WHERE request_id = ? AND code IS NULL LIMIT 1",
            (request_id,),
        ).fetchone()
        if left is not None:
            return False
        row = db.execute(
            "UPDATE requests SET state = 'done', done_at = ?, claimed_until = NULL"
            " WHERE id = ? AND state = 'queued' RETURNING not_to, plain_reports",
            (now, request_id),
        ).fetchone()
        if row is not None and row[0]:
            not_to, plain_reports = row
            if plain_reports is None:
                self._add_report(db, request_id, "not", not_to, now)
            elif (
                plain_reports == "all"
                or db.execute(
                    "SELECT 1 FROM recipients WHERE request_id = ? AND code != 0 LIMIT 1",
                    (request_id,),
                ).fetchone()
            ):
                # Plain mode's report (SPEC section 9): with "failures", only when
                # a number did not get code 0.
                self._add_report(db, request_id, "plain", not_to, now)
        if row is not None:
            fb.start_delivery_reports(db, request_id, now)
        return row is not None

    async def finish_if_done(self, request_ids: Sequence[int], now: float) -> list[int]:
        def finish(db: sqlite3.Connection) -> list[int]:
            return [i for i in request_ids if self._finish_if_done(db, i, now)]

        return await self._write(finish)

    async def quarantine(self, request_id: int, error: str) -> None:
        def q(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE requests SET state = 'quarantined', claimed_until = NULL, last_error = ?"
                " WHERE id = ?",
                (error, request_id),
            )

        await self._write(q)

    # -- reports ---------------------------------------------------------

    async def claim_reports(self, now: float, limit: int, lease_s: float) -> list[ReportJob]:
        def claim(db: sqlite3.Connection) -> list[ReportJob]:
            rows = db.execute(
                "UPDATE reports SET claimed_until = ? WHERE id IN ("
                " SELECT id FROM reports WHERE state = 'pending' AND due_at <= ?"
                " AND (claimed_until IS NULL OR claimed_until < ?) ORDER BY id LIMIT ?)"
                " RETURNING id, request_id, kind, to_addr, created_at, attempts",
                (now + lease_s, now, now, limit),
            ).fetchall()
            return sorted((ReportJob(*r) for r in rows), key=lambda j: j.id)

        return await self._write(claim)

    def _report_data(self, request_id: int) -> ReportData:
        row = self.db.execute(
            "SELECT email_id, ack_code, numbered, message_id, plain_reports FROM requests"
            " WHERE id = ?",
            (request_id,),
        ).fetchone()
        rows = self.db.execute(
            "SELECT tel, coalesce(code, 999) FROM recipients WHERE request_id = ? ORDER BY idx",
            (request_id,),
        ).fetchall()
        return ReportData(row[0], row[1], bool(row[2]), [(t, c) for t, c in rows], row[3], row[4])

    async def report_data(self, request_id: int) -> ReportData:
        return await self._read(lambda db: self._report_data(request_id))

    def _report_data_many(self, request_ids: Sequence[int]) -> dict[int, ReportData]:
        found: dict[int, ReportData] = {}
        for request_id in set(request_ids):
            try:
                found[request_id] = self._report_data(request_id)
            except (TypeError, ValueError):  # no such request: left out, not fatal to the rest
                log.error("reports: request %d has no readable data", request_id)
        return found

    async def report_data_many(self, request_ids: Sequence[int]) -> dict[int, ReportData]:
        return await self._read(lambda db: self._report_data_many(request_ids))

    async def report_sent(self, report_id: int, now: float) -> None:
        def sent(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE reports SET state = 'sent', sent_at = ?, claimed_until = NULL,"
                " attempts = attempts + 1 WHERE id = ?",
                (now, report_id),
            )

        await self._write(sent)

    async def report_failed(self, report_id: int, due_at: float, error: str) -> None:
        def failed(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE reports SET due_at = ?, last_error = ?, claimed_until = NULL,"
                " attempts = attempts + 1 WHERE id = ?",
                (due_at, error, report_id),
            )

        await self._write(failed)

    # -- after "sent": delivery reports, replies, STOP, metrics (SPEC 7) ------

    async def add_events(self, events: Sequence[InboundEvent], now: float) -> list[bool]:
        return await self._write(lambda db: fb.add_events(db, events, now))

    async def process_events(self, now: float, limit: int, rules: FeedbackRules) -> FeedbackPass:
        return await self._write(lambda db: fb.process_events(db, now, limit, rules))

    async def queue_delivery_reports(self, now: float, rules: FeedbackRules) -> int:
        return await self._write(lambda db: fb.queue_delivery_reports(db, now, rules))

    async def next_feedback_due(self, rules: FeedbackRules) -> float | None:
        return await self._read(lambda db: fb.next_feedback_due(db, rules))

    async def delivery_rows(self, report_id: int) -> list[tuple[int, str, str, str, float]]:
        return await self._read(lambda db: fb.delivery_rows(db, report_id))

    async def reply_data(self, report_id: int) -> tuple[str, str, str, bool] | None:
        return await self._read(lambda db: fb.reply_data(db, report_id))

    async def blacklisted(self, account: str, numbers: Sequence[str]) -> set[str]:
        return await self._read(lambda db: fb.blacklisted(db, account, numbers))

    async def heartbeat(self, process: str, now: float, pid: int) -> None:
        await self._write(lambda db: fb.beat(db, process, now, pid))

    async def heartbeats(self) -> dict[str, float]:
        return await self._read(fb.heartbeats)

    async def set_provider_state(
        self, name: str, up: bool, now: float, error: str | None = None
    ) -> None:
        await self._write(lambda db: fb.set_provider_state(db, name, up, now, error))

    async def metrics(self, now: float) -> StoreMetrics:
        def read(db: sqlite3.Connection) -> StoreMetrics:
            return StoreMetrics(fb.counters(db), fb.gauges(db, now))

        return await self._read(read)

    # -- status ----------------------------------------------------------

    def _status(self, now: float) -> dict[str, object]:
        db = self.db
        requests = {
            state: n
            for state, n in db.execute(
                "SELECT CASE WHEN state = 'queued' AND due_at > ? THEN 'waiting' ELSE state END,"
                " count(*) FROM requests GROUP BY 1",
                (now,),
            )
        }
        reports = dict(db.execute("SELECT state, count(*) FROM reports GROUP BY state").fetchall())
        pending = db.execute("SELECT count(*) FROM recipients WHERE code IS NULL").fetchone()[0]
        errors = [
            f"request {i}: {e}"
            for i, e in db.execute(
                "SELECT id, last_error FROM requests WHERE last_error IS NOT NULL"
                " AND state != 'done' ORDER BY id DESC LIMIT 5"
            )
        ] + [
            f"report {i} to {t}: {e}"
            for i, t, e in db.execute(
                "SELECT id, to_addr, last_error FROM reports WHERE last_error IS NOT NULL"
                " AND state = 'pending' ORDER BY id DESC LIMIT 5"
            )
        ]
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        cap = int(db.execute("PRAGMA max_page_count").fetchone()[0])
        return {
            "requests": requests,
            "recipients_pending": pending,
            "reports": reports,
            "last_errors": errors,
            # Watch this against store.max_size_mb and the free disk space.
            "database": {
                "bytes": pages * page_size,
                "max_bytes": cap * page_size if self.max_size_mb is not None else None,
            },
        }

    async def status(self, now: float) -> dict[str, object]:
        return await self._read(lambda db: self._status(now))
