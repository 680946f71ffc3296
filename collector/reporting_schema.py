"""Tables of the reporting layer (migration 0003): daily rollups, budgets, balance snapshots.

They live on the ledger's ``Base.metadata`` so ``alembic check`` sees one schema, and the
migration spells them with plain SQLAlchemy types (the same way 0001 spells the ledger).

``rollup_daily`` holds one row per (UTC day, model, status, currency, key fingerprint,
tag set, tariff, shard) with the sums a report needs; a key has a row per shard that
concurrent writers added to (see ``collector.rollups``), and reads sum over them. Its key
columns are NOT NULL (a primary key cannot hold NULL), so an unknown value is stored as
``''`` (``UNKNOWN``) and read back as None. A tag set is stored once, in ``rollup_tag_sets``,
keyed by a hash of its canonical JSON, and its tags one per row in ``rollup_tag_set_items``
so any tag key can be grouped on or filtered by with plain SQL on both dialects.

``rollup_state`` is one row saying whether the rollup covers the whole ledger: a ledger
that had calls before the rollup existed is read raw until ``dsmeter rollup`` builds it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import cast

from sqlalchemy import BigInteger, Boolean, Date, Index, Integer, SmallInteger, String, Table, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from collector.models import Base, Money, UTCDateTime

__all__ = [
    "UNKNOWN",
    "canonical_tags",
    "tags_text",
    "tag_set_id",
    "RollupDaily",
    "RollupTagSet",
    "RollupTagSetItem",
    "RollupState",
    "RollupRebuild",
    "Budget",
    "BalanceSnapshot",
    "ROLLUP_DAILY",
    "ROLLUP_TAG_SETS",
    "ROLLUP_TAG_SET_ITEMS",
    "ROLLUP_STATE",
    "ROLLUP_REBUILDS",
    "BUDGETS",
    "BALANCE_SNAPSHOTS",
    "ROLLUP_KEY_COLUMNS",
    "ROLLUP_COUNT_COLUMNS",
    "ROLLUP_MONEY_COLUMNS",
]

UNKNOWN = ""  # a NULL dimension in a rollup key (model, currency, key fingerprint, tariff)

_TAG_KEY_LIMIT, _TAG_VALUE_LIMIT = 100, 500  # as collector.models cuts call_tags rows


def canonical_tags(tags: Mapping[str, object] | None) -> dict[str, str]:
    """A call's tags as ``call_tags`` holds them: keys cut to 100, values to 500, first key wins; sorted.

    The one definition shared by the rollup (which stores tag sets) and the raw ledger path,
    so grouping by a tag gives the same groups either way.
    """
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        cut = str(key)[:_TAG_KEY_LIMIT]
        if cut not in out:
            out[cut] = str(value)[:_TAG_VALUE_LIMIT]
    return dict(sorted(out.items()))


def tags_text(tags: Mapping[str, str]) -> str:
    """The canonical JSON text of a tag set (sorted keys, no spaces, UTF-8 kept)."""
    return json.dumps(dict(tags), ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def tag_set_id(tags: Mapping[str, str]) -> str:
    """The rollup's name for a canonical tag set: 32 hex digits of the SHA-256 of its JSON."""
    return hashlib.sha256(tags_text(tags).encode()).hexdigest()[:32]


ROLLUP_KEY_COLUMNS: tuple[str, ...] = (
    "day",
    "model",
    "status",
    "currency",
    "key_fingerprint",
    "tag_set_id",
    "tariff_id",
)
ROLLUP_COUNT_COLUMNS: tuple[str, ...] = (
    "calls",
    "unpriced_calls",
    "estimated_calls",
    "prompt_cache_hit_tokens",
    "prompt_cache_miss_tokens",
    "completion_tokens",
    "reasoning_tokens",
)
ROLLUP_MONEY_COLUMNS: tuple[str, ...] = ("cost", "cost_cache_hit", "cost_cache_miss", "cost_output")


class RollupDaily(Base):
    """Sums of the calls of one UTC day sharing every key column. Counts and money are exact."""

    __tablename__ = "rollup_daily"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(20), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    key_fingerprint: Mapped[str] = mapped_column(String(100), primary_key=True)
    tag_set_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tariff_id: Mapped[str] = mapped_column(String(200), primary_key=True)

    calls: Mapped[int] = mapped_column(BigInteger)
    unpriced_calls: Mapped[int] = mapped_column(BigInteger)
    estimated_calls: Mapped[int] = mapped_column(BigInteger)
    prompt_cache_hit_tokens: Mapped[int] = mapped_column(BigInteger)
    prompt_cache_miss_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger)
    cost: Mapped[Decimal] = mapped_column(Money)
    cost_cache_hit: Mapped[Decimal] = mapped_column(Money)
    cost_cache_miss: Mapped[Decimal] = mapped_column(Money)
    cost_output: Mapped[Decimal] = mapped_column(Money)
    # Which writer transaction added to this row (``collector.rollups``, migration 0006): writers
    # adding to one key at the same time use different shards, so they never wait on each
    # other's row lock. Reads sum over shards as they sum over rows.
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("0"))


class RollupTagSet(Base):
    """One distinct set of tags, as canonical JSON (keys sorted), named by a hash of that text."""

    __tablename__ = "rollup_tag_sets"

    tag_set_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tags: Mapped[str] = mapped_column(Text)


class RollupTagSetItem(Base):
    """One tag of one tag set: what a group-by or a filter on a tag key joins to."""

    __tablename__ = "rollup_tag_set_items"

    tag_set_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))

    __table_args__ = (Index("ix_rollup_tag_set_items_key_value", "key", "value"),)


class RollupState(Base):
    """A single row (id 1): whether ``rollup_daily`` covers every call in the ledger."""

    __tablename__ = "rollup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    complete: Mapped[bool] = mapped_column(Boolean)
    built_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RollupRebuild(Base):
    """When each day's rollup rows were last re-derived from the raw ledger (see ``collector.rollups``)."""

    __tablename__ = "rollup_rebuilds"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    rebuilt_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Budget(Base):
    """A monthly spending limit on a scope of calls (all calls, or those carrying given tags)."""

    __tablename__ = "budgets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Canonical JSON of the scope's tag filter ({} = every call), unique with the currency.
    scope: Mapped[str] = mapped_column(String(1000))
    currency: Mapped[str] = mapped_column(String(3))
    monthly: Mapped[Decimal] = mapped_column(Money)
    soft: Mapped[Decimal] = mapped_column(Money)  # a fraction of ``monthly``, e.g. 0.8
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("uq_budgets_scope_currency", "scope", "currency", unique=True),)


class BalanceSnapshot(Base):
    """One reading of the provider's ``GET /user/balance``, one row per currency it reported."""

    __tablename__ = "balance_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    taken_at: Mapped[datetime] = mapped_column(UTCDateTime)
    upstream: Mapped[str] = mapped_column(String(500))  # scheme://host[:port], never credentials
    currency: Mapped[str] = mapped_column(String(3))
    total_balance: Mapped[Decimal] = mapped_column(Money)
    granted_balance: Mapped[Decimal | None] = mapped_column(Money)
    topped_up_balance: Mapped[Decimal | None] = mapped_column(Money)
    is_available: Mapped[bool] = mapped_column(Boolean)

    __table_args__ = (Index("ix_balance_snapshots_upstream_currency_taken_at", "upstream", "currency", "taken_at"),)


ROLLUP_DAILY: Table = cast(Table, RollupDaily.__table__)
ROLLUP_TAG_SETS: Table = cast(Table, RollupTagSet.__table__)
ROLLUP_TAG_SET_ITEMS: Table = cast(Table, RollupTagSetItem.__table__)
ROLLUP_STATE: Table = cast(Table, RollupState.__table__)
ROLLUP_REBUILDS: Table = cast(Table, RollupRebuild.__table__)
BUDGETS: Table = cast(Table, Budget.__table__)
BALANCE_SNAPSHOTS: Table = cast(Table, BalanceSnapshot.__table__)
