"""French commercial quiet hours, judged in Europe/Paris."""

from __future__ import annotations

from datetime import UTC, datetime

from mailbridge.quiet_hours import PARIS, QuietHours


def paris(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=PARIS)


def test_day_and_night() -> None:
    q = QuietHours()
    assert not q.is_quiet(paris(2026, 11, 24, 8, 0))  # Tuesday 08:00
    assert not q.is_quiet(paris(2026, 11, 24, 19, 59, 59))
    assert q.is_quiet(paris(2026, 11, 24, 20, 0))
    assert q.is_quiet(paris(2026, 11, 24, 7, 59, 59))


def test_utc_input_is_judged_in_paris() -> None:
    # 19:30 UTC in winter is 20:30 in Paris.
    assert QuietHours().is_quiet(datetime(2026, 11, 24, 19, 30, tzinfo=UTC))
    # 18:30 UTC in summer is 20:30 in Paris (CEST).
    assert QuietHours().is_quiet(datetime(2026, 7, 8, 18, 30, tzinfo=UTC))
    assert not QuietHours().is_quiet(datetime(2026, 7, 8, 17, 30, tzinfo=UTC))


def test_sundays_and_holidays() -> None:
    q = QuietHours()
    assert q.is_quiet(paris(2026, 11, 29, 12, 0))  # Sunday
    assert q.is_quiet(paris(2026, 12, 25, 12, 0))  # Christmas
    assert q.is_quiet(paris(2026, 7, 14, 12, 0))  # Bastille day
    assert not q.is_quiet(paris(2026, 12, 26, 12, 0))  # Saint-Étienne: Alsace-Moselle only


def test_subdivision_adds_local_holidays() -> None:
    assert QuietHours("57").is_quiet(paris(2026, 12, 26, 12, 0))
    assert QuietHours("57").is_quiet(paris(2026, 4, 3, 12, 0))  # Good Friday 2026


def test_next_allowed() -> None:
    q = QuietHours()
    tuesday_noon = paris(2026, 11, 24, 12, 0)
    assert q.next_allowed(tuesday_noon) == tuesday_noon
    assert q.next_allowed(paris(2026, 11, 24, 21, 0)) == paris(2026, 11, 25, 8, 0)
    assert q.next_allowed(paris(2026, 11, 25, 3, 0)) == paris(2026, 11, 25, 8, 0)
    # Saturday night -> Monday 08:00 (Sunday skipped).
    assert q.next_allowed(paris(2026, 11, 28, 20, 30)) == paris(2026, 11, 30, 8, 0)
    # Christmas Eve night -> the 26th (the 25th is a holiday).
    assert q.next_allowed(paris(2026, 12, 24, 22, 0)) == paris(2026, 12, 26, 8, 0)
    # Sunday 5 a.m. -> Monday 08:00.
    assert q.next_allowed(paris(2026, 11, 29, 5, 0)) == paris(2026, 11, 30, 8, 0)
