"""Monthly partitions of ``calls`` on PostgreSQL: naming, upkeep, and what Alembic must not compare.

At 1,000 calls/s the ledger grows by about 2.6 billion rows a month; one heap and one set of
indexes that size makes every insert touch cold pages and every retention cut a mass
DELETE. So on PostgreSQL, migration 0004 makes ``calls`` a table partitioned by RANGE on
``started_at``, one partition per UTC month, named ``calls_yYYYYmMM``, plus a DEFAULT
partition ``calls_default`` that catches a row no monthly partition covers yet (so no insert
ever fails for want of a partition). Retention then drops whole months (``collector.prune``).
SQLite is not partitioned.

What partitioning changes, and how the ledger keeps its contract:

* A primary key on a partitioned table must contain the partition key: it is
  ``(request_id, started_at)`` (still named ``pk_calls``), and ``LedgerStore`` inserts with
  ``ON CONFLICT (request_id, started_at) DO NOTHING``. A replayed record carries the same
  ``started_at``, so inserts stay idempotent; ``request_id`` is our own uuid4.
* For the same reason nothing can reference ``calls(request_id)``: the foreign key from
  ``call_tags`` is replaced by a statement trigger that deletes a deleted call's tags
  (what ``ON DELETE CASCADE`` did), and ``include_object`` tells Alembic's comparison that
  this foreign key is absent on purpose there (and that partitions are not stray tables).
  ``LedgerStore`` writes a call's tags in the transaction that adds the call.
* New months: ``ensure_partitions`` creates the partitions up to ``MONTHS_AHEAD`` months
  ahead. ``LedgerStore.migrate`` (every process's first write, ``dsmeter db upgrade``) and
  ``dsmeter prune`` call it. If a month was still missing, its rows went to the DEFAULT
  partition; the next call creates that month's partition and moves them into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = [
    "DEFAULT_PARTITION",
    "MONTHS_AHEAD",
    "DELETE_TAGS_TRIGGER",
    "Partition",
    "partition_name",
    "month_start",
    "add_months",
    "is_partitioned",
    "partitions",
    "ensure_partitions",
    "include_object",
]

DEFAULT_PARTITION = "calls_default"
MONTHS_AHEAD = 3  # partitions exist this many months past the current one
DELETE_TAGS_TRIGGER = "calls_delete_tags"
_PARTITION_NAME = re.compile(r"calls_y(\d{4})m(\d{2})")
_TAGS_FK = "fk_call_tags_request_id_calls"
# Any fixed 64-bit number; only partition upkeep takes this advisory lock.
_LOCK_KEY = 0x64736D7061727431  # "dsmpart1"


@dataclass(frozen=True, slots=True)
class Partition:
    """One monthly partition: rows with ``lower <= started_at < upper``."""

    name: str
    lower: datetime
    upper: datetime


def month_start(day: date | datetime) -> date:
    return date(day.year, day.month, 1)


def add_months(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 + count
    return date(index // 12, index % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"calls_y{month.year:04d}m{month.month:02d}"


def _bound(month: date) -> datetime:
    return datetime(month.year, month.month, 1, tzinfo=timezone.utc)


def _parse_name(name: str) -> Partition | None:
    match = _PARTITION_NAME.fullmatch(name)
    if match is None:
        return None
    month = date(int(match.group(1)), int(match.group(2)), 1)
    return Partition(name, _bound(month), _bound(add_months(month, 1)))


def is_partitioned(connection: Connection) -> bool:
    """Whether ``calls`` is a partitioned table here (PostgreSQL after migration 0004)."""
    if connection.dialect.name != "postgresql":
        return False
    kind = connection.execute(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass('calls')")
    ).scalar()
    return bool(kind == "p")


def partitions(connection: Connection) -> list[Partition]:
    """The monthly partitions of ``calls``, oldest first (the DEFAULT partition is not listed)."""
    names = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = to_regclass('calls')"
        )
    ).scalars()
    found = [p for p in (_parse_name(name) for name in names) if p is not None]
    return sorted(found, key=lambda p: p.lower)


def ensure_partitions(connection: Connection, today: date, *, months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """Create the missing monthly partitions: ``today``'s month to ``months_ahead`` ahead, and any month
    with rows waiting in the DEFAULT partition (which are moved into it).

    Rows reach the DEFAULT partition when no process created their month in time (none
    restarted for months) or when they are late for a month before partitioning began.
    Serialised by an advisory lock, so processes starting together create each month once.
    Returns the partitions created; a no-op (empty list) where ``calls`` is not partitioned.
    """
    if not is_partitioned(connection):
        return []
    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    have = {p.name for p in partitions(connection)}
    first = month_start(today)
    wanted = {add_months(first, ahead) for ahead in range(months_ahead + 1)}
    waiting = connection.execute(
        sa.text(f"SELECT DISTINCT date_trunc('month', started_at AT TIME ZONE 'UTC') FROM {DEFAULT_PARTITION}")
    ).scalars()
    wanted.update(month_start(value) for value in waiting)
    created: list[str] = []
    for month in sorted(wanted):
        name = partition_name(month)
        if name not in have:
            _create(connection, month)
            created.append(name)
    return created


def _create(connection: Connection, month: date) -> None:
    name = partition_name(month)
    lower, upper = _bound(month), _bound(add_months(month, 1))
    bounds = f"FROM ('{lower.isoformat()}') TO ('{upper.isoformat()}')"
    waiting = connection.execute(
        sa.text(f"SELECT 1 FROM {DEFAULT_PARTITION} WHERE started_at >= :lower AND started_at < :upper LIMIT 1"),
        {"lower": lower, "upper": upper},
    ).first()
    if waiting is None:
        connection.execute(sa.text(f"CREATE TABLE {name} PARTITION OF calls FOR VALUES {bounds}"))
        return
    # PostgreSQL refuses a partition whose range has rows in the DEFAULT partition: move them
    # first, with writers to the DEFAULT partition held off until the new one is attached.
    # Deleting from the partition itself (not from `calls`) leaves their tags alone.
    connection.execute(sa.text(f"LOCK TABLE {DEFAULT_PARTITION} IN SHARE ROW EXCLUSIVE MODE"))
    connection.execute(sa.text(f"CREATE TABLE {name} (LIKE calls INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    connection.execute(
        sa.text(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE started_at >= :lower AND started_at < :upper "
            f"RETURNING *) INSERT INTO {name} SELECT * FROM moved"
        ),
        {"lower": lower, "upper": upper},
    )
    connection.execute(sa.text(f"ALTER TABLE calls ATTACH PARTITION {name} FOR VALUES {bounds}"))


def include_object(dialect: str, obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic ``include_object``: leave out what partitioning adds or removes on purpose.

    The partitions (reflected tables ``calls_y…`` and ``calls_default``) are not stray
    tables, and on PostgreSQL the ``call_tags`` foreign key to ``calls`` cannot exist (see
    the module docstring). Everything else is compared as usual, on every dialect.
    """
    if type_ == "table" and reflected and name is not None:
        if name == DEFAULT_PARTITION or _PARTITION_NAME.fullmatch(name):
            return False
    if type_ == "foreign_key_constraint" and name == _TAGS_FK and dialect == "postgresql":
        return False
    return True

