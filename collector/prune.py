"""Retention: remove raw calls older than a date, once the daily rollup holds their days.

Reports and the dashboard read the rollup for whole days (``collector.rollups``), so raw
calls can go once their days are rolled up; a year at 1,000 calls/s is about 31 billion
rows otherwise. ``prune`` refuses while the rollup and the raw ledger disagree on any day
being removed (``NotRolledUp``): nothing is removed that no report could show again.

On a partitioned PostgreSQL ledger (``collector.partitions``) whole months before the
cut-off are dropped as tables (their tags deleted first), and only the rows of a month cut
in the middle (or in the DEFAULT partition) are deleted row by row. On SQLite, and on an
unpartitioned ledger, the calls are deleted (their tags go with them). Either way it is one
transaction, logged in ``ledger_prunes``.

One race is left: a writer that commits a late call for a day being pruned between the
check and the removal, and dies before its rollup hook runs, loses that call from both.
Late calls are rare (spool replays) and writers add their rollup sums right after their
commit, so the window is milliseconds; ``dsmeter rollup --check`` over the pruned range
would show the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from collector.errors import DsmeterError, UsageError
from collector.models import CALLS
from collector.partitions import DEFAULT_PARTITION, ensure_partitions, is_partitioned, partitions
from collector.record import utcnow
from collector.retention_schema import LEDGER_PRUNES
from collector.store import LedgerStore, is_operational_error

__all__ = ["EXIT_NOT_ROLLED_UP", "NotRolledUp", "PrunePlan", "prune", "pruned_before"]

EXIT_NOT_ROLLED_UP = 4


class NotRolledUp(DsmeterError):
    """Days before the cut-off whose calls the rollup does not (exactly) hold yet."""

    exit_code = EXIT_NOT_ROLLED_UP

    def __init__(self, days: list[date], before: date) -> None:
        self.days = days
        first, last = days[0], days[-1]
        span = first.isoformat() if first == last else f"{first.isoformat()} .. {last.isoformat()}"
        super().__init__(
            f"refusing to prune before {before.isoformat()}: {len(days)} day(s) ({span}) are not fully rolled up; "
            f"run `dsmeter rollup --since {first.isoformat()} --until {last.isoformat()}` first"
        )


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What a prune removed (or, with ``dry_run``, would remove)."""

    before: datetime  # every call that started before this instant
    calls: int  # rows of calls
    partitions: list[str] = field(default_factory=list)  # whole monthly partitions dropped
    dry_run: bool = False


def _cutoff(before: date) -> datetime:
    return datetime.combine(before, time.min, tzinfo=timezone.utc)


def pruned_before(connection: Connection) -> datetime | None:
    """The latest cut-off any prune of this ledger applied: raw calls before it were removed on purpose."""
    value: datetime | None = connection.execute(sa.select(sa.func.max(LEDGER_PRUNES.c.pruned_before))).scalar()
    return value


def _unrolled_days(store: LedgerStore, before: date) -> list[date]:
    """Days before ``before`` (from the oldest call) where the rollup and the raw ledger differ."""
    from collector.rollups import compare  # pandas and the query layer: only when pruning

    with store.engine.connect() as connection:
        oldest: datetime | None = connection.execute(
            sa.select(sa.func.min(CALLS.c.started_at)).where(CALLS.c.started_at < _cutoff(before))
        ).scalar()
    if oldest is None:
        return []
    drifts = compare(store, oldest.astimezone(timezone.utc).date(), before)
    return sorted({drift.key[0] for drift in drifts})


def prune(store: LedgerStore, before: date, *, dry_run: bool = False, today: date | None = None) -> PrunePlan:
    """Remove every call that started before ``before`` (00:00 UTC), if the rollup holds their days.

    Raises ``UsageError`` for a cut-off after today, ``NotRolledUp`` (exit code 4) when a
    day to be removed is not rolled up; removes nothing then.
    """
    today = today or utcnow().date()
    if before > today:
        raise UsageError(f"--before {before.isoformat()} is in the future; calls up to today would be lost")
    store.ensure_schema()
    unrolled = _unrolled_days(store, before)
    if unrolled:
        raise NotRolledUp(unrolled, before)
    cutoff = _cutoff(before)
    try:
        with store.engine.connect() as connection:
            connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
            with connection.begin():
                plan = _remove(connection, cutoff, dry_run)
                if not dry_run:
                    connection.execute(
                        LEDGER_PRUNES.insert().values(
                            pruned_before=cutoff, pruned_at=utcnow(), calls=plan.calls, partitions=len(plan.partitions)
                        )
                    )
                    ensure_partitions(connection, today)
    except sa.exc.SQLAlchemyError as error:
        if is_operational_error(error):
            raise store.unavailable(error, "prune") from None
        raise
    return plan


def _count(connection: Connection, table: str, cutoff: datetime | None = None) -> int:
    """Rows of ``calls`` or one of its partitions, all or those started before ``cutoff``."""
    started_at = sa.column("started_at", CALLS.c.started_at.type)  # typed: SQLite compares stored text
    statement = sa.select(sa.func.count()).select_from(sa.table(table, started_at))
    if cutoff is not None:
        statement = statement.where(started_at < cutoff)
    return int(connection.execute(statement).scalar_one())


def _remove(connection: Connection, cutoff: datetime, dry_run: bool) -> PrunePlan:
    dropped: list[str] = []
    removed = 0
    if is_partitioned(connection):
        for part in partitions(connection):
            if part.upper > cutoff:
                continue
            dropped.append(part.name)
            removed += _count(connection, part.name)
            if not dry_run:
                # Tags first: no foreign key ties them to a partition (see collector.partitions).
                connection.execute(
                    sa.text(f"DELETE FROM call_tags t USING {part.name} c WHERE t.request_id = c.request_id")
                )
                connection.execute(sa.text(f"DROP TABLE {part.name}"))
        # What is left before the cut-off: a month cut in the middle, late rows in the DEFAULT
        # partition. Deleting through `calls` fires the trigger that deletes their tags.
        if dry_run:
            left = sum(_count(connection, p.name, cutoff) for p in partitions(connection) if p.name not in dropped)
            removed += left + _count(connection, DEFAULT_PARTITION, cutoff)
            return PrunePlan(cutoff, removed, dropped, dry_run=True)
    elif dry_run:
        return PrunePlan(cutoff, _count(connection, "calls", cutoff), dropped, dry_run=True)
    # On SQLite the store's connections enforce foreign keys, so call_tags cascade.
    deleted = connection.execute(CALLS.delete().where(CALLS.c.started_at < cutoff))
    removed += deleted.rowcount if deleted.rowcount is not None and deleted.rowcount >= 0 else 0
    return PrunePlan(cutoff, removed, dropped)
