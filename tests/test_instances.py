"""Several instances on one PostgreSQL (SPEC section 6; issue 11), for real.

Three daemons (each with its worker process) share one database, one Kcell
fake (real HTTP; it deduplicates on client_message_id, as Kcell does) and one
Maildir. Emails are spread across them, some emailIds sent to two instances
at the same moment; one instance is SIGKILLed while it holds claimed work,
and not restarted. Then: every emailId processed once, every recipient sent
once, every report once, and the dead instance's work finished by the others
within the bound of docs/deployment.md (its leases expire after
`dispatch.lease_s`). A second test restarts the database in the middle of a
stream: 451 while it is down, 250 again after, nothing lost, no daemon
restarted.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fake_kcell import FakeKcell
from tests.httpfake import ProviderServer
from tests.pg import PgCluster
from tests.support import (
    DaemonProcess,
    ack_code,
    config_dict,
    maildir_reports,
    not_codes,
    reports_for,
    request_mail,
    wait_for,
)

LEASE_S = 3.0
TAKEOVER_BOUND_S = 30.0  # lease_s + a claim cycle, with room for a loaded machine


@pytest.fixture
def kcell() -> Iterator[tuple[FakeKcell, ProviderServer]]:
    fake = FakeKcell()
    fake.senders = ["MaSociete"]  # the default_sender of tests.support's account
    server = ProviderServer(fake).start()
    yield fake, server
    fake.release()
    server.stop()


def instance(tmp: Path, n: int, dsn: str, server: ProviderServer, maildir: Path) -> DaemonProcess:
    """One mailbridge instance on the shared database, Kcell fake and Maildir."""
    cfg = config_dict(tmp / f"i{n}", provider="kz")
    cfg["providers"] = {
        "kz": {"type": "kcell", "url": server.url + FakeKcell.BASE, "username": "mailbridge",
               "password": "secret", "timeout_s": 30, "retry_backoff_s": 0.2},
    }  # fmt: skip
    cfg["store"] = {"postgresql": dsn, "busy_timeout_s": 2}
    cfg["reports"]["maildir"] = str(maildir)
    cfg["reports"]["retry_backoff_s"] = 0.2
    cfg["dispatch"] = {"workers": 2, "lease_s": LEASE_S, "linger_s": 0, "provider_wait_s": 0.5}
    (tmp / f"i{n}").mkdir(parents=True, exist_ok=True)
    return DaemonProcess(tmp / f"i{n}", cfg)


def numbers_of(n: int) -> list[str]:
    return [f"+7701{n:04d}{i:03d}" for i in range(3)]


def email(n: int, email_id: str | None = None) -> tuple[str, Any]:
    email_id = email_id or f"e{n}-{secrets.token_hex(3)}"
    fields = {f"num{i}": num for i, num in enumerate(numbers_of(n), start=1)}
    return email_id, request_mail(sms=f"message {n}", emailId=email_id, **fields)


def send_until_stored(proc: DaemonProcess, msg: Any, timeout: float = 60) -> tuple[int, str]:
    """Submit as a client's MTA would: again after a 4xx, until 250 (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = proc.send(msg)
        except OSError as err:  # the daemon is gone, or the connection was cut
            reply = (421, str(err))
        if reply[0] == 250 or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def worker_holds_claims(dsn: str, daemon_pid: int) -> bool:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM requests WHERE claimed_by LIKE %s AND state = 'queued'",
            (f"%:{daemon_pid}:worker-%",),
        ).fetchone() or (0,)
    return int(n) > 0


def test_three_instances_one_killed_holding_work(
    tmp_path: Path, pg_cluster: PgCluster, kcell: tuple[FakeKcell, ProviderServer]
) -> None:
    fake, server = kcell
    dsn = pg_cluster.new_database()
    maildir = tmp_path / "reports"
    # The victim first, alone, so that it surely holds claimed work: Kcell's
    # answers are held back (it takes the SMS, answers 10 s later).
    victim = instance(tmp_path, 0, dsn, server, maildir).start()
    procs = [victim]
    processed: list[str] = []  # emailIds expected to be processed once
    duplicates: list[str] = []  # emailIds sent to two instances at once
    try:
        fake.delay_s = 10.0
        for n in range(6):
            email_id, msg = email(n)
            assert send_until_stored(victim, msg)[0] == 250
            processed.append(email_id)
        assert victim.proc is not None
        victim_pid = victim.proc.pid
        wait_for(lambda: worker_holds_claims(dsn, victim_pid), what="the victim's claims")
        a, b = (instance(tmp_path, n, dsn, server, maildir).start() for n in (1, 2))
        procs += [a, b]
        for n in range(6, 12):  # spread across the three
            email_id, msg = email(n)
            assert send_until_stored(procs[n % 3], msg)[0] == 250
            processed.append(email_id)
        assert worker_holds_claims(dsn, victim_pid)
        victim.kill()  # SIGKILL: the daemon, and its worker with it (PDEATHSIG)
        killed_at = time.monotonic()
        fake.delay_s = 0.0
        n = 12
        first = n
        for n in range(first, first + 30):
            email_id, msg = email(n)
            assert send_until_stored((a, b)[n % 2], msg)[0] == 250
            processed.append(email_id)
        for n in range(first + 30, first + 40):
            email_id, msg = email(n)
            replies: list[tuple[int, str]] = []

            def submit(proc: DaemonProcess, msg: Any = msg, out: list[Any] = replies) -> None:
                out.append(send_until_stored(proc, msg))

            threads = [threading.Thread(target=submit, args=(p,)) for p in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [code for code, _ in replies] == [250, 250], replies
            processed.append(email_id)
            duplicates.append(email_id)

        def all_reported() -> bool:
            return all(
                (r := reports_for(maildir, e))["not"] and len(r["ack"]) == 1 + (e in duplicates)
                for e in processed
            )

        wait_for(all_reported, timeout=TAKEOVER_BOUND_S + 60, what="every Not")
        victims_done = time.monotonic() - killed_at
        # Every emailId processed once; the duplicates' second copy got Ack 1.
        for email_id in processed:
            reports = reports_for(maildir, email_id)
            assert len(reports["not"]) == 1, (email_id, len(reports["not"]))
            acks = sorted(ack_code(r) for r in reports["ack"])
            assert acks == ([0, 1] if email_id in duplicates else [0]), (email_id, acks)
            assert [code for _, code in not_codes(reports["not"][0])] == [0, 0, 0]
        # Every recipient sent once (the fake refuses a client_message_id twice).
        total = first + 40
        for n in range(total):
            for number in numbers_of(n):
                assert fake.count(number) == 1, number
        assert fake.total == total * 3
        # Every report once: one file per report row, none twice.
        subjects = [str(m["Subject"]) for m in maildir_reports(maildir)]
        assert len(subjects) == len(set(subjects)) + len(duplicates)  # the Ack 1 copies
        assert victims_done < TAKEOVER_BOUND_S + 60
        print(f"takeover: the killed instance's work finished {victims_done:.1f}s after the kill")
        for proc in (a, b):
            assert proc.terminate() == 0
    finally:
        for proc in procs:
            proc.stop()


def test_database_restart_mid_stream(
    tmp_path: Path, kcell: tuple[FakeKcell, ProviderServer]
) -> None:
    fake, server = kcell
    cluster = PgCluster().start()  # its own server: this test stops it
    try:
        dsn = cluster.new_database()
        maildir = tmp_path / "reports"
        procs = [instance(tmp_path, n, dsn, server, maildir).start() for n in range(2)]
        sent: list[str] = []
        try:
            for n in range(10):
                email_id, msg = email(n)
                assert procs[n % 2].send(msg)[0] == 250
                sent.append(email_id)
            cluster.stop()
            # While it is down: 451 4.3.0, the client keeps the mail and retries.
            email_id, msg = email(10)
            code, text = procs[0].send(msg)
            assert (code, text.split()[0]) == (451, "4.3.0"), (code, text)
            cluster.start()
            # Back: the same mail is taken (no restart of mailbridge).
            assert send_until_stored(procs[0], msg)[0] == 250
            sent.append(email_id)
            for n in range(11, 20):
                email_id, msg = email(n)
                assert send_until_stored(procs[n % 2], msg)[0] == 250
                sent.append(email_id)
            wait_for(
                lambda: all(len(reports_for(maildir, e)["not"]) >= 1 for e in sent),
                timeout=90, what="every Not after the restart",
            )  # fmt: skip
            for email_id in sent:
                assert len(reports_for(maildir, email_id)["not"]) == 1
            for n in range(20):
                for number in numbers_of(n):
                    assert fake.count(number) == 1
            log = procs[0].log()
            assert re.search(r"answered 451", log)
            for proc in procs:
                assert proc.terminate() == 0
        finally:
            for proc in procs:
                proc.stop()
    finally:
        cluster.destroy()
