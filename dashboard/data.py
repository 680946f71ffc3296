"""Cached loaders: the only place the dashboard asks ``collector.queries`` for data.

``st.cache_resource`` keeps one read-only engine per ledger URL for the whole server;
``st.cache_data(ttl=...)`` keeps query results per (URL, filters) for a minute, so moving
between pages or widgets does not re-run SQL, and a minute later new calls show up.
Loaders are keyed by the URL string and a ``Selection`` (both hashable); the engine is
fetched inside. Everything returned is plain data (DataFrames, Decimals), ready to draw.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pandas as pd
import streamlit as st
from sqlalchemy.engine import Engine

from collector import projection, queries
from collector.config import database_url
from collector.pricebook import PriceBook, Tariff, book_path_from_env, load_book
from dashboard import format as fmt
from dashboard.engine import LedgerState, Probe, describe_error, open_read_only, probe
from dashboard.selection import ALL_TAGS, Selection

__all__ = [
    "CACHE_TTL_S",
    "ENV_NOW",
    "now",
    "ledger_url",
    "engine",
    "ledger_probe",
    "to_filters",
    "filter_choices",
    "latency",
    "finish_reasons",
    "error_classes",
    "call_count",
    "calls_page",
    "CALL_SORT_KEYS",
    "column_label",
]

CACHE_TTL_S = 60
PROBE_TTL_S = 10  # a ledger that fills up (or comes back) shows within seconds
# Freezes "now" for the tests and the benchmark (ISO 8601); unset in real use.
ENV_NOW = "DSMETER_DASHBOARD_NOW"
CALL_SORT_KEYS = queries.CALL_SORT_KEYS

_COLUMN_LABELS = {
    "started_at": "Started (UTC)",
    "cost": "Cost",
    "duration_ms": "Duration",
    "ttft_ms": "Time to first token",
    "completion_tokens": "Output tokens",
    "prompt_cache_miss_tokens": "Cache-miss tokens",
}


def column_label(name: str) -> str:
    return _COLUMN_LABELS.get(name, name.replace("_", " "))


def now() -> datetime:
    """The current time, aware UTC (``DSMETER_DASHBOARD_NOW`` pins it for reproducible runs)."""
    pinned = os.environ.get(ENV_NOW)
    if pinned:
        moment = datetime.fromisoformat(pinned)
        return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return datetime.now(timezone.utc)


def ledger_url() -> str:
    """The ledger this dashboard reads: ``DSMETER_DATABASE_URL`` (set by ``dsmeter dashboard``), else the default."""
    return database_url(None)


def _dispose(engine: Engine) -> None:
    engine.dispose()


@st.cache_resource(show_spinner=False, on_release=_dispose)
def _engine(url: str) -> Engine:
    return open_read_only(url)


def engine() -> Engine:
    return _engine(ledger_url())


@st.cache_data(ttl=PROBE_TTL_S, show_spinner=False)
def _probe(url: str) -> Probe:
    return probe(_engine(url), url)


def ledger_probe() -> Probe:
    """Whether the ledger can be read and holds calls (cached for a few seconds)."""
    url = ledger_url()
    try:
        return _probe(url)
    except Exception as error:  # noqa: BLE001 - a bad URL must be one message on screen, never a traceback
        return Probe(LedgerState.UNREACHABLE, f"cannot open the ledger: {error}", url)


def forget_probe() -> None:
    """Drop the cached probe, so the next run asks the database again."""
    _probe.clear()


def lost(probe_before: Probe, error: BaseException) -> Probe:
    """The state to show when a query failed on a ledger the last probe found readable."""
    return Probe(LedgerState.UNREACHABLE,
                 f"lost the ledger database {probe_before.url}: {describe_error(error, ledger_url())}",
                 probe_before.url)


def to_filters(selection: Selection) -> queries.Filters:
    """The query layer's filters for what the sidebar shows."""
    tags: dict[str, tuple[str, ...]] = {}
    if selection.tag_key != ALL_TAGS:
        tags[selection.tag_key] = selection.tag_values
    return queries.Filters(
        since=selection.since, until=selection.until, models=selection.models, statuses=selection.statuses, tags=tags
    )


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _filter_choices(url: str) -> queries.FilterChoices:
    return queries.filter_choices(_engine(url))


def filter_choices() -> queries.FilterChoices:
    return _filter_choices(ledger_url())


# -- Calls page --------------------------------------------------------------------------------


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _latency(url: str, selection: Selection) -> pd.DataFrame:
    return queries.latency_percentiles(_engine(url), to_filters(selection))


def latency(selection: Selection) -> pd.DataFrame:
    """TTFT and duration percentiles per model and thinking mode (``queries.latency_percentiles``)."""
    return _latency(ledger_url(), selection)


def latency_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The percentile frame as people read it: thinking as a word, milliseconds with units."""
    shown = pd.DataFrame({
        "Model": frame["model"].fillna("(unknown)"),
        "Thinking": frame["thinking"].map({True: "thinking", False: "non-thinking"}).fillna("unknown"),
        "Calls": [fmt.count(v) for v in frame["duration_ms_calls"]],
    })
    for metric, label in (("ttft_ms", "TTFT"), ("duration_ms", "Duration")):
        for p in queries.PERCENTILES:
            shown[f"{label} p{p}"] = [fmt.milliseconds(None if pd.isna(v) else float(v)) for v in frame[f"{metric}_p{p}"]]
    return shown


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _finish_reasons(url: str, selection: Selection) -> pd.DataFrame:
    return queries.finish_reasons(_engine(url), to_filters(selection))


def finish_reasons(selection: Selection) -> pd.DataFrame:
    return _finish_reasons(ledger_url(), selection)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _error_classes(url: str, selection: Selection) -> pd.DataFrame:
    return queries.error_classes(_engine(url), to_filters(selection))


def error_classes(selection: Selection) -> pd.DataFrame:
    return _error_classes(ledger_url(), selection)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _calls_page(url: str, selection: Selection, sort_by: str, descending: bool, limit: int,
                offset: int) -> tuple[pd.DataFrame, int]:
    return queries.list_calls(_engine(url), to_filters(selection), sort_by=sort_by, descending=descending,
                              limit=limit, offset=offset)


def calls_page(selection: Selection, sort_by: str, descending: bool, limit: int, offset: int) -> pd.DataFrame:
    """One page of matching calls, sorted on the server (``queries.list_calls``)."""
    frame, _ = _calls_page(ledger_url(), selection, sort_by, descending, limit, offset)
    return frame


def call_count(selection: Selection) -> int:
    """How many calls match (the first page's query counts them too, so this costs nothing extra)."""
    _, total = _calls_page(ledger_url(), selection, "started_at", True, 1, 0)
    return total


def calls_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Ledger rows for reading: money with currency, tokens with units, tags as ``key=value``."""
    return pd.DataFrame({
        "Started (UTC)": [t.strftime("%Y-%m-%d %H:%M:%S") for t in frame["started_at"]],
        "Model": frame["model"],
        "Thinking": frame["thinking"].map({True: "yes", False: "no"}).fillna(""),
        "Status": frame["status"],
        "HTTP": [("" if pd.isna(v) else str(int(v))) for v in frame["http_status"]],
        "Finish": frame["finish_reason"].fillna(""),
        "Error": frame["error_type"].fillna(""),
        "Cache hit": [fmt.tokens(_int(v)) for v in frame["prompt_cache_hit_tokens"]],
        "Cache miss": [fmt.tokens(_int(v)) for v in frame["prompt_cache_miss_tokens"]],
        "Output": [fmt.tokens(_int(v)) for v in frame["completion_tokens"]],
        "Reasoning": [fmt.tokens(_int(v)) for v in frame["reasoning_tokens"]],
        "Estimated": frame["usage_estimated"].map({True: "estimated", False: ""}),
        "Cost": [fmt.money_or_unpriced(c, cur, places=6) for c, cur in zip(frame["cost"], frame["currency"])],
        "Tariff": frame["tariff_id"].fillna(""),
        "TTFT": [fmt.milliseconds(None if pd.isna(v) else float(v)) for v in frame["ttft_ms"]],
        "Duration": [fmt.milliseconds(None if pd.isna(v) else float(v)) for v in frame["duration_ms"]],
        "Key": frame["key_fingerprint"].fillna(""),
        "User": frame["user"].fillna(""),
        "Tags": [", ".join(f"{k}={v}" for k, v in sorted((tags or {}).items())) for tags in frame["tags"]],
        "Request id": [str(v) for v in frame["request_id"]],
    })


def _int(value: object) -> int | None:
    return None if value is None or (isinstance(value, float) and pd.isna(value)) else int(value)  # type: ignore[call-overload]


# -- Overview ----------------------------------------------------------------------------------

BUCKETS: tuple[str, ...] = ("cache hit", "cache miss", "output")
_BUCKET_COSTS = {"cache hit": "cost_cache_hit", "cache miss": "cost_cache_miss", "output": "cost_output"}
RUN_RATE_DAYS = queries.RUN_RATE_DAYS
_CHART_DIMS = ["day", "model", "status", "currency"]


@dataclass(frozen=True, slots=True)
class MoneyFigures:
    today: Decimal
    month_to_date: Decimal
    forecast: Decimal | None
    in_range: Decimal


@dataclass(frozen=True, slots=True)
class Headline:
    """The overview's figures: what a reader looks at first, drawn before any chart."""

    currencies: tuple[str, ...]
    money: dict[str, MoneyFigures]  # per currency
    calls: int
    errors: int
    cancels: int
    unpriced_calls: int
    cache_hit_ratio: float | None
    cache_saved: dict[str, Decimal]  # per currency
    tokens: dict[str, int]  # queries.TOKEN_BUCKETS: cache_hit, cache_miss, output, reasoning
    source: str  # "rollup" or "ledger": which table answered


@dataclass(frozen=True, slots=True)
class DailyCharts:
    """The overview's charts: one frame per chart, one row per UTC day and series."""

    spend_by_day_model: pd.DataFrame  # day, model, currency, spend
    spend_by_day_bucket: pd.DataFrame  # day, bucket, currency, spend
    cache_hit_by_day: pd.DataFrame  # day, cache_hit_ratio (every selected day; NaN without prompt tokens)
    calls_by_day_status: pd.DataFrame  # day, status, calls


def _as_of() -> datetime:
    return now().replace(second=0, microsecond=0)


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _headline(url: str, selection: Selection, as_of: datetime) -> Headline:
    engine = _engine(url)
    filters = to_filters(selection)
    totals = queries.totals(engine, filters)
    start_of_today = datetime.combine(as_of.date(), datetime.min.time(), tzinfo=timezone.utc)
    tomorrow = start_of_today + timedelta(days=1)
    today = queries.spend_totals(engine, filters.between(start_of_today, tomorrow))
    month_to_date = queries.spend_totals(engine, filters.between(start_of_today.replace(day=1), tomorrow))
    # Whole UTC days are what the rollup answers, so the forecast is made as of the start of
    # today (the month's complete days and the run rate of the last complete days). On the 1st
    # that instant closes the previous month, so it is made as of now (only today's hours, read raw).
    month = queries.month_forecast(engine, filters, start_of_today if as_of.day > 1 else as_of)
    return _headline_from(totals, today, month_to_date, month)


def headline(selection: Selection) -> Headline:
    """The overview's figures from the aggregate queries (the rollup when built), cached a minute."""
    return _headline(ledger_url(), selection, _as_of())


def _headline_from(
    totals: queries.Totals,
    today: dict[str, Decimal],
    month_to_date: dict[str, Decimal],
    month: dict[str, queries.MonthForecast],
) -> Headline:
    """Shape the query layer's answers for drawing: no figure is computed here, only picked."""
    currencies = tuple(sorted(set(totals.cost) | set(month) | set(month_to_date))) or ("USD",)
    money: dict[str, MoneyFigures] = {}
    for currency in currencies:
        forecast = month.get(currency)
        in_range = totals.cost.get(currency)
        money[currency] = MoneyFigures(
            today=today.get(currency, Decimal(0)),
            month_to_date=month_to_date.get(currency, Decimal(0)),
            forecast=forecast.forecast if forecast else None,
            in_range=in_range.total if in_range else Decimal(0),
        )
    return Headline(
        currencies=currencies, money=money, calls=totals.calls, errors=totals.errors, cancels=totals.cancels,
        unpriced_calls=totals.unpriced_calls, cache_hit_ratio=totals.cache_hit_ratio,
        cache_saved=totals.cache_saved, tokens=dict(totals.tokens), source=totals.source,
    )


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _daily_charts(url: str, selection: Selection) -> DailyCharts:
    daily = queries.aggregate(_engine(url), to_filters(selection), _CHART_DIMS)
    return _charts_from(selection, daily)


def daily_charts(selection: Selection) -> DailyCharts:
    """The overview's per-day charts from one ``queries.aggregate`` (day x model x status x currency)."""
    return _daily_charts(ledger_url(), selection)


def _charts_from(selection: Selection, daily: pd.DataFrame) -> DailyCharts:
    """Regroup one aggregate frame into the overview's charts (sums of the query layer's sums)."""
    priced = daily[daily["currency"].notna()]
    by_model = (priced.groupby(["day", "model", "currency"], as_index=False, dropna=False)["cost"]
                .agg(_decimal_sum).rename(columns={"cost": "spend"}))
    by_model["model"] = by_model["model"].fillna("(unknown)")
    parts = [
        priced.groupby(["day", "currency"], as_index=False)[column].agg(_decimal_sum)
        .rename(columns={column: "spend"}).assign(bucket=bucket)
        for bucket, column in _BUCKET_COSTS.items()
    ]
    by_bucket = pd.concat(parts, ignore_index=True)[["day", "bucket", "currency", "spend"]]
    per_day = daily.groupby("day", as_index=False)[["prompt_cache_hit_tokens", "prompt_cache_miss_tokens"]].sum()
    prompt = per_day["prompt_cache_hit_tokens"] + per_day["prompt_cache_miss_tokens"]
    per_day["cache_hit_ratio"] = (per_day["prompt_cache_hit_tokens"] / prompt.where(prompt > 0)).astype("float64")
    every_day = pd.DataFrame({"day": list(pd.date_range(selection.start, selection.end, freq="D").date)})
    ratio_by_day = every_day.merge(per_day[["day", "cache_hit_ratio"]], on="day", how="left")
    by_status = daily.groupby(["day", "status"], as_index=False)["calls"].sum()
    return DailyCharts(spend_by_day_model=by_model, spend_by_day_bucket=by_bucket, cache_hit_by_day=ratio_by_day,
                       calls_by_day_status=by_status)


def _decimal_sum(values: pd.Series) -> Decimal:
    return sum(values, Decimal(0))


# -- Chargeback --------------------------------------------------------------------------------

KEY_FINGERPRINT = "key"  # queries' name for grouping by API key fingerprint
END_USER = "user"  # queries' name for grouping by the request body's `user` field
_TAG = "tag:"
CHARGEBACK_LIMIT = 10_000  # groups per currency; more than any table a person reads


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _has_users(url: str, selection: Selection) -> bool:
    return queries.has_users(_engine(url), to_filters(selection))


def chargeback_dimensions(selection: Selection) -> list[str]:
    """What spend can be charged back by: every tag key in the ledger, the API key fingerprint, and the
    end user when some call the sidebar selects carries one (apps that never send `user` are not offered it)."""
    dimensions = [f"{_TAG}{key}" for key in filter_choices().tag_values] + [KEY_FINGERPRINT]
    if _has_users(ledger_url(), selection):
        dimensions.append(END_USER)
    return dimensions


def dimension_label(dimension: str) -> str:
    """The dimension's name in chart titles, table headers and the CSV header."""
    if dimension == KEY_FINGERPRINT:
        return "API key (fingerprint)"
    if dimension == END_USER:
        return "End user"
    return dimension.removeprefix(_TAG)


def dimension_choice(dimension: str) -> str:
    """The dimension as the page offers it: the end user says where it comes from."""
    if dimension == END_USER:
        return "End user (request `user` field)"
    return dimension_label(dimension)


def reads_ledger(dimension: str) -> bool:
    """True when grouping by ``dimension`` reads the raw ledger, never the daily rollup (``queries.RAW_ONLY_DIMS``)."""
    return dimension in queries.RAW_ONLY_DIMS


@dataclass(frozen=True, slots=True)
class Chargeback:
    dimension: str
    currencies: tuple[str, ...]
    totals: dict[str, Decimal]  # per currency
    last_day: date
    previous_day: date
    # group, currency, calls, spend, share (Decimal), last_day, previous_day (Decimal), day_over_day (Decimal | None)
    rows: pd.DataFrame


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _chargeback(url: str, selection: Selection, dimension: str) -> Chargeback:
    engine = _engine(url)
    filters = to_filters(selection)
    top = queries.top_spenders(engine, filters, dimension, limit=CHARGEBACK_LIMIT)
    last, previous = selection.end, selection.end - timedelta(days=1)
    two_days = filters.between(datetime.combine(previous, datetime.min.time(), tzinfo=timezone.utc),
                               datetime.combine(last + timedelta(days=1), datetime.min.time(), tzinfo=timezone.utc))
    daily = queries.spend_by_day(engine, two_days, dimension)
    spend_on: dict[tuple[date, object, str], Decimal] = {
        (day, group, currency): cost
        for day, group, currency, cost in zip(daily["day"], daily["group"], daily["currency"], daily["cost"])
        if currency is not None
    }
    rows = []
    for group, currency, calls, cost, share in zip(top["group"], top["currency"], top["calls"], top["cost"],
                                                   top["share"]):
        on_last = spend_on.get((last, group, currency), Decimal(0))
        on_previous = spend_on.get((previous, group, currency), Decimal(0))
        change = (on_last - on_previous) / on_previous if on_previous else None
        rows.append({
            "group": _group_label(dimension, group), "currency": currency, "calls": int(calls), "spend": cost,
            "share": share, "last_day": on_last, "previous_day": on_previous, "day_over_day": change,
        })
    frame = pd.DataFrame(rows, columns=["group", "currency", "calls", "spend", "share", "last_day", "previous_day",
                                        "day_over_day"])
    spent = queries.spend_totals(engine, filters)
    return Chargeback(dimension=dimension, currencies=tuple(sorted(spent)), totals=spent, last_day=last,
                      previous_day=previous, rows=frame)


def _group_label(dimension: str, group: object) -> str:
    if group is None:
        if dimension == KEY_FINGERPRINT:
            return "(no key)"
        if dimension == END_USER:
            return "(no user)"
        return f"(no {dimension_label(dimension)})"
    return str(group)


def chargeback(selection: Selection, dimension: str) -> Chargeback:
    """Spend per group of ``dimension`` (``tag:<key>``, ``key`` or ``user``) with shares and day-over-day change."""
    return _chargeback(ledger_url(), selection, dimension)


def chargeback_csv(table: Chargeback) -> bytes:
    """The chargeback table as CSV with exact amounts (no rounding, no currency symbols): for spreadsheets."""
    out = table.rows.assign(
        spend=[_plain(v) for v in table.rows["spend"]],
        share=[_plain(v) for v in table.rows["share"]],
        last_day=[_plain(v) for v in table.rows["last_day"]],
        previous_day=[_plain(v) for v in table.rows["previous_day"]],
        day_over_day=["" if v is None else _plain(v.quantize(Decimal("0.0001"))) for v in table.rows["day_over_day"]],
    ).rename(columns={"group": dimension_label(table.dimension), "last_day": f"spend_{table.last_day.isoformat()}",
                      "previous_day": f"spend_{table.previous_day.isoformat()}"})
    text: str = out.to_csv(index=False)
    return text.encode("utf-8")


def _plain(value: Decimal) -> str:
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# -- Price book --------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def _price_book(path: str | None) -> PriceBook:
    return load_book(path)


def price_book() -> PriceBook:
    """The book every command prices with: ``DSMETER_PRICES`` if set, else the shipped one (cached)."""
    return _price_book(book_path_from_env())


def tariffs_in_force(book: PriceBook, at: datetime, models: Sequence[str] = ()) -> pd.DataFrame:
    """One row per (model, period, currency) of the tariffs in force at ``at``, straight from the book.

    Columns: model, period, currency, hit, miss, output (Decimal per ``per_tokens``), list_hit,
    list_miss, list_output (a promotion's list prices, else None), promotion, schedule,
    start, end, tariff, source, note.
    """
    rows = []
    for model in book.models_at(at):
        if models and model not in models:
            continue
        found = book.resolve(model, at)
        if found is None:
            continue
        tariff = found.tariff
        for period in tariff.periods:
            for currency in tariff.currencies:
                rates = tariff.rates(period, currency)
                if rates is None:
                    continue
                listed = tariff.rates(period, currency, list_prices=True) if tariff.list_prices else None
                rows.append({
                    "model": model, "period": period, "currency": currency,
                    "hit": rates.hit, "miss": rates.miss, "output": rates.output,
                    "list_hit": listed.hit if listed else None, "list_miss": listed.miss if listed else None,
                    "list_output": listed.output if listed else None,
                    "promotion": tariff.promotion, "schedule": _schedule_text(tariff),
                    "start": tariff.start, "end": tariff.end, "tariff": tariff.id,
                    "source": tariff.source, "note": tariff.note,
                })
    return pd.DataFrame(rows, columns=["model", "period", "currency", "hit", "miss", "output", "list_hit",
                                       "list_miss", "list_output", "promotion", "schedule", "start", "end",
                                       "tariff", "source", "note"])


def _schedule_text(tariff: Tariff) -> str:
    schedule = tariff.schedule
    if schedule is None:
        return "one price all day"
    windows = "; ".join(window.describe() for window in schedule.windows)
    holidays = f", {schedule.calendar.name} off-peak" if schedule.calendar is not None else ""
    return f"{windows} ({schedule.time_zone}; otherwise {schedule.default}{holidays})"


def aliases_in_force(book: PriceBook, at: datetime) -> pd.DataFrame:
    rows = [{"name": a.name, "billed as": a.model, "since": a.start, "until": a.end, "source": a.source,
             "note": a.note} for a in book.aliases_at(at)]
    return pd.DataFrame(rows, columns=["name", "billed as", "since", "until", "source", "note"])


def tariff_history(book: PriceBook, models: Sequence[str], until: datetime) -> pd.DataFrame:
    """Every entry for ``models`` in the book's currency, oldest first, with the dearest period's prices.

    An entry still in force is drawn up to ``until``. Columns: model, start, end, period, hit,
    miss, output, promotion, label, tariff, source, note.
    """
    rows = []
    for model in models:
        for tariff in book.tariffs_of(model):
            currency = book.currency if book.currency in tariff.currencies else tariff.currencies[0]
            period = tariff.schedule.peak if tariff.schedule is not None else tariff.periods[0]
            rates = tariff.rates(period, currency) or tariff.rates(tariff.periods[0], currency)
            if rates is None:
                continue
            label = (f"{fmt.rate(rates.hit, currency)} / {fmt.rate(rates.miss, currency)} / "
                     f"{fmt.rate(rates.output, currency)}" + (f" ({period})" if tariff.schedule else ""))
            rows.append({
                "model": model, "start": tariff.start, "end": tariff.end or max(until, tariff.start),
                "period": period, "hit": rates.hit, "miss": rates.miss, "output": rates.output,
                "promotion": tariff.promotion, "label": label, "tariff": tariff.id, "source": tariff.source,
                "note": tariff.note, "open": tariff.end is None,
            })
    return pd.DataFrame(rows, columns=["model", "start", "end", "period", "hit", "miss", "output", "promotion",
                                       "label", "tariff", "source", "note", "open"])


def book_models(book: PriceBook) -> list[str]:
    return sorted({tariff.model for tariff in book.tariffs})


# -- What-if -----------------------------------------------------------------------------------


def plannable_models(book: PriceBook) -> list[str]:
    """Every name the book can price (models and aliases), for the planner's model lists."""
    return sorted({tariff.model for tariff in book.tariffs} | {alias.name for alias in book.aliases})


@st.cache_data(ttl=CACHE_TTL_S, show_spinner=False)
def _whatif_estimate(
    _book: PriceBook, book_digest: str, models: tuple[str, ...], at: datetime, list_prices: bool,
    workload: projection.Workload,
) -> list[projection.ModelEstimate]:
    # The book is not hashed (leading underscore); its digest names it in the cache key.
    return projection.estimate(workload, _book, list(models), at, list_prices=list_prices)


def whatif_estimate(
    book: PriceBook, models: Sequence[str], at: datetime, *, list_prices: bool, calls: int, cached: int,
    uncached: int, output: int, reasoning: int, thinking_share: Decimal, cache_hit_share: Decimal | None,
    peak_share: Decimal | None,
) -> list[projection.ModelEstimate]:
    """``projection.estimate`` for the planner's inputs (nothing priced here); [] when no model is chosen."""
    if not models:
        return []
    workload = projection.Workload(
        calls=calls, cached_prompt_tokens=cached, uncached_prompt_tokens=uncached, output_tokens=output,
        reasoning_tokens=reasoning, thinking_share=thinking_share, cache_hit_share=cache_hit_share,
        peak_share=peak_share,
    )
    return _whatif_estimate(book, book.digest, tuple(models), at, list_prices, workload)


def compared_to_cheapest(results: Sequence[projection.ModelEstimate]) -> list[tuple[str, Decimal, str]]:
    """(model, its total over the cheapest total, the cheapest model) for every other model; [] when unusable."""
    if len(results) < 2:
        return []
    cheapest = min(results, key=lambda r: r.total)
    if cheapest.total <= 0:
        return []
    return [(r.model, r.total / cheapest.total, cheapest.model) for r in results if r is not cheapest]


def last_days(selection: Selection, days: int) -> Selection:
    """The sidebar's filters over the last ``days`` UTC days, today included."""
    end = now().date()
    return replace(selection, start=end - timedelta(days=days - 1), end=end)


def replay_change(summary: projection.ReplaySummary) -> Decimal | None:
    """Projected against actual as a ratio (None when nothing was actually spent)."""
    return summary.difference / summary.actual_cost if summary.actual_cost else None


def estimate_frame(results: Sequence[projection.ModelEstimate]) -> pd.DataFrame:
    """The estimates as (model, bucket, cost) rows, for the side-by-side chart."""
    rows = [
        {"model": r.model, "bucket": bucket, "cost": value}
        for r in results
        for bucket, value in (("cache hit", r.cache_hit), ("cache miss", r.cache_miss), ("output", r.output))
    ]
    return pd.DataFrame(rows, columns=["model", "bucket", "cost"])


@st.cache_data(ttl=CACHE_TTL_S, show_spinner="Re-pricing the recorded calls…")
def _replay(url: str, selection: Selection, _book: PriceBook, book_digest: str, as_model: str | None,
            as_of: datetime | None, shift_off_peak: Decimal) -> projection.ReplaySummary:
    frame = queries.traffic_frame(_engine(url), to_filters(selection))
    repriced = projection.reprice_traffic(frame, _book, as_model=as_model, as_of=as_of, shift_off_peak=shift_off_peak)
    return projection.compare_by_day(repriced, _book.currency)


def replay(selection: Selection, book: PriceBook, *, as_model: str | None, as_of: datetime | None,
           shift_off_peak: Decimal) -> projection.ReplaySummary:
    """The recorded calls of ``selection`` re-priced by ``projection.reprice_traffic`` and compared per day."""
    return _replay(ledger_url(), selection, book, book.digest, as_model, as_of, shift_off_peak)


def replay_frame(summary: projection.ReplaySummary) -> pd.DataFrame:
    """Actual and projected cost per day as long rows (day, series, cost) for a line chart."""
    days = summary.days
    return pd.concat([
        pd.DataFrame({"day": days["day"], "series": "actual", "cost": days["actual_cost"]}),
        pd.DataFrame({"day": days["day"], "series": "projected", "cost": days["projected_cost"]}),
    ], ignore_index=True)
