"""The one query layer: every read of the ledger (export, reports, dashboard) is a function here.

Functions take an ``Engine`` (from ``LedgerStore.engine``), return plain Python values
(``Decimal`` money, aware UTC ``datetime``), and know nothing about output formats. Time
ranges are half-open: ``since`` inclusive, ``until`` exclusive, both timezone-aware.
Queries that may return the whole ledger stream it (``yield_per``) rather than load it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from collector.models import CALLS, Call

__all__ = ["EXPORT_COLUMNS", "iter_export_rows", "in_time_range"]

EXPORT_BATCH = 1000  # rows fetched per round trip while streaming

# One ledger row per call. `cost_usd` is the cost when the call was priced in USD (else
# empty), so a spreadsheet can sum one column without mixing currencies; `cost` and
# `currency` carry every priced row. The raw usage object is left out (it is in the ledger).
EXPORT_COLUMNS: tuple[str, ...] = (
    "request_id",
    "provider_request_id",
    "started_at",
    "finished_at",
    "endpoint",
    "upstream",
    "requested_model",
    "model",
    "stream",
    "thinking",
    "status",
    "http_status",
    "finish_reason",
    "error_type",
    "error_message",
    "prompt_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "chunk_count",
    "tool_call_count",
    "ttft_ms",
    "first_content_ms",
    "duration_ms",
    "cost_usd",
    "cost",
    "currency",
    "cost_cache_hit",
    "cost_cache_miss",
    "cost_output",
    "tariff_id",
    "key_fingerprint",
    "user",
    "tags",
)

_DERIVED = {"cost_usd"}
_EXPORT_SELECT = [CALLS.c[name] for name in EXPORT_COLUMNS if name not in _DERIVED]


def in_time_range(
    statement: sa.Select[Any], since: datetime | None, until: datetime | None, column: Any = Call.started_at
) -> sa.Select[Any]:
    """``statement`` limited to ``since <= column < until`` (either bound optional)."""
    if since is not None:
        statement = statement.where(column >= since)
    if until is not None:
        statement = statement.where(column < until)
    return statement


def iter_export_rows(engine: Engine, since: datetime | None, until: datetime | None) -> Iterator[dict[str, Any]]:
    """Every call started in ``[since, until)``, ordered by (started_at, request_id), as dicts keyed by EXPORT_COLUMNS.

    Streams: memory stays flat however large the ledger. Values are Python objects (UUID,
    datetime, Decimal, dict for tags, None for unknown); formatting is the caller's.
    """
    statement = in_time_range(sa.select(*_EXPORT_SELECT), since, until).order_by(
        Call.started_at, Call.request_id
    )
    with engine.connect() as connection:
        result = connection.execution_options(yield_per=EXPORT_BATCH).execute(statement)
        for mapping in result.mappings():
            row = dict(mapping)
            row["cost_usd"] = row["cost"] if row["currency"] == "USD" else None
            if row["tags"] is None:
                row["tags"] = {}
            yield {name: row[name] for name in EXPORT_COLUMNS}


# =============================================================================================
# Aggregates (issue 6; owned by reports). Totals, spend by day x any dimension, breakdowns,
# top spenders, month-to-date and its forecast, under one ``Filters``. Reports and the
# dashboard both read these. Each reads the daily rollup (``collector.rollups``) when the
# filters allow it (whole UTC days, rollup complete, no end user asked for) and the raw ledger
# otherwise; both paths give the same numbers (tests/test_rollups.py checks it). Money is exact
# Decimal throughout.
# =============================================================================================

import json as _json  # noqa: E402 - this section's own imports
from collections.abc import Callable as _Callable  # noqa: E402
from collections.abc import Iterable as _Iterable  # noqa: E402
from collections.abc import Mapping as _Mapping  # noqa: E402
from collections.abc import Sequence as _Sequence  # noqa: E402
from dataclasses import dataclass as _agg_dataclass  # noqa: E402
from dataclasses import field as _field  # noqa: E402
from datetime import date as _date  # noqa: E402
from datetime import timedelta as _timedelta  # noqa: E402
from datetime import timezone as _utc_tz  # noqa: E402
from datetime import tzinfo as _tzinfo  # noqa: E402
from decimal import ROUND_HALF_EVEN as _ROUND_HALF_EVEN  # noqa: E402
from decimal import Decimal as _Decimal  # noqa: E402
from typing import Literal as _Literal  # noqa: E402

import pandas as _pd  # noqa: E402

from collector.errors import UsageError as _UsageError  # noqa: E402
from collector.models import CALL_TAGS as _CALL_TAGS  # noqa: E402
from collector.reporting_schema import (  # noqa: E402
    ROLLUP_COUNT_COLUMNS,
    canonical_tags,
    tag_set_id,
    ROLLUP_DAILY,
    ROLLUP_MONEY_COLUMNS,
    ROLLUP_STATE,
    ROLLUP_TAG_SET_ITEMS,
    ROLLUP_TAG_SETS,
    UNKNOWN,
)
from collector.reporting_schema import tags_text as _tags_text  # noqa: E402

__all__ += [
    "Filters",
    "Source",
    "MEASURES",
    "TOKEN_BUCKETS",
    "MONEY_BUCKETS",
    "SPEND_GROUPS",
    "RUN_RATE_DAYS",
    "CurrencyCost",
    "Totals",
    "MonthForecast",
    "CachePrices",
    "tariff_cache_prices",
    "canonical_tags",
    "tag_set_id",
    "RAW_ONLY_DIMS",
    "uses_rollup",
    "rollup_complete",
    "aggregate",
    "aggregate_on",
    "totals",
    "spend_totals",
    "spend_by_day",
    "breakdown",
    "top_spenders",
    "month_forecast",
    "tag_keys",
    "require_tag_key",
]

Source = _Literal["auto", "rollup", "ledger"]

# Every aggregate row carries these sums. Token sums leave NULL counts out (never taken as 0);
# money sums leave unpriced calls out (counted apart in ``unpriced_calls``).
MEASURES: tuple[str, ...] = ROLLUP_COUNT_COLUMNS + ROLLUP_MONEY_COLUMNS
# Token buckets a report shows; reasoning tokens are part of the output bucket, shown apart.
TOKEN_BUCKETS: dict[str, str] = {
    "cache_hit": "prompt_cache_hit_tokens",
    "cache_miss": "prompt_cache_miss_tokens",
    "output": "completion_tokens",
    "reasoning": "reasoning_tokens",
}
# Money buckets: what a call's cost is made of (reasoning is billed as output).
MONEY_BUCKETS: dict[str, tuple[str, str]] = {
    "cache_hit": ("prompt_cache_hit_tokens", "cost_cache_hit"),
    "cache_miss": ("prompt_cache_miss_tokens", "cost_cache_miss"),
    "output": ("completion_tokens", "cost_output"),
}
# What ``spend_by_day`` / ``top_spenders`` can group by, besides ``tag:<key>``.
SPEND_GROUPS: tuple[str, ...] = ("model", "bucket", "status", "key", "user", "currency")
# Dimensions the daily rollup does not keep, so only the raw ledger can answer them. ``user``
# (the request body's end-user id) can have millions of values: as a rollup column it would
# make the rollup one row per user per day, about as large as the ledger it summarises.
RAW_ONLY_DIMS: frozenset[str] = frozenset({"user"})
RUN_RATE_DAYS = 7  # whole UTC days before ``as_of`` whose mean daily spend projects the month
_TAG_PREFIX = "tag:"
_DAY = _timedelta(days=1)
_ZERO = _Decimal(0)
_MILLION = _Decimal(1_000_000)


def _as_tuple(values: _Iterable[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    return tuple(values)


@_agg_dataclass(frozen=True, eq=True)
class Filters:
    """Which calls a query looks at. Every field narrows; an empty field does not filter.

    * ``since`` / ``until``: aware datetimes (any zone, compared in UTC), half-open
      ``[since, until)`` on ``started_at``. Both on UTC midnight (or None) lets the rollup answer.
    * ``models``: the model a call is attributed to: the response's ``model``, else the
      requested one (``coalesce(model, requested_model)``, everywhere in this section).
    * ``statuses``: ``collector.record.Status`` values.
    * ``tags``: ``{key: value}`` or ``{key: (value, ...)}``: a call must carry each key with
      one of the values; ``{key: ()}`` means "carries the key, any value". Stored as tuples.
    * ``key_fingerprints``: API key fingerprints (never keys).
    * ``users``: end-user ids (the request body's ``user`` field). The rollup has no user
      column, so this filter always reads the raw ledger.
    """

    since: datetime | None = None
    until: datetime | None = None
    models: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    tags: _Mapping[str, tuple[str, ...]] = _field(default_factory=dict)
    key_fingerprints: tuple[str, ...] = ()
    users: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise _UsageError(f"filter {name}={value.isoformat()} has no time zone; give an aware UTC time")
        if self.since is not None and self.until is not None and self.until < self.since:
            raise _UsageError(f"filter until ({self.until.isoformat()}) is before since ({self.since.isoformat()})")
        object.__setattr__(self, "models", _as_tuple(self.models))
        object.__setattr__(self, "statuses", _as_tuple(self.statuses))
        object.__setattr__(self, "key_fingerprints", _as_tuple(self.key_fingerprints))
        object.__setattr__(self, "users", _as_tuple(self.users))
        tags = {str(key): _as_tuple(value) for key, value in dict(self.tags or {}).items()}
        object.__setattr__(self, "tags", tags)

    def __hash__(self) -> int:
        return hash((self.since, self.until, self.models, self.statuses,
                     tuple(sorted(self.tags.items())), self.key_fingerprints, self.users))

    def between(self, since: datetime | None, until: datetime | None) -> Filters:
        """The same filters over another time range."""
        return Filters(since=since, until=until, models=self.models, statuses=self.statuses,
                       tags=dict(self.tags), key_fingerprints=self.key_fingerprints, users=self.users)

    @property
    def whole_days(self) -> bool:
        """True when both bounds are UTC midnights (or open): the daily rollup can answer."""
        return all(
            bound is None or bound.astimezone(_utc_tz.utc).timetz().replace(tzinfo=None) == datetime.min.time()
            for bound in (self.since, self.until)
        )


@_agg_dataclass(frozen=True, slots=True)
class CurrencyCost:
    """What the calls priced in one currency cost, per money bucket and in total (exact)."""

    currency: str
    cache_hit: _Decimal
    cache_miss: _Decimal
    output: _Decimal
    total: _Decimal


@_agg_dataclass(frozen=True, slots=True)
class Totals:
    """The headline figures for the calls ``Filters`` selects.

    ``tokens`` is keyed by ``TOKEN_BUCKETS`` (reasoning is included in output and also shown
    apart). ``cost`` and ``cache_saved`` are per currency (sorted by currency code).
    ``cache_hit_ratio`` = hit / (hit + miss) prompt tokens, None without prompt tokens.
    ``cache_saved`` = hit tokens x (miss price - hit price) at each call's own tariff, from the
    price book. ``errors`` / ``cancels`` count status ``error`` / ``cancelled``; ``statuses``
    has every status present. ``source`` says which table answered ("rollup" or "ledger").
    """

    calls: int
    statuses: dict[str, int]
    errors: int
    cancels: int
    unpriced_calls: int
    estimated_calls: int
    tokens: dict[str, int]
    cost: dict[str, CurrencyCost]
    cache_hit_ratio: float | None
    cache_saved: dict[str, _Decimal]
    source: str


@_agg_dataclass(frozen=True, slots=True)
class MonthForecast:
    """Month-to-date spend in one currency and where the month ends at the recent run rate.

    ``month_to_date`` is the spend in ``[month_start, as_of)``. ``run_rate`` is the mean
    daily spend over the ``run_rate_days`` whole days before ``as_of``'s day (days with no
    calls count as 0), quantised to 1e-6. ``forecast`` = month_to_date (exact) + run_rate x the
    days left until ``month_end`` (fractional when ``as_of`` is not midnight; that product
    quantised to 1e-6), so on the month's last instant the forecast is the spend itself.
    """

    currency: str
    month_start: datetime
    month_end: datetime
    as_of: datetime
    month_to_date: _Decimal
    run_rate: _Decimal
    run_rate_days: int
    forecast: _Decimal


# (model, tariff_id, currency) -> (cache-hit price, cache-miss price) per million tokens, or None.
CachePrices = _Callable[[str | None, str | None, str], tuple[_Decimal, _Decimal] | None]


# -- choosing the source ----------------------------------------------------------------------


def rollup_complete(engine: Engine) -> bool:
    """True when ``rollup_daily`` covers the whole ledger (see ``collector.rollups``).

    False too for a ledger whose schema predates the rollup (migration 0003): it is read raw.
    """
    try:
        with engine.connect() as connection:
            row = connection.execute(sa.select(ROLLUP_STATE.c.complete).where(ROLLUP_STATE.c.id == 1)).first()
    except (sa.exc.ProgrammingError, sa.exc.OperationalError) as error:
        if "rollup_state" not in str(error):
            raise
        return False
    return bool(row is not None and row[0])


def uses_rollup(engine: Engine, filters: Filters, source: Source = "auto", dims: _Sequence[str] = ()) -> bool:
    """Whether a query under ``filters`` grouped by ``dims`` reads the rollup (True) or the raw ledger (False).

    ``source="rollup"`` insists (a ``UsageError`` when the range is not whole UTC days, the
    rollup is not built, or ``dims`` / ``filters`` name the end user, which the rollup does not
    keep, see ``RAW_ONLY_DIMS``); ``"ledger"`` always reads raw; ``"auto"`` picks the rollup
    when it can.
    """
    if source == "ledger":
        return False
    if source not in ("auto", "rollup"):
        raise _UsageError(f"unknown source {source!r}; choose auto, rollup or ledger")
    if filters.users or RAW_ONLY_DIMS.intersection(dims):
        if source == "rollup":
            raise _UsageError(
                "the daily rollup has no end-user (user) column; group or filter by user with source auto or ledger"
            )
        return False
    if not filters.whole_days:
        if source == "rollup":
            raise _UsageError("the daily rollup answers whole UTC days only; since/until must be UTC midnights")
        return False
    if not rollup_complete(engine):
        if source == "rollup":
            raise _UsageError("the rollup is not built for this ledger yet; run `dsmeter rollup`")
        return False
    return True


# -- the aggregation core ---------------------------------------------------------------------


def _dim_names(dims: _Sequence[str]) -> list[str]:
    allowed = {"day", "model", "status", "currency", "key", "tariff", "tag_set", *RAW_ONLY_DIMS}
    names: list[str] = []
    for dim in dims:
        if dim in names:
            raise _UsageError(f"dimension {dim!r} given twice")
        if dim.startswith(_TAG_PREFIX):
            if not dim[len(_TAG_PREFIX):]:
                raise _UsageError("a tag dimension needs a key: tag:<key>")
        elif dim not in allowed:
            raise _UsageError(
                f"cannot group by {dim!r}; choose from {', '.join(sorted(allowed))} or tag:<key>"
            )
        names.append(dim)
    return names


def _raw_day(dialect: str) -> sa.ColumnElement[str]:
    if dialect == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", CALLS.c.started_at), "YYYY-MM-DD")
    # SQLite keeps UTCDateTime as UTC text "YYYY-MM-DD HH:MM:SS[.ffffff]".
    return sa.func.substr(CALLS.c.started_at, 1, 10, type_=sa.String)


def _raw_model() -> sa.ColumnElement[str]:
    return sa.func.coalesce(CALLS.c.model, CALLS.c.requested_model)


def _raw_statement(dialect: str, filters: Filters, dims: list[str]) -> sa.Select[Any]:
    calls = CALLS
    columns: list[Any] = []
    source: Any = calls
    for dim in dims:
        if dim == "day":
            columns.append(_raw_day(dialect).label(dim))
        elif dim == "model":
            columns.append(_raw_model().label(dim))
        elif dim == "status":
            columns.append(calls.c.status.label(dim))
        elif dim == "currency":
            columns.append(calls.c.currency.label(dim))
        elif dim == "key":
            columns.append(calls.c.key_fingerprint.label(dim))
        elif dim == "user":
            columns.append(calls.c.user.label(dim))
        elif dim == "tariff":
            columns.append(calls.c.tariff_id.label(dim))
        elif dim == "tag_set":
            columns.append(sa.cast(calls.c.tags, sa.Text).label(dim))
        else:
            tag = _CALL_TAGS.alias(f"tag_{len(columns)}")
            source = source.outerjoin(
                tag, sa.and_(tag.c.request_id == calls.c.request_id, tag.c.key == dim[len(_TAG_PREFIX):])
            )
            columns.append(tag.c.value.label(dim))
    has_tokens = sa.or_(calls.c.prompt_tokens.is_not(None), calls.c.completion_tokens.is_not(None))
    measures = [
        sa.func.count().label("calls"),
        sa.func.count().filter(calls.c.cost.is_(None), has_tokens).label("unpriced_calls"),
        sa.func.count().filter(calls.c.usage_estimated.is_(True)).label("estimated_calls"),
        *[sa.func.sum(calls.c[name]).label(name) for name in ROLLUP_COUNT_COLUMNS[3:]],
        *[sa.func.sum(calls.c[name]).label(name) for name in ROLLUP_MONEY_COLUMNS],
    ]
    statement = sa.select(*columns, *measures).select_from(source)
    statement = in_time_range(statement, filters.since, filters.until)
    if filters.models:
        statement = statement.where(_raw_model().in_(list(filters.models)))
    if filters.statuses:
        statement = statement.where(calls.c.status.in_(list(filters.statuses)))
    if filters.key_fingerprints:
        statement = statement.where(calls.c.key_fingerprint.in_(list(filters.key_fingerprints)))
    if filters.users:
        statement = statement.where(calls.c.user.in_(list(filters.users)))
    for key, values in filters.tags.items():
        tagged = sa.select(_CALL_TAGS.c.request_id).where(
            _CALL_TAGS.c.request_id == calls.c.request_id, _CALL_TAGS.c.key == key
        )
        if values:
            tagged = tagged.where(_CALL_TAGS.c.value.in_(list(values)))
        statement = statement.where(tagged.exists())
    return statement.group_by(*[column for column in columns]) if columns else statement


def _rollup_statement(filters: Filters, dims: list[str]) -> sa.Select[Any]:
    if filters.users or RAW_ONLY_DIMS.intersection(dims):
        # ``uses_rollup`` never picks the rollup for these; a direct caller gets told, not a tag join.
        raise _UsageError("the daily rollup has no end-user (user) column; read the raw ledger")
    rollup = ROLLUP_DAILY
    columns: list[Any] = []
    source: Any = rollup
    for dim in dims:
        if dim == "day":
            columns.append(rollup.c.day.label(dim))
        elif dim in ("model", "status", "currency"):
            columns.append(rollup.c[dim].label(dim))
        elif dim == "key":
            columns.append(rollup.c.key_fingerprint.label(dim))
        elif dim == "tariff":
            columns.append(rollup.c.tariff_id.label(dim))
        elif dim == "tag_set":
            sets = ROLLUP_TAG_SETS
            source = source.join(sets, sets.c.tag_set_id == rollup.c.tag_set_id)
            columns.append(sets.c.tags.label(dim))
        else:
            item = ROLLUP_TAG_SET_ITEMS.alias(f"item_{len(columns)}")
            source = source.outerjoin(
                item, sa.and_(item.c.tag_set_id == rollup.c.tag_set_id, item.c.key == dim[len(_TAG_PREFIX):])
            )
            columns.append(item.c.value.label(dim))
    measures = [sa.func.sum(rollup.c[name]).label(name) for name in MEASURES]
    statement = sa.select(*columns, *measures).select_from(source)
    if filters.since is not None:
        statement = statement.where(rollup.c.day >= filters.since.astimezone(_utc_tz.utc).date())
    if filters.until is not None:
        statement = statement.where(rollup.c.day < filters.until.astimezone(_utc_tz.utc).date())
    if filters.models:
        statement = statement.where(rollup.c.model.in_(list(filters.models)))
    if filters.statuses:
        statement = statement.where(rollup.c.status.in_(list(filters.statuses)))
    if filters.key_fingerprints:
        statement = statement.where(rollup.c.key_fingerprint.in_(list(filters.key_fingerprints)))
    for key, values in filters.tags.items():
        items = ROLLUP_TAG_SET_ITEMS
        tagged = sa.select(items.c.tag_set_id).where(items.c.tag_set_id == rollup.c.tag_set_id, items.c.key == key)
        if values:
            tagged = tagged.where(items.c.value.in_(list(values)))
        statement = statement.where(tagged.exists())
    return statement.group_by(*columns) if columns else statement


def _frame(records: list[dict[str, Any]], columns: _Sequence[str]) -> _pd.DataFrame:
    """A frame whose text and money columns are plain objects: None stays None (pandas 3 would
    otherwise infer a string dtype and turn None into NaN), Decimal stays Decimal."""
    data: dict[str, _pd.Series] = {}
    for name in columns:
        values = [record[name] for record in records]
        if name in ROLLUP_COUNT_COLUMNS or name in ("tokens",):
            data[name] = _pd.Series(values, dtype="int64")
        else:
            data[name] = _pd.Series(values, dtype=object)
    return _pd.DataFrame(data, columns=list(columns))


def _sort_key(value: object) -> tuple[int, str]:
    # None first, then by text: the same order on both dialects and for every type here.
    return (0, "") if value is None else (1, value.isoformat() if isinstance(value, _date) else str(value))


def aggregate(engine: Engine, filters: Filters, dims: _Sequence[str], *, source: Source = "auto") -> _pd.DataFrame:
    """Sums of every ``MEASURES`` column per distinct combination of ``dims``, under ``filters``.

    ``dims`` (each at most once): ``day`` (the UTC calendar day, a ``datetime.date``),
    ``model`` (coalesce(model, requested_model)), ``status``, ``currency``, ``key`` (key
    fingerprint), ``user`` (the request body's end-user id; always read from the raw ledger,
    see ``RAW_ONLY_DIMS``), ``tariff`` (tariff id), ``tag_set`` (the call's canonical tags as
    sorted JSON text, see ``canonical_tags``), ``tag:<key>`` (that tag's value). A dimension the
    call does not have is None. An empty ``dims`` gives one row (all zero when nothing matches).

    Columns: ``dims`` then ``MEASURES``. Counts are int; money is exact Decimal (0 when no
    call of the group was priced). Rows are sorted by ``dims`` (None first), so the same
    ledger always gives the same frame. ``source`` picks the table (see ``uses_rollup``).
    """
    rollup = uses_rollup(engine, filters, source, dims)
    with engine.connect() as connection:
        return _frame(aggregate_on(connection, filters, dims, rollup=rollup), [*_dim_names(dims), *MEASURES])


def aggregate_on(
    connection: sa.Connection, filters: Filters, dims: _Sequence[str], *, rollup: bool
) -> list[dict[str, Any]]:
    """``aggregate`` on an open connection (inside the caller's transaction), as a list of dicts.

    ``rollup`` says which table to read; the caller has checked that the rollup can answer.
    ``collector.rollups`` uses it to re-derive rollup rows from the raw ledger under its lock.
    """
    names = _dim_names(dims)
    statement = (
        _rollup_statement(filters, names) if rollup else _raw_statement(connection.dialect.name, filters, names)
    )
    rows = connection.execute(statement).all()
    records: list[dict[str, Any]] = []
    for row in rows:
        record = dict(zip([*names, *MEASURES], row))
        if not names and not record["calls"]:
            record = dict.fromkeys(MEASURES)  # no call matched: SUM gave NULLs
        for name in ROLLUP_COUNT_COLUMNS:
            record[name] = int(record[name] or 0)
        for name in ROLLUP_MONEY_COLUMNS:
            record[name] = _ZERO if record[name] is None else record[name]
        for dim in names:
            value = record[dim]
            if dim == "day" and isinstance(value, str):
                value = _date.fromisoformat(value)
            elif dim == "tag_set":
                value = _tags_text(canonical_tags(_json.loads(value) if value else {}))
            elif dim not in RAW_ONLY_DIMS and not dim.startswith(_TAG_PREFIX) and value == UNKNOWN:
                value = None  # the rollup's stand-in for NULL (a raw-only dimension never holds it)
            record[dim] = value
        records.append(record)
    if "tag_set" in names and not rollup:
        records = _merge(records, names)  # raw JSON texts that differ only in key order are one set
    records.sort(key=lambda record: [_sort_key(record[dim]) for dim in names])
    return records


def _merge(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        key = tuple(record[dim] for dim in names)
        into = merged.get(key)
        if into is None:
            merged[key] = dict(record)
        else:
            for name in MEASURES:
                into[name] += record[name]
    return list(merged.values())


# -- the figures reports and the dashboard show -----------------------------------------------


_BOOKS: dict[str | None, Any] = {}


def _book_in_effect() -> Any:
    """The price book calls are priced with ($DSMETER_PRICES, else the shipped one), loaded once per path."""
    from collector.pricebook import PriceBookError, book_path_from_env, load_book

    path = book_path_from_env()
    if path not in _BOOKS:
        try:
            _BOOKS[path] = load_book(path)
        except PriceBookError:
            _BOOKS[path] = None  # a broken book: savings fall back to the prices the rows were billed at
    return _BOOKS[path]


def tariff_cache_prices(book: Any, tariff_id: str | None, currency: str) -> tuple[_Decimal, _Decimal] | None:
    """(cache-hit, cache-miss) price per million tokens of the tariff entry and period a call was
    priced with (``tariff_id`` as ``collector.pricing`` writes it), from ``book``; None if unknown."""
    if book is None or not tariff_id or tariff_id.startswith("unpriced:"):
        return None
    text = tariff_id.split("#", 1)[0].rsplit(">", 1)[-1]
    entry, sep, period = text.rpartition("/")
    if not sep:
        return None
    for tariff in book.tariffs:
        if tariff.id == entry:
            rates = tariff.rates(period, currency)
            if rates is None:
                return None
            scale = _MILLION / tariff.per_tokens
            return rates.hit * scale, rates.miss * scale
    return None


def _price_book_cache_prices(model: str | None, tariff: str | None, currency: str) -> tuple[_Decimal, _Decimal] | None:
    return tariff_cache_prices(_book_in_effect(), tariff, currency)


def _cache_saved(frame: _pd.DataFrame, prices: CachePrices) -> dict[str, _Decimal]:
    """hit tokens x (miss price - hit price) per (model, tariff, currency) group of priced calls.

    Prices come from ``prices``; a group whose tariff it cannot name falls back to the prices
    its own rows were billed at (cache-miss cost / miss tokens), which is exact because one
    tariff entry bills one price. Quantised to 1e-6 per currency.
    """
    saved: dict[str, _Decimal] = {}
    for record in frame.to_dict("records"):
        currency = record["currency"]
        hit_tokens = record["prompt_cache_hit_tokens"]
        if currency is None:
            continue
        saved.setdefault(currency, _ZERO)
        if not hit_tokens:
            continue
        found = prices(record["model"], record["tariff"], currency)
        if found is not None:
            hit_price, miss_price = found
            saved[currency] += hit_tokens * (miss_price - hit_price) / _MILLION
        elif record["prompt_cache_miss_tokens"]:
            miss_per_token = record["cost_cache_miss"] / record["prompt_cache_miss_tokens"]
            saved[currency] += hit_tokens * miss_per_token - record["cost_cache_hit"]
    step = _Decimal("0.000001")
    return {currency: value.quantize(step, _ROUND_HALF_EVEN) for currency, value in sorted(saved.items())}


def totals(
    engine: Engine, filters: Filters, *, source: Source = "auto", cache_prices: CachePrices | None = None
) -> Totals:
    """The headline figures (see ``Totals``) for the calls ``filters`` selects.

    ``cache_prices`` looks up (hit, miss) prices per million tokens for a (model, tariff id,
    currency); the default reads them from the price book in effect (``tariff_cache_prices``).
    One aggregate query; money exact.
    """
    chosen: Source = "rollup" if uses_rollup(engine, filters, source) else "ledger"
    frame = aggregate(engine, filters, ["status", "currency", "model", "tariff"], source=chosen)
    statuses: dict[str, int] = {}
    for status, calls in zip(frame["status"], frame["calls"]):
        statuses[status] = statuses.get(status, 0) + int(calls)
    tokens = {bucket: int(frame[column].sum()) for bucket, column in TOKEN_BUCKETS.items()}
    cost: dict[str, CurrencyCost] = {}
    for currency in sorted({c for c in frame["currency"] if c is not None}):
        mine = frame[frame["currency"] == currency]
        parts = {name: sum(mine[name], _ZERO) for name in ROLLUP_MONEY_COLUMNS}
        cost[currency] = CurrencyCost(
            currency=currency,
            cache_hit=parts["cost_cache_hit"],
            cache_miss=parts["cost_cache_miss"],
            output=parts["cost_output"],
            total=parts["cost"],
        )
    prompt = tokens["cache_hit"] + tokens["cache_miss"]
    return Totals(
        calls=int(frame["calls"].sum()),
        statuses=dict(sorted(statuses.items())),
        errors=statuses.get("error", 0),
        cancels=statuses.get("cancelled", 0),
        unpriced_calls=int(frame["unpriced_calls"].sum()),
        estimated_calls=int(frame["estimated_calls"].sum()),
        tokens=tokens,
        cost=cost,
        cache_hit_ratio=(tokens["cache_hit"] / prompt) if prompt else None,
        cache_saved=_cache_saved(frame, cache_prices or _price_book_cache_prices),
        source=chosen,
    )


def spend_totals(engine: Engine, filters: Filters, *, source: Source = "auto") -> dict[str, _Decimal]:
    """Total cost per currency (sorted by code) of the priced calls ``filters`` selects."""
    frame = aggregate(engine, filters, ["currency"], source=source)
    return {c: cost for c, cost in zip(frame["currency"], frame["cost"]) if c is not None}


def _group_dims(by: str) -> list[str]:
    if by == "key":
        return ["key"]
    if by in ("model", "status", "user", "currency") or by.startswith(_TAG_PREFIX):
        return [by]
    raise _UsageError(f"cannot group spend by {by!r}; choose from {', '.join(SPEND_GROUPS)} or tag:<key>")


def spend_by_day(
    engine: Engine, filters: Filters, by: str | None = None, *, source: Source = "auto"
) -> _pd.DataFrame:
    """Spend per UTC day, split by ``by``: None, ``model``, ``bucket``, ``status``, ``key``,
    ``user`` (end user, read raw), ``currency`` or ``tag:<key>``.

    Columns: ``day`` (date), ``group`` (the group's value; None for no split, for a call
    without the tag, or an unknown model), ``currency`` (None for unpriced calls), ``calls``,
    ``tokens`` and ``cost`` (exact Decimal). For ``by="bucket"`` each (day, currency) gives
    three rows, ``group`` = cache_hit / cache_miss / output, with that bucket's tokens and
    cost; ``calls`` is then the day's calls. Otherwise ``tokens`` is every billed token (hit +
    miss + output). Only days with calls appear. Sorted by day, group, currency (None first).
    """
    if by == "bucket":
        frame = aggregate(engine, filters, ["day", "currency"], source=source)
        rows = [
            {"day": r["day"], "group": bucket, "currency": r["currency"], "calls": r["calls"],
             "tokens": r[tokens], "cost": r[cost]}
            for r in frame.to_dict("records")
            for bucket, (tokens, cost) in MONEY_BUCKETS.items()
        ]
        order = {bucket: i for i, bucket in enumerate(MONEY_BUCKETS)}
        rows.sort(key=lambda r: (r["day"], order[r["group"]], _sort_key(r["currency"])))
        return _frame(rows, ["day", "group", "currency", "calls", "tokens", "cost"])
    group = None if by is None else _group_dims(by)[0]
    dims = ["day", *([] if group is None or group == "currency" else [group]), "currency"]
    frame = aggregate(engine, filters, dims, source=source)
    rows = [
        {"day": r["day"], "group": None if group is None else r[group], "currency": r["currency"],
         "calls": r["calls"],
         "tokens": r["prompt_cache_hit_tokens"] + r["prompt_cache_miss_tokens"] + r["completion_tokens"],
         "cost": r["cost"]}
        for r in frame.to_dict("records")
    ]
    return _frame(rows, ["day", "group", "currency", "calls", "tokens", "cost"])


def breakdown(engine: Engine, filters: Filters, by: _Sequence[str], *, source: Source = "auto") -> _pd.DataFrame:
    """Calls, tokens and money per joint group of ``by`` (e.g. ``["model", "tag:team"]``) and currency.

    ``by`` items: ``model``, ``status``, ``key``, ``user``, ``tag:<key>`` (``currency`` is always a
    column). Columns: the ``by`` names, ``currency``, then ``MEASURES``. Sorted by cost
    (highest first) within each currency, then by the groups, so the order is stable.
    """
    dims: list[str] = []
    for item in by:
        dims.extend(_group_dims(item))
    if "currency" in dims:
        dims.remove("currency")
    frame = aggregate(engine, filters, [*dims, "currency"], source=source)
    records = frame.to_dict("records")
    records.sort(key=lambda r: (_sort_key(r["currency"]), -r["cost"], [_sort_key(r[d]) for d in dims]))
    return _frame(records, [*dims, "currency", *MEASURES])


def top_spenders(
    engine: Engine, filters: Filters, by: str = "key", *, limit: int = 10, source: Source = "auto"
) -> _pd.DataFrame:
    """The ``limit`` groups of ``by`` (``key``, ``model``, ``user``, ``tag:<key>``, ...) costing most, per currency.

    Columns: ``group``, ``currency``, ``calls``, ``cost``, ``share`` (cost / the currency's
    total, Decimal quantised to 1e-4; 0 when the total is 0). Unpriced calls are left out.
    Sorted by currency, then cost (highest first), then group.
    """
    if limit < 1:
        raise _UsageError("limit must be >= 1")
    dims = _group_dims(by)
    frame = aggregate(engine, filters, [*dims, "currency"], source=source)
    frame = frame[frame["currency"].notna()]
    rows: list[dict[str, Any]] = []
    for currency in sorted(set(frame["currency"])):
        mine = frame[frame["currency"] == currency].to_dict("records")
        total = sum((r["cost"] for r in mine), _ZERO)
        mine.sort(key=lambda r: (-r["cost"], _sort_key(r[dims[0]])))
        for r in mine[:limit]:
            share = (r["cost"] / total).quantize(_Decimal("0.0001"), _ROUND_HALF_EVEN) if total else _ZERO
            rows.append({"group": r[dims[0]], "currency": currency, "calls": r["calls"], "cost": r["cost"],
                         "share": share})
    return _frame(rows, ["group", "currency", "calls", "cost", "share"])


def _month_bounds(moment: datetime, zone: _tzinfo) -> tuple[datetime, datetime]:
    local = moment.astimezone(zone)
    start = datetime(local.year, local.month, 1, tzinfo=zone)
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return start.astimezone(_utc_tz.utc), datetime(year, month, 1, tzinfo=zone).astimezone(_utc_tz.utc)


def month_forecast(
    engine: Engine,
    filters: Filters,
    as_of: datetime,
    *,
    run_rate_days: int = RUN_RATE_DAYS,
    source: Source = "auto",
    tz: _tzinfo = _utc_tz.utc,
) -> dict[str, MonthForecast]:
    """Month-to-date and month-end forecast per currency (see ``MonthForecast``), under ``filters``.

    ``as_of`` is an aware instant; its month is the one containing the instant just before it,
    so ``as_of`` = midnight of the 1st reports the month just ended. Months and days are
    calendar months and days in ``tz`` (UTC by default; another zone reads the raw ledger).
    The time range of ``filters`` is ignored (the month and the run-rate window set their own).
    Currencies with no spend in either window are absent.
    """
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise _UsageError("as_of must be timezone-aware")
    if run_rate_days < 1:
        raise _UsageError("run_rate_days must be >= 1")
    as_of = as_of.astimezone(_utc_tz.utc)
    month_start, month_end = _month_bounds(as_of - _timedelta(microseconds=1), tz)
    local = as_of.astimezone(tz)
    local_midnight = datetime(local.year, local.month, local.day, tzinfo=tz)
    window_end = local_midnight.astimezone(_utc_tz.utc)
    first = local_midnight.date() - _timedelta(days=run_rate_days)
    window_start = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(_utc_tz.utc)
    mtd = spend_totals(engine, filters.between(month_start, as_of), source=source)
    recent = spend_totals(engine, filters.between(window_start, window_end), source=source)
    left = _Decimal(int((month_end - as_of).total_seconds())) / _Decimal(86400)
    step = _Decimal("0.000001")
    out: dict[str, MonthForecast] = {}
    for currency in sorted(set(mtd) | set(recent)):
        rate = (recent.get(currency, _ZERO) / run_rate_days).quantize(step, _ROUND_HALF_EVEN)
        spent = mtd.get(currency, _ZERO)
        out[currency] = MonthForecast(
            currency=currency,
            month_start=month_start,
            month_end=month_end,
            as_of=as_of,
            month_to_date=spent,
            run_rate=rate,
            run_rate_days=run_rate_days,
            forecast=spent + (rate * left).quantize(step, _ROUND_HALF_EVEN),
        )
    return out


def tag_keys(engine: Engine) -> tuple[str, ...]:
    """Every tag key present in the ledger, sorted."""
    with engine.connect() as connection:
        keys = connection.execute(sa.select(_CALL_TAGS.c.key).distinct().order_by(_CALL_TAGS.c.key)).scalars().all()
    return tuple(keys)


def require_tag_key(engine: Engine, key: str) -> None:
    """A ``UsageError`` naming the known keys when no call in the ledger carries tag ``key``."""
    with engine.connect() as connection:
        found = connection.execute(sa.select(_CALL_TAGS.c.key).where(_CALL_TAGS.c.key == key).limit(1)).first()
    if found is None:
        known = ", ".join(tag_keys(engine)) or "none"
        raise _UsageError(f"no call carries tag key {key!r} (tag keys in the ledger: {known})")


# =============================================================================================
# Dashboard-only queries (issue 5; owned by the dashboard). The call listing with paging,
# latency percentiles by model and thinking mode, finish reasons, error classes, and what the
# sidebar filters can be set to. Each takes the ``Filters`` above, with the same meaning as
# the aggregates (``_dash_filtered`` mirrors ``_raw_statement``'s filters; a test holds them
# equal). The dashboard's totals and charts come from the aggregates themselves.
# =============================================================================================

import json as _dash_json  # noqa: E402 - this section's own imports
from dataclasses import dataclass as _dash_dataclass  # noqa: E402
from datetime import timedelta as _dash_timedelta  # noqa: E402
from datetime import timezone as _dash_timezone  # noqa: E402
from typing import TypeVar as _DashTypeVar  # noqa: E402
from typing import Unpack as _DashUnpack  # noqa: E402
from typing import cast as _dash_cast  # noqa: E402

import pandas as pd  # noqa: E402

from collector.errors import UsageError  # noqa: E402
from collector.models import CALL_TAGS  # noqa: E402

__all__ += [
    "DASHBOARD_CALL_COLUMNS",
    "CALL_SORT_KEYS",
    "PERCENTILES",
    "ERROR_CLASSES",
    "FilterChoices",
    "has_calls",
    "has_users",
    "filter_choices",
    "list_calls",
    "latency_percentiles",
    "finish_reasons",
    "error_classes",
]
DASHBOARD_CALL_COLUMNS: tuple[str, ...] = (
    "started_at",
    "model",
    "thinking",
    "status",
    "http_status",
    "finish_reason",
    "error_type",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "usage_estimated",
    "cost",
    "currency",
    "tariff_id",
    "ttft_ms",
    "duration_ms",
    "key_fingerprint",
    "user",
    "tags",
    "request_id",
)
# Columns the call listing may be ordered by on the server (so paging stays correct).
CALL_SORT_KEYS: tuple[str, ...] = (
    "started_at",
    "cost",
    "duration_ms",
    "ttft_ms",
    "completion_tokens",
    "prompt_cache_miss_tokens",
)
PERCENTILES: tuple[int, ...] = (50, 90, 99)
# Error classes people act on differently: back off (429), top up (402), retry later (5xx),
# fix the request (other 4xx), look at the network (disconnects, timeouts).
ERROR_CLASSES: tuple[str, ...] = (
    "429 rate limited",
    "402 insufficient balance",
    "5xx server error",
    "other 4xx",
    "error in stream",
    "disconnected",
    "timeout",
    "cancelled by caller",
)


@_dash_dataclass(frozen=True, slots=True)
class FilterChoices:
    """What the filters can be set to: values present in the ledger, and its time span."""

    models: tuple[str, ...]
    statuses: tuple[str, ...]
    tag_values: dict[str, tuple[str, ...]]  # tag key -> its values (a bounded number per key)
    first_call: datetime | None
    last_call: datetime | None


TAG_VALUES_SHOWN = 200  # per key: a filter list longer than this is unusable anyway


def has_calls(engine: Engine) -> bool:
    """True when the ledger holds at least one call (cheap: one indexed row)."""
    with engine.connect() as connection:
        return connection.execute(sa.select(CALLS.c.request_id).limit(1)).first() is not None


def has_users(engine: Engine, filters: Filters) -> bool:
    """True when some call ``filters`` selects carries an end user (the request body's ``user`` field).

    ``user`` has no index (every insert would pay for one), so this stops at the first such
    call: immediate where users are common, one pass over the range where no call has one.
    """
    statement = _dash_filtered(
        engine, sa.select(CALLS.c.request_id).where(CALLS.c.user.is_not(None)), filters
    ).limit(1)
    with engine.connect() as connection:
        return connection.execute(statement).first() is not None


def _distinct(connection: sa.Connection, table: str, column: str, where: str = "", **params: Any) -> list[str]:
    """Distinct non-NULL values of an indexed column by a loose index scan (one index probe per value).

    ``SELECT DISTINCT`` reads every row (seconds on a million-row ledger on PostgreSQL); this
    walks the index from one value to the next, so it costs as many probes as there are values.
    ``table``, ``column`` and ``where`` are this module's own identifiers, never user input.
    """
    extra = f" AND {where}" if where else ""
    first_where = f" WHERE {where}" if where else ""
    sql = sa.text(
        f"WITH RECURSIVE walk(v) AS ("
        f" SELECT min({column}) FROM {table}{first_where}"
        f" UNION ALL"
        f" SELECT (SELECT min({column}) FROM {table} WHERE {column} > walk.v{extra}) FROM walk WHERE walk.v IS NOT NULL"
        f") SELECT v FROM walk WHERE v IS NOT NULL"
    )
    return [str(value) for value in connection.execute(sql, params).scalars()]


def filter_choices(engine: Engine) -> FilterChoices:
    """Distinct models, statuses and tag values (index walks, milliseconds at any size), first and last call."""
    with engine.connect() as connection:
        # The aggregates attribute a call to coalesce(model, requested_model): offer both columns' names.
        models = sorted(set(_distinct(connection, "calls", "model"))
                        | set(_distinct(connection, "calls", "requested_model")))
        statuses = _distinct(connection, "calls", "status")
        tag_values = {
            key: tuple(_distinct(connection, "call_tags", "value", "key = :key", key=key)[:TAG_VALUES_SHOWN])
            for key in _distinct(connection, "call_tags", "key")
        }
        # Two queries, not one: a lone min() or max() is an index lookup; both together scan.
        first = connection.execute(sa.select(sa.func.min(CALLS.c.started_at))).scalar()
        last = connection.execute(sa.select(sa.func.max(CALLS.c.started_at))).scalar()
    return FilterChoices(
        models=tuple(models),
        statuses=tuple(statuses),
        tag_values=tag_values,
        first_call=_aware(first),
        last_call=_aware(last),
    )


def _aware(value: Any) -> datetime | None:
    """min()/max() of a UTCDateTime column come back as text on SQLite: read them as aware UTC."""
    if value is None:
        return None
    moment: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        return moment.replace(tzinfo=_dash_timezone.utc)
    return moment.astimezone(_dash_timezone.utc)


def list_calls(
    engine: Engine,
    filters: Filters,
    *,
    sort_by: str = "started_at",
    descending: bool = True,
    limit: int = 100,
    offset: int = 0,
) -> tuple[pd.DataFrame, int]:
    """One page of the ledger under ``filters`` (columns ``DASHBOARD_CALL_COLUMNS``) and the matching count.

    Sorted on the server (``sort_by`` in ``CALL_SORT_KEYS``; ties broken by request_id so
    pages never overlap), so a page is exact however large the ledger. Money stays Decimal.
    """
    if sort_by not in CALL_SORT_KEYS:
        raise UsageError(f"cannot sort calls by {sort_by!r}; choose one of {', '.join(CALL_SORT_KEYS)}")
    if limit < 1 or offset < 0:
        raise UsageError("limit must be >= 1 and offset >= 0")
    table = CALLS
    column = table.c[sort_by]
    tie = table.c.request_id.desc() if descending else table.c.request_id.asc()
    keys: list[Any] = [column.desc() if descending else column.asc(), tie]
    if column.nullable:
        # NULLs (an unpriced call, a timing never taken) last either way, the same on both dialects.
        keys.insert(0, column.is_(None))
    # Without that term the default order (started_at, never NULL) walks the started_at index
    # and stops after one page instead of sorting every matching call.
    statement = (
        _dash_filtered(engine, sa.select(*[table.c[name] for name in DASHBOARD_CALL_COLUMNS]), filters)
        .order_by(*keys)
        .limit(limit)
        .offset(offset)
    )
    counted = _dash_filtered(engine, sa.select(sa.func.count()).select_from(table), filters)
    with engine.connect() as connection:
        rows = connection.execute(statement).mappings().all()
        total = int(connection.execute(counted).scalar_one())
    frame = pd.DataFrame([dict(row) for row in rows], columns=list(DASHBOARD_CALL_COLUMNS))
    return frame, total


_TIMINGS = ("ttft_ms", "duration_ms")


class _NearestRanks:
    """SQLite aggregate: [n, p50, p90, p99] (``PERCENTILES``, nearest rank) of the non-NULL values, as JSON.

    SQLite has no percentile function; window ranks cost two sorts of every row per timing.
    This collects each group's values once and sorts them in memory (8 bytes per call).
    """

    def __init__(self) -> None:
        self.values: list[float] = []

    def step(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    def finalize(self) -> str:
        values = sorted(self.values)
        n = len(values)
        # Nearest rank: the smallest value with at least p% of the values at or below it.
        picks = [values[(p * n + 99) // 100 - 1] if n else None for p in PERCENTILES]
        return _dash_json.dumps([n, *picks])


def latency_percentiles(engine: Engine, filters: Filters) -> pd.DataFrame:
    """Time to first token and duration, p50/p90/p99 in ms, per model and thinking mode.

    Columns: model, thinking, ttft_ms_calls, ttft_ms_p50, ttft_ms_p90, ttft_ms_p99,
    duration_ms_calls, duration_ms_p50, ... (calls counts only calls that have the timing).
    Nearest-rank percentiles on both dialects: ``percentile_disc`` on PostgreSQL, an
    in-process aggregate on SQLite; one pass over the calls either way.
    """
    groups = [_raw_model().label("model"), CALLS.c.thinking]
    columns = ["model", "thinking"]
    for metric in _TIMINGS:
        columns += [f"{metric}_calls", *[f"{metric}_p{p}" for p in PERCENTILES]]
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            measures: list[Any] = []
            for metric in _TIMINGS:
                value = CALLS.c[metric]
                measures.append(sa.func.count(value))
                measures += [sa.func.percentile_disc(p / 100).within_group(value.asc()) for p in PERCENTILES]
            statement = _dash_filtered(engine, sa.select(*groups, *measures), filters).group_by(*groups)
            rows = [tuple(row) for row in connection.execute(statement).all()]
        else:
            connection.connection.driver_connection.create_aggregate(  # type: ignore[union-attr]
                "dsmeter_nearest_ranks", 1, _NearestRanks
            )
            packed = [sa.func.dsmeter_nearest_ranks(CALLS.c[metric], type_=sa.String) for metric in _TIMINGS]
            statement = _dash_filtered(engine, sa.select(*groups, *packed), filters).group_by(*groups)
            rows = []
            for model, thinking, *timings in connection.execute(statement).all():
                row: list[Any] = [model, thinking]
                for text in timings:
                    row += _dash_json.loads(text)
                rows.append(tuple(row))
    frame = pd.DataFrame(rows, columns=columns)
    for metric in _TIMINGS:
        frame[f"{metric}_calls"] = frame[f"{metric}_calls"].astype("int64")
        for p in PERCENTILES:
            frame[f"{metric}_p{p}"] = frame[f"{metric}_p{p}"].astype("float64")
    return frame.sort_values(["model", "thinking"], key=lambda s: s.astype(str)).reset_index(drop=True)


def finish_reasons(engine: Engine, filters: Filters) -> pd.DataFrame:
    """Calls per finish reason (``(none)`` for calls that never finished with one); columns finish_reason, calls."""
    reason = sa.func.coalesce(CALLS.c.finish_reason, "(none)").label("finish_reason")
    statement = _dash_filtered(engine, sa.select(reason, sa.func.count().label("calls")), filters).group_by(reason)
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
    frame = pd.DataFrame([tuple(row) for row in rows], columns=["finish_reason", "calls"])
    return frame.sort_values(["calls", "finish_reason"], ascending=[False, True]).reset_index(drop=True)


def _error_class() -> sa.ColumnElement[str]:
    http = CALLS.c.http_status
    return sa.case(
        (CALLS.c.status == "disconnected", "disconnected"),
        (CALLS.c.status == "timeout", "timeout"),
        (CALLS.c.status == "cancelled", "cancelled by caller"),
        (http == 429, "429 rate limited"),
        (http == 402, "402 insufficient balance"),
        (sa.and_(http >= 500, http < 600), "5xx server error"),
        (sa.and_(http >= 400, http < 500), "other 4xx"),
        else_="error in stream",
    )


def error_classes(engine: Engine, filters: Filters) -> pd.DataFrame:
    """Calls that did not complete, per error class (``ERROR_CLASSES``); columns error_class, calls.

    Every class is present (0 when none), in ``ERROR_CLASSES`` order, so a chart keeps its bars.
    """
    klass = _error_class().label("error_class")
    statement = _dash_filtered(
        engine, sa.select(klass, sa.func.count().label("calls")).where(CALLS.c.status != "completed"), filters
    ).group_by(klass)
    with engine.connect() as connection:
        counts = {name: int(calls) for name, calls in connection.execute(statement).all()}
    return pd.DataFrame({"error_class": list(ERROR_CLASSES), "calls": [counts.get(c, 0) for c in ERROR_CLASSES]})


_SelectT = _DashTypeVar("_SelectT", bound="sa.Select[_DashUnpack[tuple[Any, ...]]]")


# On SQLite a time window longer than this is read by scanning the table, not the started_at
# index: fetching most of a table row by row through an index is 2-3x slower than reading it
# (measured on a million calls), and SQLite's planner picks the index for any range.
SQLITE_INDEX_WINDOW = _dash_timedelta(days=3)


def _started_at(engine: Engine, filters: Filters) -> Any:
    """The column to compare ``since``/``until`` with: ``started_at``, or on SQLite for a wide window the
    same value through coalesce(x, x), which the planner cannot match to an index."""
    column = CALLS.c.started_at
    if engine.dialect.name != "sqlite":
        return column
    narrow = filters.since is not None and filters.until is not None and (
        filters.until - filters.since <= SQLITE_INDEX_WINDOW
    )
    return column if narrow else sa.func.coalesce(column, column)


def _dash_filtered(engine: Engine, statement: _SelectT, filters: Filters) -> _SelectT:
    """``statement`` (over ``calls``) limited to the calls ``filters`` selects, exactly as ``aggregate`` reads them."""
    # in_time_range is typed for the general Select; the statement keeps its own row type.
    statement = _dash_cast(
        _SelectT, in_time_range(statement, filters.since, filters.until, column=_started_at(engine, filters))
    )
    if filters.models:
        statement = statement.where(_raw_model().in_(list(filters.models)))
    if filters.statuses:
        statement = statement.where(CALLS.c.status.in_(list(filters.statuses)))
    if filters.key_fingerprints:
        statement = statement.where(CALLS.c.key_fingerprint.in_(list(filters.key_fingerprints)))
    if filters.users:
        statement = statement.where(CALLS.c.user.in_(list(filters.users)))
    for key, values in filters.tags.items():
        tagged = sa.select(CALL_TAGS.c.request_id).where(
            CALL_TAGS.c.request_id == CALLS.c.request_id, CALL_TAGS.c.key == key
        )
        if values:
            tagged = tagged.where(CALL_TAGS.c.value.in_(list(values)))
        statement = statement.where(tagged.exists())
    return statement


__all__ += ["traffic_frame"]

# The columns ``collector.projection.reprice_traffic`` reads (its ``TRAFFIC_COLUMNS``).
_TRAFFIC_COLUMNS: tuple[str, ...] = (
    "request_id",
    "started_at",
    "finished_at",
    "model",
    "requested_model",
    "prompt_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens",
    "currency",
    "cost",
)


def traffic_frame(engine: Engine, filters: Filters) -> pd.DataFrame:
    """The calls ``filters`` selects, one row each, with what ``projection.reprice_traffic`` needs.

    Ordered by (started_at, request_id). Token counts stay NULL (None) where unknown, money
    stays exact Decimal, times aware UTC; object columns throughout, so nothing becomes NaN.
    """
    statement = _dash_filtered(engine, sa.select(*[CALLS.c[name] for name in _TRAFFIC_COLUMNS]), filters).order_by(
        CALLS.c.started_at, CALLS.c.request_id
    )
    with engine.connect() as connection:
        rows = connection.execution_options(yield_per=EXPORT_BATCH).execute(statement).all()
    data = {name: pd.Series([row[i] for row in rows], dtype=object) for i, name in enumerate(_TRAFFIC_COLUMNS)}
    return pd.DataFrame(data, columns=list(_TRAFFIC_COLUMNS))


# =============================================================================================
# Re-pricing (issue 3; owned by the price book). ``dsmeter reprice`` reads the pricing inputs
# of a range of calls and writes corrected prices back together with one audit row each, in
# the caller's transaction: the only UPDATE of ``calls`` anywhere, and always audited.
# =============================================================================================

from collections.abc import Iterator as _RpIterator  # noqa: E402 - this section's own imports
from collections.abc import Sequence as _RpSequence  # noqa: E402
from contextlib import contextmanager as _rp_contextmanager  # noqa: E402

from sqlalchemy.engine import Connection as _RpConnection  # noqa: E402

from collector.reprice_schema import PRICING_COLUMNS as _RP_PRICING_COLUMNS  # noqa: E402
from collector.reprice_schema import REPRICE_AUDIT as _REPRICE_AUDIT  # noqa: E402

__all__ += [
    "PRICING_INPUT_COLUMNS",
    "repricing_transaction",
    "iter_pricing_rows",
    "update_call_prices",
    "insert_reprice_audit",
    "reprice_audit_rows",
]

# What re-pricing a call reads: its identity and time, its model names, its tokens, its current price.
PRICING_INPUT_COLUMNS: tuple[str, ...] = (
    "request_id",
    "started_at",
    "finished_at",
    "model",
    "requested_model",
    "prompt_tokens",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens",
    *_RP_PRICING_COLUMNS,
)
REPRICE_BATCH = 2000  # calls read per round trip (keyset pages: memory stays flat)


@_rp_contextmanager
def repricing_transaction(engine: Engine) -> _RpIterator[_RpConnection]:
    """One write transaction for a whole reprice run; SQLite takes its write lock up front.

    Either every changed call and its audit row are written, or none (an error rolls back).
    """
    with engine.connect() as connection:
        connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
        with connection.begin():
            yield connection


def iter_pricing_rows(
    connection: _RpConnection, since: datetime | None, until: datetime | None, *, lock: bool = False
) -> _RpIterator[dict[str, Any]]:
    """Calls started in ``[since, until)`` (``PRICING_INPUT_COLUMNS``), ordered by (started_at, request_id).

    Read in keyset pages of ``REPRICE_BATCH``, so any range streams. ``lock`` takes row locks
    (``FOR UPDATE``) on PostgreSQL so nothing changes a row between our read and our update;
    SQLite's write lock (``repricing_transaction``) already excludes other writers.
    """
    columns = [CALLS.c[name] for name in PRICING_INPUT_COLUMNS]
    last: tuple[Any, Any] | None = None
    while True:
        statement = in_time_range(sa.select(*columns), since, until)
        if last is not None:
            after = sa.tuple_(sa.literal(last[0], CALLS.c.started_at.type), sa.literal(last[1], CALLS.c.request_id.type))
            statement = statement.where(sa.tuple_(CALLS.c.started_at, CALLS.c.request_id) > after)
        statement = statement.order_by(CALLS.c.started_at, CALLS.c.request_id).limit(REPRICE_BATCH)
        if lock and connection.dialect.name == "postgresql":
            statement = statement.with_for_update()
        rows = [dict(row) for row in connection.execute(statement).mappings()]
        yield from rows
        if len(rows) < REPRICE_BATCH:
            return
        last = (rows[-1]["started_at"], rows[-1]["request_id"])


def update_call_prices(connection: _RpConnection, prices: _RpSequence[dict[str, Any]]) -> int:
    """Set the pricing columns (``reprice_schema.PRICING_COLUMNS``) of calls by ``request_id``; returns rows changed."""
    if not prices:
        return 0
    statement = (
        CALLS.update()
        .where(CALLS.c.request_id == sa.bindparam("b_request_id", type_=CALLS.c.request_id.type))
        .values({name: sa.bindparam(f"b_{name}", type_=CALLS.c[name].type) for name in _RP_PRICING_COLUMNS})
    )
    changed = 0
    for start in range(0, len(prices), REPRICE_BATCH):
        batch = [{f"b_{key}": value for key, value in row.items()} for row in prices[start : start + REPRICE_BATCH]]
        changed += connection.execute(statement, batch).rowcount
    return changed


def insert_reprice_audit(connection: _RpConnection, rows: _RpSequence[dict[str, Any]]) -> None:
    """Append audit rows (``reprice_schema.RepriceAudit`` columns)."""
    for start in range(0, len(rows), REPRICE_BATCH):
        connection.execute(_REPRICE_AUDIT.insert(), list(rows[start : start + REPRICE_BATCH]))


def reprice_audit_rows(engine: Engine, run_id: Any = None) -> list[dict[str, Any]]:
    """The audit (of one run, or all), oldest first: who re-priced which call when, old and new."""
    statement = sa.select(_REPRICE_AUDIT)
    if run_id is not None:
        statement = statement.where(_REPRICE_AUDIT.c.run_id == run_id)
    statement = statement.order_by(_REPRICE_AUDIT.c.repriced_at, _REPRICE_AUDIT.c.request_id)
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(statement).mappings()]
