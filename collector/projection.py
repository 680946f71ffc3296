"""Projection (the what-if calculator): workloads and recorded traffic priced under any tariff. Pure.

Two questions, two entry points, both used by ``dsmeter estimate`` / ``dsmeter replay`` and
the dashboard's what-if page:

* ``estimate(workload, book, models, at)``: "what does 1M calls a month cost on Flash vs
  Pro?" A ``Workload`` is calls and average tokens per call (cached and uncached prompt,
  output, reasoning for thinking calls), with the shares that time-of-use and caching
  depend on. Returns one ``ModelEstimate`` per model: cache-hit, cache-miss and output
  cost, the total, the tariff entry and periods used, and the promotion that applied.
* ``reprice_traffic(frame, book, as_model=..., as_of=..., shift_off_peak=...)``: "what
  would last month have cost on Pro, or with the batch jobs moved off-peak?" Re-prices a
  ledger DataFrame (``TRAFFIC_COLUMNS``, from ``collector.queries.traffic_frame``) call by
  call, each at its own time of day and date; ``compare_by_day`` then sets actual against
  projected per UTC day and in total.

Money is exact ``Decimal``. Where a share is a fraction that has no finite decimal (the
default peak share of a week is 35/168), each part is rounded half-even to 10^-12 (the
ledger's precision) and the total is the sum of the rounded parts, so parts always add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import ROUND_HALF_EVEN, Decimal, Inexact, localcontext
from fractions import Fraction
from typing import Any

import pandas as pd

from collector.errors import UsageError
from collector.pricebook import STANDARD, PriceBook, Tariff
from collector.pricing import Quote, Unpriced, make_tariff_id, quote, split_prompt
from collector.timeofuse import Schedule

__all__ = [
    "Share",
    "Workload",
    "PeriodShare",
    "ModelEstimate",
    "estimate",
    "period_shares",
    "default_peak_share",
    "TRAFFIC_COLUMNS",
    "PROJECTED_COLUMNS",
    "reprice_traffic",
    "DAY_COLUMNS",
    "ReplaySummary",
    "compare_by_day",
]

Share = Decimal | Fraction | int
_PLACES = Decimal(1).scaleb(-12)  # 10^-12: the ledger's money precision


def _fraction(value: Share | str, name: str) -> Fraction:
    try:
        share = Fraction(value)  # exact for Decimal, int and decimal strings
    except (ValueError, TypeError, ZeroDivisionError):
        raise UsageError(f"{name} must be a number from 0 to 1, got {value!r}") from None
    if not 0 <= share <= 1:
        raise UsageError(f"{name} must be from 0 to 1, got {value}")
    return share


def _money(value: Fraction) -> Decimal:
    """A Fraction of money as a Decimal: exact when it has a finite decimal, else rounded to 10^-12."""
    with localcontext() as context:
        context.prec = 100
        context.clear_flags()
        result = Decimal(value.numerator) / Decimal(value.denominator)
        if not context.flags[Inexact]:
            return result
        return result.quantize(_PLACES, rounding=ROUND_HALF_EVEN)


# =============================================================================================
# Workloads
# =============================================================================================


@dataclass(frozen=True, slots=True)
class Workload:
    """Traffic in one period (say a month): ``calls`` and average tokens per call.

    ``output_tokens`` are the answer's tokens; ``reasoning_tokens`` the extra reasoning
    (thinking) tokens of a thinking call, billed as output, on ``thinking_share`` of the
    calls. ``cache_hit_share``, when given, re-splits each call's prompt (cached + uncached)
    into hits and misses by that share instead. ``peak_share`` is the share of calls made in
    the tariff's peak period (None: that period's share of the week's hours); the rest are
    spread over the other periods by their hours.
    """

    calls: int | Decimal
    cached_prompt_tokens: int | Decimal = 0
    uncached_prompt_tokens: int | Decimal = 0
    output_tokens: int | Decimal = 0
    reasoning_tokens: int | Decimal = 0
    thinking_share: Share = 1
    cache_hit_share: Share | None = None
    peak_share: Share | None = None

    def __post_init__(self) -> None:
        for name in ("calls", "cached_prompt_tokens", "uncached_prompt_tokens", "output_tokens", "reasoning_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, Decimal)) or not Decimal(value).is_finite():
                raise UsageError(f"{name.replace('_', ' ')} must be a whole or decimal number, got {value!r}")
            if value < 0:
                raise UsageError(f"{name.replace('_', ' ')} must not be negative, got {value}")
        _fraction(self.thinking_share, "thinking share")
        if self.cache_hit_share is not None:
            _fraction(self.cache_hit_share, "cache-hit share")
        if self.peak_share is not None:
            _fraction(self.peak_share, "peak share")

    @property
    def prompt_tokens(self) -> Decimal:
        return Decimal(self.cached_prompt_tokens) + Decimal(self.uncached_prompt_tokens)

    def tokens(self) -> tuple[Fraction, Fraction, Fraction]:
        """Total (cache hit, cache miss, output) tokens over all calls, exact."""
        calls = Fraction(self.calls)
        if self.cache_hit_share is None:
            hit, miss = Fraction(self.cached_prompt_tokens), Fraction(self.uncached_prompt_tokens)
        else:
            share = Fraction(self.cache_hit_share)
            prompt = Fraction(self.prompt_tokens)
            hit, miss = prompt * share, prompt * (1 - share)
        output = Fraction(self.output_tokens) + Fraction(self.reasoning_tokens) * Fraction(self.thinking_share)
        return calls * hit, calls * miss, calls * output


@dataclass(frozen=True, slots=True)
class PeriodShare:
    """One time-of-use period of an estimate: its share of the calls and its tariff id."""

    period: str
    share: Fraction
    tariff_id: str


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    """A workload's cost on one model under one tariff entry."""

    model: str
    currency: str
    cache_hit: Decimal
    cache_miss: Decimal
    output: Decimal
    total: Decimal
    tariff: Tariff
    via: str | None  # the name asked for, when billed through an alias
    periods: tuple[PeriodShare, ...]
    list_prices: bool  # list prices were asked for (promotions ignored)
    promotion: str | None  # the promotion these prices are (None when none applied)
    list_total: Decimal | None  # the total at list prices, when a promotion applied

    @property
    def tariff_ids(self) -> tuple[str, ...]:
        return tuple(p.tariff_id for p in self.periods)


def period_shares(tariff: Tariff, peak_share: Share | None = None) -> dict[str, Fraction]:
    """How a workload's calls spread over ``tariff``'s periods (exact, summing to 1).

    Without ``peak_share``, each period gets its share of a plain week's hours. With it, the
    schedule's peak period gets ``peak_share`` and the others share the rest by their hours
    (all of it to the off-peak period if the others have no hours).
    """
    schedule = tariff.schedule
    if schedule is None:
        return {STANDARD: Fraction(1)}
    hours = schedule.week_shares()
    if peak_share is None:
        return hours
    peak = _fraction(peak_share, "peak share")
    rest = {p: s for p, s in hours.items() if p != schedule.peak}
    total_rest = sum(rest.values(), Fraction(0))
    out: dict[str, Fraction] = {}
    for period in hours:  # the schedule's own order, default period first
        if period == schedule.peak:
            out[period] = peak if rest else Fraction(1)
        elif total_rest:
            out[period] = (1 - peak) * rest[period] / total_rest
        else:
            out[period] = (1 - peak) if period == schedule.off_peak else Fraction(0)
    return out


def default_peak_share(tariff: Tariff) -> Fraction | None:
    """The share of a plain week's hours that are peak under ``tariff`` (None for a flat tariff)."""
    if tariff.schedule is None:
        return None
    return tariff.schedule.week_shares()[tariff.schedule.peak]


def estimate(
    workload: Workload,
    book: PriceBook,
    models: Sequence[str] | None,
    at: datetime,
    *,
    currency: str | None = None,
    list_prices: bool = False,
) -> list[ModelEstimate]:
    """``workload``'s cost on each of ``models`` under the tariffs in force at ``at``.

    ``models`` None means every model with a tariff of its own at ``at``. ``list_prices``
    prices promotions at their list prices. Raises ``UsageError`` for a model the book has
    no tariff for at ``at`` (including a time before the book's first entry).
    """
    if at.tzinfo is None:
        raise UsageError("the estimate's time must be timezone-aware")
    wanted = currency or book.currency
    chosen = list(dict.fromkeys(models)) if models else book.models_at(at, wanted)
    if not chosen:
        raise UsageError(_no_tariff_message(book, None, at, wanted))
    hit_tokens, miss_tokens, output_tokens = workload.tokens()
    out: list[ModelEstimate] = []
    for model in chosen:
        resolution = book.resolve(model, at, wanted)
        if resolution is None:
            raise UsageError(_no_tariff_message(book, model, at, wanted))
        tariff = resolution.tariff
        shares = period_shares(tariff, workload.peak_share)
        parts = [Fraction(0)] * 3
        list_parts = [Fraction(0)] * 3
        periods: list[PeriodShare] = []
        for period, share in shares.items():
            periods.append(PeriodShare(period, share, make_tariff_id(tariff, period, via=resolution.via)))
            if not share:
                continue
            for target, use_list in ((parts, list_prices), (list_parts, True)):
                priced = _quote_fraction(book, model, at, period, wanted, use_list, hit_tokens, miss_tokens, output_tokens)
                for i, value in enumerate(priced):
                    target[i] += value * share
        hit, miss, output = (_money(p) for p in parts)
        promoted = tariff.promotion is not None and not list_prices
        list_total = sum((_money(p) for p in list_parts), Decimal(0)) if promoted else None
        out.append(ModelEstimate(
            model=model, currency=wanted, cache_hit=hit, cache_miss=miss, output=output, total=hit + miss + output,
            tariff=tariff, via=resolution.via, periods=tuple(periods), list_prices=list_prices,
            promotion=tariff.promotion if promoted else None, list_total=list_total,
        ))
    return out


def _quote_fraction(book: PriceBook, model: str, at: datetime, period: str, currency: str, list_prices: bool,
                    hit: Fraction, miss: Fraction, output: Fraction) -> tuple[Fraction, Fraction, Fraction]:
    """Cost parts of fractional token totals: price one token of each kind exactly, then scale."""
    result = quote(book, model, at, cache_hit_tokens=1, cache_miss_tokens=1, output_tokens=1,
                   currency=currency, list_prices=list_prices, period=period)
    assert isinstance(result, Quote) and result.cache_hit is not None
    return Fraction(result.cache_hit) * hit, Fraction(result.cache_miss) * miss, Fraction(result.output) * output


def _no_tariff_message(book: PriceBook, model: str | None, at: datetime, currency: str) -> str:
    when = at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    first = book.first_start
    if first is not None and at < first:
        return f"no tariff at {when}: the price book starts at {first:%Y-%m-%d %H:%M} UTC"
    if model is None:
        return f"no model has a {currency} tariff at {when}"
    known = ", ".join(book.models_at(at, currency)) or "none"
    if book.knows(model):
        return f"{model} has no {currency} tariff at {when} (models priced then: {known})"
    return f"unknown model {model!r}: the price book has no tariff for it (models priced at {when}: {known})"


# =============================================================================================
# Recorded traffic
# =============================================================================================

# What ``reprice_traffic`` reads: one ledger row per call (collector.queries.traffic_frame).
TRAFFIC_COLUMNS: tuple[str, ...] = (
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
# What it adds: the projected price of each call (None where the call cannot be priced).
PROJECTED_COLUMNS: tuple[str, ...] = (
    "projected_model",
    "projected_tariff_id",
    "projected_period",
    "projected_cache_hit",
    "projected_cache_miss",
    "projected_output",
    "projected_cost",
)


def _int_or_none(value: Any) -> int | None:
    if value is None or pd.isna(value):
        return None
    return int(value)


def _aware(value: Any) -> datetime | None:
    if value is None or pd.isna(value):
        return None
    moment: datetime = value.to_pydatetime() if isinstance(value, pd.Timestamp) else value
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment


def reprice_traffic(
    frame: pd.DataFrame,
    book: PriceBook,
    *,
    as_model: str | None = None,
    as_of: datetime | None = None,
    shift_off_peak: Share = 0,
    currency: str | None = None,
) -> pd.DataFrame:
    """``frame`` (``TRAFFIC_COLUMNS``) with ``PROJECTED_COLUMNS`` added: each call re-priced.

    ``as_model``: price every call as that model (default: the model it used, the
    response's first, as the ledger priced it). ``as_of``: use the tariff entries in force
    at that instant instead of at each call's own time; the time-of-use period is still the
    call's own (its hour, weekday and holiday). ``shift_off_peak`` (0..1): that share of the
    calls that fell in a peak period is moved to the off-peak period. Calls without token
    counts, or whose model has no tariff, get None (unpriced, never 0).
    """
    missing = [c for c in TRAFFIC_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"traffic frame lacks columns {missing}")
    shift = _fraction(shift_off_peak, "shift off-peak")
    if as_of is not None and as_of.tzinfo is None:
        raise UsageError("--as-of must be timezone-aware")
    wanted = currency or book.currency
    if as_model is not None and not book.knows(as_model):
        raise UsageError(f"unknown model {as_model!r}: the price book has no tariff or alias for it")
    out: dict[str, list[Any]] = {name: [] for name in PROJECTED_COLUMNS}
    columns = {name: frame[name].tolist() for name in TRAFFIC_COLUMNS}
    by_finish = book.price_at == "finished_at"
    for i in range(len(frame)):
        started = _aware(columns["started_at"][i])
        finished = _aware(columns["finished_at"][i]) if by_finish else None
        at = finished or started
        model, requested = columns["model"][i], columns["requested_model"][i]
        names = [as_model] if as_model is not None else [
            n for n in dict.fromkeys((model, requested)) if isinstance(n, str) and n
        ]
        projected = _UNPRICED_ROW if at is None else _project_call(
            names, at, book, as_of, shift, wanted,
            _int_or_none(columns["prompt_tokens"][i]), _int_or_none(columns["prompt_cache_hit_tokens"][i]),
            _int_or_none(columns["prompt_cache_miss_tokens"][i]), _int_or_none(columns["completion_tokens"][i]),
        )
        for name, value in zip(PROJECTED_COLUMNS, projected):
            out[name].append(value)
    result = frame.copy()
    for name in PROJECTED_COLUMNS:
        result[name] = pd.Series(out[name], index=frame.index, dtype=object)
    return result


_UNPRICED_ROW: tuple[Any, ...] = (None,) * len(PROJECTED_COLUMNS)


def _project_call(names: list[str], at: datetime, book: PriceBook, as_of: datetime | None, shift: Fraction,
                  currency: str, prompt: int | None, hit_tokens: int | None, miss_tokens: int | None,
                  completion: int | None) -> tuple[Any, ...]:
    try:
        split = split_prompt(prompt, hit_tokens, miss_tokens)
    except ValueError:
        return _UNPRICED_ROW
    if split is None or completion is None or completion < 0:
        return _UNPRICED_ROW
    hit = split.hit if split.known else None
    miss = split.miss if split.known else None

    def price(name: str, period: str) -> Quote | Unpriced:
        assert completion is not None and split is not None
        return quote(book, name, as_of or at, cache_hit_tokens=hit, cache_miss_tokens=miss,
                     prompt_tokens=split.hit + split.miss, output_tokens=completion,
                     currency=currency, period=period)

    for name in names:
        resolution = book.resolve(name, as_of or at, currency)
        if resolution is None:
            continue
        tariff = resolution.tariff
        period = tariff.period_at(at)  # the call's own hour and day, whatever tariff prices it
        priced = price(name, period)
        if isinstance(priced, Unpriced):
            continue
        parts = [priced.cache_hit, priced.cache_miss, priced.output]
        schedule: Schedule | None = tariff.schedule
        if shift and schedule is not None and period == schedule.peak and schedule.off_peak != schedule.peak:
            moved = price(name, schedule.off_peak)
            assert isinstance(moved, Quote)
            shifted = [moved.cache_hit, moved.cache_miss, moved.output]
            parts = [
                None if a is None or b is None else _money(Fraction(a) * (1 - shift) + Fraction(b) * shift)
                for a, b in zip(parts, shifted)
            ]
        total = sum((p for p in parts if p is not None), Decimal(0))
        return (name, priced.tariff_id, period, parts[0], parts[1], parts[2], total)
    return _UNPRICED_ROW


DAY_COLUMNS: tuple[str, ...] = (
    "day",
    "calls",
    "actual_cost",
    "projected_cost",
    "difference",
    "actual_unpriced_calls",
    "projected_unpriced_calls",
)


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """Actual against projected cost, per UTC day (``days``, columns ``DAY_COLUMNS``) and in total."""

    currency: str
    days: pd.DataFrame
    calls: int
    actual_cost: Decimal
    projected_cost: Decimal
    actual_unpriced_calls: int
    projected_unpriced_calls: int

    @property
    def difference(self) -> Decimal:
        return self.projected_cost - self.actual_cost


def compare_by_day(repriced: pd.DataFrame, currency: str) -> ReplaySummary:
    """Per UTC day of ``started_at``: calls, actual cost (rows priced in ``currency``), projected cost.

    A call with token counts whose actual cost is missing (or in another currency) counts as
    actual-unpriced; one the projection could not price as projected-unpriced. Neither adds
    to its money column: unknown is never summed as 0.
    """
    rows: dict[date, list[Any]] = {}
    zero = Decimal(0)
    has_tokens = [
        _int_or_none(c) is not None or _int_or_none(p) is not None
        for c, p in zip(repriced["completion_tokens"].tolist(), repriced["prompt_tokens"].tolist())
    ]
    for started, actual, actual_currency, projected, tokens in zip(
        repriced["started_at"].tolist(), repriced["cost"].tolist(), repriced["currency"].tolist(),
        repriced["projected_cost"].tolist(), has_tokens,
    ):
        moment = _aware(started)
        assert moment is not None
        day = moment.astimezone(timezone.utc).date()
        row = rows.setdefault(day, [0, zero, zero, 0, 0])
        row[0] += 1
        if isinstance(actual, Decimal) and actual_currency == currency:
            row[1] += actual
        elif tokens:
            row[3] += 1
        if isinstance(projected, Decimal):
            row[2] += projected
        elif tokens:
            row[4] += 1
    ordered = sorted(rows.items())
    days = pd.DataFrame(
        [(day, calls, actual, projected, projected - actual, a_un, p_un)
         for day, (calls, actual, projected, a_un, p_un) in ordered],
        columns=list(DAY_COLUMNS),
    )
    return ReplaySummary(
        currency=currency,
        days=days,
        calls=sum(r[0] for _, r in ordered),
        actual_cost=sum((r[1] for _, r in ordered), zero),
        projected_cost=sum((r[2] for _, r in ordered), zero),
        actual_unpriced_calls=sum(r[3] for _, r in ordered),
        projected_unpriced_calls=sum(r[4] for _, r in ordered),
    )
