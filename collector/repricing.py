"""Re-pricing stored calls after a correction to the price book: planned purely, written with an audit.

``plan_change(row, book)`` (pure) says whether one stored call's price differs from what the
book says now. ``reprice(store, book, since, until)`` applies it to every call started in
``[since, until)`` (and to no other), in one transaction: each changed call is updated and
gets a ``reprice_audit`` row (who, when, which book, old and new tariff and money). Running it
again changes nothing (the prices already agree), so it is idempotent. ``dry_run`` computes
the same result and writes nothing. Afterwards the reporting rollup, when the ledger has one,
is re-derived for the days that changed, so reports agree with the calls.
"""

from __future__ import annotations

import getpass
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from collector.pricebook import PriceBook
from collector.pricing import price_record
from collector.record import UsageRecord
from collector.reprice_schema import PRICING_COLUMNS
from collector.store import LedgerStore

__all__ = ["Prices", "PriceChange", "RepriceResult", "plan_change", "reprice", "os_user"]


@dataclass(frozen=True, slots=True)
class Prices:
    """A call's pricing columns (``reprice_schema.PRICING_COLUMNS``)."""

    currency: str | None
    cost: Decimal | None
    cost_cache_hit: Decimal | None
    cost_cache_miss: Decimal | None
    cost_output: Decimal | None
    tariff_id: str | None

    @classmethod
    def of(cls, values: Mapping[str, Any] | UsageRecord) -> Prices:
        get = values.get if isinstance(values, Mapping) else lambda name: getattr(values, name)
        return cls(*(get(name) for name in PRICING_COLUMNS))

    def as_dict(self, prefix: str = "") -> dict[str, Any]:
        return {f"{prefix}{name}": getattr(self, name) for name in PRICING_COLUMNS}


@dataclass(frozen=True, slots=True)
class PriceChange:
    request_id: uuid.UUID
    started_at: datetime
    model: str | None
    old: Prices
    new: Prices


@dataclass
class RepriceResult:
    """What a reprice found (and, unless ``dry_run``, wrote)."""

    run_id: uuid.UUID
    since: datetime
    until: datetime | None
    dry_run: bool
    price_book: str
    calls: int = 0  # calls in the range
    changes: list[PriceChange] = field(default_factory=list)
    old_totals: dict[str, Decimal] = field(default_factory=dict)  # per currency, every call in the range
    new_totals: dict[str, Decimal] = field(default_factory=dict)
    old_unpriced: int = 0  # calls with token counts but no price
    new_unpriced: int = 0
    written: int = 0
    rollup_days: int | None = None  # days of the reporting rollup re-derived (None: no rollup)


def _record(row: Mapping[str, Any]) -> UsageRecord:
    return UsageRecord(
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        request_id=row["request_id"],
        model=row["model"],
        requested_model=row["requested_model"],
        prompt_tokens=row["prompt_tokens"],
        prompt_cache_hit_tokens=row["prompt_cache_hit_tokens"],
        prompt_cache_miss_tokens=row["prompt_cache_miss_tokens"],
        completion_tokens=row["completion_tokens"],
    )


def _same(old: Prices, new: Prices) -> bool:
    # Decimal equality is by value: 0.10 == 0.1, as the ledger stores them (pico-units).
    return old == new


def plan_change(row: Mapping[str, Any], book: PriceBook) -> PriceChange | None:
    """The change the book makes to one stored call (``PRICING_INPUT_COLUMNS``), or None if it agrees."""
    old = Prices.of(row)
    new = Prices.of(price_record(_record(row), book))
    if _same(old, new):
        return None
    return PriceChange(row["request_id"], row["started_at"], row["model"] or row["requested_model"], old, new)


def os_user() -> str:
    """Who runs this (the OS login); never fails."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container's bare uid): say which uid
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _has_tokens(row: Mapping[str, Any]) -> bool:
    return any(row[name] is not None for name in ("prompt_tokens", "prompt_cache_hit_tokens",
                                                   "prompt_cache_miss_tokens", "completion_tokens"))


def _tally(result: RepriceResult, row: Mapping[str, Any], change: PriceChange | None) -> None:
    old = Prices.of(row)
    new = change.new if change is not None else old
    result.calls += 1
    for prices, totals, attr in ((old, result.old_totals, "old_unpriced"), (new, result.new_totals, "new_unpriced")):
        if prices.cost is not None and prices.currency is not None:
            totals[prices.currency] = totals.get(prices.currency, Decimal(0)) + prices.cost
        elif _has_tokens(row):
            setattr(result, attr, getattr(result, attr) + 1)


def reprice(
    store: LedgerStore,
    book: PriceBook,
    since: datetime,
    until: datetime | None = None,
    *,
    dry_run: bool = False,
    user: str | None = None,
    now: datetime | None = None,
) -> RepriceResult:
    """Re-price every call started in ``[since, until)`` with ``book``; write the changes with an audit.

    Rows outside the range are never read for update nor touched. On PostgreSQL the rows
    read are locked until the transaction commits; on SQLite the write lock is held.
    """
    from collector import queries

    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValueError("reprice bounds must be timezone-aware")
    result = RepriceResult(run_id=uuid.uuid4(), since=since, until=until, dry_run=dry_run, price_book=book.origin)
    if dry_run:
        store.require_schema()
        with store.engine.connect() as connection:
            for row in queries.iter_pricing_rows(connection, since, until):
                change = plan_change(row, book)
                _tally(result, row, change)
                if change is not None:
                    result.changes.append(change)
        return result

    store.ensure_schema()
    stamp = now or datetime.now(timezone.utc)
    who = user or os_user()
    with queries.repricing_transaction(store.engine) as connection:
        for row in queries.iter_pricing_rows(connection, since, until, lock=True):
            change = plan_change(row, book)
            _tally(result, row, change)
            if change is not None:
                result.changes.append(change)
        updates = [{"request_id": c.request_id, **c.new.as_dict()} for c in result.changes]
        result.written = queries.update_call_prices(connection, updates)
        if result.written != len(updates):  # pragma: no cover - the rows are locked: this would be a bug
            raise RuntimeError(f"expected to update {len(updates)} calls, updated {result.written}; rolled back")
        queries.insert_reprice_audit(connection, [
            {
                "id": uuid.uuid4(), "run_id": result.run_id, "request_id": c.request_id, "repriced_at": stamp,
                "os_user": who[:200], "price_book": book.origin[:500],
                **c.old.as_dict("old_"), **c.new.as_dict("new_"),
            }
            for c in result.changes
        ])
    if result.changes:
        result.rollup_days = _rederive_rollup(store, {c.started_at.astimezone(timezone.utc).date() for c in result.changes})
    return result


def _rederive_rollup(store: LedgerStore, days: set[date]) -> int | None:
    """Re-derive the reporting rollup for ``days`` if this ledger has one (migration 0003)."""
    import sqlalchemy as sa

    if not sa.inspect(store.engine).has_table("rollup_daily"):
        return None
    from collector import rollups

    first, last = min(days), max(days)
    rollups.rebuild(store, first, last + timedelta(days=1))
    return len(days)
