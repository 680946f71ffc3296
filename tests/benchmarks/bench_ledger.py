#!/usr/bin/env python3
"""Benchmark: ledger write rate (rows/s) through ``LedgerWriter`` into SQLite and PostgreSQL, and bytes per row.

Rows are shaped like real calls (priced, a raw DeepSeek usage object, two tags, a key
fingerprint, timings), spread over a month. For each database, in the same run:

- ``writer``: ``LedgerWriter.submit`` of every row from this thread, then ``flush()``: the
  wall time from the first submit until every row is committed (the writer's background
  thread batches them, ``--batch`` rows per transaction); also the caller's CPU cost per
  ``submit`` (what a metered call pays);
- ``store.insert``: the same rows written directly in batches (no queue, no thread): the
  baseline the writer is compared with;
- on PostgreSQL, bytes per row: ``pg_total_relation_size`` of ``calls`` and ``call_tags``
  (every partition, indexes and TOAST included) over the row count; on SQLite, the file size.

Each measurement writes fresh rows into a table that keeps growing, and is repeated
``--repeat`` times; medians are reported. Schema migration happens before timing.

    python tests/benchmarks/bench_ledger.py                                 # SQLite only
    DSMETER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python tests/benchmarks/bench_ledger.py --rows 100000 --repeat 3    # and PostgreSQL
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import print_conditions, process_cpu, table, write_json  # noqa: E402

MODELS = [("deepseek-v4-flash", "deepseek-v4-flash"), ("deepseek-v4-pro", "deepseek-v4-pro"),
          ("deepseek-chat", "deepseek-v4-flash"), ("deepseek-reasoner", "deepseek-v4-flash")]
TEAMS = ["search", "support", "ads", "growth", "infra", "research"]
FEATURES = ["autocomplete", "summarise", "chat", "classify", "translate"]
# API keys are few (one per service or team), not one per call: a unique fingerprint per call
# would make the daily rollup one row per call, which no real ledger has.
KEYS = [f"kf_{n:016x}" for n in range(12)]


def make_records(count: int, seed: int, start: datetime) -> list[Any]:
    """``count`` realistic, priced records arriving at about 1,000 calls/s from ``start`` (in time order, as a
    ledger is written: writers finish calls in roughly the order they start)."""
    from collector.record import UsageRecord

    rng = random.Random(seed)
    records = []
    started = start
    for _ in range(count):
        requested, served = rng.choice(MODELS)
        started += timedelta(microseconds=rng.randint(0, 2000))
        hit = rng.choice([0, 64, 512, 1536, 3072])
        miss = rng.randint(20, 2500)
        reasoning = rng.randint(0, 900) if "reasoner" in requested or rng.random() < 0.2 else 0
        completion = reasoning + rng.randint(5, 1200)
        duration = rng.uniform(300, 25000)
        usage = {
            "prompt_tokens": hit + miss, "completion_tokens": completion, "total_tokens": hit + miss + completion,
            "prompt_tokens_details": {"cached_tokens": hit},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
            "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": miss,
        }
        cost_hit = Decimal(hit) * Decimal("0.000000028")
        cost_miss = Decimal(miss) * Decimal("0.00000014")
        cost_out = Decimal(completion) * Decimal("0.00000028")
        records.append(UsageRecord(
            started_at=started,
            requested_model=requested,
            provider_request_id=str(uuid.UUID(int=rng.getrandbits(128))),
            upstream="https://api.deepseek.com",
            finished_at=started + timedelta(milliseconds=duration),
            model=served,
            stream=True,
            thinking=reasoning > 0,
            status="completed",
            http_status=200,
            finish_reason="stop",
            prompt_tokens=hit + miss,
            prompt_cache_hit_tokens=hit,
            prompt_cache_miss_tokens=miss,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            usage_raw=usage,
            chunk_count=completion - reasoning + 2,
            ttft_ms=round(rng.uniform(150, 2500), 3),
            first_content_ms=round(rng.uniform(200, 9000), 3),
            duration_ms=round(duration, 3),
            key_fingerprint=rng.choice(KEYS),
            user=f"user-{rng.randint(1, 5000)}",
            tags={"team": rng.choice(TEAMS), "feature": rng.choice(FEATURES)},
            currency="USD",
            cost=cost_hit + cost_miss + cost_out,
            cost_cache_hit=cost_hit,
            cost_cache_miss=cost_miss,
            cost_output=cost_out,
            tariff_id="deepseek-v4-flash/2026-04-01/standard",
        ))
    return records


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for the run, dropped afterwards."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from collector.config import normalise_database_url

    admin_url = normalise_database_url(admin_url)
    name = f"dsmeter_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def count_rows(store: Any) -> tuple[int, int]:
    import sqlalchemy as sa

    with store.engine.connect() as conn:
        calls = conn.execute(sa.text("SELECT count(*), count(DISTINCT request_id) FROM calls")).one()
    return int(calls[0]), int(calls[1])


def postgres_bytes(store: Any) -> dict[str, int]:
    """Total on-disk bytes (heap, indexes, TOAST) of calls and call_tags, every partition included."""
    import sqlalchemy as sa

    sizes = {}
    with store.engine.connect() as conn:
        for name in ("calls", "call_tags"):
            sizes[name] = int(conn.execute(sa.text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "WHERE c.oid = CAST(:name AS regclass) "
                "OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = CAST(:name AS regclass))"
            ), {"name": name}).scalar_one())
        sizes["calls_heap"] = int(conn.execute(sa.text(
            "SELECT coalesce(sum(pg_table_size(c.oid)), 0) FROM pg_class c "
            "WHERE c.oid = 'calls'::regclass OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = 'calls'::regclass)"
        )).scalar_one())
    return sizes


class ServerCPU:
    """CPU seconds spent by the PostgreSQL backends serving one database (a local server: read from /proc)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.local = store.dialect == "postgresql" and Path("/proc").is_dir()

    def sample(self) -> dict[int, float]:
        if not self.local:
            return {}
        import sqlalchemy as sa

        with self.store.engine.connect() as conn:
            pids = conn.execute(sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )).scalars().all()
        return {pid: process_cpu(pid) for pid in pids}

    def since(self, before: dict[int, float]) -> float | None:
        if not self.local:
            return None
        after = self.sample()
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def measure(url: str, label: str, rows: int, repeat: int, batch: int) -> dict[str, Any]:
    from collector.store import LedgerStore
    from collector.writer import LedgerWriter

    store = LedgerStore(url)
    store.migrate()
    # Calls of today, as a live ledger gets them (on PostgreSQL they go to this month's partition).
    clock = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    writer_rates: list[float] = []
    submit_us: list[float] = []
    store_rates: list[float] = []
    client_us: list[float] = []
    server_us: list[float] = []
    server = ServerCPU(store)
    seed = 0
    expected = 0
    for _ in range(repeat):
        seed += 1
        records = make_records(rows, seed, clock)
        clock = records[-1].started_at
        with tempfile.TemporaryDirectory(prefix="dsmeter-bench-spool-") as spool:
            writer = LedgerWriter(url, batch_size=batch, spool_dir=Path(spool))
            writer.flush(30)  # its thread is up and any spool replay done before timing
            server_before = server.sample()
            process_before = time.process_time()
            started = time.perf_counter()
            cpu = time.thread_time()
            for record in records:
                writer.submit(record)
            submit_cpu = time.thread_time() - cpu
            if not writer.flush(600):
                raise SystemExit(f"{label}: the writer did not drain")
            elapsed = time.perf_counter() - started
            client_us.append((time.process_time() - process_before) / rows * 1e6)
            server_cpu = server.since(server_before)
            if server_cpu is not None:
                server_us.append(server_cpu / rows * 1e6)
            writer.close()
            if any(Path(spool).iterdir()) and any(p.stat().st_size for p in Path(spool).rglob("*") if p.is_file()):
                raise SystemExit(f"{label}: rows went to the spool instead of the database")
        writer_rates.append(rows / elapsed)
        submit_us.append(submit_cpu / rows * 1e6)
        expected += rows

        seed += 1
        records = make_records(rows, seed, clock)
        clock = records[-1].started_at
        started = time.perf_counter()
        for i in range(0, rows, batch):
            store.insert(records[i : i + batch])
        store_rates.append(rows / (time.perf_counter() - started))
        expected += rows
    total, distinct = count_rows(store)
    if total != expected or distinct != expected:
        raise SystemExit(f"{label}: expected {expected} rows, found {total} ({distinct} distinct)")
    result: dict[str, Any] = {
        "database": label,
        "rows_per_run": rows,
        "batch": batch,
        "total_rows": total,
        "writer_rows_per_s": round(statistics.median(writer_rates)),
        "writer_rows_per_s_all": [round(r) for r in writer_rates],
        "store_insert_rows_per_s": round(statistics.median(store_rates)),
        "store_insert_rows_per_s_all": [round(r) for r in store_rates],
        "submit_cpu_us": round(statistics.median(submit_us), 2),
        "client_cpu_us_per_row": round(statistics.median(client_us), 1),
        "server_cpu_us_per_row": round(statistics.median(server_us), 1) if server_us else None,
    }
    if store.dialect == "postgresql":
        sizes = postgres_bytes(store)
        result["bytes"] = sizes
        result["bytes_per_row"] = round((sizes["calls"] + sizes["call_tags"]) / total, 1)
        result["calls_bytes_per_row"] = round(sizes["calls"] / total, 1)
        result["calls_heap_bytes_per_row"] = round(sizes["calls_heap"] / total, 1)
    elif store.sqlite_path is not None:
        size = sum(p.stat().st_size for p in store.sqlite_path.parent.glob(store.sqlite_path.name + "*"))
        result["bytes_per_row"] = round(size / total, 1)
    store.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows per timed run (default 50,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per database and path (default 3)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows per transaction (default: the writer's own, collector.writer.DEFAULT_BATCH_SIZE)")
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("DSMETER_TEST_POSTGRES_URL"),
                        help="PostgreSQL server to create a scratch database on (default: $DSMETER_TEST_POSTGRES_URL)")
    parser.add_argument("--no-sqlite", action="store_true", help="skip SQLite")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if args.batch is None:
        from collector.writer import DEFAULT_BATCH_SIZE

        args.batch = DEFAULT_BATCH_SIZE

    results = []
    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-ledger-") as home:
        os.environ["DSMETER_HOME"] = home
        if not args.no_sqlite:
            results.append(measure(f"sqlite:///{home}/ledger.db", "SQLite", args.rows, args.repeat, args.batch))
        if args.postgres:
            with postgres_database(args.postgres) as url:
                results.append(measure(url, "PostgreSQL", args.rows, args.repeat, args.batch))
    targets = {"SQLite": 20_000, "PostgreSQL": 10_000}
    rows = [[r["database"], f"{r['writer_rows_per_s']:,}", f"{targets[r['database']]:,}",
             f"{r['writer_rows_per_s'] / targets[r['database']]:.2f}x",
             f"{r['store_insert_rows_per_s']:,}", f"{r['writer_rows_per_s'] / r['store_insert_rows_per_s']:.2f}",
             f"{r['submit_cpu_us']:.1f}", f"{r['client_cpu_us_per_row']:.1f}",
             "-" if r["server_cpu_us_per_row"] is None else f"{r['server_cpu_us_per_row']:.1f}",
             f"{r['bytes_per_row']:,}", f"{r['total_rows']:,}"] for r in results]
    print(f"ledger writes, {args.rows:,} rows per run, {args.batch} rows per transaction, median of {args.repeat}")
    print(table(["database", "writer rows/s", "target", "vs target", "store.insert rows/s", "writer/store",
                 "submit CPU us", "writer CPU us/row", "server CPU us/row", "bytes/row", "rows at end"], rows))
    print("writer CPU: this process (caller + writer thread) per row; server CPU: the PostgreSQL backends serving it")
    for r in results:
        if "bytes" in r:
            print(f"PostgreSQL on disk: calls {r['bytes']['calls']:,} B ({r['calls_bytes_per_row']} B/row, heap alone "
                  f"{r['calls_heap_bytes_per_row']} B/row), call_tags {r['bytes']['call_tags']:,} B, {r['total_rows']:,} rows")
    env = print_conditions()
    write_json(args.json, {"benchmark": "ledger", "conditions": env, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
