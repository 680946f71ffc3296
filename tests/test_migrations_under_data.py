"""Migrations under data (issue 7): upgrading a full ledger from the first revision to head keeps
every row and every figure, on SQLite and PostgreSQL.

A ledger is created at revision 0001 (Alembic), one call is written through ``LedgerStore`` so
its stored form is exactly the application's, and that row is multiplied in bulk SQL into a
million calls with varied models, statuses, tokens, money, NULLs, timestamps and tags (plus a
tag row for half of them). Then ``dsmeter db upgrade`` runs, as a user would, and for both
tables every column's figures are compared before and after: non-NULL count, sum, min and max
(numbers and money), total length, min and max (text and JSON), true-count (booleans), min and
max (times), distinct ids. The reports then read the upgraded ledger and must agree with it.

The million-row run is marked ``slow``; the same check on 20,000 rows runs by default.
"""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner

from collector.cli import main
from collector.models import Call, record_from_row
from collector.queries import Filters, totals
from collector.record import UsageRecord, utcnow
from collector.store import LedgerStore, alembic_config, head_revision

TABLES = ("calls", "call_tags")


def _template() -> UsageRecord:
    return UsageRecord(
        started_at=utcnow().replace(microsecond=250_000) - timedelta(days=60),
        finished_at=utcnow() - timedelta(days=60) + timedelta(seconds=3),
        requested_model="deepseek-v4-flash", model="deepseek-v4-flash", provider_request_id="chatcmpl-template",
        upstream="https://api.deepseek.com", thinking=False, http_status=200, finish_reason="stop",
        prompt_tokens=1000, prompt_cache_hit_tokens=640, prompt_cache_miss_tokens=360, completion_tokens=200,
        reasoning_tokens=50, usage_raw={"prompt_tokens": 1000, "completion_tokens": 200},
        chunk_count=42, tool_call_count=1, ttft_ms=312.5, first_content_ms=840.25, duration_ms=3000.125,
        key_fingerprint="kf_0123456789abcdef", user="u-1", tags={"team": "search"},
        currency="USD", cost=Decimal("0.000123456789"), cost_cache_hit=Decimal("0.000001"),
        cost_cache_miss=Decimal("0.000002"), cost_output=Decimal("0.000120456789"), tariff_id="deepseek-v4-flash@2026-01-01",
    )


# Per dialect: the SQL that makes row n (1..N) from the template row t.
_SERIES = {
    "sqlite": "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows) ",
    "postgresql": "WITH g(n) AS (SELECT generate_series(1::bigint, :rows)) ",
}
_EXPR = {
    "sqlite": {
        "request_id": "printf('%032x', n)",
        "started_at": "strftime('%Y-%m-%d %H:%M:%S', t.started_at, '+' || n || ' seconds') || '.250000'",
        "finished_at": "CASE WHEN n % 23 = 0 THEN NULL ELSE strftime('%Y-%m-%d %H:%M:%S', t.started_at, '+' || (n + 3) || ' seconds') || '.000000' END",
        "text": "{col} || '-' || (n % {mod})",
        "model_pick": "CASE n % 3 WHEN 0 THEN 'deepseek-v4-pro' WHEN 1 THEN 'deepseek-v4-flash' ELSE NULL END",
        "bool": "(n % 2 = 0)",
        "json_tags": "'{\"team\": \"team-' || (n % 7) || '\"}'",
    },
    "postgresql": {
        "request_id": "md5(n::text)::uuid",
        "started_at": "t.started_at + n * interval '1 second'",
        "finished_at": "CASE WHEN n % 23 = 0 THEN NULL ELSE t.started_at + (n + 3) * interval '1 second' END",
        "text": "{col} || '-' || (n % {mod})",
        "model_pick": "CASE n % 3 WHEN 0 THEN 'deepseek-v4-pro' WHEN 1 THEN 'deepseek-v4-flash' ELSE NULL END",
        "bool": "(n % 2 = 0)",
        "json_tags": "json_build_object('team', 'team-' || (n % 7))",
    },
}


def _select_list(dialect: str, columns: list[str]) -> str:
    e = _EXPR[dialect]
    varied: dict[str, str] = {
        "request_id": e["request_id"],
        "started_at": e["started_at"],
        "finished_at": e["finished_at"],
        "model": e["model_pick"],
        "provider_request_id": e["text"].format(col='t."provider_request_id"', mod=1_000_003),
        "status": "CASE WHEN n % 11 = 0 THEN 'error' WHEN n % 13 = 0 THEN 'cancelled' ELSE 'completed' END",
        "thinking": e["bool"],
        "http_status": "CASE WHEN n % 11 = 0 THEN 429 ELSE 200 END",
        "prompt_tokens": "1000 + n % 997",
        "prompt_cache_hit_tokens": "CASE WHEN n % 17 = 0 THEN NULL ELSE 640 + n % 331 END",
        "prompt_cache_miss_tokens": "CASE WHEN n % 17 = 0 THEN NULL ELSE 360 + n % 666 END",
        "completion_tokens": "200 + n % 4001",
        "reasoning_tokens": "CASE WHEN n % 5 = 0 THEN n % 1999 ELSE NULL END",
        "usage_estimated": "(n % 17 = 0)",
        "chunk_count": "n % 500",
        "ttft_ms": "t.ttft_ms + (n % 1000) / 8.0",
        "duration_ms": "t.duration_ms + (n % 977) * 1.5",
        "key_fingerprint": e["text"].format(col='t."key_fingerprint"', mod=50),
        "user": e["text"].format(col='t."user"', mod=1000),
        "tags": e["json_tags"],
        "cost": "CASE WHEN n % 19 = 0 THEN NULL ELSE t.cost + n * 1000003 END",
        "cost_cache_hit": "CASE WHEN n % 19 = 0 THEN NULL ELSE t.cost_cache_hit + n END",
        "cost_cache_miss": "CASE WHEN n % 19 = 0 THEN NULL ELSE t.cost_cache_miss + n * 3 END",
        "cost_output": "CASE WHEN n % 19 = 0 THEN NULL ELSE t.cost_output + n * 999999 END",
        "currency": "CASE WHEN n % 19 = 0 THEN NULL WHEN n % 4 = 0 THEN 'CNY' ELSE t.currency END",
    }
    return ", ".join(varied.get(c, f't."{c}"') for c in columns)


def seed_at_first_revision(url: str, rows: int) -> UsageRecord:
    """A ledger at revision 0001 with ``rows`` calls made from one application-written call."""
    command.upgrade(alembic_config(url), "0001")
    store = LedgerStore(url, migrate=False)
    try:
        template = _template()
        assert store.insert([template]) == 1
        dialect = store.dialect
        columns = [c["name"] for c in sa.inspect(store.engine).get_columns("calls")]
        quoted = ", ".join(f'"{c}"' for c in columns)
        template_id = template.request_id.hex if dialect == "sqlite" else str(template.request_id)
        with store.engine.begin() as conn:
            conn.execute(
                sa.text(f'{_SERIES[dialect]}INSERT INTO calls ({quoted}) SELECT {_select_list(dialect, columns)} '
                        "FROM g, calls AS t WHERE t.request_id = :template"),
                {"rows": rows - 1, "template": template_id},
            )
            conn.execute(sa.text(
                "INSERT INTO call_tags (request_id, key, value) SELECT request_id, 'feature', "
                "'f-' || (completion_tokens % 9) FROM calls WHERE completion_tokens % 2 = 0"
            ))
        return template
    finally:
        store.close()


def figures(url: str) -> dict[str, Any]:
    """Every column's figures, for every table this test seeds."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    out: dict[str, Any] = {}
    try:
        inspector = sa.inspect(engine)
        with engine.connect() as conn:
            for table in TABLES:
                parts = ["count(*)"]
                for column in inspector.get_columns(table):
                    name, kind = f'"{column["name"]}"', column["type"]
                    parts.append(f"count({name})")
                    if isinstance(kind, (sa.Integer, sa.Float, sa.Numeric)) and not isinstance(kind, sa.Boolean):
                        parts += [f"sum({name})", f"min({name})", f"max({name})"]
                    elif isinstance(kind, sa.Boolean):
                        parts.append(f"sum(CASE WHEN {name} THEN 1 ELSE 0 END)")
                    elif isinstance(kind, sa.DateTime):
                        parts += [f"min({name})", f"max({name})"]
                    else:  # text, JSON, UUID: their text
                        text = f"CAST({name} AS TEXT)"
                        parts += [f"sum(length({text}))", f"min({text})", f"max({text})"]
                parts.append("count(DISTINCT request_id)")
                row = conn.execute(sa.text(f"SELECT {', '.join(parts)} FROM {table}")).one()
                out[table] = tuple(row)
    finally:
        engine.dispose()
    return out


def _upgrade_and_check(url: str, rows: int) -> dict[str, float]:
    started = time.monotonic()
    template = seed_at_first_revision(url, rows)
    seeded = time.monotonic()
    before = figures(url)
    assert before["calls"][0] == rows and before["calls"][-1] == rows  # every call there, every id distinct
    assert before["call_tags"][0] > rows // 3

    measured = time.monotonic()
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", url])
    upgraded = time.monotonic()
    assert result.exit_code == 0, result.output
    after = figures(url)
    assert after == before

    store = LedgerStore(url, migrate=False)
    try:
        assert store.current_revision() == head_revision() != "0001"
        store.require_schema()
        # The application still reads the old rows as they were written.
        with store.engine.connect() as conn:
            calls = Call.__table__
            first = conn.execute(sa.select(calls).order_by(calls.c.started_at).limit(1)).mappings().one()
        record = record_from_row(first)
        assert record == template  # field by field (money compared as Decimal values)
        # And the reports over the upgraded ledger agree with it, to the pico-dollar.
        report = totals(store.engine, Filters())
        with store.engine.connect() as conn:
            raw = conn.execute(sa.text(
                "SELECT count(*), sum(completion_tokens), sum(CASE WHEN currency = 'USD' THEN cost END) FROM calls"
            )).one()
        assert report.calls == raw[0] == rows
        assert report.tokens["output"] == raw[1]
        assert report.cost["USD"].total == Decimal(raw[2]).scaleb(-12)
    finally:
        store.close()
    return {"seed_s": seeded - started, "figures_s": measured - seeded, "upgrade_s": upgraded - measured}


def test_upgrading_twenty_thousand_calls_from_the_first_revision_keeps_every_figure(db_url: str) -> None:
    _upgrade_and_check(db_url, 20_000)


@pytest.mark.slow
def test_upgrading_a_million_calls_from_the_first_revision_keeps_every_figure(db_url: str) -> None:
    timings = _upgrade_and_check(db_url, 1_000_000)
    print(f"\n1,000,000 calls on {db_url.split(':')[0]}: {timings}")
