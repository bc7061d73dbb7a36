"""The SQLite store: admission, emailId uniqueness, claims, results, reports."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from mailbridge.model import NewRequest, RecipientDraft, RecipientResult
from mailbridge.store import StoreUnavailable
from mailbridge.store import queue as store_queue
from mailbridge.store.queue import runs as _runs
from mailbridge.store.sqlite import SCHEMA, SCHEMA_VERSION, SqliteStore
from mailbridge.store.sqlstore import SqlStore

NOW = 1_800_000_000.0


def new_request(email_id: str | None = "1", ack: int = 0, **kw: Any) -> NewRequest:
    recipients = kw.pop(
        "recipients",
        [
            RecipientDraft(
                tel="0601020304",
                number="+33601020304",
                text="hello",
                encoding="gsm7",
                parts=1,
                max_parts=5,
            ),
            RecipientDraft(tel="bad", code=7),
        ],
    )
    fields: dict[str, Any] = dict(
        account="key", email_id=email_id, ack_code=ack, ack_to="ack@c.test", not_to="not@c.test",
        numbered=True, sender="MaSociete", reference=None, received_at=NOW, due_at=NOW,
        mail_from="erp@c.test", client_ip="127.0.0.1", message_id="<m@c.test>",
        recipients=recipients,
    )  # fmt: skip
    fields.update(kw)
    return NewRequest(**fields)


@pytest.fixture
def store(any_store: SqlStore) -> SqlStore:
    """The store of each backend (tests/conftest.py): the same contract on both."""
    return any_store


async def test_admission_and_duplicate_email_id(store: SqlStore) -> None:
    first = await store.add_request(new_request("42"))
    second = await store.add_request(new_request("42"))
    other_account = await store.add_request(new_request("42", account="other"))
    assert (first.ack_code, second.ack_code, other_account.ack_code) == (0, 1, 0)
    status = await store.status(NOW)
    assert status.requests == {"queued": 2, "done": 1}
    reports = await store.claim_reports(NOW, 10, 60)
    assert [(r.request_id, r.kind) for r in reports] == [
        (first.request_id, "ack"), (second.request_id, "ack"), (other_account.request_id, "ack"),
    ]  # fmt: skip
    data = await store.report_data(second.request_id)
    assert (data.ack_code, data.rows) == (1, [])


async def test_format_errors_do_not_consume_the_email_id(store: SqlStore) -> None:
    assert (await store.add_request(new_request("9", ack=3))).ack_code == 3
    assert (await store.add_request(new_request("9"))).ack_code == 0


async def test_concurrent_duplicates_admit_exactly_one(store: SqlStore) -> None:
    results = await asyncio.gather(*(store.add_request(new_request("same")) for _ in range(20)))
    assert sorted(r.ack_code for r in results) == [0] + [1] * 19


async def test_a_failing_call_keeps_nothing_alone_or_beside_others(store: SqlStore) -> None:
    """A store call that fails keeps none of its writes, whether it had its
    transaction alone (no savepoint) or shared it (its savepoint rolled back,
    the others committed)."""

    def put(key: str, fail: bool) -> Any:
        def write(tx: Any) -> None:
            tx.execute("INSERT INTO meta VALUES (?, 'x')", (key,))
            if fail:
                raise ValueError(key)

        return store._write(write)

    def keys(tx: Any) -> list[str]:
        return sorted(k for (k,) in tx.all("SELECT key FROM meta WHERE key LIKE ?", ("t-%",)))

    with pytest.raises(ValueError):
        await put("t-alone", True)
    # Hold the store thread on a read while two writes queue: one transaction.
    gate, holding = threading.Event(), threading.Event()

    def hold(tx: Any) -> None:
        holding.set()
        gate.wait(10)

    held = asyncio.ensure_future(store._read(hold))
    assert await asyncio.to_thread(holding.wait, 10)
    kept, failed = (
        asyncio.ensure_future(put("t-kept", False)),
        asyncio.ensure_future(put("t-failed", True)),
    )
    await asyncio.sleep(0)  # both queued
    commits = store.engine.commits
    gate.set()
    await held
    await kept
    with pytest.raises(ValueError):
        await failed
    assert store.engine.commits == commits + 1  # the two calls shared a transaction
    assert await store._read(keys) == ["t-kept"]
    assert await store.add_request(new_request("after"))  # the store goes on


async def test_claim_send_finish(store: SqlStore) -> None:
    admitted = await store.add_request(new_request())
    (claimed,) = await store.claim_requests(NOW, 60, 10)
    assert claimed.id == admitted.request_id
    assert await store.claim_requests(NOW, 60, 10) == []  # leased
    pending = await store.pending_recipients([claimed.id], NOW, 100)
    assert [(p.idx, p.number, p.in_doubt) for p in pending] == [(1, "+33601020304", False)]
    await store.mark_submitting([(claimed.id, 1)], "outbox", NOW + 60)
    assert await store.finish_if_done([claimed.id], NOW) == []
    await store.record_results(
        [
            RecipientResult(
                request_id=claimed.id,
                idx=1,
                code=0,
                provider="outbox",
                provider_message_id="id-1",
                detail="",
                due_at=NOW,
            )
        ],
        NOW,
    )
    assert await store.finish_if_done([claimed.id], NOW) == [claimed.id]
    data = await store.report_data(claimed.id)
    assert data.rows == [("0601020304", 0), ("bad", 7)]
    kinds = [r.kind for r in await store.claim_reports(NOW, 10, 60)]
    assert kinds == ["ack", "not"]


async def test_all_final_at_intake_queues_the_not_at_once(store: SqlStore) -> None:
    req = new_request(recipients=[RecipientDraft(tel="x", code=7)])
    admitted = await store.add_request(req)
    assert (await store.status(NOW)).requests == {"done": 1}
    assert [r.kind for r in await store.claim_reports(NOW, 10, 60)] == ["ack", "not"]
    assert admitted.ack_code == 0


async def test_crash_mid_submission_leaves_recipients_in_doubt(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.add_request(new_request())
    (claimed,) = await store.claim_requests(NOW, 600, 10)
    await store.mark_submitting([(claimed.id, 1)], "outbox", NOW + 600)
    await store.close()  # the process dies here
    again = SqliteStore(tmp_path / "db.sqlite")
    await again.open()
    assert await again.recover() == 1
    (reclaimed,) = await again.claim_requests(NOW, 60, 10)
    assert reclaimed.id == claimed.id
    pending = await again.pending_recipients([claimed.id], NOW, 10)
    assert [(p.idx, p.in_doubt) for p in pending] == [(1, True)]
    assert again.instance_id == store.instance_id
    await again.close()


async def test_retry_due_times_and_release(store: SqlStore) -> None:
    admitted = await store.add_request(new_request())
    (claimed,) = await store.claim_requests(NOW, 60, 10)
    retry = RecipientResult(
        request_id=claimed.id,
        idx=1,
        code=None,
        provider="outbox",
        provider_message_id=None,
        detail="503",
        due_at=NOW + 30,
        provider_index=0,
        attempts=1,
    )
    await store.record_results([retry], NOW)
    assert await store.pending_recipients([claimed.id], NOW, 10) == []
    await store.release_requests([claimed.id], None, None, count_attempt=False)
    assert await store.claim_requests(NOW + 29, 60, 10) == []
    assert await store.next_due() is not None
    (later,) = await store.claim_requests(NOW + 31, 60, 10)
    assert later.id == admitted.request_id
    (p,) = await store.pending_recipients([claimed.id], NOW + 31, 10)
    assert (p.attempts, p.in_doubt) == (1, True)


async def test_credit(store: SqlStore) -> None:
    assert await store.reserve_credit("key", 3, 5)
    assert not await store.reserve_credit("key", 3, 5)
    admitted = await store.add_request(new_request(account="key"))
    refund = RecipientResult(request_id=admitted.request_id, idx=1, code=999, refund_parts=3)
    await store.record_results([refund], NOW)
    assert await store.reserve_credit("key", 5, 5)


async def test_report_retry(store: SqlStore) -> None:
    await store.add_request(new_request(recipients=[RecipientDraft(tel="x", code=7)]))
    ack, not_ = await store.claim_reports(NOW, 10, 60)
    await store.report_failed(ack.id, NOW + 100, "relay down")
    await store.report_sent(not_.id, NOW)
    assert await store.claim_reports(NOW + 1, 10, 60) == []
    (retry,) = await store.claim_reports(NOW + 100, 10, 60)
    assert (retry.id, retry.attempts) == (ack.id, 1)
    status = await store.status(NOW)
    assert status.reports == {"pending": 1, "sent": 1}


async def test_unwritable_store_raises_store_unavailable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    await store.close()
    # Make the database read-only under the daemon's feet.
    again = SqliteStore(tmp_path / "db.sqlite")
    await again.open()
    assert again._db is not None
    again._db.execute("PRAGMA query_only = ON")
    with pytest.raises(StoreUnavailable):
        await again.add_request(new_request())
    await again.close()


def test_runs_of_consecutive_idx() -> None:
    assert _runs([]) == []
    assert _runs([7, 1, 3, 2, 9, 8, 3]) == [(1, 3), (7, 9)]
    assert _runs([5]) == [(5, 5)]


async def test_results_by_runs_touch_exactly_their_recipients(store: SqlStore) -> None:
    """Same outcomes share one UPDATE per run of idx: interleaved outcomes, gaps
    and a recipient left out must each end exactly as recorded."""
    drafts = [
        RecipientDraft(
            tel=f"06010203{i:02d}",
            number=f"+336010203{i:02d}",
            text="hi",
            encoding="gsm7",
            parts=1,
            max_parts=5,
        )
        for i in range(10)
    ]
    await store.add_request(new_request(recipients=drafts))
    (claimed,) = await store.claim_requests(NOW, 60, 10)
    sent = [1, 2, 3, 5, 6, 9]  # accepted, in two runs and a lone one
    await store.mark_submitting([(claimed.id, i) for i in [*sent, 4, 7, 10]], "cm", NOW + 60)
    results = [
        RecipientResult(
            request_id=claimed.id,
            idx=i,
            code=0,
            provider="cm",
            provider_message_id=None,
            detail="accepted",
            due_at=NOW,
        )
        for i in sent
    ]
    results += [
        RecipientResult(
            request_id=claimed.id,
            idx=i,
            code=7,
            provider="cm",
            provider_message_id=None,
            detail="invalid",
            due_at=NOW,
        )
        for i in (4, 7)
    ]
    results.append(
        RecipientResult(
            request_id=claimed.id,
            idx=10,
            code=None,
            provider="cm",
            provider_message_id=None,
            detail="503",
            due_at=NOW + 30,
            provider_index=0,
            attempts=1,
        )
    )
    await store.record_results(results, NOW)
    read = await store._read(
        lambda tx: tx.all(
            "SELECT idx, code, detail, submitting, attempts FROM recipients WHERE request_id = ?",
            (claimed.id,),
        )
    )
    rows = {
        idx: (code, detail, submitting, attempts)
        for idx, code, detail, submitting, attempts in read
    }
    assert rows == {
        **{i: (0, "accepted", 0, 0) for i in sent},
        4: (7, "invalid", 0, 0),
        7: (7, "invalid", 0, 0),
        8: (None, None, 0, 0),  # neither marked nor recorded: untouched
        10: (None, "503", 0, 1),
    }


async def test_report_data_many_reads_each_request_once_and_skips_unknown(
    store: SqlStore,
) -> None:
    first = await store.add_request(new_request("a"))
    second = await store.add_request(new_request("b", recipients=[RecipientDraft(tel="x", code=7)]))
    many = await store.report_data_many(
        [first.request_id, second.request_id, first.request_id, 999]
    )
    assert set(many) == {first.request_id, second.request_id}
    assert many[first.request_id] == await store.report_data(first.request_id)
    assert many[second.request_id].rows == [("x", 7)]


async def test_finish_a_batch_in_the_order_given(store: SqlStore) -> None:
    """finish_if_done over a batch: only requests whose every recipient has a
    code, held by this owner and still queued, finish; each gets its Not, in
    the order given; a request without emailNot finishes without one."""
    ok = [
        RecipientDraft(
            tel="0601020304", number="+33601020304", text="x", encoding="gsm7", parts=1, max_parts=5
        )
    ]
    two = ok + [
        RecipientDraft(
            tel="0601020305", number="+33601020305", text="x", encoding="gsm7", parts=1, max_parts=5
        )
    ]
    reqs = [
        new_request("b1", ack_to=None, recipients=ok),
        new_request("b2", ack_to=None, recipients=two),  # one recipient left pending
        new_request("b3", ack_to=None, not_to=None, recipients=ok),  # no emailNot
        new_request("b4", ack_to=None, recipients=ok),
    ]
    ids = [(await store.add_request(r)).request_id for r in reqs]
    claimed = await store.claim_requests(NOW, 60, 10)
    assert sorted(c.id for c in claimed) == sorted(ids)
    results = [RecipientResult(request_id=i, idx=1, code=0, provider="outbox") for i in ids]
    await store.record_results(results, NOW)
    given = [ids[3], ids[1], ids[2], ids[0], ids[3]]  # a repeated id finishes once
    assert await store.finish_if_done(given, NOW) == [ids[3], ids[2], ids[0]]
    reports = await store.claim_reports(NOW, 10, 60)
    assert [(r.request_id, r.kind) for r in reports] == [(ids[3], "not"), (ids[0], "not")]
    assert await store.finish_if_done(ids, NOW) == []  # done once; b2 still pending
    assert (await store.status(NOW)).requests == {"done": 3, "queued": 1}


async def test_a_busy_store_with_commit_wait_gathers_writes_into_one_commit(
    store: SqlStore,
) -> None:
    """The worker's engine (commit_wait_s): while busy, a write waits for company."""
    store.engine.commit_wait_s = 2.0  # far longer than the test needs: nothing racy
    await store.add_request(new_request("1"))  # a commit: the store is busy now
    before = store.commits
    first = asyncio.create_task(store.add_request(new_request("2")))
    await asyncio.sleep(0)  # the task runs up to its wait: its call is queued
    # Once the engine thread has taken the first call, a second one can only
    # share its transaction if the thread waits for it before beginning.
    await wait_until(store.engine._queue.empty)
    second = await store.add_request(new_request("3"))
    assert (await first).ack_code == second.ack_code == 0
    assert store.commits == before + 1


async def test_an_idle_store_does_not_wait_for_company(store: SqlStore) -> None:
    store.engine.commit_wait_s = 600.0  # if an idle write waited, the test would time out
    admitted = await asyncio.wait_for(store.add_request(new_request("1")), timeout=30)
    assert admitted.ack_code == 0 and store.commits == 1


async def wait_until(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.001)


async def test_a_poll_that_finds_nothing_takes_no_write_lock(tmp_path: Path) -> None:
    """Claims are read first (store/engine.py read_first): with nothing due they
    answer while another process holds SQLite's write lock, and commit nothing."""
    store = SqliteStore(tmp_path / "db.sqlite", busy_timeout_s=0.5)
    await store.open()
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the other process is writing
        try:
            assert await store.claim_reports(NOW, 10, 60) == []
            assert await store.claim_requests(NOW, 60, 10) == []
        finally:
            other.execute("ROLLBACK")
        assert store.commits == 0
        admitted = await store.add_request(new_request())
        (claimed,) = await store.claim_requests(NOW, 60, 10)  # work: claimed in a transaction
        assert claimed.id == admitted.request_id
        assert [r.kind for r in await store.claim_reports(NOW, 10, 60)] == ["ack"]
    finally:
        other.close()
        await store.close()


async def test_a_claim_and_the_read_of_what_it_claimed_in_one_call(store: SqlStore) -> None:
    """claim_*_with_*: the claim commits, then its data is read on the same trip,
    equal to what the separate reads give."""
    admitted = await store.add_request(new_request("1"))
    claims, page = await store.claim_requests_with_page(NOW, 60, 10, 100)
    assert [c.id for c in claims] == [admitted.request_id]
    assert page == await store.pending_recipients([admitted.request_id], NOW, 100)
    assert page is not None and len(page) == 1  # the number with code 7 is final
    jobs, data = await store.claim_reports_with_data(NOW, 10, 60)
    assert [j.kind for j in jobs] == ["ack"]
    assert data == await store.report_data_many([admitted.request_id], rows_of=())
    # Nothing due: answered without a transaction, and nothing to read.
    assert await store.claim_requests_with_page(NOW, 60, 10, 100) == ([], [])
    assert await store.claim_reports_with_data(NOW, 10, 60) == ([], {})


async def test_a_report_claim_reads_the_rows_only_of_the_reports_rendered_from_them(
    store: SqlStore,
) -> None:
    """An Ack is rendered without the request's recipient rows (a CSV's 100 000):
    the claim's read leaves them out; a Not claimed with it gets its own."""
    final = await store.add_request(new_request("f", recipients=[RecipientDraft(tel="x", code=7)]))
    queued = await store.add_request(new_request("q"))  # a pending number: its Ack only
    jobs, data = await store.claim_reports_with_data(NOW, 10, 60)
    assert sorted((j.request_id, j.kind) for j in jobs) == [
        (final.request_id, "ack"),
        (final.request_id, "not"),
        (queued.request_id, "ack"),
    ]
    assert data is not None
    assert data[final.request_id].rows == [("x", 7)]
    assert data[queued.request_id].rows == []
    assert data[queued.request_id].email_id == "q"
    assert (await store.report_data(queued.request_id)).rows != []  # there were rows to read
    many = await store.report_data_many(
        [final.request_id, queued.request_id], rows_of={queued.request_id}
    )
    assert many[final.request_id].rows == [] and len(many[queued.request_id].rows) == 2


async def test_a_read_after_a_write_that_fails_leaves_the_write_standing(
    store: SqlStore,
) -> None:
    def fails(tx: Any, claims: Any) -> None:
        tx.all("SELECT no_such_column FROM requests")

    admitted = await store.add_request(new_request("1"))
    claims, after = await store.engine.run_then(
        lambda tx: store_queue.claim_requests(tx, NOW, 60, 10, store.owner), fails
    )
    assert [c.id for c in claims] == [admitted.request_id] and after is None
    assert await store.claim_requests(NOW, 60, 10) == []  # the lease was committed
    assert (await store.add_request(new_request("2"))).ack_code == 0  # the store goes on


async def test_plain_report_only_when_a_number_failed(store: SqlStore) -> None:
    """SPEC 9, plain.reports: failures: the text report is queued only when a
    number did not get code 0; `all` always; the XML Not never for plain mode."""
    ok = [
        RecipientDraft(
            tel="0601020304", number="+33601020304", text="x", encoding="gsm7", parts=1, max_parts=5
        )
    ]
    failed = new_request("p1", ack_to=None, plain_reports="failures")
    quiet = new_request("p2", ack_to=None, plain_reports="failures", recipients=ok)
    everything = new_request("p3", ack_to=None, plain_reports="all", recipients=ok)
    ids = [(await store.add_request(r)).request_id for r in (failed, quiet, everything)]
    results = [RecipientResult(request_id=i, idx=1, code=0, provider="outbox") for i in ids]
    await store.record_results(results, NOW)
    assert sorted(await store.finish_if_done(ids, NOW)) == sorted(ids)
    reports = await store.claim_reports(NOW, 10, 60)
    assert [(r.request_id, r.kind) for r in reports] == [(ids[0], "plain"), (ids[2], "plain")]
    data = await store.report_data(ids[0])
    assert (data.plain_reports, data.rows) == ("failures", [("0601020304", 0), ("bad", 7)])


async def test_a_version_1_file_is_migrated(tmp_path: Path) -> None:
    """A file as the first release wrote it: its rows stay readable, and the new
    columns and tables work."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)  # version 1, frozen
    db.execute("INSERT INTO meta VALUES ('instance_id', 'abcd0123'), ('schema_version', '1')")
    db.execute(
        "INSERT INTO requests (account, email_id, ack_code, state, numbered, mail_from, client_ip,"
        " received_at, due_at, token) VALUES ('key', 'v1', 0, 'done', 0, 'a@c.test', '127.0.0.1',"
        " 1, 1, 'abc')"
    )
    db.execute(
        "INSERT INTO recipients (request_id, idx, tel, encoding, parts, max_parts, code)"
        " VALUES (1, 1, '0601020304', 'gsm7', 1, 1, 0)"
    )
    db.execute("INSERT INTO email_ids VALUES ('key', 'v1', 1)")
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        assert store.instance_id == "abcd0123"
        data = await store.report_data(1)
        assert (data.email_id, data.rows, data.plain_reports) == ("v1", [("0601020304", 0)], None)
        assert (await store.add_request(new_request("v2", plain_reports="all"))).ack_code == 0
        assert (await store.add_request(new_request("v1"))).ack_code == 1  # its emailIds kept
    finally:
        await store.close()
    db = sqlite3.connect(path)
    version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),)
    db.close()


async def test_a_file_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StoreUnavailable, match="schema version 99, newer than this mailbridge"):
        await SqliteStore(path).open()


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("DELETE FROM reports WHERE request_id IN (1, 2)", "reports_request"),
        ("DELETE FROM events WHERE request_id IN (1, 2)", "events_recipient"),
        (
            "SELECT id FROM requests WHERE state = 'done' AND done_at < 5 AND NOT EXISTS"
            " (SELECT 1 FROM reports p WHERE p.request_id = requests.id AND p.state = 'pending')"
            " ORDER BY id LIMIT 500",
            "requests_done",
        ),
        (
            "SELECT message_id FROM events WHERE request_id = 1 AND idx = 2 AND kind = 'dlr'"
            " AND state = 'matched' ORDER BY id",
            "events_recipient",
        ),
    ],
)
async def test_lookups_that_would_grow_with_the_store_use_an_index(
    tmp_path: Path, query: str, index: str
) -> None:
    """The purge's deletes and choice of requests, a recipient's events: an
    index search, never a scan of a table that grows (bench/soak.py)."""
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        plan = " | ".join(row[3] for row in store.db.execute("EXPLAIN QUERY PLAN " + query))
    finally:
        await store.close()
    assert f"INDEX {index}" in plan and "SCAN" not in plan, plan


async def test_postgresql_statistics_follow_a_young_store(pg_cluster: Any) -> None:
    """A new PostgreSQL store gets planner statistics as it grows, without
    waiting for autovacuum's first round (bench/soak.py: a third of the rate
    for the first minute without them); a store that did not change is left
    alone."""
    from mailbridge.store.postgres import PostgresStore, refresh_statistics
    from tests.conftest import postgres_config

    store = PostgresStore(postgres_config(pg_cluster))
    await store.open()
    try:
        drafts = [
            RecipientDraft(tel=f"06{i:08d}", number=f"+336{i:08d}", text="hi",
                           encoding="gsm7", parts=1, max_parts=5)
            for i in range(1500)
        ]  # fmt: skip
        await store.add_request(new_request("big", recipients=drafts))

        def recipients_estimate(tx: Any) -> float:
            return float(tx.one("SELECT reltuples FROM pg_class WHERE relname = 'recipients'")[0])

        # The server's activity counters reach pg_stat within about a second.
        deadline = asyncio.get_running_loop().time() + 30
        while await store._read(recipients_estimate) < 1500:
            assert asyncio.get_running_loop().time() < deadline, "never analysed"
            await store.heartbeat("test", NOW, 1)
            await asyncio.sleep(0.2)  # the counters' flush interval, polled
        assert await store._write(refresh_statistics) == []
    finally:
        await store.close()
