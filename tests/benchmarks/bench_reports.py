"""Benchmark: `dsmeter report` over a 10,000,000-call PostgreSQL ledger, with the daily rollup and without.

    DSMETER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python tests/benchmarks/bench_reports.py [--rows 10000000] [--days 90] [--keep NAME] [--repeat 5]

Seeds a fresh database (named NAME with ``--keep``, reused on the next run; otherwise dropped
at the end) inside PostgreSQL with ``INSERT ... SELECT FROM generate_series`` (not through the
writer: that is measured in bench_writer.py), with exact pico-unit costs at the published
deepseek-flash / deepseek-v4-pro off-peak prices, 20 tag sets (team, env, feature) each with its
own API key, five statuses; indexes and keys are built after the load, then VACUUM ANALYZE. The rollup is built
from scratch with ``collector.rollups.rebuild`` (timed), then each report is timed:

* in-process: ``build_report`` + ``render`` (what a warm process such as the dashboard pays), the
  median of ``--repeat`` runs, reading the rollup, then the raw ledger (rollup marked incomplete);
* the command ``dsmeter report ...`` end to end (``python -m collector.cli``: interpreter start,
  imports, SQL, rendering), median of ``--repeat`` runs with the rollup.

The target (issue 6) is a report under 1 s with the rollup. Figures go to stdout and to
``test-artifacts/bench_reports.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

from benchutil import conditions, write_json  # noqa: E402

END = date(2026, 10, 31)  # the last day seeded; reports are for days just before it
# (model, hit, miss, output pico-units per token, off-peak) and the tariff id the price book writes.
MODELS = [
    ("deepseek-flash", 3_000, 150_000, 600_000, "deepseek-flash@2026-09-10/off-peak"),
    ("deepseek-flash", 3_000, 150_000, 600_000, "deepseek-flash@2026-09-10/off-peak"),
    ("deepseek-v4-pro", 22_000, 660_000, 1_980_000, "deepseek-v4-pro@2026-09-10/off-peak"),
]
TEAMS = ["search", "ads", "infra", "growth", "support"]
ENVS = ["prod", "staging"]
FEATURES = ["chat", "summary"]

CALL_INDEXES = [
    ("ix_calls_started_at", "started_at"),
    ("ix_calls_model_started_at", "model, started_at"),
    ("ix_calls_requested_model_started_at", "requested_model, started_at"),
    ("ix_calls_status", "status"),
    ("ix_calls_key_fingerprint", "key_fingerprint"),
]


def _admin_url() -> str:
    from collector.config import normalise_database_url

    url = os.environ.get("DSMETER_TEST_POSTGRES_URL")
    if not url:
        sys.exit("set DSMETER_TEST_POSTGRES_URL to a PostgreSQL server (the database in it is only used to connect)")
    return normalise_database_url(url)


def _database(admin_url: str, name: str, *, fresh: bool) -> tuple[str, bool]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
        if exists and fresh:
            connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            exists = None
        if not exists:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), bool(exists)


def seed(url: str, rows: int, days: int) -> dict[str, float]:
    """Load ``rows`` calls over ``days`` days ending on END, entirely inside PostgreSQL."""
    import sqlalchemy as sa

    from collector.store import LedgerStore

    store = LedgerStore(url)
    store.migrate()
    tag_sets = [(TEAMS[i % 5], ENVS[(i // 5) % 2], FEATURES[(i // 10) % 2]) for i in range(20)]
    timings: dict[str, float] = {}
    began = time.perf_counter()
    with store.engine.begin() as connection:
        # Since migration 0004 (calls partitioned by month) call_tags has no foreign key to calls;
        # put back only what the schema had.
        had_fk = connection.execute(sa.text(
            "SELECT 1 FROM pg_constraint WHERE conname = 'fk_call_tags_request_id_calls'")).first() is not None
        for name, _ in CALL_INDEXES:
            connection.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
        connection.execute(sa.text("ALTER TABLE call_tags DROP CONSTRAINT IF EXISTS fk_call_tags_request_id_calls"))
        connection.execute(sa.text("ALTER TABLE call_tags DROP CONSTRAINT IF EXISTS pk_call_tags"))
        connection.execute(sa.text("DROP INDEX IF EXISTS ix_call_tags_key_value"))
        connection.execute(sa.text("SELECT setseed(0.42)"))
        start = datetime(END.year, END.month, END.day, tzinfo=timezone.utc).timestamp() - (days - 1) * 86400
        models = ",".join(f"'{m[0]}'" for m in MODELS)
        hit_price = ",".join(str(m[1]) for m in MODELS)
        miss_price = ",".join(str(m[2]) for m in MODELS)
        out_price = ",".join(str(m[3]) for m in MODELS)
        tariffs = ",".join(f"'{m[4]}'" for m in MODELS)
        tags_json = ",".join(f"'{{\"team\":\"{t}\",\"env\":\"{e}\",\"feature\":\"{f}\"}}'" for t, e, f in tag_sets)
        connection.execute(sa.text(f"""
            INSERT INTO calls (request_id, started_at, finished_at, requested_model, model, endpoint, upstream,
                stream, thinking, status, http_status, finish_reason, prompt_tokens, prompt_cache_hit_tokens,
                prompt_cache_miss_tokens, completion_tokens, reasoning_tokens, usage_estimated, chunk_count,
                tool_call_count, ttft_ms, duration_ms, key_fingerprint, tags, currency, cost, cost_cache_hit,
                cost_cache_miss, cost_output, tariff_id)
            SELECT gen_random_uuid(), ts, ts + interval '2 seconds', (ARRAY[{models}])[m], (ARRAY[{models}])[m],
                'chat.completions', 'https://api.deepseek.com', true, m = 3, st, 200,
                CASE WHEN st = 'completed' THEN 'stop' END, hit + miss, hit, miss, out, out / 3, st <> 'completed'
                AND st <> 'error', 40, 0, 300 + r * 900, 2000 + r * 9000, 'fp-' || (t % 10),
                (ARRAY[{tags_json}])[t + 1]::json, 'USD',
                hit * (ARRAY[{hit_price}])[m] + miss * (ARRAY[{miss_price}])[m] + out * (ARRAY[{out_price}])[m],
                hit * (ARRAY[{hit_price}])[m], miss * (ARRAY[{miss_price}])[m], out * (ARRAY[{out_price}])[m],
                (ARRAY[{tariffs}])[m]
            FROM (
                SELECT to_timestamp({start} + (i::float8 * {days * 86400} / {rows})) AS ts,
                       1 + (i % 3)::int AS m, (i % 20)::int AS t, random() AS r,
                       CASE WHEN i % 50 = 0 THEN 'error' WHEN i % 97 = 0 THEN 'cancelled'
                            WHEN i % 211 = 0 THEN 'disconnected' WHEN i % 503 = 0 THEN 'timeout'
                            ELSE 'completed' END AS st,
                       (random() * 30000)::bigint AS hit, (random() * 6000)::bigint AS miss,
                       (random() * 2000)::bigint AS out
                FROM generate_series(1, {rows}) AS i
            ) AS g
        """))
    timings["insert_calls_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with store.engine.begin() as connection:
        for key in ("team", "env", "feature"):
            connection.execute(sa.text(
                f"INSERT INTO call_tags (request_id, key, value) SELECT request_id, '{key}', tags->>'{key}' FROM calls"))
    timings["insert_call_tags_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with store.engine.begin() as connection:
        for name, columns in CALL_INDEXES:
            connection.execute(sa.text(f"CREATE INDEX {name} ON calls ({columns})"))
        connection.execute(sa.text("ALTER TABLE call_tags ADD CONSTRAINT pk_call_tags PRIMARY KEY (request_id, key)"))
        connection.execute(sa.text("CREATE INDEX ix_call_tags_key_value ON call_tags (key, value)"))
        if had_fk:
            connection.execute(sa.text(
                "ALTER TABLE call_tags ADD CONSTRAINT fk_call_tags_request_id_calls FOREIGN KEY (request_id) "
                "REFERENCES calls (request_id) ON DELETE CASCADE"))
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE calls"))
        connection.execute(sa.text("VACUUM ANALYZE call_tags"))
    timings["indexes_and_analyze_s"] = time.perf_counter() - began
    store.close()
    return timings


def _set_complete(url: str, complete: bool) -> None:
    import sqlalchemy as sa

    from collector.reporting_schema import ROLLUP_STATE
    from collector.store import LedgerStore

    store = LedgerStore(url)
    with store.engine.begin() as connection:
        connection.execute(ROLLUP_STATE.update().values(complete=complete))
    store.close()
    del sa


REPORTS = [
    ("day", ["--period", "day", "--group-by", "model,tag:team"]),
    ("week", ["--period", "week", "--group-by", "model,tag:team"]),
    ("month", ["--period", "month", "--group-by", "model,tag:team"]),
]


def time_in_process(url: str, period: str, repeat: int) -> tuple[float, str]:
    from collector.report_render import render
    from collector.reports import build_report
    from collector.store import LedgerStore

    store = LedgerStore(url, migrate=False)
    times = []
    source = ""
    for _ in range(repeat):
        began = time.perf_counter()
        report = build_report(store.engine, day=END, period=period, group_by=["model", "tag:team"])
        render(report, "html")
        times.append(time.perf_counter() - began)
        source = report.source
    store.close()
    return statistics.median(times), source


def time_command(url: str, args: list[str], repeat: int) -> float:
    # `python -m collector.cli` is what the `dsmeter` script runs, from the same checkout as this script.
    command = [sys.executable, "-m", "collector.cli", "report"]
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        done = subprocess.run([*command, "--db", url, "--date", END.isoformat(), "--format", "md", *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            sys.exit(f"dsmeter report failed: {done.stderr.strip()}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", metavar="NAME", default=None,
                        help="database name to keep (and reuse when it already holds the rows)")
    options = parser.parse_args()

    admin = _admin_url()
    name = options.keep or f"dsmeter_bench_reports_{uuid.uuid4().hex[:8]}"
    url, existed = _database(admin, name, fresh=False)
    figures: dict[str, object] = {"rows": options.rows, "days": options.days, "conditions": conditions()}
    try:
        from collector.rollups import rebuild
        from collector.store import LedgerStore

        import sqlalchemy as sa

        store = LedgerStore(url)
        store.migrate()
        with store.engine.connect() as connection:
            have = connection.execute(sa.text("SELECT count(*) FROM calls")).scalar_one()
        if have != options.rows:
            store.close()
            url, _ = _database(admin, name, fresh=True)
            print(f"seeding {options.rows:,} calls over {options.days} days ...", flush=True)
            figures["seed"] = seed(url, options.rows, options.days)
            print(f"  {figures['seed']}", flush=True)
            store = LedgerStore(url)
        began = time.perf_counter()
        result = rebuild(store)
        figures["rollup_build_s"] = round(time.perf_counter() - began, 2)
        with store.engine.connect() as connection:
            figures["rollup_rows"] = connection.execute(sa.text("SELECT count(*) FROM rollup_daily")).scalar_one()
        store.close()
        print(f"rollup built from scratch in {figures['rollup_build_s']} s: {figures['rollup_rows']:,} rows "
              f"for {result.days} days", flush=True)

        rows = []
        for period, args in REPORTS:
            _set_complete(url, True)
            with_rollup, source = time_in_process(url, period, options.repeat)
            assert source == "rollup"
            command = time_command(url, args, options.repeat)
            _set_complete(url, False)
            raw, source = time_in_process(url, period, max(1, options.repeat // 2))
            assert source == "ledger"
            _set_complete(url, True)
            rows.append({"period": period, "with_rollup_s": round(with_rollup, 3), "raw_ledger_s": round(raw, 3),
                         "speedup": round(raw / with_rollup, 1), "dsmeter_report_command_s": round(command, 3)})
            print(f"{period:>5}: with rollup {with_rollup:.3f} s, raw ledger {raw:.3f} s "
                  f"({raw / with_rollup:.0f}x); `dsmeter report` end to end {command:.3f} s", flush=True)
        figures["reports"] = rows
        out = ROOT / "test-artifacts"
        out.mkdir(exist_ok=True)
        write_json(str(out / "bench_reports.json"), figures)
    finally:
        if options.keep is None:
            import sqlalchemy as sa

            engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
            with engine.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            engine.dispose()


if __name__ == "__main__":
    main()
