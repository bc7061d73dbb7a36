"""The dispatcher (mailbridge/dispatch.py) over a real SQLite store.

`Dispatcher.run_once()` with recording providers that return scripted
outcomes or raise the typed errors, and a FakeClock: time moves only when a
test says so, so retry times, cool-downs and holds are asserted exactly
(jitter is ±20 %: a retry is not due at 0.8 x its delay, and is at 1.2 x).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailbridge.clock import FakeClock
from mailbridge.codes import Code
from mailbridge.config import (
    AccountConfig,
    DispatchConfig,
    OutboxProviderConfig,
    ProviderConfig,
    RouteConfig,
)
from mailbridge.dispatch import Dispatcher
from mailbridge.model import NewRequest, RecipientDraft
from mailbridge.providers import (
    Outcome,
    ProviderAuthError,
    SmsMessage,
    TemporaryProviderError,
)
from mailbridge.store.sqlite import SqliteStore

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
KEY = "dispatch-test-key"

# -- a recording provider --------------------------------------------------------

Reply = Callable[[Sequence[SmsMessage]], list[Outcome]] | Exception


def accept(batch: Sequence[SmsMessage]) -> list[Outcome]:
    return [Outcome(m.key, Code.SENT, f"id-{m.key}") for m in batch]


def reject(code: int) -> Reply:
    def reply(batch: Sequence[SmsMessage]) -> list[Outcome]:
        return [Outcome(m.key, code, detail=f"rejected {code}") for m in batch]

    return reply


def down() -> Exception:
    return TemporaryProviderError("HTTP 503")


def throttled() -> Exception:
    return TemporaryProviderError("HTTP 429", throttled=True)


@dataclass
class Recorder:
    """A provider of the Provider protocol: records each call, answers from a script
    (then with `default` once the script is spent)."""

    name: str
    max_batch: int = 100
    script: list[Reply] = field(default_factory=list)
    default: Reply = accept
    calls: list[list[SmsMessage]] = field(default_factory=list)

    async def send(self, batch: Sequence[SmsMessage]) -> list[Outcome]:
        self.calls.append(list(batch))
        reply = self.script.pop(0) if self.script else self.default
        if isinstance(reply, Exception):
            raise reply
        return reply(batch)

    async def check(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        pass

    def numbers(self) -> list[list[str]]:
        return [[m.to for m in call] for call in self.calls]


# -- the harness -------------------------------------------------------------------


@dataclass
class World:
    store: SqliteStore
    db: Path
    clock: FakeClock
    tmp: Path
    providers: dict[str, Recorder] = field(default_factory=dict)
    dispatcher: Dispatcher | None = None

    def build(
        self,
        providers: Sequence[Recorder],
        route: Sequence[str] | None = None,
        credit: int | None = None,
        provider_settings: dict[str, Any] | None = None,
        **dispatch: Any,
    ) -> Dispatcher:
        self.providers = {p.name: p for p in providers}
        settings: dict[str, Any] = {"retry_attempts": 3, "retry_backoff_s": 10.0}
        settings.update(provider_settings or {})
        configs: dict[str, ProviderConfig] = {
            p.name: OutboxProviderConfig(type="outbox", path=self.tmp / "unused", **settings)
            for p in providers
        }
        names = list(route or [p.name for p in providers])
        account = AccountConfig(
            keyid=KEY,
            sender_domains=["client.test"],
            commercial=False,
            routes=[RouteConfig(prefix="", providers=names)],
            credit=credit,
        )
        self.dispatcher = Dispatcher(
            self.store,
            self.providers,
            configs,
            {KEY: account},
            DispatchConfig(**dispatch),
            self.clock,
        )
        return self.dispatcher

    async def submit(
        self, *numbers: str, parts: int = 1, email_id: str = "e1", due_in: float = 0.0
    ) -> int:
        """A request received now, due now or `due_in` seconds from now (quiet hours)."""
        now = self.clock.time()
        request = NewRequest(
            account=KEY, email_id=email_id, ack_code=0, ack_to=None, not_to="n@client.test",
            numbered=True, sender="MaSociete", reference=None, received_at=now,
            due_at=now + due_in,
            mail_from="erp@client.test", client_ip="127.0.0.1", message_id=None,
            recipients=[
                RecipientDraft(tel=n, number=n, text="hello", encoding="gsm7", parts=parts,
                               max_parts=parts)
                for n in numbers
            ],
        )  # fmt: skip
        return (await self.store.add_request(request)).request_id

    async def run(self) -> int:
        assert self.dispatcher is not None
        return await self.dispatcher.run_once()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def recipients(self, request_id: int) -> list[dict[str, Any]]:
        """The store's rows, read with a connection of our own (as `status` would)."""
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT idx, code, provider, provider_index, attempts, due_at, detail"
                " FROM recipients WHERE request_id = ? ORDER BY idx",
                (request_id,),
            ).fetchall()
        return [dict(r) for r in rows]

    def one(self, request_id: int) -> dict[str, Any]:
        (row,) = self.recipients(request_id)
        return row

    def credit_used(self) -> int:
        with sqlite3.connect(self.db) as db:
            row = db.execute("SELECT used FROM credits WHERE account = ?", (KEY,)).fetchone()
        return 0 if row is None else int(row[0])

    def request_state(self, request_id: int) -> str:
        with sqlite3.connect(self.db) as db:
            (state,) = db.execute(
                "SELECT state FROM requests WHERE id = ?", (request_id,)
            ).fetchone()
        return str(state)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    db = tmp_path / "db.sqlite"
    store = SqliteStore(db)
    await store.open()
    yield World(store, db, FakeClock(START), tmp_path)
    await store.close()


N1, N2, N3 = "+33601020301", "+33601020302", "+33601020303"

# -- sending and retrying -------------------------------------------------------------


async def test_accepted_recipients_get_0_and_the_request_is_done(world: World) -> None:
    cm = Recorder("cm")
    world.build([cm])
    rid = await world.submit(N1, N2)
    assert await world.run() == 1
    assert cm.numbers() == [[N1, N2]]  # one call for the request
    assert [(r["code"], r["provider"], r["attempts"]) for r in world.recipients(rid)] == [
        (0, "cm", 1),
        (0, "cm", 1),
    ]
    assert world.request_state(rid) == "done"
    assert await world.run() == 0  # nothing left to claim


async def test_a_request_sent_in_one_call_is_finished_by_the_write_of_its_results(
    world: World,
) -> None:
    """A short page's results and the request's end (state done, its Not queued)
    share one commit: two in all after the claim (the mark and the results)."""
    cm = Recorder("cm")
    dispatcher = world.build([cm])
    rid = await world.submit(N1, N2)
    claims = await world.store.claim_requests(world.clock.time(), 60.0, 10)
    before = world.store.commits
    await dispatcher.process(claims)
    assert world.store.commits - before == 2
    assert world.request_state(rid) == "done"
    with sqlite3.connect(world.db) as db:
        kinds = db.execute("SELECT kind FROM reports WHERE request_id = ?", (rid,)).fetchall()
    assert kinds == [("not",)]


async def test_a_transient_failure_is_retried_with_doubling_backoff(world: World) -> None:
    cm = Recorder("cm", script=[down(), down()])
    world.build([cm], provider_settings={"retry_attempts": 3, "retry_backoff_s": 10.0})
    rid = await world.submit(N1)

    await world.run()
    first = world.one(rid)
    assert (first["code"], first["attempts"]) == (None, 1)
    assert 8.0 <= first["due_at"] - world.clock.time() <= 12.0  # 10 s ± 20 %
    world.advance(7.9)
    await world.run()
    assert len(cm.calls) == 1  # not due yet: the store holds the retry time

    world.advance(12.1 - 7.9)
    await world.run()
    second = world.one(rid)
    assert len(cm.calls) == 2 and (second["code"], second["attempts"]) == (None, 2)
    assert 16.0 <= second["due_at"] - world.clock.time() <= 24.0  # doubled: 20 s ± 20 %

    world.advance(24.1)
    await world.run()
    assert len(cm.calls) == 3
    assert (world.one(rid)["code"], world.one(rid)["attempts"]) == (0, 3)
    assert world.request_state(rid) == "done"


@pytest.mark.parametrize(("failure", "code"), [(down, Code.ERROR), (throttled, Code.OVERFLOW)])
async def test_after_the_last_attempt_on_the_last_provider_999_or_29(
    world: World, failure: Callable[[], Exception], code: int
) -> None:
    cm = Recorder("cm", default=failure())
    world.build([cm], provider_settings={"retry_attempts": 2, "retry_backoff_s": 1.0})
    rid = await world.submit(N1)
    await world.run()
    world.advance(1.3)
    await world.run()
    assert len(cm.calls) == 2
    row = world.one(rid)
    assert (row["code"], row["attempts"]) == (code, 2)
    assert world.request_state(rid) == "done"


async def test_a_per_message_retry_outcome_is_retried_like_a_failed_call(world: World) -> None:
    def one_throttled(batch: Sequence[SmsMessage]) -> list[Outcome]:
        first, *rest = batch
        return [Outcome(first.key, Code.OVERFLOW, retry=True), *accept(rest)]

    cm = Recorder("cm", script=[one_throttled])
    world.build([cm])
    rid = await world.submit(N1, N2)
    await world.run()
    assert [(r["code"], r["attempts"]) for r in world.recipients(rid)] == [(None, 1), (0, 1)]
    world.advance(12.1)
    await world.run()
    assert cm.numbers() == [[N1, N2], [N1]]  # only the one to retry goes again
    assert [r["code"] for r in world.recipients(rid)] == [0, 0]


async def test_a_final_rejection_is_not_retried(world: World) -> None:
    cm = Recorder("cm", default=reject(Code.MALFORMED_NUMBER))
    world.build([cm])
    rid = await world.submit(N1)
    await world.run()
    world.advance(3600)
    await world.run()
    assert len(cm.calls) == 1
    assert world.one(rid)["code"] == Code.MALFORMED_NUMBER


async def test_a_provider_that_raises_anything_else_is_a_retry(world: World) -> None:
    cm = Recorder("cm", script=[RuntimeError("bug in an adapter")])
    world.build([cm])
    rid = await world.submit(N1)
    await world.run()
    row = world.one(rid)
    assert (row["code"], row["attempts"]) == (None, 1) and "bug in an adapter" in row["detail"]
    world.advance(12.1)
    await world.run()
    assert world.one(rid)["code"] == 0


# -- failover ---------------------------------------------------------------------------


async def test_failover_to_the_next_provider_of_the_route_at_once(world: World) -> None:
    cm, smsmode = Recorder("cm", default=down()), Recorder("smsmode")
    world.build([cm, smsmode], provider_settings={"retry_attempts": 2, "retry_backoff_s": 1.0})
    rid = await world.submit(N1)
    await world.run()
    world.advance(1.3)
    await world.run()  # cm's 2nd and last attempt fails: smsmode is tried in the same run
    assert (len(cm.calls), len(smsmode.calls)) == (2, 1)
    row = world.one(rid)
    assert (row["code"], row["provider"], row["provider_index"], row["attempts"]) == (
        0, "smsmode", 1, 1,
    )  # fmt: skip


async def test_pages_read_on_and_failovers_of_earlier_pages_go_in_the_same_pass(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages continue from where the last ended; recipients of an earlier page due
    again at once (a failover) are still sent before the request is let go."""
    monkeypatch.setattr("mailbridge.dispatch.PAGE", 3)
    cm, smsmode = Recorder("cm", max_batch=2, script=[down()]), Recorder("smsmode")
    world.build([cm, smsmode], provider_settings={"retry_attempts": 1, "retry_backoff_s": 1.0})
    numbers = [f"+3361000000{i}" for i in range(7)]
    rid = await world.submit(*numbers)
    assert await world.run() == 1  # one claim: every recipient done in its pass
    assert [n for call in cm.numbers() for n in call] == numbers
    assert smsmode.numbers() == [numbers[:2]]  # the first call's two, failed over at once
    rows = world.recipients(rid)
    assert [r["code"] for r in rows] == [0] * 7
    assert [r["provider"] for r in rows] == ["smsmode"] * 2 + ["cm"] * 5
    assert world.request_state(rid) == "done"


async def test_failover_resets_the_attempt_count_and_ends_with_the_last_error(
    world: World,
) -> None:
    cm, smsmode = Recorder("cm", default=down()), Recorder("smsmode", default=throttled())
    world.build([cm, smsmode], provider_settings={"retry_attempts": 2, "retry_backoff_s": 1.0})
    rid = await world.submit(N1)
    await world.run()
    world.advance(1.3)
    await world.run()
    assert world.one(rid)["attempts"] == 1  # smsmode's first, not cm's third
    world.advance(1.3)
    await world.run()
    assert (len(cm.calls), len(smsmode.calls)) == (2, 2)
    assert world.one(rid)["code"] == Code.OVERFLOW  # the last provider's verdict


# -- the circuit breaker -------------------------------------------------------------


async def open_the_circuit(world: World, cm: Recorder, failures: int) -> None:
    """`failures` requests, each one failed call to cm."""
    for i in range(failures):
        await world.submit(f"+3360102040{i}", email_id=f"open{i}")
        await world.run()


async def test_the_circuit_opens_after_circuit_failures_calls_in_a_row(world: World) -> None:
    cm, outbox = Recorder("cm", default=down()), Recorder("outbox")
    world.build(
        [cm, outbox],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 60},
    )
    await open_the_circuit(world, cm, 2)
    assert len(cm.calls) == 2 and outbox.calls == []
    rid = await world.submit(N1, email_id="after")
    await world.run()
    # Skipped without an attempt on cm: straight to outbox.
    assert len(cm.calls) == 2 and outbox.numbers() == [[N1]]
    row = world.one(rid)
    assert (row["code"], row["provider"], row["provider_index"]) == (0, "outbox", 1)


async def test_a_success_in_between_resets_the_count(world: World) -> None:
    cm, outbox = Recorder("cm", script=[down(), accept, down()]), Recorder("outbox")
    world.build(
        [cm, outbox],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 60},
    )
    await open_the_circuit(world, cm, 3)  # fail, ok, fail: never two in a row
    await world.submit(N1, email_id="after")
    await world.run()
    assert len(cm.calls) == 4 and outbox.calls == []


async def test_a_last_provider_with_an_open_circuit_holds_until_the_cooldown_ends(
    world: World,
) -> None:
    cm = Recorder("cm", script=[down(), down()])
    world.build(
        [cm],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 60},
    )
    await open_the_circuit(world, cm, 2)
    opened_at = world.clock.time()
    rid = await world.submit(N1, email_id="after")
    await world.run()
    row = world.one(rid)
    assert len(cm.calls) == 2  # skipped, no attempt counted
    assert (row["code"], row["attempts"]) == (None, 0)
    assert row["due_at"] == pytest.approx(opened_at + 60)
    world.advance(59.9)
    await world.run()
    assert len(cm.calls) == 2  # still cooling down (the earlier requests' retries too)


async def test_half_open_a_successful_probe_closes_the_circuit(world: World) -> None:
    cm, outbox = Recorder("cm", script=[down(), down()]), Recorder("outbox")
    world.build(
        [cm, outbox],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 60},
    )
    await open_the_circuit(world, cm, 2)
    world.advance(60)
    await world.run()  # the two earlier requests are due again: cm answers this time
    assert len(cm.calls) == 3 and outbox.calls == []
    rid = await world.submit(N1, email_id="after")
    await world.run()
    assert len(cm.calls) == 4 and outbox.calls == []  # closed: cm is used again
    assert world.one(rid)["provider"] == "cm"


async def test_half_open_a_failed_probe_opens_the_circuit_again_at_once(world: World) -> None:
    cm, outbox = Recorder("cm", default=down()), Recorder("outbox")
    world.build(
        [cm, outbox],
        provider_settings={"retry_attempts": 5, "circuit_failures": 3, "circuit_cooldown_s": 60},
    )
    await open_the_circuit(world, cm, 3)
    world.advance(60)
    rid = await world.submit(N1, email_id="probe")
    await world.run()
    # The requests due after the cool-down share one call to cm; it fails.
    assert len(cm.calls) == 4 and len(cm.calls[-1]) == 4
    assert (world.one(rid)["code"], world.one(rid)["attempts"]) == (None, 1)
    rid2 = await world.submit(N2, email_id="after")
    await world.run()
    assert len(cm.calls) == 4  # open again after one failure, not circuit_failures
    assert world.one(rid2)["provider"] == "outbox"
    world.advance(12.1)  # the probe's recipients are due for their retry: cm is skipped
    await world.run()
    assert len(cm.calls) == 4
    assert (world.one(rid)["code"], world.one(rid)["provider"]) == (0, "outbox")


async def test_half_open_lets_one_call_through(world: World) -> None:
    """docs/reliability.md: after the cool-down "one call goes through"."""
    cm = Recorder("cm", max_batch=1, default=down())
    world.build(
        [cm],
        provider_settings={"retry_attempts": 5, "circuit_failures": 1, "circuit_cooldown_s": 60},
    )
    await world.submit(N1, email_id="opener")
    await world.run()  # one failed call: open
    waiting = await world.submit(N2, N3, "+33601020304", email_id="waiting")
    await world.run()
    assert len(cm.calls) == 1  # open: nothing sent
    world.advance(60)
    await world.run()
    # Four recipients are due at the end of the cool-down, one call each
    # (max_batch 1): only one may probe the provider.
    assert len(cm.calls) == 2
    # It failed: the others waited for it and now wait a cool-down, no attempt counted.
    rows = world.recipients(waiting)
    assert [(r["code"], r["attempts"]) for r in rows] == [(None, 0)] * 3
    assert all(r["due_at"] == pytest.approx(world.clock.time() + 60) for r in rows)


async def test_half_open_after_a_good_probe_the_others_go_in_the_same_run(world: World) -> None:
    cm = Recorder("cm", max_batch=1, script=[down()])
    world.build(
        [cm],
        provider_settings={"retry_attempts": 5, "circuit_failures": 1, "circuit_cooldown_s": 60},
    )
    await world.submit(N1, email_id="opener")
    await world.run()
    waiting = await world.submit(N2, N3, email_id="waiting")
    await world.run()
    world.advance(60)
    await world.run()
    assert cm.numbers() == [[N1], [N1], [N2], [N3]]  # the probe first, alone, then the rest
    assert [r["code"] for r in world.recipients(waiting)] == [0, 0]


# -- the outage hold ------------------------------------------------------------------


@pytest.mark.parametrize("hold", [0.0, 900.0])
async def test_outage_hold(world: World, hold: float) -> None:
    """Last provider down as a whole: held up to outage_hold_s after arrival; 0: no hold."""
    cm = Recorder("cm", default=down())
    world.build(
        [cm],
        provider_settings={
            "retry_attempts": 2, "retry_backoff_s": 1.0,
            "circuit_failures": 2, "circuit_cooldown_s": 60,
        },
        outage_hold_s=hold,
    )  # fmt: skip
    rid = await world.submit(N1)
    await world.run()
    world.advance(1.3)
    await world.run()  # the 2nd and last attempt; this call opens the circuit
    row = world.one(rid)
    if hold == 0:
        assert (row["code"], row["attempts"]) == (Code.ERROR, 2)  # straight after the retries
        return
    assert (row["code"], row["attempts"]) == (None, 2)
    assert "is down" in row["detail"]
    assert row["due_at"] == pytest.approx(world.clock.time() + 60)  # until the circuit's end
    # Probes every cool-down until the hold is over; then the next failed probe gives 999.
    while world.one(rid)["code"] is None:
        assert world.clock.time() - START.timestamp() < hold + 120
        world.advance(60)
        await world.run()
    assert world.one(rid)["code"] == Code.ERROR
    assert world.clock.time() - START.timestamp() >= hold


async def test_outage_hold_ends_with_29_when_throttled(world: World) -> None:
    cm = Recorder("cm", default=throttled())
    world.build(
        [cm],
        provider_settings={
            "retry_attempts": 1, "circuit_failures": 1, "circuit_cooldown_s": 600,
        },
        outage_hold_s=900.0,
    )  # fmt: skip
    rid = await world.submit(N1)
    await world.run()
    assert world.one(rid)["code"] is None  # held
    world.advance(600)
    await world.run()
    world.advance(600)
    await world.run()
    assert world.one(rid)["code"] == Code.OVERFLOW
    assert len(cm.calls) == 3


# -- credit -----------------------------------------------------------------------------


async def test_credit_is_reserved_and_the_rest_get_12(world: World) -> None:
    cm = Recorder("cm")
    world.build([cm], credit=5)
    rid = await world.submit(N1, N2, N3, parts=2)  # 6 parts for a credit of 5
    await world.run()
    assert cm.numbers() == [[N1, N2]]  # the third was not sent
    assert [r["code"] for r in world.recipients(rid)] == [0, 0, Code.NO_CREDIT]
    assert world.credit_used() == 4
    rid2 = await world.submit(N1, parts=2, email_id="e2")
    await world.run()
    assert world.one(rid2)["code"] == Code.NO_CREDIT  # 1 part left, 2 needed
    assert world.credit_used() == 4


async def test_unused_credit_is_refunded(world: World) -> None:
    def first_rejected(batch: Sequence[SmsMessage]) -> list[Outcome]:
        first, *rest = batch
        return [Outcome(first.key, Code.MALFORMED_NUMBER), *accept(rest)]

    cm = Recorder("cm", script=[first_rejected, down()])
    world.build([cm], credit=10)
    rid = await world.submit(N1, N2, parts=3)
    await world.run()
    assert world.credit_used() == 3  # the rejected one's 3 parts came back
    rid2 = await world.submit(N3, parts=3, email_id="e2")
    await world.run()  # a failed call: reserved for the attempt, refunded after it
    assert world.one(rid2)["code"] is None and world.credit_used() == 3
    world.advance(12.1)
    await world.run()
    assert world.one(rid2)["code"] == 0 and world.credit_used() == 6
    assert [r["code"] for r in world.recipients(rid)] == [Code.MALFORMED_NUMBER, 0]


async def test_a_retry_does_not_count_its_credit_twice(world: World) -> None:
    cm = Recorder("cm", script=[down()])
    world.build([cm], credit=2)
    rid = await world.submit(N1, parts=2)
    await world.run()
    world.advance(12.1)
    await world.run()  # had the first attempt kept its 2 parts, this one would get 12
    assert world.one(rid)["code"] == 0 and world.credit_used() == 2


# -- refused credentials ----------------------------------------------------------------


async def test_refused_credentials_hold_the_work_without_an_attempt(world: World) -> None:
    cm = Recorder("cm", script=[ProviderAuthError("token refused")] * 3)
    world.build(
        [cm],
        credit=1,
        provider_settings={"retry_attempts": 1, "circuit_failures": 1},
        provider_wait_s=120.0,
    )
    rid = await world.submit(N1)
    for _ in range(3):  # never failed, however often it is refused
        await world.run()
        row = world.one(rid)
        assert (row["code"], row["attempts"]) == (None, 0)
        assert "credentials refused" in row["detail"]
        assert row["due_at"] == pytest.approx(world.clock.time() + 120)
        assert world.credit_used() == 0  # refunded
        world.advance(119)
        await world.run()
        world.advance(1)
    assert len(cm.calls) == 3
    await world.run()  # the operator fixed the token
    assert world.one(rid)["code"] == 0 and len(cm.calls) == 4
    # Not a provider outage: the refusals did not open the circuit.
    assert world.dispatcher is not None and world.dispatcher.breakers["cm"].failures == 0


async def test_refused_credentials_hold_until_the_validity_then_999(world: World) -> None:
    """SPEC 8: held, loudly, while the credentials are refused; at validity_s 999."""
    cm = Recorder("cm", default=ProviderAuthError("token refused"))
    world.build([cm], provider_wait_s=120.0, validity_s=300.0)
    rid = await world.submit(N1)
    await world.run()
    assert world.one(rid)["due_at"] == pytest.approx(world.clock.time() + 120)
    world.advance(120)
    await world.run()
    assert world.one(rid)["due_at"] == pytest.approx(START.timestamp() + 240)
    world.advance(120)
    await world.run()  # the next hold is cut at the validity's end, not 120 s later
    assert world.one(rid)["due_at"] == pytest.approx(START.timestamp() + 300)
    world.advance(60)
    await world.run()
    row = world.one(rid)
    assert (row["code"], len(cm.calls)) == (999, 3)
    assert "validity" in row["detail"]
    assert world.request_state(rid) == "done"


async def test_validity_counts_from_the_end_of_the_quiet_hours(world: World) -> None:
    cm = Recorder("cm")
    world.build([cm], validity_s=600.0)
    rid = await world.submit(N1, due_in=3600)  # deferred to the end of the quiet hours
    world.advance(3600)
    await world.run()
    assert world.one(rid)["code"] == 0
    # The provider is told when the SMS stops being worth delivering.
    assert cm.calls[0][0].expires_at == pytest.approx(START.timestamp() + 3600 + 600)


async def test_an_open_circuit_without_outage_hold_fails_at_once(world: World) -> None:
    """SPEC 8: outage_hold_s 0 means 29/999 straight away, not a wait per attempt
    for the cool-down of a circuit that is already open."""
    cm = Recorder("cm", script=[down(), down()])
    world.build(
        [cm],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 600},
        outage_hold_s=0.0,
    )
    await open_the_circuit(world, cm, 2)
    rid = await world.submit(N1, email_id="after")
    await world.run()
    row = world.one(rid)
    assert (row["code"], len(cm.calls)) == (999, 2)  # no call, no waiting
    assert "circuit is open" in row["detail"]


async def test_an_open_circuit_holds_no_longer_than_the_outage_hold(world: World) -> None:
    cm = Recorder("cm", script=[down(), down()])
    world.build(
        [cm],
        provider_settings={"retry_attempts": 5, "circuit_failures": 2, "circuit_cooldown_s": 600},
        outage_hold_s=100.0,
    )
    await open_the_circuit(world, cm, 2)
    rid = await world.submit(N1, email_id="after")
    await world.run()
    assert world.one(rid)["due_at"] == pytest.approx(world.clock.time() + 100)  # not 600
    world.advance(100)
    await world.run()
    assert world.one(rid)["code"] == 999


async def test_no_route_or_unknown_account_gives_999(world: World) -> None:
    cm = Recorder("cm")
    dispatcher = world.build([cm])
    rid = await world.submit(N1)
    dispatcher.accounts = {}  # the account was removed from the configuration
    await world.run()
    assert world.one(rid)["code"] == Code.ERROR and cm.calls == []
