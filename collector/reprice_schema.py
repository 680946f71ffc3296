"""The reprice audit (migration 0002): one row per call whose price ``dsmeter reprice`` changed.

A price change never rewrites history silently: each re-priced call keeps, here, who ran the
reprice (the OS user), when, with which price book, and its old and new tariff and money, so
any reprice can be read back or undone. Lives on the ledger's ``Base.metadata`` so ``alembic
check`` sees one schema; the migration spells it with plain SQLAlchemy types.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import cast

from sqlalchemy import Index, String, Table, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from collector.models import Base, Money, UTCDateTime

__all__ = ["RepriceAudit", "REPRICE_AUDIT", "PRICING_COLUMNS"]

# The calls columns a reprice may change (and the audit keeps before and after).
PRICING_COLUMNS: tuple[str, ...] = ("currency", "cost", "cost_cache_hit", "cost_cache_miss", "cost_output", "tariff_id")


class RepriceAudit(Base):
    """One call re-priced by one ``dsmeter reprice`` run."""

    __tablename__ = "reprice_audit"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(Uuid)  # every row of one reprice run shares it
    request_id: Mapped[uuid.UUID] = mapped_column(Uuid)  # the call (calls.request_id); no FK: history outlives rows
    repriced_at: Mapped[datetime] = mapped_column(UTCDateTime)
    os_user: Mapped[str] = mapped_column(String(200))
    price_book: Mapped[str] = mapped_column(String(500))  # the book's origin and sha256

    old_currency: Mapped[str | None] = mapped_column(String(3))
    new_currency: Mapped[str | None] = mapped_column(String(3))
    old_tariff_id: Mapped[str | None] = mapped_column(String(200))
    new_tariff_id: Mapped[str | None] = mapped_column(String(200))
    old_cost: Mapped[Decimal | None] = mapped_column(Money)
    new_cost: Mapped[Decimal | None] = mapped_column(Money)
    old_cost_cache_hit: Mapped[Decimal | None] = mapped_column(Money)
    new_cost_cache_hit: Mapped[Decimal | None] = mapped_column(Money)
    old_cost_cache_miss: Mapped[Decimal | None] = mapped_column(Money)
    new_cost_cache_miss: Mapped[Decimal | None] = mapped_column(Money)
    old_cost_output: Mapped[Decimal | None] = mapped_column(Money)
    new_cost_output: Mapped[Decimal | None] = mapped_column(Money)

    __table_args__ = (
        Index("ix_reprice_audit_request_id", "request_id"),
        Index("ix_reprice_audit_run_id", "run_id"),
        Index("ix_reprice_audit_repriced_at", "repriced_at"),
    )


REPRICE_AUDIT: Table = cast(Table, RepriceAudit.__table__)
