"""French commercial quiet hours: 20:00-08:00, Sundays and public holidays.

Input: an aware datetime and the account's holiday subdivision. Output: whether
commercial SMS are forbidden now, and when they are next allowed. Times are
judged in Europe/Paris, whatever the machine's time zone.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays

PARIS = ZoneInfo("Europe/Paris")
DAY_START = time(8, 0)
DAY_END = time(20, 0)


class QuietHours:
    """The calendar of one subdivision; build once per account and reuse."""

    def __init__(self, subdivision: str | None = None) -> None:
        # Years are added on demand by the holidays package (expand=True).
        self._holidays = holidays.country_holidays("FR", subdiv=subdivision, expand=True)

    def _day_allowed(self, day: date) -> bool:
        return day.weekday() != 6 and day not in self._holidays

    def is_quiet(self, when: datetime) -> bool:
        """True when a commercial SMS may not be sent at `when`."""
        local = when.astimezone(PARIS)
        if not self._day_allowed(local.date()):
            return True
        return not (DAY_START <= local.time() < DAY_END)

    def next_allowed(self, when: datetime) -> datetime:
        """`when` itself if allowed, else 08:00 Paris time of the next allowed day."""
        if not self.is_quiet(when):
            return when
        local = when.astimezone(PARIS)
        day = local.date()
        if local.time() >= DAY_START:
            day += timedelta(days=1)
        while not self._day_allowed(day):
            day += timedelta(days=1)
        return datetime.combine(day, DAY_START, tzinfo=PARIS)
