"""The nightly report: what one day, week or month cost, against the period before it.

``build_report`` gathers everything from ``collector.queries`` (one query module for reports
and the dashboard) into a ``Report``: plain data, Decimal money, nothing formatted.
``collector.report_render`` turns it into Markdown, CSV, JSON or a self-contained HTML page.

Periods are calendar spans in a time zone (UTC unless ``--tz``), ending on ``--date``:

* ``day``: that day; the previous period is the day before.
* ``week``: the 7 days ending on that day (run on Monday for "yesterday": the ISO week);
  the previous period is the 7 days before.
* ``month``: the month up to and including that day (the whole month on its last day);
  the previous period is the same days of the month before (all of it, if shorter).

A UTC report over whole days reads the daily rollup; another zone reads the raw ledger.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import Engine

from collector.budgets import BudgetStatus, evaluate
from collector.errors import UsageError
from collector.queries import (
    Filters,
    MonthForecast,
    Totals,
    aggregate,
    breakdown,
    month_forecast,
    require_tag_key,
    spend_by_day,
    top_spenders,
    totals,
    uses_rollup,
)

__all__ = [
    "PERIODS",
    "GROUPS",
    "Period",
    "BreakdownRow",
    "DailyRow",
    "TopRow",
    "Report",
    "parse_date",
    "parse_tz",
    "parse_group_by",
    "make_period",
    "previous_period",
    "build_report",
    "change_percent",
]

PERIODS: tuple[str, ...] = ("day", "week", "month")
# Plus tag:<key>. ``user`` (the request body's end-user id) is read from the ledger itself: the
# daily rollup does not keep it (see collector.queries.RAW_ONLY_DIMS).
GROUPS: tuple[str, ...] = ("model", "status", "key", "user")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_PERCENT = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Period:
    """A span of whole local days ``[first, last]`` in ``tz``, and the UTC instants that bound it."""

    kind: str
    first: date
    last: date
    tz: str
    since: datetime  # UTC, inclusive
    until: datetime  # UTC, exclusive

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1

    @property
    def label(self) -> str:
        if self.first == self.last:
            return self.first.isoformat()
        return f"{self.first.isoformat()} to {self.last.isoformat()}"


@dataclass(frozen=True, slots=True)
class BreakdownRow:
    groups: tuple[str | None, ...]  # one value per group-by item
    currency: str | None
    calls: int
    tokens: dict[str, int]  # cache_hit, cache_miss, output, reasoning
    cost: Decimal
    previous_cost: Decimal
    change: Decimal
    change_percent: Decimal | None  # None when the previous period cost nothing


@dataclass(frozen=True, slots=True)
class DailyRow:
    day: date  # local day in the report's zone
    currency: str
    calls: int
    cost: Decimal


@dataclass(frozen=True, slots=True)
class TopRow:
    group: str | None
    currency: str
    calls: int
    cost: Decimal
    share: Decimal


@dataclass(frozen=True, slots=True)
class Report:
    """Everything a report shows. ``generated_at`` is None unless asked for (it is the only
    field that differs between two runs over the same ledger)."""

    title: str
    period: Period
    previous: Period
    filters: dict[str, str]  # tag filters the report was limited to
    group_by: tuple[str, ...]
    top_by: str
    totals: Totals
    previous_totals: Totals
    breakdown: tuple[BreakdownRow, ...]
    daily: tuple[DailyRow, ...]
    top_spenders: tuple[TopRow, ...]
    month: tuple[MonthForecast, ...]
    budgets: tuple[BudgetStatus, ...]
    source: str  # "rollup" or "ledger": which table answered
    generated_at: datetime | None = None


# -- parsing ---------------------------------------------------------------------------------------


def parse_tz(name: str | None) -> tuple[str, tzinfo]:
    """``None``/``UTC`` or an IANA zone name (``Europe/Paris``)."""
    if name is None or name.strip().upper() in ("UTC", "Z", "ETC/UTC"):
        return "UTC", timezone.utc
    try:
        return name, ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {name!r} (use an IANA name such as Europe/Paris, or UTC)") from None


def parse_date(text: str, today: date) -> date:
    """``yesterday``, ``today`` or ``YYYY-MM-DD`` (``today`` is the caller's local date)."""
    value = text.strip().lower()
    if value == "yesterday":
        return today - timedelta(days=1)
    if value == "today":
        return today
    if _DATE.match(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise UsageError(f"unknown date {text!r}: use yesterday, today or YYYY-MM-DD")


def parse_group_by(text: str | None, engine: Engine | None = None) -> tuple[str, ...]:
    """``model,tag:team`` as a tuple; every tag key must be one some call carries (checked when ``engine``)."""
    if not text:
        return ()
    items: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.startswith("tag:"):
            if not item[4:]:
                raise UsageError("--group-by tag: needs a key, e.g. tag:team")
            if engine is not None:
                require_tag_key(engine, item[4:])
        elif item not in GROUPS:
            raise UsageError(f"cannot group by {item!r}; choose from {', '.join(GROUPS)} or tag:<key>")
        if item in items:
            raise UsageError(f"--group-by names {item!r} twice")
        items.append(item)
    return tuple(items)


# -- periods ---------------------------------------------------------------------------------------


def _instant(day: date, zone: tzinfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(timezone.utc)


def _span(kind: str, first: date, last: date, tz_name: str, zone: tzinfo) -> Period:
    return Period(kind=kind, first=first, last=last, tz=tz_name, since=_instant(first, zone),
                  until=_instant(last + timedelta(days=1), zone))


def make_period(kind: str, day: date, tz_name: str = "UTC", zone: tzinfo = timezone.utc) -> Period:
    """The ``kind`` period ending on ``day`` (see the module docstring)."""
    if kind == "day":
        return _span(kind, day, day, tz_name, zone)
    if kind == "week":
        return _span(kind, day - timedelta(days=6), day, tz_name, zone)
    if kind == "month":
        return _span(kind, day.replace(day=1), day, tz_name, zone)
    raise UsageError(f"unknown period {kind!r}; choose day, week or month")


def previous_period(period: Period, zone: tzinfo = timezone.utc) -> Period:
    """The span the report compares against (same length, just before; for a month, the same days)."""
    if period.kind == "month":
        year, month = (period.first.year - 1, 12) if period.first.month == 1 else (period.first.year,
                                                                                   period.first.month - 1)
        first = date(year, month, 1)
        length = min(period.days, calendar.monthrange(year, month)[1])
        if period.last.day == calendar.monthrange(period.last.year, period.last.month)[1]:
            length = calendar.monthrange(year, month)[1]  # a whole month compares with the whole month before
        return _span("month", first, first + timedelta(days=length - 1), period.tz, zone)
    length = period.days
    last = period.first - timedelta(days=1)
    return _span(period.kind, last - timedelta(days=length - 1), last, period.tz, zone)


def change_percent(now: Decimal, before: Decimal) -> Decimal | None:
    """(now - before) / before in percent, 2 places; None when ``before`` is 0."""
    if not before:
        return None
    return ((now - before) * 100 / before).quantize(_PERCENT, ROUND_HALF_EVEN)


# -- building --------------------------------------------------------------------------------------


def _tokens(row: dict[str, Any]) -> dict[str, int]:
    return {
        "cache_hit": int(row["prompt_cache_hit_tokens"]),
        "cache_miss": int(row["prompt_cache_miss_tokens"]),
        "output": int(row["completion_tokens"]),
        "reasoning": int(row["reasoning_tokens"]),
    }


def _breakdown(engine: Engine, current: Filters, before: Filters, group_by: Sequence[str]) -> tuple[BreakdownRow, ...]:
    if not group_by:
        return ()
    now = breakdown(engine, current, list(group_by))
    then = breakdown(engine, before, list(group_by))
    names = list(group_by)
    previous = {
        (tuple(r[n] for n in names), r["currency"]): r["cost"] for r in then.to_dict("records")
    }
    rows: list[BreakdownRow] = []
    seen: set[tuple[tuple[Any, ...], Any]] = set()
    for r in now.to_dict("records"):
        key = (tuple(r[n] for n in names), r["currency"])
        seen.add(key)
        was = previous.get(key, Decimal(0))
        rows.append(BreakdownRow(groups=key[0], currency=r["currency"], calls=int(r["calls"]), tokens=_tokens(r),
                                 cost=r["cost"], previous_cost=was, change=r["cost"] - was,
                                 change_percent=change_percent(r["cost"], was)))
    for key, was in previous.items():  # groups that spent before and nothing now still show, at 0
        if key not in seen:
            rows.append(BreakdownRow(groups=key[0], currency=key[1], calls=0,
                                     tokens=dict.fromkeys(("cache_hit", "cache_miss", "output", "reasoning"), 0),
                                     cost=Decimal(0), previous_cost=was, change=-was,
                                     change_percent=change_percent(Decimal(0), was)))

    def order(row: BreakdownRow) -> tuple[Any, ...]:
        return (row.currency or "", -row.cost, -row.previous_cost,
                tuple((0, "") if g is None else (1, g) for g in row.groups))

    return tuple(sorted(rows, key=order))


def _daily(engine: Engine, filters: Filters, period: Period, zone: tzinfo) -> tuple[DailyRow, ...]:
    found: dict[tuple[date, str], tuple[int, Decimal]] = {}
    if period.tz == "UTC":
        frame = spend_by_day(engine, filters)
        for r in frame.to_dict("records"):
            if r["currency"] is not None:
                found[(r["day"], r["currency"])] = (int(r["calls"]), r["cost"])
    else:
        day = period.first
        while day <= period.last:
            frame = aggregate(engine, filters.between(_instant(day, zone), _instant(day + timedelta(days=1), zone)),
                              ["currency"])
            for r in frame.to_dict("records"):
                if r["currency"] is not None:
                    found[(day, r["currency"])] = (int(r["calls"]), r["cost"])
            day += timedelta(days=1)
    currencies = sorted({currency for _, currency in found})
    rows = []
    for currency in currencies:
        day = period.first
        while day <= period.last:
            calls, cost = found.get((day, currency), (0, Decimal(0)))
            rows.append(DailyRow(day=day, currency=currency, calls=calls, cost=cost))
            day += timedelta(days=1)
    return tuple(rows)


def build_report(
    engine: Engine,
    *,
    day: date,
    period: str = "day",
    tz: str | None = None,
    group_by: Sequence[str] = (),
    tags: dict[str, str] | None = None,
    top_by: str = "key",
    top_limit: int = 10,
    with_budgets: bool = True,
    generated_at: datetime | None = None,
) -> Report:
    """The report for the ``period`` ending on local ``day`` (see the module docstring)."""
    tz_name, zone = parse_tz(tz)
    current = make_period(period, day, tz_name, zone)
    before = previous_period(current, zone)
    scope = dict(sorted((tags or {}).items()))
    for key in scope:
        require_tag_key(engine, key)
    base = Filters(tags={key: (value,) for key, value in scope.items()})
    now_filters = base.between(current.since, current.until)
    before_filters = base.between(before.since, before.until)
    now_totals = totals(engine, now_filters)
    month = month_forecast(engine, base, current.until, tz=zone)
    statuses = evaluate(engine, current.until, tz=zone) if with_budgets else []
    top = top_spenders(engine, now_filters, top_by, limit=top_limit)
    title = f"DeepSeek spend, {current.kind} of {current.label}" + ("" if tz_name == "UTC" else f" ({tz_name})")
    return Report(
        title=title,
        period=current,
        previous=before,
        filters=scope,
        group_by=tuple(group_by),
        top_by=top_by,
        totals=now_totals,
        previous_totals=totals(engine, before_filters),
        breakdown=_breakdown(engine, now_filters, before_filters, group_by),
        daily=_daily(engine, now_filters, current, zone),
        top_spenders=tuple(
            TopRow(group=r["group"], currency=r["currency"], calls=int(r["calls"]), cost=r["cost"], share=r["share"])
            for r in top.to_dict("records")
        ),
        month=tuple(month[c] for c in sorted(month)),
        budgets=tuple(statuses),
        source="rollup" if uses_rollup(engine, now_filters) else "ledger",
        generated_at=generated_at,
    )

