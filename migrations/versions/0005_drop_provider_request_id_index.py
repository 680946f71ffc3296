"""Drop ``ix_calls_provider_request_id``: no query reads it, and it was the costliest index to write.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

No query in ``collector.queries``, the reports or the dashboard filters, sorts or looks up
calls by the provider's id (it is stored, exported, never trusted to be unique). Provider
ids are random (DeepSeek's are UUIDs), so each insert put its index entry on a random leaf
of a B-tree far larger than the cache: on SQLite that index alone made the ``calls`` insert
1.4x slower and doubled the pages each commit writes (tests/benchmarks/bench_ledger.py);
on PostgreSQL it is one more random page, and WAL full-page image, per row.

Dropping an index rewrites no data (SQLite: a plain DROP INDEX, no table rebuild; PostgreSQL:
dropping the partitioned index drops every partition's). Downgrade builds it again.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_calls_provider_request_id"


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="calls")


def downgrade() -> None:
    op.create_index(_INDEX, "calls", ["provider_request_id"], unique=False)
