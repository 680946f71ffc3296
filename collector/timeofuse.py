"""Time-of-use schedules: which price period an instant falls in.

A ``Schedule`` has a time zone, a default period and windows (``09:00-12:00 peak``); a
window names the weekdays it applies on (or every day, or the calendar's working days) and
may cross midnight (``16:30-00:30``), in which case it belongs to the day it starts on:
its weekday and holiday are judged on that day. On a holiday of the schedule's calendar
only the default period applies. Windows are half-open: ``[from, to)``, so 12:00:00 is
already outside ``09:00-12:00``.

Pure: no I/O, no clock. Times in are timezone-aware; local wall time comes from ``zoneinfo``
(so a schedule in a zone with daylight saving follows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

__all__ = [
    "WEEKDAYS",
    "WORKDAYS",
    "MINUTES_PER_DAY",
    "Calendar",
    "Window",
    "Schedule",
    "parse_clock",
    "format_clock",
    "overlapping_windows",
    "shares_by_period",
]

WEEKDAYS: tuple[str, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WORKDAYS = "workdays"  # the calendar's working days: Mon-Fri not on a holiday, plus adjusted working days
MINUTES_PER_DAY = 24 * 60
_MINUTES_PER_WEEK = 7 * MINUTES_PER_DAY


def parse_clock(text: str, *, allow_24: bool) -> int:
    """``"HH:MM"`` as minutes after midnight; ``"24:00"`` (end of day) only when ``allow_24``.

    Raises ``ValueError`` with a message fit for a price-book error.
    """
    parts = text.split(":")
    if len(parts) != 2 or not all(len(p) == 2 and p.isdigit() for p in parts):
        raise ValueError(f"{text!r} is not a time of day HH:MM")
    hours, minutes = int(parts[0]), int(parts[1])
    if hours == 24 and minutes == 0 and allow_24:
        return MINUTES_PER_DAY
    if hours > 23 or minutes > 59:
        raise ValueError(f"{text!r} is not a time of day (00:00 to 23:59{', or 24:00 as an end' if allow_24 else ''})")
    return hours * 60 + minutes


def format_clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True, slots=True)
class Calendar:
    """Public holidays and adjusted working days (local dates), with where they come from."""

    name: str
    holidays: frozenset[date]
    working_days: frozenset[date] = frozenset()
    years: tuple[int, ...] = ()
    source: str = ""
    note: str | None = None

    def is_holiday(self, day: date) -> bool:
        return day in self.holidays

    def is_workday(self, day: date) -> bool:
        """Mon-Fri that is not a holiday, or a weekend day declared an adjusted working day."""
        if day in self.working_days:
            return True
        return day.weekday() < 5 and day not in self.holidays


@dataclass(frozen=True, slots=True)
class Window:
    """One time-of-use window: ``period`` from ``start`` to ``end`` minutes on ``days``.

    ``days`` is a set of weekday numbers (0 = Monday), or ``None`` for every day, or
    ``WORKDAYS`` for the calendar's working days. ``end <= start`` means the window crosses
    midnight; ``end`` may be 1440 (24:00).
    """

    period: str
    start: int
    end: int
    days: frozenset[int] | str | None = None

    @property
    def crosses_midnight(self) -> bool:
        return self.end <= self.start

    def describe(self) -> str:
        if self.days is None:
            days = "every day"
        elif self.days == WORKDAYS:
            days = "working days"
        else:
            assert isinstance(self.days, frozenset)
            days = ",".join(WEEKDAYS[d] for d in sorted(self.days))
        return f"{self.period} {format_clock(self.start)}-{format_clock(self.end)} {days}"


@dataclass(frozen=True, slots=True)
class Schedule:
    """Time-of-use windows in one time zone; instants outside every window get ``default``."""

    name: str
    time_zone: str
    default: str
    windows: tuple[Window, ...]
    calendar: Calendar | None = None
    peak: str = "peak"  # the dearer period: what a workload's peak share puts calls in
    off_peak: str = "off-peak"  # where shifting calls "off-peak" moves them
    source: str = ""
    note: str | None = None
    _zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_zone", ZoneInfo(self.time_zone))

    @property
    def periods(self) -> tuple[str, ...]:
        """Every period this schedule can give, the default first."""
        seen = [self.default]
        for window in self.windows:
            if window.period not in seen:
                seen.append(window.period)
        return tuple(seen)

    def local(self, at: datetime) -> datetime:
        if at.tzinfo is None:
            raise ValueError(f"naive datetime {at!r}: time-of-use needs an aware instant")
        return at.astimezone(self._zone)

    def period_at(self, at: datetime) -> str:
        """The period ``at`` falls in."""
        local = self.local(at)
        day = local.date()
        second = local.hour * 3600 + local.minute * 60 + local.second
        for window in self.windows:
            start, end = window.start * 60, window.end * 60
            if window.crosses_midnight:
                if second >= start and self._applies(window, day):
                    return window.period
                if second < end and self._applies(window, day - timedelta(days=1)):
                    return window.period
            elif start <= second < end and self._applies(window, day):
                return window.period
        return self.default

    def _applies(self, window: Window, day: date) -> bool:
        """Whether ``window`` is open on the local date it starts on."""
        calendar = self.calendar
        if calendar is not None and calendar.is_holiday(day):
            return False
        if window.days is None:
            return True
        if window.days == WORKDAYS:
            return calendar.is_workday(day) if calendar is not None else day.weekday() < 5
        assert isinstance(window.days, frozenset)
        return day.weekday() in window.days

    def week_shares(self) -> dict[str, Fraction]:
        """Each period's share of a plain week's hours (exact fractions summing to 1).

        A plain week has no holidays; working-day windows count as Monday to Friday.
        """
        claimed: dict[int, str] = {}
        for window in self.windows:
            for minute in _claimed(window):
                claimed.setdefault(minute, window.period)
        counts: dict[str, int] = {period: 0 for period in self.periods}
        counts[self.default] += _MINUTES_PER_WEEK - len(claimed)
        for period in claimed.values():
            counts[period] += 1
        return {period: Fraction(count, _MINUTES_PER_WEEK) for period, count in counts.items()}


def _window_weekdays(window: Window) -> tuple[int, ...]:
    if window.days is None:
        return tuple(range(7))
    if window.days == WORKDAYS:
        return tuple(range(5))
    assert isinstance(window.days, frozenset)
    return tuple(sorted(window.days))


def overlapping_windows(schedule: Schedule) -> list[tuple[Window, Window, str]]:
    """Pairs of windows of different periods that claim the same minute of a plain week."""
    found: list[tuple[Window, Window, str]] = []
    windows = schedule.windows
    for i, first in enumerate(windows):
        claimed = _claimed(first)
        for second in windows[i + 1 :]:
            if second.period == first.period:
                continue
            shared = claimed & _claimed(second)
            if shared:
                minute = min(shared)
                where = f"{WEEKDAYS[minute // MINUTES_PER_DAY]} {format_clock(minute % MINUTES_PER_DAY)}"
                found.append((first, second, where))
    return found


def _claimed(window: Window) -> set[int]:
    length = (window.end - window.start) % MINUTES_PER_DAY or MINUTES_PER_DAY
    out: set[int] = set()
    for weekday in _window_weekdays(window):
        first = weekday * MINUTES_PER_DAY + window.start
        out.update((first + offset) % _MINUTES_PER_WEEK for offset in range(length))
    return out


def shares_by_period(schedule: Schedule | None) -> Mapping[str, Fraction]:
    """A schedule's week shares, or ``{"standard": 1}`` for a flat tariff."""
    if schedule is None:
        return {"standard": Fraction(1)}
    return schedule.week_shares()

