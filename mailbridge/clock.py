"""Time, injected: production uses `SystemClock`; tests pass a `FakeClock`.

All times are aware datetimes or POSIX seconds (UTC). Quiet hours convert to
Europe/Paris themselves.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware."""
        ...

    def time(self) -> float:
        """The current time in POSIX seconds."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()


class FakeClock:
    """A clock that stands still until told to move (tests)."""

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = start

    def now(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def set(self, when: datetime) -> None:
        self._now = when

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self._now = self._now + timedelta(seconds=seconds)


async def nap(wake: asyncio.Event, stopping: asyncio.Event, timeout: float) -> None:
    """Sleep until `wake` or `stopping` is set, or `timeout` seconds pass.

    Background loops use it between rounds: new work sets `wake`, so nothing
    waits for a poll interval, and the timeout only covers work that becomes
    due by itself (retries, deferred sends).
    """
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waiters, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
