"""Report delivery through a real SMTP relay (an aiosmtpd server in the test):
a relay that is down keeps reports pending and retried; nothing is dropped."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailbridge.clock import FakeClock
from mailbridge.config import RelayConfig, ReportsConfig
from mailbridge.mailer import MaildirSink, Mailer, SmtpRelaySink
from mailbridge.model import NewRequest, RecipientDraft
from mailbridge.report import ReportRenderer
from mailbridge.store.sqlite import SqliteStore
from tests.support import maildir_reports

START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
GOLDEN = Path(__file__).parent / "golden"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class RelaySink:
    """A relay that records every mail and counts connections."""

    mails: list[Received] = field(default_factory=list)
    connections: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.mails.append(
            Received(
                envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b""
            )
        )
        return "250 2.0.0 queued"


def new_request(email_id: str, not_to: str | None = "not@client.test") -> NewRequest:
    return NewRequest(
        account="k", email_id=email_id, ack_code=0, ack_to="ack@client.test", not_to=not_to,
        numbered=False, sender=None, reference=None, received_at=START.timestamp(),
        due_at=START.timestamp(), mail_from="erp@client.test", client_ip="127.0.0.1",
        message_id="<req@client.test>", recipients=[RecipientDraft(tel="0601020304", code=0)],
    )  # fmt: skip


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    yield s
    await s.close()


def reports_config(**kw: Any) -> ReportsConfig:
    return ReportsConfig.model_validate({"from": "mailbridge@bridge.test", **kw})


async def test_relay_down_then_up(store: SqliteStore) -> None:
    clock = FakeClock(START)
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = reserved.getsockname()[1]
    relay = RelayConfig(host="127.0.0.1", port=port, timeout_s=10)
    config = reports_config(smtp=relay.model_dump(), retry_backoff_s=30)
    sink = SmtpRelaySink(relay)
    mailer = Mailer(store, sink, ReportRenderer(), config, clock)
    await store.add_request(new_request("1548"))

    assert await mailer.run_once() == 0
    status = await store.status(clock.time())
    assert status.reports == {"pending": 2}
    assert any("report" in e for e in status.last_errors)
    assert await mailer.run_once() == 0  # not due yet: nothing attempted
    clock.advance(15)
    assert await store.claim_reports(clock.time(), 10, 60) == []

    # The relay comes back; once the backoff has passed the reports go out.
    handler = RelaySink()
    reserved.listen()
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        handler.connections += 1
        return SMTP(handler, hostname="relay.test")

    server = await loop.create_server(protocol, sock=reserved)
    try:
        clock.advance(60)
        assert await mailer.run_once() == 2
        assert handler.connections == 1  # both reports on one connection
    finally:
        await sink.aclose()
        server.close()
    ack, not_ = handler.mails
    assert (ack.mail_from, ack.rcpt_tos, not_.rcpt_tos) == (
        "<>",
        ["ack@client.test"],
        ["not@client.test"],
    )
    assert b"\r\nAuto-Submitted: auto-replied\r\n" in not_.data
    assert not_.data.endswith((GOLDEN / "not_single.xml").read_bytes().replace(b"\n", b"\r\n"))
    assert (await store.status(clock.time())).reports == {"sent": 2}


async def test_relay_reconnects_after_the_relay_closed_the_connection(store: SqliteStore) -> None:
    handler = RelaySink()
    loop = asyncio.get_running_loop()
    servers: list[SMTP] = []

    def protocol() -> SMTP:
        handler.connections += 1
        smtp = SMTP(handler, hostname="relay.test")
        servers.append(smtp)
        return smtp

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay = RelayConfig(host="127.0.0.1", port=port, timeout_s=10)
    sink = SmtpRelaySink(relay)
    mailer = Mailer(
        store, sink, ReportRenderer(), reports_config(smtp=relay.model_dump()), FakeClock(START)
    )
    try:
        await store.add_request(new_request("a", not_to=None))
        assert await mailer.run_once() == 1
        assert servers[0].transport is not None
        servers[0].transport.close()  # the relay drops the idle connection
        await store.add_request(new_request("b", not_to=None))
        assert await mailer.run_once() == 1
    finally:
        await sink.aclose()
        server.close()
    assert [m.rcpt_tos for m in handler.mails] == [["ack@client.test"], ["ack@client.test"]]
    assert handler.connections == 2


async def test_maildir_delivery_is_idempotent(store: SqliteStore, tmp_path: Path) -> None:
    clock = FakeClock(START)
    sink = MaildirSink(tmp_path / "md", store.instance_id)
    mailer = Mailer(
        store, sink, ReportRenderer(), reports_config(maildir=str(tmp_path / "md")), clock
    )
    await store.add_request(new_request("x"))
    (job,) = await store.claim_reports(clock.time(), 1, 60)
    assert await mailer.deliver(job)
    # Simulate a crash between the rename into new/ and the store commit.
    db = sqlite3.connect(tmp_path / "db.sqlite")
    with db:
        db.execute(
            "UPDATE reports SET state = 'pending', claimed_until = NULL WHERE id = ?", (job.id,)
        )
    db.close()
    assert await mailer.run_once() == 2  # the Ack again (found, not rewritten) and the Not
    assert len(maildir_reports(tmp_path / "md")) == 2
    assert (await store.status(clock.time())).reports == {"sent": 2}


async def test_reports_go_out_on_parallel_connections_in_order_per_request(
    store: SqliteStore,
) -> None:
    """A burst of reports uses up to `connections` relay connections at once,
    and each request's Ack still reaches the relay before its Not."""
    clock = FakeClock(START)
    handler = RelaySink()
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        handler.connections += 1
        return SMTP(handler, hostname="relay.test")

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay = RelayConfig(host="127.0.0.1", port=port, connections=3)
    sink = SmtpRelaySink(relay)
    mailer = Mailer(store, sink, ReportRenderer(), reports_config(smtp=relay.model_dump()), clock)
    for i in range(12):
        await store.add_request(new_request(f"burst-{i}"))
    try:
        assert await mailer.run_once() == 24
    finally:
        await sink.aclose()
        server.close()
    assert handler.connections == 3
    kinds: dict[bytes, list[str]] = {}
    for mail in handler.mails:
        email_id = mail.data.split(b"<emailId>")[1].split(b"</emailId>")[0]
        kinds.setdefault(email_id, []).append(mail.rcpt_tos[0])
    assert kinds == {
        f"burst-{i}".encode(): ["ack@client.test", "not@client.test"] for i in range(12)
    }
    assert (await store.status(clock.time())).reports == {"sent": 24}


# -- report delivery that ends (SPEC 8) ------------------------------------------------


async def test_a_permanent_refusal_fails_the_report_at_once(store: SqliteStore) -> None:
    """A relay answering 552 to a Not: one attempt, state failed, never retried
    by itself; `reports retry` would make it pending again."""
    from tests.report_sink import ReportSink

    clock = FakeClock(START)
    with ReportSink() as relay_sink:
        relay_sink.refuse_larger_than = 555  # the Ack (534 bytes) passes, the Not (576) not
        config = reports_config(smtp=relay_sink.relay_config(), retry_backoff_s=30)
        sink = SmtpRelaySink(RelayConfig.model_validate(relay_sink.relay_config()))
        mailer = Mailer(store, sink, ReportRenderer(), config, clock)
        rid = (await store.add_request(new_request("1548"))).request_id
        await store.record_results([], clock.time())
        assert await mailer.run_once() == 1  # the Ack
        for _ in range(3):
            clock.advance(7200)
            assert await mailer.run_once() == 0
        await sink.aclose()
        assert relay_sink.refused == 1  # one attempt, not one every backoff
    status = await store.status(clock.time())
    assert status.reports == {"sent": 1, "failed": 1}
    assert any("552" in e and "report" in e for e in status.last_errors)
    assert rid == 1


async def test_a_mail_over_the_relays_size_is_not_even_sent(store: SqliteStore) -> None:
    from tests.report_sink import ReportSink

    clock = FakeClock(START)
    with ReportSink() as relay_sink:
        relay_sink.size_limit = 555  # advertised as SIZE 555
        relay_sink.come_back()  # listen again with the new limit
        config = reports_config(smtp=relay_sink.relay_config())
        sink = SmtpRelaySink(RelayConfig.model_validate(relay_sink.relay_config()))
        mailer = Mailer(store, sink, ReportRenderer(), config, clock)
        await store.add_request(new_request("1549"))
        await mailer.run_once()
        await sink.aclose()
        assert [m.header("Subject") for m in relay_sink.mails] == ["etatAck 1549"]
    status = await store.status(clock.time())
    assert status.reports == {"sent": 1, "failed": 1}
    assert any("SIZE limit of 555" in e for e in status.last_errors)


async def test_a_temporary_failure_is_retried_until_max_age_then_failed(
    store: SqliteStore,
) -> None:
    from tests.report_sink import ReportSink

    clock = FakeClock(START)
    with ReportSink() as relay_sink:
        relay_sink.go_down("tempfail")
        config = reports_config(
            smtp=relay_sink.relay_config(), retry_backoff_s=60, retry_max_backoff_s=3600,
            max_age_s=86400,
        )  # fmt: skip
        sink = SmtpRelaySink(RelayConfig.model_validate(relay_sink.relay_config()))
        mailer = Mailer(store, sink, ReportRenderer(), config, clock)
        await store.add_request(new_request("1550", not_to=None))
        attempts = 0
        while (await store.status(clock.time())).reports.get("pending"):
            await mailer.run_once()
            attempts += 1
            (job_due,) = [
                d for (d,) in store.db.execute("SELECT due_at FROM reports WHERE state = 'pending'")
            ] or [clock.time()]
            # capped backoff: never more than an hour (+20 % jitter) between tries
            assert job_due - clock.time() <= 3600 * 1.2 + 1
            clock.advance(max(0.0, job_due - clock.time()) + 1)
            assert attempts < 100
        await sink.aclose()
    status = await store.status(clock.time())
    assert status.reports == {"failed": 1}
    assert clock.time() - START.timestamp() >= 86400  # only after max_age_s
    assert 20 < attempts < 40  # 60 s doubling, capped at an hour, over a day
