"""SQLite backend of the store (the default): one file, WAL, one connection.

The queue's rules are in store/queue.py and store/events.py, the engine
(one thread, group commit) in store/engine.py; this module holds what is
SQLite's own:
- the connection: WAL, `synchronous` FULL by default (a 250 survives power
  loss), a busy wait that follows the other process's writer closely;
- the schema: version 1 below, frozen, and the migrations after it, applied
  in order at open to every file (a new one too), in one transaction;
- `max_size_mb` caps the file (`PRAGMA max_page_count`): past it SQLite
  raises its real SQLITE_FULL, exactly as on a full disk;
- errors that mean "cannot write now" (disk full, I/O error, locked past the
  busy timeout) become `StoreUnavailable`, which intake answers with 451;
- the lock file `<store>.lock`: one daemon (and its worker) per file, so a
  start may take back every lease of the previous run at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailbridge.store import StoreUnavailable
from mailbridge.store.engine import Tx
from mailbridge.store.sqlstore import SqlStore

log = logging.getLogger(__name__)
LOCK_WAIT_S = 30.0  # how long a starting daemon waits for a previous one's worker to die

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


_VERSION_3 = [
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                  -- dlr | mo
        provider_type TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,     -- the same callback twice is one row
        message_id TEXT,
        number TEXT,
        to_addr TEXT,                        -- mo: our number or short code
        status TEXT,                         -- dlr: DELIVRE ... or EN_COURS
        text TEXT NOT NULL,
        occurred_at REAL,
        received_at REAL NOT NULL,
        raw TEXT NOT NULL,
        state TEXT NOT NULL,                 -- new | matched | waiting | orphan
        request_id INTEGER,
        idx INTEGER,
        next_try_at REAL NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX events_due ON events (state, next_try_at) WHERE state IN ('new', 'waiting')",
    "CREATE INDEX events_waiting_id ON events (message_id) WHERE state = 'waiting'",
    "ALTER TABLE recipients ADD COLUMN dlr_status TEXT",
    "ALTER TABLE recipients ADD COLUMN dlr_text TEXT",
    "ALTER TABLE recipients ADD COLUMN dlr_at REAL",
    "ALTER TABLE recipients ADD COLUMN dlr_report INTEGER",  # the etatDlr report that told it
    "CREATE INDEX recipients_pmid ON recipients (provider_message_id)"
    " WHERE provider_message_id IS NOT NULL",
    "CREATE INDEX recipients_number ON recipients (number, request_id) WHERE code = 0",
    # The queue gauge counts pending recipients without reading the finished ones.
    "CREATE INDEX recipients_pending ON recipients (due_at) WHERE code IS NULL",
    "ALTER TABLE requests ADD COLUMN dlr_to TEXT",  # where etatDlr mails go
    "ALTER TABLE requests ADD COLUMN dlr_state TEXT",  # waiting | complete
    "ALTER TABLE requests ADD COLUMN dlr_due_at REAL",
    "CREATE INDEX requests_dlr ON requests (dlr_due_at) WHERE dlr_state = 'waiting'",
    "ALTER TABLE reports ADD COLUMN event_id INTEGER",  # kind 'reply': the reply
    # Leases name their holder (several processes, later several instances).
    "ALTER TABLE requests ADD COLUMN claimed_by TEXT",
    "ALTER TABLE reports ADD COLUMN claimed_by TEXT",
    """CREATE TABLE blacklist (
        account TEXT NOT NULL,
        number TEXT NOT NULL,                -- E.164
        added_at REAL NOT NULL,
        source TEXT NOT NULL,                -- e.g. "STOP reply 12"
        PRIMARY KEY (account, number)
    ) WITHOUT ROWID""",
    """CREATE TABLE counters (
        name TEXT NOT NULL,
        labels TEXT NOT NULL,                -- label values joined by U+001F
        shard TEXT NOT NULL,                 -- the process that counted (summed on read)
        value REAL NOT NULL,
        PRIMARY KEY (name, labels, shard)
    ) WITHOUT ROWID""",
    """CREATE TABLE heartbeats (
        process TEXT PRIMARY KEY,            -- "worker:<host>:<daemon pid>"
        at REAL NOT NULL,
        pid INTEGER NOT NULL
    )""",
    """CREATE TABLE provider_state (
        name TEXT PRIMARY KEY,
        up INTEGER NOT NULL,
        since REAL NOT NULL,
        last_error TEXT
    )""",
]

# Lookups that otherwise read a whole table, so grow with the store (bench/soak.py):
# the purge's deletes by request (a full scan of reports and events per 500
# requests, holding the write lock), its choice of finished requests by age, and
# the events of one recipient (a multipart SMS's receipts, SPEC 10). The same
# statements in PostgreSQL's version 4.
GROWTH_INDEXES = [
    "CREATE INDEX IF NOT EXISTS reports_request ON reports (request_id)",
    "CREATE INDEX IF NOT EXISTS events_recipient ON events (request_id, idx)"
    " WHERE request_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS requests_done ON requests (state, done_at)",
]

# Version 1 is SCHEMA above, frozen; every later change is a migration, applied
# in order at open, to new files too (so the schema is written in one place).
MIGRATIONS: dict[int, list[str]] = {
    2: ["ALTER TABLE requests ADD COLUMN plain_reports TEXT"],  # plain mode (SPEC 9)
    3: _VERSION_3,  # delivery reports, replies, STOP, metrics (SPEC 7); lease holders
    4: [  # when a request first became due (validity, outage hold: SPEC 8)
        "ALTER TABLE requests ADD COLUMN first_due_at REAL",
        "UPDATE requests SET first_due_at = due_at",
    ],
    # The ids of a multipart SMS's parts (SMPP: one message_id per submit_sm), so
    # that a receipt naming one part finds its recipient (SPEC 10).
    5: [
        """CREATE TABLE message_parts (
        message_id TEXT NOT NULL,            -- one part's id (SMPP submit_sm_resp)
        request_id INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        part INTEGER NOT NULL,               -- 1..n, in the order sent
        PRIMARY KEY (request_id, idx, part)
    )""",
        "CREATE INDEX message_parts_id ON message_parts (message_id)",
    ],
    6: GROWTH_INDEXES,
}
SCHEMA_VERSION = max(MIGRATIONS)


class SqliteDialect:
    paramstyle = "qmark"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    skip_locked = ""  # one writer at a time: nothing to skip
    notify = ""


class SqliteBackend:
    """The connection, schema and errors of a SQLite file (see the module docstring)."""

    dialect = SqliteDialect()
    exclusive = True

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

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.busy_timeout_s
        )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        # Statement and savepoint journals in memory, not in a temporary file
        # created, written page by page and deleted in each transaction.
        db.execute("PRAGMA temp_store = MEMORY")
        return db

    def prepare(self, db: sqlite3.Connection) -> str:
        try:
            return self._prepare(db)
        except sqlite3.OperationalError as err:
            if "locked" not in str(err):
                raise
            raise StoreUnavailable(
                f"{self.path}: {err}: another process kept the write lock longer than"
                f" store.busy_timeout_s ({self.busy_timeout_s:g}s)"
            ) from None

    def _current(self, db: sqlite3.Connection) -> str | None:
        """The instance id when the file is already at SCHEMA_VERSION (a read:
        the operator's commands open a busy store without waiting for its writer)."""
        try:
            rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return None
            raise
        if rows.get("schema_version") != str(SCHEMA_VERSION) or "instance_id" not in rows:
            return None
        return str(rows["instance_id"])

    def _prepare(self, db: sqlite3.Connection) -> str:
        instance = self._current(db)
        if instance is None:
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
        if instance is not None:
            return instance
        self.begin(db)
        row = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
        if row is None:
            instance = secrets.token_hex(4)
            db.execute("INSERT INTO meta VALUES ('instance_id', ?)", (instance,))
        else:
            instance = str(row[0])
        db.execute("COMMIT")
        return instance

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION (a new one from 1); refuse a newer one.

        One transaction (a crash leaves the old version whole) that holds the
        write lock from the first read, so two processes opening at once do not
        both migrate."""
        self.begin(db)
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

    def begin(self, db: sqlite3.Connection) -> None:
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

    def commit(self, db: sqlite3.Connection) -> None:
        db.execute("COMMIT")

    def rollback(self, db: sqlite3.Connection) -> None:
        db.execute("ROLLBACK")

    def in_transaction(self, db: sqlite3.Connection) -> bool:
        return db.in_transaction

    def unavailable(self, err: BaseException) -> str | None:
        if isinstance(err, sqlite3.DatabaseError):  # locked, full, I/O error, corrupt file
            return f"sqlite: {err}"
        return None

    def lost(self, db: sqlite3.Connection, err: BaseException) -> sqlite3.Connection:
        return db  # a file does not go away; the next transaction tries again

    def close(self, db: sqlite3.Connection) -> None:
        db.close()

    def size(self, tx: Tx) -> tuple[int, int | None]:
        page_size = int(tx.one("PRAGMA page_size")[0])
        pages = int(tx.one("PRAGMA page_count")[0])
        cap = int(tx.one("PRAGMA max_page_count")[0])
        return pages * page_size, cap * page_size if self.max_size_mb is not None else None

    async def watch(self, on_wake: Callable[[], None]) -> None:
        return None  # the intake wakes the worker through its pipe

    async def unwatch(self) -> None:
        return None


class SqliteStore(SqlStore):
    """The default store: a SQLite file. Construct, then `await open()`."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "full",
        busy_timeout_s: float = 5.0,
        max_size_mb: float | None = None,
    ) -> None:
        self.path = path
        super().__init__(
            SqliteBackend(
                path,
                synchronous=synchronous,
                busy_timeout_s=busy_timeout_s,
                max_size_mb=max_size_mb,
            )
        )

    @property
    def db(self) -> Any:
        """The engine's connection (tests read through it)."""
        conn = self.engine._conn
        if conn is None:
            raise StoreUnavailable("store is not open")
        return conn

    _db = db


# -- the lock file -------------------------------------------------------------


def lock_path(path: Path) -> Path:
    """The file whose lock says "a mailbridge works on this store"."""
    return path.with_name(path.name + ".lock")


def lock_holder(path: Path) -> int | None:
    """The pid of the daemon that holds this store's lock, or None when no
    daemon does (0: held, by a daemon too old to write its pid)."""
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)


async def acquire_lock(path: Path) -> int:
    """Lock the store for this daemon; wait while a previous run's worker dies.

    Returns the locked file descriptor (closing it releases the lock; the
    worker process inherits it, so the lock is free only once both are gone).
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Our pid, for the operator's commands to wake us (SIGUSR1) after
                # they change the queue; it means nothing once the lock is free.
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"{lock} is locked: another mailbridge (or its worker) uses this store"
                        " (one daemon per SQLite file; several instances need store.postgresql)"
                    ) from None
                await asyncio.sleep(0.05)
    except BaseException:  # timed out, or cancelled (a stop while the daemon starts)
        os.close(fd)
        raise
