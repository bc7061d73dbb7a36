"""Crash safety, measured: a stream of emails while the daemon is SIGKILLed at
random moments and restarted, then a reconciliation of everything.

The real daemon (`DaemonProcess`) sends through the Kcell fake (which keeps
every `client_message_id` and answers a repeated one with "duplicate", so what
it accepted per number is the ground truth for "submitted exactly once") and
mails its reports through a real SMTP relay (`ReportSink`). Client threads
submit `FAULT_EMAILS` emails of 1-50 recipients each; every attempt carries its
own Message-ID, so each stored request, and each report (In-Reply-To), tells
which attempt it came from. A client retries an email until it gets its 250,
as an MTA would. `random.Random(FAULT_SEED)` decides the emails and when to
kill: after a drawn number of 250 replies plus a drawn delay, and a few times
after the stream while dispatch and reports drain.

Checked: every attempt answered 250 is stored once and got one Ack; an
attempt answered with an error reply was not stored; an attempt cut by a kill
was stored at most once (committed before the 250 could leave); every email
is processed exactly once (one Ack 0, one Not with every code 0) and every
recipient was accepted exactly once by the provider; a report can reach the
relay twice only when a kill falls between the relay's 250 and the store's
commit, so at most once per kill (counted and printed).

Run `pytest tests/test_faults.py -s` to see the figures; FAULT_SEED,
FAULT_EMAILS and FAULT_SYNCHRONOUS (full, normal) in the environment change
the run. The file also holds the full-store cases: `store.max_size_mb` makes
SQLite raise its real SQLITE_FULL; the intake answers 451 and goes on.
"""

from __future__ import annotations

import json
import os
import random
import smtplib
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mailbridge.mailer import MAX_UNMARKED
from tests.fake_kcell import FakeKcell
from tests.httpfake import ProviderServer
from tests.report_sink import ReportSink
from tests.support import (
    DaemonProcess,
    ack_code,
    config_dict,
    not_codes,
    outbox_lines,
    reports_for,
    request_mail,
    send_on,
    wait_for,
    wire_bytes,
)

SEED = int(os.environ.get("FAULT_SEED", "20261124"))
EMAILS = int(os.environ.get("FAULT_EMAILS", "300"))
SYNCHRONOUS = os.environ.get("FAULT_SYNCHRONOUS", "full")  # store.synchronous
CLIENTS = 4
KILLS_IN_STREAM = 12
KILLS_AFTER_STREAM = 3
MAX_ATTEMPTS = 40  # per email; a client that needs more has found a bug
RELAY_CONNECTIONS = 4  # reports.smtp.connections: reports in flight at once


@dataclass
class Attempt:
    email: int
    n: int
    message_id: str
    # "250"; "reply" (an SMTP error reply: must not be stored); "dropped" (the
    # connection died: stored or not); "unreached" (died before DATA: not stored)
    outcome: str = ""
    reply: str = ""


@dataclass
class Email:
    n: int
    email_id: str
    numbers: list[str]
    attempts: list[Attempt] = field(default_factory=list)


class Bridge:
    """The daemon under fault injection: the current port, and whether it is up."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.tmp = tmp
        self.config = config
        self.up = threading.Event()
        self.accepted = 0  # 250 replies so far
        self.kills = 0
        self.restart_s: list[float] = []
        self._lock = threading.Lock()
        self.proc = DaemonProcess(tmp, config).start()
        self.port = self.proc.port
        self.up.set()

    def note_250(self) -> None:
        with self._lock:
            self.accepted += 1

    def kill_and_restart(self) -> None:
        self.up.clear()
        self.proc.kill()
        self.kills += 1
        started = time.monotonic()
        self.proc = DaemonProcess(self.tmp, self.config).start()
        self.restart_s.append(time.monotonic() - started)
        self.port = self.proc.port
        self.up.set()


class Client(threading.Thread):
    """Submits its emails one after another on one connection, reconnecting and
    retrying (new attempt, new Message-ID) until each gets its 250."""

    def __init__(self, bridge: Bridge, emails: list[Email]) -> None:
        super().__init__(daemon=True)
        self.bridge = bridge
        self.emails = emails
        self.smtp: smtplib.SMTP | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            for email in self.emails:
                self._deliver(email)
        except Exception as err:  # reported by the test, not lost in a thread
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self._close()

    def _deliver(self, email: Email) -> None:
        for n in range(1, MAX_ATTEMPTS + 1):
            if not self.bridge.up.wait(120):
                raise AssertionError("the daemon did not come back")
            attempt = Attempt(email.n, n, f"<{email.email_id}.a{n}@client.test>")
            email.attempts.append(attempt)
            self._submit(email, attempt)
            if attempt.outcome == "250":
                self.bridge.note_250()
                return
        last = email.attempts[-1]
        raise AssertionError(
            f"{email.email_id}: no 250 after {MAX_ATTEMPTS} attempts; last: {last.outcome}"
            f" {last.reply}"
        )

    def _submit(self, email: Email, attempt: Attempt) -> None:
        fields = {f"num{i}": num for i, num in enumerate(email.numbers, start=1)}
        msg = request_mail(sms=f"fault {email.email_id}", emailId=email.email_id, **fields)
        msg["Message-ID"] = attempt.message_id
        attempt.outcome = "unreached"
        try:
            if self.smtp is None:
                self.smtp = smtplib.SMTP("127.0.0.1", self.bridge.port, timeout=60)
            smtp = self.smtp
            smtp.ehlo_or_helo_if_needed()
            code, text = smtp.mail(str(msg["From"]))
            if code == 250:
                code, text = smtp.rcpt(str(msg["To"]))
            if code in (250, 251):
                attempt.outcome = "dropped"  # from here on the daemon may store it
                code, text = smtp.data(wire_bytes(msg))
        except (smtplib.SMTPException, OSError) as err:
            attempt.reply = f"{type(err).__name__}: {err}"
            self._close()
            return
        attempt.reply = f"{code} {text.decode(errors='replace')}"
        attempt.outcome = "250" if code == 250 else "reply"
        if code != 250:
            self._close()

    def _close(self) -> None:
        if self.smtp is not None:
            try:
                self.smtp.close()
            except OSError:
                pass
            self.smtp = None


@pytest.fixture
def kcell() -> Iterator[tuple[FakeKcell, ProviderServer]]:
    fake = FakeKcell()
    fake.delay_s = 0.03  # a provider's latency: kills also land between accept and answer
    with ProviderServer(fake) as server:
        yield fake, server
    fake.release()


def make_emails(rng: random.Random) -> list[Email]:
    emails = []
    for n in range(EMAILS):
        count = rng.randint(1, 50)
        numbers = [f"+7701{n:03d}{i:04d}" for i in range(1, count + 1)]
        emails.append(Email(n, f"f{n:03d}", numbers))
    return emails


def submissions(server: ProviderServer) -> Counter[str]:
    """client_message_id -> how many times the daemon submitted it."""
    keys: Counter[str] = Counter()
    for req in server.requests:
        if req.method != "POST":
            continue
        try:
            body = json.loads(req.body)
        except ValueError:
            continue  # cut short by a kill: the fake refused it, nothing stored
        for item in body.get("messages", [body]):
            keys[item["client_message_id"]] += 1
    return keys


def db_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_sigkill_storm(tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]) -> None:
    started = time.monotonic()
    fake, server = kcell
    rng = random.Random(SEED)
    emails = make_emails(rng)
    with ReportSink() as sink:
        config = config_dict(tmp_path, provider="kcell", default_sender="INFO")
        config["providers"]["kcell"] = {
            "type": "kcell", "url": server.url + FakeKcell.BASE, "username": "mailbridge",
            "password": "secret", "retry_backoff_s": 0.05, "timeout_s": 10,
        }  # fmt: skip
        config["reports"] = {
            "from": "mailbridge@bridge.test",
            "smtp": {**sink.relay_config(), "connections": RELAY_CONNECTIONS},
            "retry_backoff_s": 0.2,
            "retry_max_backoff_s": 1,
        }
        config["dispatch"] = {"workers": 4}
        config["store"]["synchronous"] = SYNCHRONOUS
        bridge = Bridge(tmp_path, config)
        try:
            clients = [Client(bridge, emails[i::CLIENTS]) for i in range(CLIENTS)]
            for client in clients:
                client.start()
            # Kill after a drawn number of 250s, plus a drawn delay (mid-DATA,
            # mid-dispatch, mid-report: wherever the moment falls).
            marks = sorted(rng.sample(range(5, EMAILS - 5), KILLS_IN_STREAM))
            for mark in marks:

                def reached(mark: int = mark) -> bool:
                    return bridge.accepted >= mark or not any(c.is_alive() for c in clients)

                wait_for(reached, timeout=120, what=f"{mark} emails accepted")
                time.sleep(rng.uniform(0.0, 0.3))
                bridge.kill_and_restart()
            for client in clients:
                client.join(timeout=180)
                assert not client.is_alive(), "a client is stuck"
                assert client.error is None, client.error
            for _ in range(KILLS_AFTER_STREAM):
                time.sleep(rng.uniform(0.05, 1.0))  # while dispatch and reports drain
                bridge.kill_and_restart()
            db = tmp_path / "mailbridge.db"

            def drained() -> bool:
                left = db_rows(
                    db,
                    "SELECT (SELECT count(*) FROM requests WHERE state != 'done'),"
                    " (SELECT count(*) FROM reports WHERE state != 'sent')",
                )
                return left == [(0, 0)]

            wait_for(drained, timeout=120, what="every request done and every report sent")
            assert bridge.proc.terminate() == 0
        finally:
            bridge.proc.stop()
        mails = sink.mails
    elapsed = time.monotonic() - started

    # -- reconciliation ------------------------------------------------------
    stored = db_rows(tmp_path / "mailbridge.db", "SELECT id, email_id, ack_code, message_id, state"
                     " FROM requests")  # fmt: skip
    by_message_id: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in stored:
        by_message_id[row[3]].append(row)
    attempts = [a for e in emails for a in e.attempts]
    outcome_counts = Counter(a.outcome for a in attempts)
    for a in attempts:
        rows = by_message_id.get(a.message_id, [])
        if a.outcome == "250":
            assert len(rows) == 1, f"{a.message_id} answered 250, stored {len(rows)} times"
        elif a.outcome in ("reply", "unreached"):
            assert rows == [], f"{a.message_id} refused ({a.reply or a.outcome}) but stored"
        else:
            assert len(rows) <= 1, f"{a.message_id} cut by a kill, stored {len(rows)} times"
    dropped_but_stored = sum(
        1 for a in attempts if a.outcome == "dropped" and by_message_id.get(a.message_id)
    )
    assert len(stored) == sum(len(by_message_id.get(a.message_id, [])) for a in attempts)
    assert all(row[4] == "done" for row in stored)

    # Reports, logically (by Message-ID) and physically (deliveries).
    physical = Counter(m.header("Message-ID") for m in mails)
    physical_duplicates = sum(n - 1 for n in physical.values())
    unique = {m.header("Message-ID"): m for m in mails}
    acks: dict[int, list[int]] = defaultdict(list)  # request id -> Ack codes
    nots: dict[int, list[bytes]] = defaultdict(list)
    attempt_of = {row[0]: row[3] for row in stored}  # request id -> the attempt's Message-ID
    for mail in unique.values():
        request_id = int(mail.header("X-Mailbridge-Request"))
        assert mail.header("In-Reply-To") == attempt_of[request_id]
        if mail.header("Subject").startswith("etatAck "):
            acks[request_id].append(ack_code(mail.body))
        else:
            nots[request_id].append(mail.body)
    for row in stored:
        request_id, _, ack, message_id, _ = row
        assert acks[request_id] == [ack], f"request {request_id} ({message_id}): Acks"
        assert len(nots[request_id]) == (1 if ack == 0 else 0), f"request {request_id}: Nots"

    # Every email: processed once, every recipient accepted once by the provider.
    processed = {row[1]: row[0] for row in stored if row[2] == 0}
    losses = duplicates = 0
    for email in emails:
        assert email.attempts[-1].outcome == "250"
        first = [row for row in stored if row[1] == email.email_id and row[2] == 0]
        assert len(first) == 1, f"{email.email_id}: processed {len(first)} times"
        (body,) = nots[processed[email.email_id]]
        assert not_codes(body) == [(num, 0) for num in email.numbers], email.email_id
        counts = [fake.count(num) for num in email.numbers]
        losses += sum(1 for c in counts if c == 0)
        duplicates += sum(c - 1 for c in counts if c > 1)
    recipients = sum(len(e.numbers) for e in emails)
    keys = submissions(server)
    figures = {
        "seed": SEED,
        "synchronous": SYNCHRONOUS,
        "emails": EMAILS,
        "recipients": recipients,
        "attempts": len(attempts),
        "attempt_outcomes": dict(outcome_counts),
        "cut_by_kill_but_stored": dropped_but_stored,
        "ack1_for_retries": sum(1 for row in stored if row[2] == 1),
        "kills": bridge.kills,
        "restart_s_max": round(max(bridge.restart_s), 2),
        "provider_requests": sum(1 for r in server.requests if r.method == "POST"),
        "keys_resubmitted": sum(1 for n in keys.values() if n > 1),
        "sms_duplicates": duplicates,
        "sms_losses": losses,
        "report_mails": len(mails),
        "physical_report_duplicates": physical_duplicates,
        "seconds": round(elapsed, 1),
    }
    print("\nFAULT FIGURES " + json.dumps(figures))
    assert (duplicates, losses) == (0, 0), figures
    assert fake.total == recipients, figures
    assert bridge.kills >= 10
    # Only a kill between the relay's 250 and the commit repeats a report. Reports
    # go out on up to `connections` relay connections at once, each holding at most
    # 2 x MAX_UNMARKED taken but not yet marked `sent` (mailer.SentMarks).
    assert physical_duplicates <= bridge.kills * RELAY_CONNECTIONS * 2 * MAX_UNMARKED, figures


# -- a full store -------------------------------------------------------------


async def test_store_cap_raises_sqlite_full_and_the_store_stays_usable(tmp_path: Path) -> None:
    from mailbridge.model import NewRequest, RecipientDraft
    from mailbridge.store import StoreUnavailable
    from mailbridge.store.sqlite import SqliteStore

    def request(n: int) -> NewRequest:
        drafts = [
            RecipientDraft(tel=f"06{i:08d}", number=f"+336{i:08d}", text="x" * 100,
                           encoding="gsm7", parts=1, max_parts=5)
            for i in range(50)
        ]  # fmt: skip
        return NewRequest(
            account="k", email_id=f"e{n}", ack_code=0, ack_to="a@client.test", not_to=None,
            numbered=True, sender=None, reference=None, received_at=0.0, due_at=0.0,
            mail_from="erp@client.test", client_ip="127.0.0.1", message_id=None,
            recipients=drafts,
        )  # fmt: skip

    # 64 pages: the empty schema's tables and indexes take about half of them.
    store = SqliteStore(tmp_path / "db.sqlite", max_size_mb=0.25)
    await store.open()
    try:
        stored = 0
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            for n in range(100):
                await store.add_request(request(n))
                stored += 1
        assert 0 < stored < 100
        status = await store.status(0.0)
        assert status.database_max_bytes == 64 * 4096 and status.database_bytes <= 64 * 4096
        # The failed transaction is gone: reads and in-place writes still work.
        assert status.requests == {"queued": stored}
        (job,) = await store.claim_requests(1.0, 60, 1)
        await store.release_requests([job.id], None, None, count_attempt=False)
    finally:
        await store.close()
    bigger = SqliteStore(tmp_path / "db.sqlite", max_size_mb=1)
    await bigger.open()
    try:
        assert (await bigger.add_request(request(999))).ack_code == 0
    finally:
        await bigger.close()


def test_disk_full_answers_451_keeps_serving_then_a_retry_succeeds(tmp_path: Path) -> None:
    config = config_dict(tmp_path)
    config["store"]["max_size_mb"] = 0.25
    config["dispatch"] = {"workers": 2, "provider_wait_s": 0.5}
    proc = DaemonProcess(tmp_path, config).start()
    accepted: dict[str, list[str]] = {}

    def mail(n: int, count: int = 50) -> Any:
        numbers = [f"06{n:04d}{i:04d}" for i in range(count)]
        fields = {f"num{i}": num for i, num in enumerate(numbers, start=1)}
        return numbers, request_mail(sms=f"full {n}", emailId=f"d{n}", **fields)

    try:
        with proc.smtp() as smtp:
            for n in range(200):
                numbers, msg = mail(n)
                code, text = send_on(smtp, msg)
                if code != 250:
                    break
                accepted[f"d{n}"] = numbers
            assert (code, text.split()[0]) == (451, "4.3.0"), (code, text)
            refused = n
            assert smtp.noop()[0] == 250  # the same session goes on
        wait_for(lambda: "answered 451" in proc.log(), what="the log line")
        assert "database or disk is full" in proc.log()
        # A new session: 451 again, no crash. (A mail ten times bigger: the
        # refused one may have failed only together with the dispatcher's
        # writes of the same group commit, and fit alone.)
        assert proc.send(mail(refused, 500)[1])[0] == 451
        # Restart with the same cap: the daemon starts on a full store.
        assert proc.terminate() == 0
        proc = DaemonProcess(tmp_path, config).start()
        assert proc.send(mail(refused, 500)[1])[0] == 451
        assert proc.terminate() == 0
        # The operator gives the store room; the client's retry is accepted.
        config["store"]["max_size_mb"] = 50
        proc = DaemonProcess(tmp_path, config).start()
        numbers, msg = mail(refused)
        code, text = proc.send(msg)
        assert code == 250, text
        accepted[f"d{refused}"] = numbers

        def all_reported() -> bool:
            return all(len(reports_for(proc.maildir, e)["not"]) == 1 for e in accepted)

        wait_for(all_reported, timeout=60, what="every Not")
        assert proc.terminate() == 0
    finally:
        proc.stop()
    assert 1 < len(accepted) < 200
    for email_id, numbers in accepted.items():
        reports = reports_for(proc.maildir, email_id)
        assert [ack_code(b) for b in reports["ack"]] == [0], email_id
        assert not_codes(reports["not"][0]) == [(num, 0) for num in numbers], email_id
    sent = Counter(line["to"] for line in outbox_lines(proc.outbox))
    assert len(sent) == 50 * len(accepted) and set(sent.values()) == {1}


async def test_work_resumes_soon_after_a_long_store_outage(tmp_path: Path) -> None:
    """A store that cannot write (disk full for hours) is not the request's
    fault: the retry pace must not grow with the outage, or the SMS would go
    out hours after the operator freed the disk."""
    from datetime import UTC, datetime

    import httpx

    from mailbridge.clock import FakeClock
    from mailbridge.dispatch import Dispatcher
    from mailbridge.model import NewRequest, RecipientDraft
    from mailbridge.providers import build_provider
    from mailbridge.store import StoreUnavailable
    from mailbridge.store.sqlite import SqliteStore
    from tests.support import make_config

    config = make_config(tmp_path)
    clock = FakeClock(datetime(2026, 11, 24, 12, 0, tzinfo=UTC))
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    full = True
    real_record = store.record_results

    async def record_results(*args: Any, **kwargs: Any) -> list[int]:
        if full:
            raise StoreUnavailable("sqlite: database or disk is full")
        return await real_record(*args, **kwargs)

    store.record_results = record_results  # type: ignore[method-assign]
    async with httpx.AsyncClient() as http:
        providers = {n: build_provider(n, pc, http) for n, pc in config.providers.items()}
        dispatcher = Dispatcher(
            store, providers, config.providers, {a.keyid: a for a in config.accounts},
            config.dispatch, clock,
        )  # fmt: skip
        now = clock.time()
        request = NewRequest(
            account=config.accounts[0].keyid, email_id="w1", ack_code=0, ack_to=None,
            not_to="n@client.test", numbered=False, sender="MaSociete", reference=None,
            received_at=now, due_at=now, mail_from="erp@client.test", client_ip="127.0.0.1",
            message_id=None,
            recipients=[RecipientDraft(tel="0601020304", number="+33601020304", text="x",
                                       encoding="gsm7", parts=1, max_parts=5)],
        )  # fmt: skip
        await store.add_request(request)
        outage_started = clock.time()
        for _ in range(12):  # the store stays full; each try fails
            claims = await store.claim_requests(clock.time(), 60, 10)
            assert len(claims) == 1
            await dispatcher.process(claims)
            due = await store.next_due()
            assert due is not None and due > clock.time()
            clock.advance(due - clock.time() + 0.001)
        wait = config.dispatch.provider_wait_s
        assert clock.time() - outage_started <= 12 * wait * 1.2  # tried at a steady pace
        full = False  # the operator freed the disk: the next try succeeds
        (claimed,) = await store.claim_requests(clock.time(), 60, 10)
        assert claimed.attempts == 0  # not the request's fault
        await dispatcher.process([claimed])
    status = await store.status(clock.time())
    await store.close()
    assert status.requests == {"done": 1}
    assert len(outbox_lines(tmp_path / "outbox.jsonl")) == 1  # in doubt, written once
