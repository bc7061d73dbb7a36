"""The daemon in-process with a fake clock: quiet hours over time, a store that
fails, credit. The SMTP client (aiosmtplib) still talks to the real listener."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosmtplib
import pytest

from mailbridge.app import Daemon
from mailbridge.clock import FakeClock
from mailbridge.config import parse_config
from mailbridge.quiet_hours import PARIS
from tests.support import (
    INTAKE,
    SENDER,
    ack_code,
    config_dict,
    not_codes,
    outbox_lines,
    reports_for,
    request_mail,
    wire_bytes,
)

T = TypeVar("T")
SATURDAY_NIGHT = datetime(2026, 11, 28, 21, 0, tzinfo=PARIS)
MONDAY_MORNING = datetime(2026, 11, 30, 8, 0, 1, tzinfo=PARIS)
TUESDAY_NOON = datetime(2026, 11, 24, 12, 0, tzinfo=PARIS)


async def eventually(predicate: Callable[[], T], timeout: float = 30.0) -> T:
    """Poll with a bound (the daemon runs in this very loop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)
    return value


class Harness:
    def __init__(self, tmp: Path, clock: FakeClock, **account: Any) -> None:
        self.tmp = tmp
        self.clock = clock
        raw = config_dict(tmp, **account)
        raw["store"]["busy_timeout_s"] = 0.2
        # One process: the FakeClock must rule the send and report stages too.
        raw.setdefault("dispatch", {})["separate_process"] = False
        self.daemon = Daemon(parse_config(raw, base_dir=tmp), clock=clock)

    async def submit(self, **fields: str) -> tuple[int, str]:
        msg = request_mail(**fields)
        host, port = self.daemon.addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=port, timeout=30) as smtp:
            try:
                _, reply = await smtp.sendmail(SENDER, [INTAKE], wire_bytes(msg))
            except aiosmtplib.SMTPResponseException as err:
                return err.code, err.message
        return 250, reply

    def reports(self, email_id: str) -> dict[str, list[bytes]]:
        return reports_for(self.tmp / "reports", email_id)

    def outbox(self) -> list[dict[str, Any]]:
        return outbox_lines(self.tmp / "outbox.jsonl")


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Harness] = []

    async def start(clock: datetime = TUESDAY_NOON, **account: Any) -> Harness:
        h = Harness(tmp_path, FakeClock(clock), **account)
        await h.daemon.start()
        started.append(h)
        return h

    yield start
    for h in started:
        await h.daemon.stop()


async def test_quiet_hours_defer_holds_until_monday_8am(harness: Any) -> None:
    h: Harness = await harness(SATURDAY_NIGHT, commercial=True, quiet_hours="defer")
    code, _ = await h.submit(num="0601020304", sms="promo", emailId="d1")
    assert code == 250
    acks = await eventually(lambda: h.reports("d1")["ack"])
    assert ack_code(acks[0]) == 0  # the Ack is immediate
    assert h.daemon.store is not None
    status = await h.daemon.store.status(h.clock.time())
    assert status.requests == {"waiting": 1}
    assert h.outbox() == []
    # Sunday noon: still held.
    h.clock.set(datetime(2026, 11, 29, 12, 0, tzinfo=PARIS))
    h.daemon.wake()
    await asyncio.sleep(0)  # let the dispatcher look once
    assert (await h.daemon.store.status(h.clock.time())).requests == {"waiting": 1}
    h.clock.set(MONDAY_MORNING)
    h.daemon.wake()
    nots = await eventually(lambda: h.reports("d1")["not"])
    assert not_codes(nots[0]) == [("0601020304", 0)]
    (line,) = h.outbox()
    assert line["text"] == "promo\nSTOP SMS au 36111"


async def test_quiet_hours_reject(harness: Any) -> None:
    h: Harness = await harness(SATURDAY_NIGHT, commercial=True)
    await h.submit(num1="0601020304", num2="0601020305", sms="promo", emailId="r1")
    nots = await eventually(lambda: h.reports("r1")["not"])
    assert not_codes(nots[0]) == [("0601020304", 24), ("0601020305", 24)]
    assert h.outbox() == []


async def test_store_locked_answers_451_then_accepts(harness: Any, tmp_path: Path) -> None:
    h: Harness = await harness()
    blocker = sqlite3.connect(tmp_path / "mailbridge.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        code, message = await h.submit(num="0601020304", sms="x", emailId="l1")
        assert (code, message.split()[0]) == (451, "4.3.0")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The client retries the same email: now accepted, and processed once.
    code, _ = await h.submit(num="0601020304", sms="x", emailId="l1")
    assert code == 250
    nots = await eventually(lambda: h.reports("l1")["not"])
    assert not_codes(nots[0]) == [("0601020304", 0)]
    assert len(h.outbox()) == 1


async def test_credit_runs_out(harness: Any) -> None:
    h: Harness = await harness(credit=3)
    numbers = {f"num{i}": f"060102030{i}" for i in range(1, 6)}
    await h.submit(**numbers, sms="x", emailId="c1")
    nots = await eventually(lambda: h.reports("c1")["not"])
    assert [code for _, code in not_codes(nots[0])] == [0, 0, 0, 12, 12]
    assert len(h.outbox()) == 3
