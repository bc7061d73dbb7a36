"""How big the store gets per million recipients, and what the purge gives back.

    .venv/bin/python bench/store_growth.py                 # 100 000 recipients per backend
    .venv/bin/python bench/store_growth.py --recipients 1000000
    .venv/bin/python bench/store_growth.py --quick         # a smoke run (seconds)

Each backend (SQLite, and PostgreSQL when Debian's package is installed: a
throwaway cluster, tests/pg.py) goes through the life of real requests with
the store's own operations, as the daemon does them: `add_request` (emails of
100 recipients, an Ack), claim, `mark_submitting`, `record_results` (a provider
message id and the provider's words per recipient), `finish_if_done` (the Not),
the reports claimed and sent, and one delivery report per recipient stored and
matched (`add_events` + `process_events`, so the etatDlr too). Then the size:
SQLite's pages in use (the file keeps its size and reuses its free pages) and
PostgreSQL's database size after VACUUM; then `purge` of everything (retention
0) and the sizes again. Prints one Markdown table, per million recipients.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mailbridge.feedback import FeedbackRules  # noqa: E402
from mailbridge.model import (  # noqa: E402
    DeliveryEvent,
    NewRequest,
    RecipientDraft,
    RecipientResult,
)
from mailbridge.store.sqlstore import SqlStore  # noqa: E402

ACCOUNT = "bench0000000000000001"
PER_EMAIL = 100
TEXT = "Votre commande 12345 est prête : retrait en magasin jusqu'au 12/12. STOP 36111"
RULES = FeedbackRules(
    providers_by_type={"cm": ("cm",)},
    reply_to={},
    delivery_report_delay_s=0.0,
    delivery_report_max_age_s=86400.0,
)


def new_request(n: int) -> NewRequest:
    now = time.time()
    return NewRequest(
        account=ACCOUNT, email_id=f"growth-{n}", ack_code=0, ack_to="ack@client.test",
        not_to="not@client.test", numbered=True, sender="MaSociete", reference=f"t{n}",
        received_at=now, due_at=now, mail_from="erp@client.test", client_ip="192.0.2.10",
        message_id=f"<{n}.growth@client.test>", dlr_to="dlr@client.test",
        recipients=[
            RecipientDraft(tel=f"06{n % 100:02d}{i:06d}", number=f"+336{n % 100:02d}{i:06d}",
                           text=TEXT, encoding="ucs2", parts=2, max_parts=5)
            for i in range(PER_EMAIL)
        ],
    )  # fmt: skip


async def one_email(store: SqlStore, n: int) -> None:
    await store.add_request(new_request(n))
    now = time.time()
    claims = await store.claim_requests(now, 60.0, 1)
    if not claims:
        raise RuntimeError("nothing to claim: is the store shared with a daemon?")
    rid = claims[0].id
    pending = await store.pending_recipients([rid], now, 1000)
    await store.mark_submitting([(p.request_id, p.idx) for p in pending], "cm", 60.0)
    results = [
        RecipientResult(
            request_id=rid,
            idx=p.idx,
            code=0,
            provider="cm",
            provider_message_id=f"cm-{rid}-{p.idx}",
            detail="Accepted",
            due_at=now,
        )  # fmt: skip
        for p in pending
    ]
    await store.record_results(results, now, [("cm", 0.02)])
    await store.finish_if_done([rid], now)
    events = [
        DeliveryEvent(
            provider_type="cm",
            message_id=f"cm-{rid}-{p.idx}",
            number=p.number,
            status="DELIVRE",
            text="Delivered",
            occurred_at=now,
            dedupe_key=f"cm-{rid}-{p.idx}-delivered",
            raw=f"STATUS=20&REFERENCE=cm-{rid}-{p.idx}&TO={p.number.lstrip('+')}",
        )  # fmt: skip
        for p in pending
    ]
    await store.add_events(events, now)
    while (await store.process_events(now, 1000, RULES)).matched:
        pass
    await store.queue_delivery_reports(now + 1, RULES)
    for job in await store.claim_reports(now + 1, 100, 60.0):
        await store.report_sent(job.id, now)


async def used_bytes(store: SqlStore) -> int:
    """Bytes the rows take: SQLite's pages in use; PostgreSQL's size after VACUUM."""
    backend = type(store).__name__
    if backend == "SqliteStore":

        def pages(tx: object) -> int:
            one = tx.one  # type: ignore[attr-defined]
            total = int(one("PRAGMA page_count")[0]) - int(one("PRAGMA freelist_count")[0])
            return total * int(one("PRAGMA page_size")[0])

        return await store._read(pages)
    await store._write(lambda tx: None)  # all writes committed
    dsn = store.backend.dsn  # type: ignore[attr-defined]
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM")
        (size,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()  # type: ignore[misc]
    return int(size)


async def measure(store: SqlStore, emails: int) -> dict[str, float]:
    await store.open()
    try:
        empty = await used_bytes(store)
        started = time.perf_counter()
        for n in range(emails):
            await one_email(store, n)
        elapsed = time.perf_counter() - started
        full = await used_bytes(store)
        purged = 0
        while n_purged := await store.purge(time.time() + 1):
            purged += n_purged
        after = await used_bytes(store)
        # The emailIds stay: a late duplicate is still Ack 1 (SPEC 11).
        again = await store.add_request(new_request(0))
        assert again.ack_code == 1, again
    finally:
        await store.close()
    per_million = 1_000_000 / (emails * PER_EMAIL)
    return {
        "emails": emails,
        "seconds": elapsed,
        "empty": empty,
        "full_per_m": (full - empty) * per_million,
        "after_per_m": (after - empty) * per_million,
        "purged": purged,
    }


def sqlite_store(directory: Path) -> SqlStore:
    from mailbridge.store.sqlite import SqliteStore

    return SqliteStore(directory / "growth.db", synchronous="normal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="2 000 recipients (smoke run)")
    args = parser.parse_args()
    recipients = 2_000 if args.quick else args.recipients
    emails = max(1, recipients // PER_EMAIL)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="mb-growth-") as tmp:
        rows.append(("SQLite", asyncio.run(measure(sqlite_store(Path(tmp)), emails))))
    try:
        from tests.pg import PgCluster, pg_bin
    except ImportError:
        pg_bin = None  # type: ignore[assignment]
    if pg_bin is not None and pg_bin() is not None:
        from mailbridge.config import StoreConfig
        from mailbridge.store.postgres import PostgresStore

        cluster = PgCluster().start()
        try:
            config = StoreConfig.model_validate({"postgresql": cluster.new_database()})
            rows.append(("PostgreSQL", asyncio.run(measure(PostgresStore(config), emails))))
        finally:
            cluster.destroy()
    mib = 2**20
    print(f"{emails * PER_EMAIL} recipients ({emails} emails of {PER_EMAIL}), each with its Ack,"
          " Not, provider id, delivery report and etatDlr")  # fmt: skip
    print()
    print("| store | per million recipients | after the purge | emails/s through the store |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['full_per_m'] / mib:,.0f} MiB | {r['after_per_m'] / mib:,.1f} MiB"
            f" | {r['emails'] / r['seconds']:,.0f} |"
        )


if __name__ == "__main__":
    main()
