"""Delivery reports, replies and STOP in the store (SPEC section 7), on a real
SQLite file: stored once, matched even when early, final statuses kept, the
etatDlr mails grouped per request, reply mails, the STOP blacklist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailbridge.feedback import EVENT_MAX_AGE_S, FeedbackRules, event_retry_delay, is_stop
from mailbridge.model import DeliveryEvent, RecipientDraft, RecipientResult, ReplyEvent
from mailbridge.store.sqlstore import SqlStore
from tests.test_store import NOW, new_request

RULES = FeedbackRules(
    providers_by_type={"cm": ("cm1",), "kcell": ("kz",)},
    reply_to={"key": None, "other": "replies@c.test"},
    delivery_report_delay_s=3600,
    delivery_report_max_age_s=86400,
)


def dlr(message_id: str | None, status: str, number: str | None = None, key: str = "",
        provider: str = "kcell", text: str = "") -> DeliveryEvent:  # fmt: skip
    return DeliveryEvent(
        provider_type=provider,
        message_id=message_id,
        number=number,
        status=status,
        text=text,
        occurred_at=None,
        dedupe_key=key or f"{provider}:{message_id}:{number}:{status}",
        raw="{}",
    )


def mo(number: str, text: str, message_id: str | None = None, key: str = "") -> ReplyEvent:
    return ReplyEvent(
        provider_type="kcell",
        message_id=message_id,
        number=number,
        to="9090",
        text=text,
        occurred_at=None,
        dedupe_key=key or f"mo:{text}",
        raw="{}",
    )


@pytest.fixture
def store(any_store: SqlStore) -> SqlStore:
    """The store of each backend (tests/conftest.py): the same contract on both."""
    return any_store


def two_numbers() -> list[RecipientDraft]:
    return [
        RecipientDraft(
            tel="0601020304",
            number="+33601020304",
            text="hello",
            encoding="gsm7",
            parts=1,
            max_parts=5,
        ),
        RecipientDraft(
            tel="06 01 02 03 05",
            number="+33601020305",
            text="hello",
            encoding="gsm7",
            parts=1,
            max_parts=5,
        ),
    ]


async def sent(store: SqlStore, email_id: str, ids: list[str], **kw: Any) -> int:
    """A request of two numbers, both accepted by provider kz with these message ids."""
    kw.setdefault("dlr_to", "dlr@c.test")
    rid = (
        await store.add_request(new_request(email_id, recipients=two_numbers(), **kw))
    ).request_id
    await store.record_results(
        [
            RecipientResult(request_id=rid, idx=i, code=0, provider="kz", provider_message_id=mid)
            for i, mid in enumerate(ids, start=1)
        ],
        NOW,
    )
    assert await store.finish_if_done([rid], NOW) == [rid]
    return rid


async def kinds(store: SqlStore, now: float = NOW + 10**7) -> list[tuple[int, str, str]]:
    return [(j.request_id, j.kind, j.to_addr) for j in await store.claim_reports(now, 100, 60)]


async def test_same_callback_twice_is_stored_once(store: SqlStore) -> None:
    event = dlr("m1", "DELIVRE")
    assert await store.add_events([event, event], NOW) == [True, False]
    assert await store.add_events([event], NOW) == [False]
    metrics = await store.metrics(NOW)
    assert ("mailbridge_delivery_reports_total", ("kcell", "DELIVRE"), 1.0) in metrics.counters


async def test_all_final_gives_one_etatdlr_mail_at_once(store: SqlStore) -> None:
    rid = await sent(store, "e1", ["m1", "m2"])
    await store.add_events([dlr("m1", "DELIVRE"), dlr("m2", "EN_COURS")], NOW + 1)
    done = await store.process_events(NOW + 1, 100, RULES)
    assert (done.matched, done.waiting) == (2, 0)
    assert await store.queue_delivery_reports(NOW + 1, RULES) == 0  # m2 not final yet
    await store.add_events([dlr("m2", "NON_DELIVRE", text="Absent subscriber")], NOW + 2)
    await store.process_events(NOW + 2, 100, RULES)
    assert await store.queue_delivery_reports(NOW + 2, RULES) == 1
    assert await store.queue_delivery_reports(NOW + 3, RULES) == 0  # never twice
    jobs = [j for j in await store.claim_reports(NOW + 3, 100, 60) if j.kind == "dlr"]
    assert [(j.request_id, j.to_addr) for j in jobs] == [(rid, "dlr@c.test")]
    rows = await store.delivery_rows(jobs[0].id)
    assert [(i, tel, status, text) for i, tel, status, text, _ in rows] == [
        (1, "0601020304", "DELIVRE", ""),
        (2, "06 01 02 03 05", "NON_DELIVRE", "Absent subscriber"),
    ]


async def test_a_final_status_is_never_replaced(store: SqlStore) -> None:
    await sent(store, "e2", ["m3", "m4"])
    await store.add_events([dlr("m3", "DELIVRE")], NOW)
    await store.process_events(NOW, 100, RULES)
    # Out of order: the intermediate status arrives after the final one.
    await store.add_events([dlr("m3", "EN_COURS"), dlr("m3", "REJETE")], NOW + 1)
    await store.process_events(NOW + 1, 100, RULES)
    await store.add_events([dlr("m4", "EXPIRE")], NOW + 2)
    await store.process_events(NOW + 2, 100, RULES)
    await store.queue_delivery_reports(NOW + 2, RULES)
    (job,) = [j for j in await store.claim_reports(NOW + 2, 100, 60) if j.kind == "dlr"]
    assert [r[2] for r in await store.delivery_rows(job.id)] == ["DELIVRE", "EXPIRE"]


async def test_a_report_before_its_message_id_is_kept_and_matched(store: SqlStore) -> None:
    await store.add_events([dlr("early", "DELIVRE")], NOW)
    assert (await store.process_events(NOW, 100, RULES)).waiting == 1
    assert (await store.metrics(NOW)).gauges["events_waiting"] == 1
    # The provider's answer is recorded: the waiting event is due at once.
    rid = await sent(store, "e3", ["early", "m5"])
    done = await store.process_events(NOW, 100, RULES)
    assert done.matched == 1
    await store.add_events([dlr("m5", "DELIVRE")], NOW)
    await store.process_events(NOW, 100, RULES)
    assert await store.queue_delivery_reports(NOW, RULES) == 1
    assert (rid, "dlr", "dlr@c.test") in await kinds(store)


async def test_unmatched_event_backs_off_then_becomes_an_orphan(store: SqlStore) -> None:
    await store.add_events([dlr("nobody", "DELIVRE")], NOW)
    assert (await store.process_events(NOW, 100, RULES)).waiting == 1
    assert (await store.process_events(NOW + 1, 100, RULES)).waiting == 0  # not due yet
    later = NOW + event_retry_delay(0)
    assert (await store.process_events(later, 100, RULES)).waiting == 1
    assert await store.next_feedback_due(RULES) == later + event_retry_delay(1)
    done = await store.process_events(NOW + EVENT_MAX_AGE_S + 1, 100, RULES)
    assert len(done.orphans) == 1 and "nobody" in done.orphans[0]


async def test_after_the_delay_those_final_by_then_then_the_rest(store: SqlStore) -> None:
    rid = await sent(store, "e4", ["m6", "m7"])
    await store.add_events([dlr("m6", "DELIVRE")], NOW)
    await store.process_events(NOW, 100, RULES)
    assert await store.queue_delivery_reports(NOW + 3599, RULES) == 0
    assert await store.next_feedback_due(RULES) == NOW + 3600
    assert await store.queue_delivery_reports(NOW + 3600, RULES) == 1  # m6 alone
    await store.add_events([dlr("m7", "DELIVRE")], NOW + 4000)
    await store.process_events(NOW + 4000, 100, RULES)
    assert await store.queue_delivery_reports(NOW + 4000, RULES) == 1  # the rest, at once
    jobs = [j for j in await store.claim_reports(NOW + 4000, 100, 60) if j.kind == "dlr"]
    assert [[r[0] for r in await store.delivery_rows(j.id)] for j in jobs] == [[1], [2]]
    assert all(j.request_id == rid for j in jobs)


async def test_no_etatdlr_without_an_address(store: SqlStore) -> None:
    await sent(store, "e5", ["m8", "m9"], dlr_to=None)
    await store.add_events([dlr("m8", "DELIVRE"), dlr("m9", "DELIVRE")], NOW)
    assert (await store.process_events(NOW, 100, RULES)).matched == 2
    assert await store.queue_delivery_reports(NOW + 10**6, RULES) == 0


async def test_batch_ids_match_with_the_number(store: SqlStore) -> None:
    """sMsmode and CM name a message by an id its whole batch shares, plus the number."""
    rid = await sent(store, "e6", ["batch1", "batch1"])
    await store.add_events([dlr("batch1", "DELIVRE", number="+33601020305")], NOW)
    await store.process_events(NOW, 100, RULES)
    await store.add_events([dlr("batch1", "REJETE", number="+33601020304")], NOW)
    await store.process_events(NOW, 100, RULES)
    await store.queue_delivery_reports(NOW, RULES)
    (job,) = [j for j in await store.claim_reports(NOW, 100, 60) if j.kind == "dlr"]
    assert job.request_id == rid
    assert [(r[0], r[2]) for r in await store.delivery_rows(job.id)] == [
        (1, "REJETE"), (2, "DELIVRE")
    ]  # fmt: skip


async def test_reply_mail_and_stop(store: SqlStore) -> None:
    older = await sent(store, "e7", ["m10", "m11"])
    newer = await sent(store, "e8", ["m12", "m13"], account="other")
    await store.add_events([mo("+33601020304", "Merci, bien reçu")], NOW)
    await store.add_events([mo("+33601020305", "Stop 36111")], NOW)
    done = await store.process_events(NOW, 100, RULES)
    assert (done.matched, done.reply_reports, len(done.stops)) == (2, 2, 1)
    replies = [(j.request_id, j.to_addr, j.id) for j in await store.claim_reports(NOW, 100, 60)
               if j.kind == "reply"]  # fmt: skip
    # The most recent request to that number; the account's reply_to.
    assert [(r, to) for r, to, _ in replies] == [(newer, "replies@c.test")] * 2
    assert await store.reply_data(replies[1][2]) == (
        "06 01 02 03 05", "+33601020305", "Stop 36111", True
    )  # fmt: skip
    assert await store.blacklisted("other", ["+33601020305", "+33601020304"]) == {"+33601020305"}
    assert await store.blacklisted("key", ["+33601020305"]) == set()
    assert older < newer


@pytest.mark.parametrize(
    "text, stop",
    [("STOP", True), ("stop", True), ("Stop", True), ("  STOP 36111", True), ("stop.", True),
     ("STOPPER", False), ("arrêtez stop", False), ("", False)],
)  # fmt: skip
def test_stop_words(text: str, stop: bool) -> None:
    assert is_stop(text) is stop


async def test_heartbeat_and_provider_state_in_the_gauges(store: SqlStore) -> None:
    await store.heartbeat("worker", NOW, 42)
    await store.set_provider_state("cm1", False, NOW, "401 Unauthorized")
    await store.set_provider_state("kz", True, NOW)
    gauges = (await store.metrics(NOW)).gauges
    assert gauges["heartbeats"] == {"worker": NOW}
    assert gauges["providers"] == {"cm1": False, "kz": True}


async def test_a_report_with_an_old_provider_time_is_mailed_now(store: SqlStore) -> None:
    """The etatDlr date is the provider's; when the mail is due is ours."""
    rid = await sent(store, "e9", ["m20", "m21"])
    old = NOW - 86400
    events = [
        DeliveryEvent(
            provider_type="kcell",
            message_id=m,
            number=None,
            status="DELIVRE",
            text="",
            occurred_at=old,
            dedupe_key=f"k{m}",
            raw="{}",
        )
        for m in ("m20", "m21")
    ]
    await store.add_events(events, NOW + 5)
    await store.process_events(NOW + 5, 100, RULES)
    assert await store.next_feedback_due(RULES) == NOW + 5
    assert await store.queue_delivery_reports(NOW + 5, RULES) == 1
    (job,) = [j for j in await store.claim_reports(NOW + 5, 100, 60) if j.kind == "dlr"]
    assert job.request_id == rid
    assert [r[4] for r in await store.delivery_rows(job.id)] == [old, old]


# -- SMPP: one receipt per part (SPEC section 10) --------------------------------------

SMPP_RULES = FeedbackRules(
    providers_by_type={"smpp": ("smsc",), "smpp:smsc": ("smsc",), "smpp:other": ("other",)},
    reply_to={"key": None},
    delivery_report_delay_s=3600,
    delivery_report_max_age_s=86400,
)


def part_dlr(message_id: str, status: str, provider: str = "smpp:smsc") -> DeliveryEvent:
    return dlr(message_id, status, provider=provider, key=f"{provider}:{message_id}:{status}")


async def smpp_sent(store: SqlStore, email_id: str, ids: list[str]) -> int:
    rid = (
        await store.add_request(
            new_request(email_id, recipients=two_numbers(), dlr_to="dlr@c.test")
        )
    ).request_id
    await store.record_results(
        [
            RecipientResult(request_id=rid, idx=i, code=0, provider="smsc", provider_message_id=mid)
            for i, mid in enumerate(ids, start=1)
        ],
        NOW,
    )
    assert await store.finish_if_done([rid], NOW) == [rid]
    return rid


async def statuses(store: SqlStore, now: float) -> list[str]:
    await store.queue_delivery_reports(now, SMPP_RULES)
    (job,) = [j for j in await store.claim_reports(now, 100, 60) if j.kind == "dlr"]
    return [r[2] for r in await store.delivery_rows(job.id)]


async def test_multipart_is_delivered_when_every_part_is(store: SqlStore) -> None:
    await smpp_sent(store, "p1", ["a1 a2 a3", "b1 b2"])
    await store.add_events([part_dlr("a1", "DELIVRE"), part_dlr("a3", "DELIVRE")], NOW)
    await store.add_events([part_dlr("b2", "DELIVRE")], NOW)
    assert (await store.process_events(NOW, 100, SMPP_RULES)).matched == 3
    assert await store.queue_delivery_reports(NOW, SMPP_RULES) == 0  # a2 and b1 missing
    # The first final failure of a part decides, whatever comes after it.
    await store.add_events([part_dlr("b1", "NON_DELIVRE"), part_dlr("a2", "DELIVRE")], NOW + 1)
    await store.process_events(NOW + 1, 100, SMPP_RULES)
    assert await statuses(store, NOW + 1) == ["DELIVRE", "NON_DELIVRE"]


async def test_part_receipt_before_its_ids_are_recorded(store: SqlStore) -> None:
    await store.add_events([part_dlr("c2", "DELIVRE"), part_dlr("c1", "DELIVRE")], NOW)
    assert (await store.process_events(NOW, 100, SMPP_RULES)).waiting == 2
    await smpp_sent(store, "p2", ["c1 c2", "d1"])
    assert (await store.process_events(NOW, 100, SMPP_RULES)).matched == 2
    await store.add_events([part_dlr("d1", "EXPIRE")], NOW)
    await store.process_events(NOW, 100, SMPP_RULES)
    assert await statuses(store, NOW) == ["DELIVRE", "EXPIRE"]


async def test_smpp_ids_match_within_their_provider_only(store: SqlStore) -> None:
    await smpp_sent(store, "p3", ["e1 e2", "f1"])
    await store.add_events([part_dlr("e1", "DELIVRE", provider="smpp:other")], NOW)
    done = await store.process_events(NOW, 100, SMPP_RULES)
    assert (done.matched, done.waiting) == (0, 1)


# -- a batch of events is matched as one event at a time would be -------------------


def _batch_events() -> list[DeliveryEvent | ReplyEvent]:
    """Many cases in one batch: contradictory reports of one recipient, an id
    two requests share (the newer wins), a batch id with numbers, an unknown id."""
    return [
        dlr("a1", "EN_COURS", key="1"),
        dlr("a1", "NON_DELIVRE", text="Absent", key="2"),
        dlr("a1", "DELIVRE", key="3"),  # after a final: ignored
        dlr("a2", "EN_COURS", key="4"),
        dlr("shared", "DELIVRE", number="+33601020304", key="5"),
        dlr("shared", "REJETE", number="+33601020305", key="6"),
        dlr("unknown", "DELIVRE", key="7"),
        dlr("b2", "EXPIRE", key="8"),
        dlr("b2", "DELIVRE", key="9"),
        mo("+33601020305", "STOP", key="10"),
    ]


async def _batch_outcome(store: SqlStore, limit: int) -> tuple[list[Any], list[Any]]:
    """Process the batch `limit` events per pass; every recipient's status and
    every event's state after it."""
    await sent(store, "x1", ["a1", "a2"])
    await sent(store, "x2", ["shared", "shared"])
    await sent(store, "x3", ["b1", "b2"])
    await sent(store, "x4", ["shared", "shared"])  # the newer request with that id
    await store.add_events(_batch_events(), NOW)
    passes = 0
    while (done := await store.process_events(NOW, limit, RULES)).matched or done.waiting:
        passes += 1
    assert passes == (1 if limit >= 10 else 10)  # 9 matched, 1 waiting; `limit` per pass

    def read(tx: Any) -> tuple[list[Any], list[Any]]:
        recipients = tx.all(
            "SELECT request_id, idx, dlr_status, dlr_text FROM recipients ORDER BY 1, 2"
        )
        events = tx.all("SELECT dedupe_key, state, request_id, idx FROM events ORDER BY id")
        return [tuple(r) for r in recipients], [tuple(e) for e in events]

    return await store._read(read)


async def test_a_batch_is_applied_as_one_event_at_a_time(
    any_store: SqlStore, tmp_path: Path
) -> None:
    from mailbridge.store.sqlite import SqliteStore

    one_by_one = SqliteStore(tmp_path / "one.sqlite")
    await one_by_one.open()
    try:
        expected = await _batch_outcome(one_by_one, 1)
    finally:
        await one_by_one.close()
    recipients, events = await _batch_outcome(any_store, 500)
    assert (recipients, events) == expected
    by_key = {e[0]: e for e in events}
    assert by_key["7"][1] == "waiting"
    rid1, rid2, rid4 = by_key["1"][2], by_key["5"][2], by_key["6"][2]
    assert rid2 == rid4 and rid2 > rid1 + 2  # the newer request that shares "shared"
    statuses = {(r[0], r[1]): r[2] for r in recipients}
    assert statuses[(rid1, 1)] == "NON_DELIVRE"  # the first final wins
    assert statuses[(rid1, 2)] == "EN_COURS"
    assert (statuses[(rid2, 1)], statuses[(rid2, 2)]) == ("DELIVRE", "REJETE")
    assert statuses[(rid1 + 2, 2)] == "EXPIRE"


async def test_matching_a_batch_takes_statements_per_batch_not_per_event(
    tmp_path: Path,
) -> None:
    """300 reports of 300 recipients: a handful of statements, not one or more per event."""
    from mailbridge.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        drafts = [
            RecipientDraft(tel=f"06{i:08d}", number=f"+336{i:08d}", text="hi", encoding="gsm7",
                           parts=1, max_parts=5)
            for i in range(300)
        ]  # fmt: skip
        rid = (
            await store.add_request(new_request("many", recipients=drafts, dlr_to="d@c.test"))
        ).request_id
        await store.record_results(
            [RecipientResult(request_id=rid, idx=i, code=0, provider="kz",
                             provider_message_id=f"m{i}") for i in range(1, 301)],
            NOW,
        )  # fmt: skip
        await store.finish_if_done([rid], NOW)
        await store.add_events([dlr(f"m{i}", "DELIVRE") for i in range(1, 301)], NOW)
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        try:
            done = await store.process_events(NOW, 500, RULES)
        finally:
            store.db.set_trace_callback(None)
        assert done.matched == 300
        # The reads (one per event before): the updates are one executemany each.
        reads = [s for s in statements if s.startswith("SELECT")]
        assert len(reads) <= 3, reads[:10]
        assert await store.queue_delivery_reports(NOW, RULES) == 1
    finally:
        await store.close()
