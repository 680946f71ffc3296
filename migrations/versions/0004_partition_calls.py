"""Scale: ``calls`` partitioned by month on PostgreSQL; the ``ledger_prunes`` retention log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

On every dialect: ``ledger_prunes``, one row per ``dsmeter prune`` (what was removed, when).

On PostgreSQL only (SQLite is left exactly as it was), ``calls`` becomes a table partitioned
by RANGE on ``started_at``: one partition per UTC month, ``calls_yYYYYmMM``, for every month
that has calls and from this month to three months ahead, plus ``calls_default`` for a row
no month covers yet. Existing rows are copied across in this transaction. Because a
partitioned table's primary key must contain the partition key, it becomes
``(request_id, started_at)`` (still ``pk_calls``), and ``call_tags`` can no longer have a
foreign key to ``calls(request_id)``: a statement trigger deletes the tags of deleted calls
instead (the old ``ON DELETE CASCADE``). ``collector/partitions.py`` explains the rest and
keeps partitions ahead of time after this migration.

The indexes are rebuilt with the names and columns they had, read from the database, so
this revision does not depend on today's models. Downgrade restores the unpartitioned table
and the foreign key.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MONTHS_AHEAD = 3
_TAGS_FK = "fk_call_tags_request_id_calls"
_TRIGGER = "calls_delete_tags"
_TRIGGER_FUNCTION = "dsmeter_calls_delete_tags"


def upgrade() -> None:
    op.create_table(
        "ledger_prunes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pruned_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("partitions", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_prunes")),
    )
    if op.get_bind().dialect.name == "postgresql":
        _partition_calls()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_calls()
    op.drop_table("ledger_prunes")


# -- PostgreSQL --------------------------------------------------------------------------------


def _month_after(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def _utc(month: date) -> str:
    return datetime(month.year, month.month, 1, tzinfo=timezone.utc).isoformat()


def _secondary_indexes(bind: sa.engine.Connection, table: str) -> list[tuple[str, list[str]]]:
    """(name, columns) of the table's indexes other than its primary key, as the database has them."""
    found = sa.inspect(bind).get_indexes(table)
    return [(str(index["name"]), [str(c) for c in index["column_names"]]) for index in found]


def _rename_out_of_the_way(bind: sa.engine.Connection, old: str) -> list[tuple[str, list[str]]]:
    """Rename ``calls`` to ``old``, with its primary key and indexes, so the names are free again."""
    indexes = _secondary_indexes(bind, "calls")
    op.execute(f"ALTER TABLE calls RENAME TO {old}")
    op.execute(f"ALTER TABLE {old} RENAME CONSTRAINT pk_calls TO pk_{old}")
    for name, _ in indexes:
        op.execute(f"ALTER INDEX {name} RENAME TO {name}_old")
    return indexes


def _create_indexes(indexes: list[tuple[str, list[str]]]) -> None:
    for name, columns in indexes:
        op.execute(f"CREATE INDEX {name} ON calls ({', '.join(columns)})")


def _partition_calls() -> None:
    bind = op.get_bind()
    op.drop_constraint(_TAGS_FK, "call_tags", type_="foreignkey")
    indexes = _rename_out_of_the_way(bind, "calls_unpartitioned")
    op.execute(
        "CREATE TABLE calls (LIKE calls_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
        "PARTITION BY RANGE (started_at)"
    )
    op.execute("ALTER TABLE calls ADD CONSTRAINT pk_calls PRIMARY KEY (request_id, started_at)")
    _create_indexes(indexes)

    this_month = datetime.now(timezone.utc).date().replace(day=1)
    months = {this_month}
    for _ in range(_MONTHS_AHEAD):
        months.add(_month_after(max(months)))
    with_calls = bind.execute(
        sa.text("SELECT DISTINCT date_trunc('month', started_at AT TIME ZONE 'UTC') FROM calls_unpartitioned")
    ).scalars()
    months.update(value.date() for value in with_calls)
    for month in sorted(months):
        op.execute(
            f"CREATE TABLE calls_y{month.year:04d}m{month.month:02d} PARTITION OF calls "
            f"FOR VALUES FROM ('{_utc(month)}') TO ('{_utc(_month_after(month))}')"
        )
    op.execute("CREATE TABLE calls_default PARTITION OF calls DEFAULT")

    op.execute("INSERT INTO calls SELECT * FROM calls_unpartitioned")
    op.execute("DROP TABLE calls_unpartitioned")

    op.execute(
        f"""
        CREATE FUNCTION {_TRIGGER_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM call_tags t USING gone g WHERE t.request_id = g.request_id;
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        f"CREATE TRIGGER {_TRIGGER} AFTER DELETE ON calls REFERENCING OLD TABLE AS gone "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {_TRIGGER_FUNCTION}()"
    )


def _unpartition_calls() -> None:
    bind = op.get_bind()
    op.execute(f"DROP TRIGGER {_TRIGGER} ON calls")
    op.execute(f"DROP FUNCTION {_TRIGGER_FUNCTION}()")
    indexes = _rename_out_of_the_way(bind, "calls_partitioned")
    op.execute("CREATE TABLE calls (LIKE calls_partitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    op.execute("ALTER TABLE calls ADD CONSTRAINT pk_calls PRIMARY KEY (request_id)")
    _create_indexes(indexes)
    op.execute("INSERT INTO calls SELECT * FROM calls_partitioned ON CONFLICT (request_id) DO NOTHING")
    op.execute("DROP TABLE calls_partitioned CASCADE")
    op.execute("DELETE FROM call_tags t WHERE NOT EXISTS (SELECT 1 FROM calls c WHERE c.request_id = t.request_id)")
    op.create_foreign_key(_TAGS_FK, "call_tags", "calls", ["request_id"], ["request_id"], ondelete="CASCADE")
