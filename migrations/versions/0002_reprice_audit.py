"""The reprice audit: one row per call whose price `dsmeter reprice` changed (who, when, old and new).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Money columns are BIGINT pico-units like the ledger's (collector/models.py); the table is
collector.reprice_schema.RepriceAudit. Adds a table only: existing calls are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reprice_audit",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("repriced_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("os_user", sa.String(length=200), nullable=False),
        sa.Column("price_book", sa.String(length=500), nullable=False),
        sa.Column("old_currency", sa.String(length=3), nullable=True),
        sa.Column("new_currency", sa.String(length=3), nullable=True),
        sa.Column("old_tariff_id", sa.String(length=200), nullable=True),
        sa.Column("new_tariff_id", sa.String(length=200), nullable=True),
        sa.Column("old_cost", sa.BigInteger(), nullable=True),
        sa.Column("new_cost", sa.BigInteger(), nullable=True),
        sa.Column("old_cost_cache_hit", sa.BigInteger(), nullable=True),
        sa.Column("new_cost_cache_hit", sa.BigInteger(), nullable=True),
        sa.Column("old_cost_cache_miss", sa.BigInteger(), nullable=True),
        sa.Column("new_cost_cache_miss", sa.BigInteger(), nullable=True),
        sa.Column("old_cost_output", sa.BigInteger(), nullable=True),
        sa.Column("new_cost_output", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reprice_audit")),
    )
    with op.batch_alter_table("reprice_audit", schema=None) as batch_op:
        batch_op.create_index("ix_reprice_audit_request_id", ["request_id"], unique=False)
        batch_op.create_index("ix_reprice_audit_run_id", ["run_id"], unique=False)
        batch_op.create_index("ix_reprice_audit_repriced_at", ["repriced_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reprice_audit", schema=None) as batch_op:
        batch_op.drop_index("ix_reprice_audit_repriced_at")
        batch_op.drop_index("ix_reprice_audit_run_id")
        batch_op.drop_index("ix_reprice_audit_request_id")
    op.drop_table("reprice_audit")
