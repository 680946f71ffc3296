"""Reporting: daily rollups, budgets and provider balance snapshots.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Append-only: never edit a revision that has shipped; write the next one. Types are plain
SQLAlchemy types (BigInteger pico-units for money, DateTime(timezone=True) for UTC), as in
0001. The rollup starts complete only on an empty ledger; a ledger that already has calls is
read raw until ``dsmeter rollup`` builds it (a data migration here would freeze today's
aggregation code into history).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rollup_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=100), nullable=False),
        sa.Column("tag_set_id", sa.String(length=32), nullable=False),
        sa.Column("tariff_id", sa.String(length=200), nullable=False),
        sa.Column("calls", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_calls", sa.BigInteger(), nullable=False),
        sa.Column("estimated_calls", sa.BigInteger(), nullable=False),
        sa.Column("prompt_cache_hit_tokens", sa.BigInteger(), nullable=False),
        sa.Column("prompt_cache_miss_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("cost_cache_hit", sa.BigInteger(), nullable=False),
        sa.Column("cost_cache_miss", sa.BigInteger(), nullable=False),
        sa.Column("cost_output", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "day", "model", "status", "currency", "key_fingerprint", "tag_set_id", "tariff_id",
            name=op.f("pk_rollup_daily"),
        ),
    )
    op.create_table(
        "rollup_tag_sets",
        sa.Column("tag_set_id", sa.String(length=32), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tag_set_id", name=op.f("pk_rollup_tag_sets")),
    )
    op.create_table(
        "rollup_tag_set_items",
        sa.Column("tag_set_id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        sa.PrimaryKeyConstraint("tag_set_id", "key", name=op.f("pk_rollup_tag_set_items")),
    )
    with op.batch_alter_table("rollup_tag_set_items", schema=None) as batch_op:
        batch_op.create_index("ix_rollup_tag_set_items_key_value", ["key", "value"], unique=False)
    rollup_state = op.create_table(
        "rollup_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollup_state")),
    )
    op.create_table(
        "rollup_rebuilds",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("rebuilt_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_rollup_rebuilds")),
    )
    op.create_table(
        "budgets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(length=1000), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("monthly", sa.BigInteger(), nullable=False),
        sa.Column("soft", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budgets")),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.create_index("uq_budgets_scope_currency", ["scope", "currency"], unique=True)
    op.create_table(
        "balance_snapshots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("upstream", sa.String(length=500), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("total_balance", sa.BigInteger(), nullable=False),
        sa.Column("granted_balance", sa.BigInteger(), nullable=True),
        sa.Column("topped_up_balance", sa.BigInteger(), nullable=True),
        sa.Column("is_available", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_balance_snapshots")),
    )
    with op.batch_alter_table("balance_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_balance_snapshots_upstream_currency_taken_at", ["upstream", "currency", "taken_at"], unique=False
        )

    # Complete from the start only when there is nothing to roll up yet.
    has_calls = op.get_bind().execute(sa.text("SELECT 1 FROM calls LIMIT 1")).first() is not None
    op.bulk_insert(rollup_state, [{"id": 1, "complete": not has_calls, "built_at": None}])


def downgrade() -> None:
    with op.batch_alter_table("balance_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_balance_snapshots_upstream_currency_taken_at")
    op.drop_table("balance_snapshots")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index("uq_budgets_scope_currency")
    op.drop_table("budgets")
    op.drop_table("rollup_rebuilds")
    op.drop_table("rollup_state")
    with op.batch_alter_table("rollup_tag_set_items", schema=None) as batch_op:
        batch_op.drop_index("ix_rollup_tag_set_items_key_value")
    op.drop_table("rollup_tag_set_items")
    op.drop_table("rollup_tag_sets")
    op.drop_table("rollup_daily")
