"""Move a SQLite store to PostgreSQL: `mailbridge store-copy --to postgresql://…`.

Input: the SQLite file of `store.sqlite` (the daemon stopped: its lock file is
taken for the copy) and an empty PostgreSQL database. Output: every row of
every table copied (requests, recipients, reports, emailIds, delivery
reports, replies, STOP list, credit, counters), the store's instance id kept
(so the idempotency keys of requests still queued do not change), the
identity sequences moved past the copied ids, and the leases of the stopped
daemon released with their in-flight recipients in doubt, exactly as its own
next start would have done. One transaction on the destination: a failure
leaves it empty.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from mailbridge.config import StoreConfig
from mailbridge.store import StoreUnavailable

# In dependency order; heartbeats are not copied (they describe live processes).
TABLES = (
    "requests", "email_ids", "recipients", "reports", "credits", "events", "blacklist",
    "counters", "provider_state", "message_parts",
)  # fmt: skip
IDENTITIES = (("requests", "id"), ("reports", "id"), ("events", "id"))


async def copy_store(source: Path, dest: str) -> dict[str, int]:
    """Copy the SQLite store at `source` into the empty database `dest`;
    rows copied per table."""
    from mailbridge.store.postgres import PostgresStore
    from mailbridge.store.sqlite import SqliteStore, acquire_lock

    if not source.exists():
        raise StoreUnavailable(f"{source}: no such store")
    lock = await acquire_lock(source)  # no daemon may write while we read
    try:
        # Opening brings the file to the current schema; a destination opened
        # once gets the schema and an instance id of its own (replaced below).
        target = StoreConfig.model_validate({"postgresql": dest})
        for store in (SqliteStore(source), PostgresStore(target)):
            await store.open()
            await store.close()
        return _copy(source, dest)
    finally:
        os.close(lock)


def _copy(source: Path, dest: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        with psycopg.connect(dest) as pg, pg.transaction():
            (queued,) = pg.execute("SELECT count(*) FROM requests").fetchone() or (0,)
            if queued:
                raise StoreUnavailable(f"{dest}: the destination already holds requests")
            for table in TABLES:
                columns = _common_columns(src, pg, table)
                names = ", ".join(columns)
                rows = src.execute(f"SELECT {names} FROM {table}")
                with pg.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    n = 0
                    for row in rows:
                        copy.write_row(row)
                        n += 1
                counts[table] = n
            (instance,) = src.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            pg.execute("UPDATE meta SET value = %s WHERE key = 'instance_id'", (instance,))
            for table, column in IDENTITIES:
                pg.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                    f" greatest((SELECT max({column}) FROM {table}), 1))"
                )
            # The stopped daemon's leases: released, its attempts in doubt.
            pg.execute("UPDATE recipients SET in_doubt = 1, submitting = 0 WHERE submitting = 1")
            pg.execute("UPDATE requests SET claimed_until = NULL, claimed_by = NULL")
            pg.execute("UPDATE reports SET claimed_until = NULL, claimed_by = NULL")
    finally:
        src.close()
    return counts


def _common_columns(src: sqlite3.Connection, pg: psycopg.Connection[Any], table: str) -> list[str]:
    mine = [str(r[1]) for r in src.execute(f"PRAGMA table_info({table})")]
    theirs = {
        str(r[0])
        for r in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,)
        )
    }
    missing = [c for c in mine if c not in theirs]
    if missing:
        raise StoreUnavailable(f"{table}: columns {missing} have no place in the destination")
    return mine
