"""The retention log (migration 0004): one row per ``dsmeter prune``.

Pruning removes raw calls whose days the daily rollup already holds; this log says up to
when calls were removed, when, and how many, so the gap in the raw ledger is explained and
anything that re-derives rollups from raw calls can tell pruned days from empty ones
(``collector.prune.pruned_before``). Lives on the ledger's ``Base.metadata`` so ``alembic
check`` sees one schema; the migration spells it with plain SQLAlchemy types.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import BigInteger, Integer, Table
from sqlalchemy.orm import Mapped, mapped_column

from collector.models import Base, UTCDateTime

__all__ = ["LedgerPrune", "LEDGER_PRUNES"]


class LedgerPrune(Base):
    """One ``dsmeter prune`` run: every call that started before ``pruned_before`` was removed."""

    __tablename__ = "ledger_prunes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pruned_before: Mapped[datetime] = mapped_column(UTCDateTime)
    pruned_at: Mapped[datetime] = mapped_column(UTCDateTime)
    calls: Mapped[int] = mapped_column(BigInteger)  # rows removed from calls
    partitions: Mapped[int] = mapped_column(Integer)  # whole monthly partitions dropped (PostgreSQL)


LEDGER_PRUNES: Table = cast(Table, LedgerPrune.__table__)
