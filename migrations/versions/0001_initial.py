"""The initial ledger: calls (one row per UsageRecord) and call_tags.

Revision ID: 0001
Revises:
Create Date: 2026-05-09

Money columns are BIGINT pico-units (10^-12 of the currency unit); timestamps are
DateTime(timezone=True) holding UTC. See collector/models.py for why.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "calls",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_model", sa.String(length=200), nullable=True),
        sa.Column("provider_request_id", sa.String(length=200), nullable=True),
        sa.Column("endpoint", sa.String(length=40), nullable=False),
        sa.Column("upstream", sa.String(length=500), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("thinking", sa.Boolean(), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("finish_reason", sa.String(length=40), nullable=True),
        sa.Column("error_type", sa.String(length=200), nullable=True),
        sa.Column("error_message", sa.String(length=1000), nullable=True),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=True),
        sa.Column("prompt_cache_hit_tokens", sa.BigInteger(), nullable=True),
        sa.Column("prompt_cache_miss_tokens", sa.BigInteger(), nullable=True),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=True),
        sa.Column("reasoning_tokens", sa.BigInteger(), nullable=True),
        sa.Column("usage_estimated", sa.Boolean(), nullable=False),
        sa.Column("usage_raw", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("tool_call_count", sa.Integer(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("first_content_ms", sa.Double(), nullable=True),
        sa.Column("duration_ms", sa.Double(), nullable=True),
        sa.Column("key_fingerprint", sa.String(length=100), nullable=True),
        sa.Column("user", sa.String(length=500), nullable=True),
        sa.Column("tags", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("cost", sa.BigInteger(), nullable=True),
        sa.Column("cost_cache_hit", sa.BigInteger(), nullable=True),
        sa.Column("cost_cache_miss", sa.BigInteger(), nullable=True),
        sa.Column("cost_output", sa.BigInteger(), nullable=True),
        sa.Column("tariff_id", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_calls")),
    )
    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.create_index("ix_calls_started_at", ["started_at"], unique=False)
        batch_op.create_index("ix_calls_model_started_at", ["model", "started_at"], unique=False)
        batch_op.create_index(
            "ix_calls_requested_model_started_at", ["requested_model", "started_at"], unique=False
        )
        batch_op.create_index("ix_calls_status", ["status"], unique=False)
        batch_op.create_index("ix_calls_key_fingerprint", ["key_fingerprint"], unique=False)
        batch_op.create_index("ix_calls_provider_request_id", ["provider_request_id"], unique=False)

    op.create_table(
        "call_tags",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=500), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["calls.request_id"],
            name=op.f("fk_call_tags_request_id_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("request_id", "key", name=op.f("pk_call_tags")),
    )
    with op.batch_alter_table("call_tags", schema=None) as batch_op:
        batch_op.create_index("ix_call_tags_key_value", ["key", "value"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("call_tags", schema=None) as batch_op:
        batch_op.drop_index("ix_call_tags_key_value")
    op.drop_table("call_tags")

    with op.batch_alter_table("calls", schema=None) as batch_op:
        batch_op.drop_index("ix_calls_provider_request_id")
        batch_op.drop_index("ix_calls_key_fingerprint")
        batch_op.drop_index("ix_calls_status")
        batch_op.drop_index("ix_calls_requested_model_started_at")
        batch_op.drop_index("ix_calls_model_started_at")
        batch_op.drop_index("ix_calls_started_at")
    op.drop_table("calls")
