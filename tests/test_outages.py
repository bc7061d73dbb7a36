"""Outages, with the real daemon, the Kcell fake and a real SMTP report relay:
- the provider down for "minutes" (compressed: seconds, with short back-offs
  and circuit cool-down): the work waits, then completes, one Not per email;
  and down for longer than `dispatch.outage_hold_s`: 999, once, nothing sent;
- the report relay down (refusing, then answering 451): reports wait and go
  out later, each once;
- a slow provider: at most `dispatch.workers` × `dispatch.calls_in_flight` calls at
  once, the intake keeps answering 250 quickly, the daemon's memory stays bounded;
- SIGTERM while a batch is at the provider: exit 0 within the grace period,
  then nothing lost and nothing sent twice.
"""

from __future__ import annotations

import json
import signal
import smtplib
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbridge.app import STOP_GRACE_S
from tests.fake_kcell import FakeKcell
from tests.httpfake import ProviderServer, RecordedRequest, Reply
from tests.report_sink import ReportSink
from tests.support import (
    DaemonProcess,
    ack_code,
    config_dict,
    not_codes,
    outbox_lines,
    request_mail,
    send_on,
    wait_for,
)


class Switch:
    """Wraps a fake provider: while `down`, every request gets 503; counts the
    calls in flight at once."""

    def __init__(self, inner: FakeKcell) -> None:
        self.inner = inner
        self.down = False
        self.refused = 0
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()

    def __call__(self, req: RecordedRequest) -> Reply:
        with self._lock:
            if self.down:
                self.refused += 1
                return Reply(503, "<html><body>503 Service Unavailable</body></html>")
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            return self.inner(req)
        finally:
            with self._lock:
                self.inflight -= 1


@pytest.fixture
def kcell() -> Iterator[tuple[FakeKcell, Switch, ProviderServer]]:
    fake = FakeKcell()
    switch = Switch(fake)
    with ProviderServer(switch) as server:
        yield fake, switch, server
    fake.release()


@pytest.fixture
def sink() -> Iterator[ReportSink]:
    with ReportSink() as relay:
        yield relay


def start(
    tmp: Path,
    server: ProviderServer | None,
    sink: ReportSink,
    kcell: dict[str, Any] | None = None,
    **dispatch: Any,
) -> DaemonProcess:
    """The daemon on Kcell (or the outbox when `server` is None), reports to `sink`."""
    if server is None:
        raw = config_dict(tmp)
    else:
        raw = config_dict(tmp, provider="kcell", default_sender="INFO")
        raw["providers"]["kcell"] = {
            "type": "kcell", "url": server.url + FakeKcell.BASE, "username": "mailbridge",
            "password": "secret", "retry_backoff_s": 0.05, "timeout_s": 10, **(kcell or {}),
        }  # fmt: skip
    raw["reports"] = {
        "from": "mailbridge@bridge.test",
        "smtp": sink.relay_config(),
        "retry_backoff_s": 0.2,
        "retry_max_backoff_s": 0.5,
    }
    raw["dispatch"] = {"workers": 2, **dispatch}
    return DaemonProcess(tmp, raw).start()


def kz(email: int, count: int) -> list[str]:
    return [f"+7702{email:03d}{i:04d}" for i in range(1, count + 1)]


def submit(proc: DaemonProcess, email_id: str, numbers: list[str]) -> None:
    fields = {f"num{i}": n for i, n in enumerate(numbers, start=1)}
    code, text = proc.send(request_mail(sms=f"outage {email_id}", emailId=email_id, **fields))
    assert code == 250, text


def db_one(tmp: Path, sql: str) -> Any:
    db = sqlite3.connect(f"file:{tmp / 'mailbridge.db'}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchone()[0]
    finally:
        db.close()


def exactly_once(sink: ReportSink, emails: dict[str, list[str]], code: int = 0) -> None:
    """One Ack 0 and one Not per email, each delivered once; every code `code`."""
    assert all(n == 1 for n in sink.by_message_id().values()), sink.by_message_id()
    for email_id, numbers in emails.items():
        reports = sink.for_email(email_id)
        assert [ack_code(m.body) for m in reports["ack"]] == [0], email_id
        assert len(reports["not"]) == 1, email_id
        assert not_codes(reports["not"][0].body) == [(n, code) for n in numbers]


def test_provider_down_for_minutes_work_waits_then_completes(
    tmp_path: Path, kcell: tuple[FakeKcell, Switch, ProviderServer], sink: ReportSink
) -> None:
    fake, switch, server = kcell
    cooldown = 0.5
    settings = {"retry_attempts": 2, "circuit_failures": 2, "circuit_cooldown_s": cooldown}
    switch.down = True
    proc = start(tmp_path, server, sink, settings, outage_hold_s=300)
    try:
        emails = {"o1": kz(1, 1), "o2": kz(2, 10), "o3": kz(3, 40)}
        for email_id, numbers in emails.items():
            submit(proc, email_id, numbers)
        down_since = time.monotonic()
        sink.wait(lambda mails: len(mails) == 3)  # the Acks go out at once
        wait_for(lambda: "skipped for" in proc.log(), what="the circuit to open")
        # Stay down for 8 cool-downs: the circuit lets one call through after each.
        wait_for(lambda: time.monotonic() - down_since > 8 * cooldown, what="the outage")
        wait_for(lambda: switch.refused >= 8, what="calls probing the provider")
        outage_s = time.monotonic() - down_since
        refused = switch.refused
        assert fake.total == 0
        assert db_one(tmp_path, "SELECT count(*) FROM recipients WHERE code IS NULL") == 51
        assert [m.header("Subject").split()[0] for m in sink.mails] == ["etatAck"] * 3
        # Not hammered: retries, then about one probe per request per cool-down.
        assert refused <= 3 * 2 + 3 * (outage_s / cooldown + 2), (refused, outage_s)
        switch.down = False  # the provider is back
        back_at = time.monotonic()
        sink.wait(lambda mails: len(mails) == 6)
        figures = {
            "outage_s": round(outage_s, 1), "cooldown_s": cooldown, "calls_refused": refused,
            "nots_after_back_s": round(time.monotonic() - back_at, 2),
        }  # fmt: skip
        print("\nPROVIDER OUTAGE FIGURES " + json.dumps(figures))
        assert proc.terminate() == 0
    finally:
        proc.stop()
    exactly_once(sink, emails)
    assert all(fake.count(n) == 1 for numbers in emails.values() for n in numbers)
    assert fake.total == 51
    assert db_one(tmp_path, "SELECT count(*) FROM reports WHERE kind = 'not'") == 3


def test_outage_longer_than_the_hold_fails_once(
    tmp_path: Path, kcell: tuple[FakeKcell, Switch, ProviderServer], sink: ReportSink
) -> None:
    fake, switch, server = kcell
    settings = {"retry_attempts": 2, "circuit_failures": 2, "circuit_cooldown_s": 0.3}
    switch.down = True
    proc = start(tmp_path, server, sink, settings, outage_hold_s=1.5)
    try:
        numbers = kz(4, 2)
        submit(proc, "h1", numbers)
        sink.wait(lambda mails: len(sink.for_email("h1")["not"]) == 1)
        switch.down = False
        # The Not is final: nothing is sent once the provider is back.
        submit(proc, "h2", kz(5, 1))
        sink.wait(lambda mails: len(sink.for_email("h2")["not"]) == 1)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    exactly_once(sink, {"h1": numbers}, code=999)
    assert fake.total == 1 and fake.count(kz(5, 1)[0]) == 1


def test_report_relay_down_reports_wait_then_go_out_once(tmp_path: Path, sink: ReportSink) -> None:
    sink.go_down("refuse")
    proc = start(tmp_path, None, sink)
    try:
        emails = {f"r{i}": [f"06120000{i:02d}"] for i in range(3)}
        for email_id, numbers in emails.items():
            submit(proc, email_id, numbers)
        wait_for(lambda: len(outbox_lines(proc.outbox)) == 3, what="the SMS, relay or not")
        retried = "SELECT min(attempts) FROM reports WHERE state = 'pending'"
        wait_for(lambda: (db_one(tmp_path, retried) or 0) >= 2, what="reports retried")
        sink.go_down("tempfail")  # listening again, but DATA answered 451
        wait_for(lambda: sink.tempfailed >= 6, what="reports refused with 451")
        assert sink.mails == []
        assert db_one(tmp_path, "SELECT count(*) FROM reports WHERE state = 'pending'") == 6
        sink.come_back()
        sink.wait(lambda mails: len(mails) == 6)
        assert proc.terminate() == 0
    finally:
        proc.stop()
    exactly_once(sink, {k: v for k, v in emails.items()})
    assert db_one(tmp_path, "SELECT count(*) FROM reports WHERE state = 'sent'") == 6
    assert "report to reports@client.test not delivered" in proc.log()


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_provider_bounded_concurrency_quick_intake_bounded_memory(
    tmp_path: Path, kcell: tuple[FakeKcell, Switch, ProviderServer], sink: ReportSink
) -> None:
    fake, switch, server = kcell
    workers, emails, per_email, clients = 2, 120, 50, 4
    # A batch whose page holds more than Kcell's max_batch (1 000 recipients, 21+
    # emails claimed at once) makes several calls, up to dispatch.calls_in_flight
    # of them at once: with 1 the bound on calls in flight is `workers` exactly.
    proc = start(tmp_path, server, sink, {"timeout_s": 300}, workers=workers, calls_in_flight=1)
    try:
        submit(proc, "warm", kz(999, 50))  # every code path once, before measuring
        sink.wait(lambda mails: len(mails) == 2)
        assert proc.proc is not None
        rss_before = vm_rss_kb(proc.proc.pid)
        fake.delay_s = 300  # from now on every answer is held until release()
        latencies: list[float] = []
        lock = threading.Lock()

        def client(first: int) -> None:
            with proc.smtp() as smtp:
                for e in range(first, emails, clients):
                    fields = {f"num{i}": n for i, n in enumerate(kz(e, per_email), start=1)}
                    msg = request_mail(sms="slow", emailId=f"s{e}", **fields)
                    t0 = time.monotonic()
                    code, text = send_on(smtp, msg)
                    assert code == 250, text
                    with lock:
                        latencies.append(time.monotonic() - t0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(latencies) == emails
        wait_for(lambda: switch.inflight == workers, what="every worker blocked")
        claimed = "SELECT count(*) FROM requests WHERE claimed_until IS NOT NULL"
        # Each worker holds a batch of requests; nothing else is claimed.
        assert workers <= db_one(tmp_path, claimed) <= workers * 200
        rss_after = vm_rss_kb(proc.proc.pid)
        fake.release()
        sent = "SELECT count(*) FROM reports WHERE state = 'sent'"
        wait_for(lambda: db_one(tmp_path, sent) == 2 + 2 * emails, timeout=120, what="every Not")
        assert proc.terminate() == 0
    finally:
        fake.release()
        proc.stop()
    p50, p99 = statistics.median(latencies), sorted(latencies)[int(0.99 * len(latencies))]
    growth_mb = (rss_after - rss_before) / 1024
    figures = {
        "emails": emails, "recipients": emails * per_email, "workers": workers,
        "max_inflight": switch.max_inflight, "intake_p50_ms": round(p50 * 1e3, 1),
        "intake_p99_ms": round(p99 * 1e3, 1), "intake_max_ms": round(max(latencies) * 1e3, 1),
        "rss_before_mb": round(rss_before / 1024, 1), "rss_growth_mb": round(growth_mb, 1),
    }  # fmt: skip
    print("\nSLOW PROVIDER FIGURES " + json.dumps(figures))
    assert switch.max_inflight == workers  # bounded, and every worker was used
    assert p50 < 0.5 and max(latencies) < 5.0, (p50, max(latencies))
    assert growth_mb < 64, growth_mb  # the queue is in the store, not in memory
    assert fake.total == 50 + emails * per_email
    assert all(fake.count(n) == 1 for e in range(emails) for n in kz(e, per_email))
    for e in range(0, emails, 17):
        reports = sink.for_email(f"s{e}")
        assert len(reports["not"]) == 1
        assert not_codes(reports["not"][0].body) == [(n, 0) for n in kz(e, per_email)]


def test_sigterm_during_a_batch(
    tmp_path: Path, kcell: tuple[FakeKcell, Switch, ProviderServer], sink: ReportSink
) -> None:
    fake, switch, server = kcell
    fake.delay_s = 300  # the provider takes the batch and holds its answer
    proc = start(tmp_path, server, sink, {"timeout_s": 300})
    numbers = kz(7, 30)
    try:
        submit(proc, "t1", numbers)
        wait_for(lambda: fake.total == 30, what="the batch at the provider")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        wait_for(lambda: "waiting for 1 batch(es) in flight" in proc.log(), what="the stop")
        with pytest.raises(ConnectionRefusedError):  # no new mail once stopping
            smtplib.SMTP("127.0.0.1", proc.port, timeout=10)
        released_at = time.monotonic()
        fake.release()  # the answer arrives during the grace period
        assert proc.proc.wait(timeout=STOP_GRACE_S + 30) == 0
        assert time.monotonic() - stopped_at < STOP_GRACE_S
        figures = {"sigterm_to_exit_s": round(time.monotonic() - stopped_at, 2),
                   "release_to_exit_s": round(time.monotonic() - released_at, 2)}  # fmt: skip
        print("\nSIGTERM FIGURES " + json.dumps(figures))
        # The results were recorded before the exit: nothing is in doubt.
        assert db_one(tmp_path, "SELECT count(*) FROM recipients WHERE code = 0") == 30
        assert db_one(tmp_path, "SELECT count(*) FROM recipients WHERE in_doubt = 1") == 0
        proc = DaemonProcess(tmp_path, proc.config).start()
        sink.wait(lambda mails: len(sink.for_email("t1")["not"]) == 1)
        assert proc.terminate() == 0
    finally:
        fake.release()
        proc.stop()
    exactly_once(sink, {"t1": numbers})
    assert sum(1 for r in server.requests if r.method == "POST") == 1  # not resubmitted
    assert all(fake.count(n) == 1 for n in numbers)
