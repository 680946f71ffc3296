"""Pricing: tokens + model + time -> cost parts and the tariff that priced them. Pure, exact Decimal.

``quote(book, model, at, ...)`` prices token counts; ``price_record(record, book)`` fills a
``UsageRecord``'s ``currency``, ``cost`` (= ``cost_cache_hit + cost_cache_miss +
cost_output``) and ``tariff_id``; ``default_pricer()`` is what ``LedgerWriter`` prices with.

Rules, each a decision written down once:

* Cost = tokens x price / ``per_tokens``, exact (no rounding: a price has at most 6
  decimals per 1M tokens, so a cost has at most 12, what the ledger keeps). Reasoning tokens
  are output tokens: they are already inside ``completion_tokens`` and are not added again.
* The period is picked by one timestamp, the book's ``price_at`` setting: ``started_at``
  (the default) or ``finished_at`` (falling back to ``started_at`` when a call never finished).
* Which model: the response's ``model`` wins, then the requested one. DeepSeek says which
  model served the call and bills that (api-facts 1.4: a ``deepseek-reasoner`` request came
  back as ``deepseek-v4-flash``); the request's name is the fallback when the response named
  none (the call failed before it) or a name the book does not price.
* A model (or currency) the book has no tariff for is *unpriced*: cost NULL, ``tariff_id``
  ``unpriced:no-tariff``, never $0. A call with no token counts at all (e.g. a 401) is not
  priced either: nothing was billed, and its pricing columns stay NULL.
* Unknown cache split: when neither ``prompt_cache_hit_tokens`` nor ``..._miss_tokens`` is
  known but ``prompt_tokens`` is (a provider without DeepSeek's fields), every prompt token
  is priced as a miss: an upper bound, never an under-bill. It is flagged: the hit part is
  NULL (unknown, not 0) and ``tariff_id`` ends in ``#all-miss``. With one of hit/miss and
  ``prompt_tokens`` the other is their difference (exact, not flagged).

``tariff_id`` reads ``[name>]entry-id/period[#all-miss]``, e.g. ``deepseek-flash@2026-09-10/peak``,
or ``deepseek-v4-flash>deepseek-flash@2026-09-10/peak`` when the name was billed through an alias.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal, DivisionByZero, Inexact, InvalidOperation, Overflow

from collector.pricebook import PriceBook, PriceBookError, Rates, Tariff, load_book
from collector.record import UsageRecord

__all__ = [
    "ALL_MISS_FLAG",
    "UNPRICED_PREFIX",
    "PromptSplit",
    "Quote",
    "Unpriced",
    "split_prompt",
    "cost_parts",
    "make_tariff_id",
    "quote",
    "pricing_instant",
    "price_record",
    "is_priced",
    "BookPricer",
    "default_pricer",
]

log = logging.getLogger("dsmeter.pricing")

# Far more digits than any token count x price has, and a trap should one ever not fit: never rounded.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow])

ALL_MISS_FLAG = "#all-miss"
UNPRICED_PREFIX = "unpriced:"


@dataclass(frozen=True, slots=True)
class PromptSplit:
    """Prompt tokens as billed: cache hits and misses; ``known`` False when the split was assumed."""

    hit: int | Decimal
    miss: int | Decimal
    known: bool = True


@dataclass(frozen=True, slots=True)
class Quote:
    """What a call (or a number of tokens) costs under one tariff and period."""

    currency: str
    cache_hit: Decimal | None  # None: the cache split was unknown and every prompt token was priced as a miss
    cache_miss: Decimal
    output: Decimal
    tariff: Tariff
    period: str
    via: str | None = None  # the name asked for, when it was billed through an alias
    list_prices: bool = False

    @property
    def total(self) -> Decimal:
        return (self.cache_hit or Decimal(0)) + self.cache_miss + self.output

    @property
    def split_known(self) -> bool:
        return self.cache_hit is not None

    @property
    def tariff_id(self) -> str:
        return make_tariff_id(self.tariff, self.period, via=self.via, all_miss=not self.split_known)

    @property
    def promotion(self) -> str | None:
        """The promotion these prices are, if any (None when list prices were asked for)."""
        return None if self.list_prices else self.tariff.promotion


@dataclass(frozen=True, slots=True)
class Unpriced:
    """Why a call could not be priced."""

    reason: str  # no-tariff, no-model, incomplete-usage, invalid-usage, book-error
    detail: str

    @property
    def tariff_id(self) -> str:
        return UNPRICED_PREFIX + self.reason


def split_prompt(prompt: int | Decimal | None, hit: int | Decimal | None,
                 miss: int | Decimal | None) -> PromptSplit | None:
    """The billed cache split, from whatever the provider sent; None when it cannot be known.

    Raises ``ValueError`` on negative counts or a hit or miss count larger than the prompt.
    """
    for name, value in (("prompt", prompt), ("cache hit", hit), ("cache miss", miss)):
        if value is not None and value < 0:
            raise ValueError(f"{name} token count is negative ({value})")
    if hit is not None and miss is not None:
        return PromptSplit(hit, miss)  # the provider's own billing fields win over prompt_tokens
    if prompt is None:
        return None
    if hit is not None:
        if hit > prompt:
            raise ValueError(f"cache hit tokens ({hit}) exceed prompt tokens ({prompt})")
        return PromptSplit(hit, prompt - hit)
    if miss is not None:
        if miss > prompt:
            raise ValueError(f"cache miss tokens ({miss}) exceed prompt tokens ({prompt})")
        return PromptSplit(prompt - miss, miss)
    return PromptSplit(0, prompt, known=False)


def cost_parts(rates: Rates, per_tokens: int, hit: int | Decimal, miss: int | Decimal,
               output: int | Decimal) -> tuple[Decimal, Decimal, Decimal]:
    """(cache hit, cache miss, output) cost of token counts at ``rates``: exact, never rounded."""
    shift = -(len(str(per_tokens)) - 1)  # per_tokens is a power of ten (validated)
    multiply = _EXACT.multiply
    return (
        multiply(Decimal(hit), rates.hit).scaleb(shift, _EXACT),
        multiply(Decimal(miss), rates.miss).scaleb(shift, _EXACT),
        multiply(Decimal(output), rates.output).scaleb(shift, _EXACT),
    )


def make_tariff_id(tariff: Tariff, period: str, *, via: str | None = None, all_miss: bool = False) -> str:
    text = f"{tariff.id}/{period}"
    if via is not None:
        text = f"{via}>{text}"
    return text + ALL_MISS_FLAG if all_miss else text


def quote(
    book: PriceBook,
    model: str,
    at: datetime,
    *,
    cache_hit_tokens: int | Decimal | None,
    cache_miss_tokens: int | Decimal | None,
    output_tokens: int | Decimal,
    prompt_tokens: int | Decimal | None = None,
    currency: str | None = None,
    list_prices: bool = False,
    period: str | None = None,
) -> Quote | Unpriced:
    """Price token counts of ``model`` at instant ``at`` (aware) with ``book``.

    ``period`` forces a time-of-use period (projections weigh each); by default it is the
    one ``at`` falls in. ``list_prices`` asks for a promotion's list prices instead of the
    promoted ones. Token counts may be Decimals (a workload's averages). With only
    ``prompt_tokens`` the prompt is priced as all misses (``Quote.cache_hit`` None).
    """
    if output_tokens < 0:
        raise ValueError(f"output token count is negative ({output_tokens})")
    split = split_prompt(prompt_tokens, cache_hit_tokens, cache_miss_tokens)
    if split is None:
        raise ValueError("the prompt's token counts are unknown: give cache hit and miss tokens, or prompt tokens")
    wanted = currency or book.currency
    resolution = book.resolve(model, at, wanted)
    if resolution is None:
        others = [c for c in book.currencies if c != wanted and book.resolve(model, at, c) is not None]
        if others:
            return Unpriced("no-tariff", f"the book has no {wanted} price for {model} at {at.isoformat()} "
                                         f"(it has {', '.join(others)})")
        return Unpriced("no-tariff", f"the book has no tariff for {model} at {at.isoformat()}")
    tariff = resolution.tariff
    chosen = period if period is not None else tariff.period_at(at)
    rates = tariff.rates(chosen, wanted, list_prices=list_prices)
    if rates is None:
        raise ValueError(f"{tariff.id} has no period {chosen!r} (periods: {', '.join(tariff.periods)})")
    hit_cost, miss_cost, out_cost = cost_parts(rates, tariff.per_tokens, split.hit, split.miss, output_tokens)
    return Quote(
        currency=wanted,
        cache_hit=hit_cost if split.known else None,
        cache_miss=miss_cost,
        output=out_cost,
        tariff=tariff,
        period=chosen,
        via=resolution.via,
        list_prices=list_prices and tariff.list_prices is not None,
    )


def pricing_instant(record: UsageRecord, price_at: str) -> datetime:
    """The timestamp that picks a record's tariff and period (the book's ``price_at``)."""
    if price_at == "finished_at" and record.finished_at is not None:
        return record.finished_at
    return record.started_at


def _has_usage(record: UsageRecord) -> bool:
    return any(
        value is not None
        for value in (record.prompt_tokens, record.prompt_cache_hit_tokens, record.prompt_cache_miss_tokens,
                      record.completion_tokens)
    )


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))


def _with_prices(record: UsageRecord, currency: str | None, cost: Decimal | None, hit: Decimal | None,
                 miss: Decimal | None, output: Decimal | None, tariff_id: str | None) -> UsageRecord:
    """A copy of ``record`` with its pricing columns set.

    The writer prices every call, so this skips ``dataclasses.replace`` (which re-runs the
    constructor's checks on a record that already passed them): a field-by-field copy.
    """
    copy = object.__new__(UsageRecord)
    for name in _RECORD_FIELDS:
        object.__setattr__(copy, name, getattr(record, name))
    copy.currency, copy.cost, copy.cost_cache_hit, copy.cost_cache_miss, copy.cost_output, copy.tariff_id = (
        currency, cost, hit, miss, output, tariff_id)
    return copy


def _unpriced(record: UsageRecord, result: Unpriced) -> UsageRecord:
    return _with_prices(record, None, None, None, None, None, result.tariff_id)


def price_record(record: UsageRecord, book: PriceBook, *, currency: str | None = None) -> UsageRecord:
    """``record`` with its pricing columns set by ``book`` (always recomputed; the record is not changed).

    Returns a new record: priced, or unpriced with the reason in ``tariff_id``, or (no token
    counts at all) with every pricing column NULL.
    """
    if not _has_usage(record):
        return _with_prices(record, None, None, None, None, None, None)
    try:
        split = split_prompt(record.prompt_tokens, record.prompt_cache_hit_tokens, record.prompt_cache_miss_tokens)
        if record.completion_tokens is not None and record.completion_tokens < 0:
            raise ValueError(f"completion token count is negative ({record.completion_tokens})")
    except ValueError as error:
        return _unpriced(record, Unpriced("invalid-usage", str(error)))
    if split is None or record.completion_tokens is None:
        return _unpriced(record, Unpriced("incomplete-usage", "the prompt or completion token count is unknown"))
    names = [n for n in dict.fromkeys((record.model, record.requested_model)) if n]
    if not names:
        return _unpriced(record, Unpriced("no-model", "the call names no model"))
    at = pricing_instant(record, book.price_at)
    result: Quote | Unpriced = Unpriced("no-tariff", "")
    for name in names:
        result = quote(
            book, name, at,
            cache_hit_tokens=record.prompt_cache_hit_tokens,
            cache_miss_tokens=record.prompt_cache_miss_tokens,
            prompt_tokens=record.prompt_tokens,
            output_tokens=record.completion_tokens,
            currency=currency,
        )
        if isinstance(result, Quote):
            return _with_prices(record, result.currency, result.total, result.cache_hit, result.cache_miss,
                                result.output, result.tariff_id)
    assert isinstance(result, Unpriced)
    return _unpriced(record, result)


def is_priced(record: UsageRecord) -> bool:
    return record.cost is not None


class BookPricer:
    """The writer's default pricer: prices each record that arrives unpriced, with one book.

    The book is loaded on first use (``path``, else ``$DSMETER_PRICES``, else the shipped
    book), so a broken team book never stops a writer from starting: it is logged once and
    calls are written unpriced (``tariff_id`` ``unpriced:book-error``) for ``dsmeter
    reprice`` to fix. A record that already carries a cost (priced by its producer) is kept.
    """

    def __init__(self, path: str | None = None, *, book: PriceBook | None = None) -> None:
        self._path = path
        self._book = book
        self._failed: PriceBookError | None = None
        self._lock = threading.Lock()

    def book(self) -> PriceBook | None:
        if self._book is not None or self._failed is not None:
            return self._book
        with self._lock:
            if self._book is None and self._failed is None:
                try:
                    self._book = load_book(self._path)
                except PriceBookError as error:
                    self._failed = error
                    log.error("dsmeter: the price book cannot be used, calls are written unpriced: %s", error)
        return self._book

    def __call__(self, record: UsageRecord) -> UsageRecord:
        if record.cost is not None:
            return record
        book = self.book()
        if book is None:
            if not _has_usage(record):
                return record
            return _unpriced(record, Unpriced("book-error", str(self._failed)))
        return price_record(record, book)


def default_pricer(path: str | None = None) -> BookPricer:
    """A pricer for ``LedgerWriter``: the book in effect (see ``BookPricer``)."""
    return BookPricer(path)
