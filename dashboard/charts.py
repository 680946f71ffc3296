"""Altair charts for the dashboard: stacked spend per day, ratios over time, shares, a tariff timeline.

Altair, not Plotly: it ships with Streamlit (no extra dependency to install or keep in step),
its charts are declarative Vega-Lite specs that AppTest can read back, and stacked bars with
a shared tooltip are one encoding, not a loop of traces. Money becomes float only here, to
draw it; every figure printed as text stays Decimal.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import altair as alt
import pandas as pd

from dashboard.format import CURRENCY_SYMBOLS

__all__ = ["STATUS_COLOURS", "estimate_bars", "replay_lines", "stacked_daily", "daily_line", "share_bars", "tariff_timeline", "money_axis_format", "drawable"]

_HEIGHT = 280
# Colours that mean something: an outcome's colour says whether it cost nothing, money, or trouble.
STATUS_COLOURS: dict[str, str] = {
    "completed": "#4c78a8",
    "cancelled": "#b0b0b0",
    "disconnected": "#f58518",
    "timeout": "#eeca3b",
    "error": "#e45756",
}


def _day_axis(days: tuple[date, date] | None) -> alt.X:
    """A UTC day axis covering exactly the selected days (so every chart on a page lines up)."""
    scale: Any = alt.Scale(type="utc")
    if days is not None:
        first = datetime.combine(days[0], time(0)) - timedelta(hours=12)
        last = datetime.combine(days[1], time(0)) + timedelta(hours=12)
        scale = alt.Scale(type="utc", domain=[first.isoformat(), last.isoformat()])
    # A UTC day time unit makes each bar one day wide instead of a thin line at midnight.
    return alt.X("utcyearmonthdate(day):T", title=None, scale=scale, axis=alt.Axis(format="%b %d", labelAngle=0))


def _with_timestamps(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["day"] = pd.to_datetime(out["day"])
    return out


def money_axis_format(currency: str | None, largest: float | None = None) -> str:
    """A d3 format for a money axis: ``$,.2f`` for USD; other currencies get the number only.

    Cents say nothing on an axis that tops out under ten cents (a day of cheap calls): then
    four decimals, trailing zeros trimmed.
    """
    places = ".4~f" if largest is not None and abs(largest) < 0.1 else ".2f"
    return f"{CURRENCY_SYMBOLS.get((currency or '').upper(), '')},{places}"


def _largest_stack(frame: pd.DataFrame, value: str) -> float | None:
    if frame.empty:
        return None
    return float(frame.groupby("day")[value].sum().max())


def drawable(frame: pd.DataFrame, *money_columns: str) -> pd.DataFrame:
    """A copy with Decimal money columns as floats (charts only; never for a figure shown as text)."""
    out = frame.copy()
    for column in money_columns:
        out[column] = [float(v) if isinstance(v, Decimal) else (None if v is None else float(v)) for v in out[column]]
    return out


def stacked_daily(
    frame: pd.DataFrame, *, value: str, stack: str, title: str, currency: str | None = None,
    stack_title: str | None = None, order: list[str] | None = None, colours: dict[str, str] | None = None,
    days: tuple[date, date] | None = None,
) -> alt.Chart:
    """Bars per UTC day (column ``day``), stacked by ``stack``; money axis when ``currency`` is given."""
    money_format = money_axis_format(currency, _largest_stack(frame, value)) if currency else None
    axis = alt.Axis(format=money_format) if money_format else alt.Axis(format="~s")
    if colours:
        present = [k for k in colours if k in set(frame[stack])] or list(colours)
        scale: Any = alt.Scale(domain=present, range=[colours[k] for k in present])
    else:
        scale = alt.Scale(domain=order) if order else alt.Undefined
    color = alt.Color(f"{stack}:N", title=stack_title or stack, sort=order, scale=scale)
    value_format = money_format or ",.0f"
    chart: alt.Chart = (
        alt.Chart(_with_timestamps(frame), title=title, height=_HEIGHT)
        .mark_bar()
        .encode(
            x=_day_axis(days),
            y=alt.Y(f"{value}:Q", title=None, axis=axis, stack="zero"),
            color=color,
            order=alt.Order(f"{stack}:N"),
            tooltip=[alt.Tooltip("utcyearmonthdate(day):T", title="day", format="%Y-%m-%d"), alt.Tooltip(f"{stack}:N"),
                     alt.Tooltip(f"{value}:Q", format=value_format)],
        )
    )
    return chart


def daily_line(
    frame: pd.DataFrame, *, value: str, title: str, percent: bool = False, days: tuple[date, date] | None = None
) -> alt.Chart:
    """One line per UTC day (column ``day``); a 0-100% axis for ratios."""
    scale = alt.Scale(domain=[0, 1]) if percent else alt.Undefined
    fmt = ".0%" if percent else ",.0f"
    chart: alt.Chart = (
        alt.Chart(_with_timestamps(frame), title=title, height=_HEIGHT)
        .mark_line(point=True)
        .encode(
            x=_day_axis(days),
            y=alt.Y(f"{value}:Q", title=None, scale=scale, axis=alt.Axis(format=fmt)),
            tooltip=[alt.Tooltip("utcyearmonthdate(day):T", title="day", format="%Y-%m-%d"), alt.Tooltip(f"{value}:Q", format=".1%" if percent else ",.0f")],
        )
    )
    return chart


def share_bars(frame: pd.DataFrame, *, label: str, value: str, title: str, currency: str | None = None) -> alt.Chart:
    """Horizontal bars, largest first: who spends, which error class, which finish reason."""
    fmt = money_axis_format(currency) if currency else ",.0f"
    chart: alt.Chart = (
        alt.Chart(frame, title=title, height=alt.Step(28))
        .mark_bar()
        .encode(
            x=alt.X(f"{value}:Q", title=None, axis=alt.Axis(format=fmt)),
            y=alt.Y(f"{label}:N", title=None, sort="-x"),
            tooltip=[alt.Tooltip(f"{label}:N"), alt.Tooltip(f"{value}:Q", format=fmt)],
        )
    )
    return chart


def tariff_timeline(frame: pd.DataFrame, *, title: str) -> alt.Chart:
    """Periods as bars from ``start`` to ``end`` per ``model``, coloured by the output price."""
    tooltip: list[Any] = [alt.Tooltip("model:N"), alt.Tooltip("start:T", format="%Y-%m-%d %H:%M"),
                          alt.Tooltip("end:T", format="%Y-%m-%d %H:%M"), alt.Tooltip("label:N", title="prices")]
    chart: alt.Chart = (
        alt.Chart(frame, title=title, height=alt.Step(32))
        .mark_bar()
        .encode(
            x=alt.X("start:T", title=None),
            x2="end:T",
            y=alt.Y("model:N", title=None),
            color=alt.Color("output:Q", title="output / 1M", scale=alt.Scale(scheme="blues")),
            tooltip=tooltip,
        )
    )
    return chart


def estimate_bars(frame: pd.DataFrame, *, currency: str) -> alt.Chart:
    """One stacked bar per model: what a workload costs there, by token bucket."""
    fmt = money_axis_format(currency)
    chart: alt.Chart = (
        alt.Chart(drawable(frame, "cost"), title=f"Cost per month ({currency})", height=alt.Step(44))
        .mark_bar()
        .encode(
            x=alt.X("cost:Q", title=None, axis=alt.Axis(format=fmt), stack="zero"),
            y=alt.Y("model:N", title=None),
            color=alt.Color("bucket:N", title="bucket", sort=["cache hit", "cache miss", "output"]),
            order=alt.Order("bucket:N"),
            tooltip=[alt.Tooltip("model:N"), alt.Tooltip("bucket:N"), alt.Tooltip("cost:Q", format=fmt)],
        )
    )
    return chart


def replay_lines(frame: pd.DataFrame, *, currency: str) -> alt.Chart:
    """Actual against projected cost per UTC day."""
    fmt = money_axis_format(currency)
    chart: alt.Chart = (
        alt.Chart(_with_timestamps(drawable(frame, "cost")), title=f"Actual and projected cost per day ({currency})",
                  height=_HEIGHT)
        .mark_line(point=True)
        .encode(
            x=_day_axis(None),
            y=alt.Y("cost:Q", title=None, axis=alt.Axis(format=fmt)),
            color=alt.Color("series:N", title=None, sort=["actual", "projected"]),
            tooltip=[alt.Tooltip("utcyearmonthdate(day):T", title="day", format="%Y-%m-%d"), alt.Tooltip("series:N"),
                     alt.Tooltip("cost:Q", format=fmt)],
        )
    )
    return chart
