"""`mailbridge store-copy`: a SQLite store moved to PostgreSQL (issue 11).

A store with work of every kind (done and queued requests, an in-flight
attempt, reports, a delivery report, a STOP, credit) is copied by the real
command; the PostgreSQL store then holds the same, keeps the instance id
(the idempotency keys of queued requests stay the same) and its emailIds
(a late duplicate still gets Ack 1).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import yaml

from mailbridge.config import StoreConfig
from mailbridge.feedback import FeedbackRules
from mailbridge.model import DeliveryEvent, RecipientResult, ReplyEvent
from mailbridge.store.postgres import PostgresStore
from mailbridge.store.sqlite import SqliteStore
from tests.pg import PgCluster
from tests.support import config_dict
from tests.test_store import NOW, new_request

RULES = FeedbackRules({"outbox": ("outbox",)}, {}, 3600, 86400)


async def fill(path: Path) -> str:
    store = SqliteStore(path)
    await store.open()
    try:
        done = (await store.add_request(new_request("done-1"))).request_id
        await store.record_results(
            [
                RecipientResult(
                    request_id=done, idx=1, code=0, provider="outbox", provider_message_id="k1"
                )
            ],
            NOW,
        )
        await store.finish_if_done([done], NOW)
        await store.add_request(new_request("queued-2"))
        (claimed,) = await store.claim_requests(NOW, 600, 10)
        await store.mark_submitting([(claimed.id, 1)], "outbox", 600)  # then the daemon stops
        await store.add_events(
            [DeliveryEvent(provider_type="outbox", message_id="k1", number=None, status="DELIVRE",
                           text="", occurred_at=NOW, dedupe_key="d1", raw="{}"),
             ReplyEvent(provider_type="outbox", message_id=None, number="+33601020304", to=None,
                        text="STOP", occurred_at=NOW, dedupe_key="r1", raw="{}")], NOW,
        )  # fmt: skip
        await store.process_events(NOW, 100, RULES)
        await store.reserve_credit("key", 3, 10)
        return store.instance_id
    finally:
        await store.close()


def test_store_copy_moves_everything(tmp_path: Path, pg_cluster: PgCluster) -> None:
    instance = asyncio.run(fill(tmp_path / "mailbridge.db"))
    dsn = pg_cluster.new_database()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(tmp_path)))
    out = subprocess.run(
        [sys.executable, "-m", "mailbridge", "store-copy", "-c", str(config), "--to", dsn],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "requests: 2 row(s)" in out.stdout and "events: 2 row(s)" in out.stdout

    async def check() -> None:
        sqlite = SqliteStore(tmp_path / "mailbridge.db")
        pg = PostgresStore(StoreConfig.model_validate({"postgresql": dsn}))
        await sqlite.open()
        await pg.open()
        try:
            assert pg.instance_id == instance
            before, after = await sqlite.status(NOW), await pg.status(NOW)
            assert (after.requests, after.reports, after.recipients_pending) == (
                before.requests, before.reports, before.recipients_pending,
            )  # fmt: skip
            assert await pg.report_data(1) == await sqlite.report_data(1)
            assert await pg.blacklisted("key", ["+33601020304"]) == {"+33601020304"}
            assert (await pg.add_request(new_request("done-1"))).ack_code == 1
            # The stopped daemon's attempt is in doubt; its request can be claimed.
            (claimed,) = await pg.claim_requests(NOW, 60, 10)
            (pending,) = await pg.pending_recipients([claimed.id], NOW, 10)
            assert pending.in_doubt
            # New ids continue after the copied ones.
            assert (await pg.add_request(new_request("new-3"))).request_id > claimed.id
            assert not await pg.reserve_credit("key", 8, 10)  # 3 of 10 already used
        finally:
            await sqlite.close()
            await pg.close()

    asyncio.run(check())
    # A second copy into the same database is refused: it holds requests now.
    again = subprocess.run(
        [sys.executable, "-m", "mailbridge", "store-copy", "-c", str(config), "--to", dsn],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 1 and "already holds requests" in again.stderr
