#!/usr/bin/env python3
"""Benchmark: several writer processes sharing one PostgreSQL ledger: rows/s, lock waits, nothing lost.

Each process is what a proxy worker or a metered application is to the ledger: a
``LedgerWriter`` committing batches of calls, each batch with its rollup sums in the same
transaction. For 1, 2 and 4 processes (``--processes``), in a fresh database each time:

- every process submits ``--rows`` realistic calls (``bench_ledger.make_records``: 4 models,
  12 API keys, 30 tag sets, so processes add to the same rollup rows) as fast as it can, or
  at ``--rate`` calls/s each;
- a sampler reads ``pg_stat_activity`` every 2 ms and counts, among the writers' backends
  that are busy (state ``active``), how often one waits on a lock another transaction holds
  (``wait_event_type = 'Lock'``): the contention the issue asks there be none of;
- at the end it checks that every call is stored exactly once and that the daily rollup
  equals the raw ledger (``collector.rollups.compare``).

The baseline, in the same run: the same processes with the rollup confined to one shard
(``ROLLUP_SHARDS = 1``), which is how every writer added to the rollup before migration 0006:
the same row for the same day, model, key and tags, each waiting for the other's commit.

    DSMETER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test \\
        python tests/benchmarks/bench_writers.py                 # 1, 2, 4 processes (about a minute)
    python tests/benchmarks/bench_writers.py --postgres URL --processes 2,8 --rows 20000 --json w.json
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ledger import make_records, postgres_database  # noqa: E402
from benchutil import print_conditions, table, write_json  # noqa: E402

SAMPLE_INTERVAL = 0.002  # seconds between two looks at pg_stat_activity


def child(url: str, seed: int, rows: int, rate: float, shards: int) -> None:
    """One writer process: ready, wait for the go line on stdin, submit, flush, print the seconds it took."""
    from collector import rollups
    from collector.writer import LedgerWriter

    rollups.ROLLUP_SHARDS = shards  # read when a hook picks and claims its shard
    day = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    records = make_records(rows, seed, day)
    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-writers-spool-") as spool:
        writer = LedgerWriter(url, spool_dir=Path(spool))
        writer.flush(30)  # thread up, spool replay done
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.perf_counter()
        for n, record in enumerate(records):
            if rate:
                wait = started + n / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            writer.submit(record)
        if not writer.flush(600):
            raise SystemExit("the writer did not drain")
        print(f"{time.perf_counter() - started:.6f}", flush=True)
        writer.close()
        if any(p.stat().st_size for p in Path(spool).rglob("*") if p.is_file()):
            raise SystemExit("rows went to the spool instead of the database")


class LockSampler:
    """Samples the writers' backends of one database: busy samples, and those waiting on a lock (by kind)."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self._engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")  # a fresh snapshot per look
        self._stop = threading.Event()
        self.looks = 0
        self.busy = 0
        self.waiting: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import sqlalchemy as sa

        query = sa.text(
            "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state = 'active'"
        )
        with self._engine.connect() as connection:
            while not self._stop.is_set():
                for kind, event in connection.execute(query):
                    self.busy += 1
                    if kind == "Lock":
                        self.waiting[event] += 1
                self.looks += 1
                time.sleep(SAMPLE_INTERVAL)

    def __enter__(self) -> LockSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._engine.dispose()


def measure(admin_url: str, processes: int, rows: int, rate: float, shards: int) -> dict[str, Any]:
    import sqlalchemy as sa

    from collector.rollups import compare
    from collector.store import LedgerStore

    with postgres_database(admin_url) as url:
        store = LedgerStore(url)
        store.migrate()  # as `dsmeter db upgrade` before the workers start
        children = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", url, str(1000 + n), str(rows), str(rate), str(shards)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            for n in range(processes)
        ]
        try:
            for process in children:
                assert process.stdout is not None
                if process.stdout.readline().strip() != "ready":
                    raise SystemExit("a writer process did not start")
            with LockSampler(url) as sampler:
                started = time.perf_counter()
                for process in children:
                    assert process.stdin is not None
                    process.stdin.write("go\n")
                    process.stdin.flush()
                for process in children:
                    assert process.stdout is not None
                    float(process.stdout.readline())
                wall = time.perf_counter() - started
        finally:
            for process in children:
                if process.wait(60) != 0:
                    raise SystemExit(f"a writer process failed (exit {process.returncode})")
        with store.engine.connect() as connection:
            total, distinct = connection.execute(sa.text("SELECT count(*), count(DISTINCT request_id) FROM calls")).one()
            rollup_rows, shards_used = connection.execute(
                sa.text("SELECT count(*), count(DISTINCT shard) FROM rollup_daily")).one()
        drifts = compare(store)
        store.close()
    expected = processes * rows
    if (total, distinct) != (expected, expected):
        raise SystemExit(f"{processes} processes: expected {expected} calls once each, found {total} ({distinct} distinct)")
    if drifts:
        raise SystemExit(f"{processes} processes: the rollup differs from the raw ledger in {len(drifts)} groups")
    waited = sum(sampler.waiting.values())
    return {
        "processes": processes,
        "shards": shards,
        "rows": expected,
        "rows_per_s": expected / wall,
        "busy_samples": sampler.busy,
        "lock_wait_samples": waited,
        "lock_wait_share": waited / sampler.busy if sampler.busy else 0.0,
        "lock_waits_by_kind": dict(sampler.waiting),
        "looks": sampler.looks,
        "rollup_rows": int(rollup_rows),
        "shards_used": int(shards_used),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        url, seed, rows, rate, shards = argv[1:6]
        child(url, int(seed), int(rows), float(rate), int(shards))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", metavar="URL", default=os.environ.get("DSMETER_TEST_POSTGRES_URL"),
                        help="PostgreSQL server to create scratch databases on (default: $DSMETER_TEST_POSTGRES_URL)")
    parser.add_argument("--processes", default="1,2,4", help="comma-separated writer process counts (default 1,2,4)")
    parser.add_argument("--rows", type=int, default=40_000, help="calls each process writes (default 40,000)")
    parser.add_argument("--rate", type=float, default=0.0, help="calls/s per process (default: as fast as it can)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if not args.postgres:
        parser.error("needs a PostgreSQL server: --postgres URL or DSMETER_TEST_POSTGRES_URL")
    from collector.config import normalise_database_url
    from collector.rollups import ROLLUP_SHARDS

    admin = normalise_database_url(args.postgres)
    results = []
    for processes in [int(p) for p in args.processes.split(",")]:
        for shards in (1, ROLLUP_SHARDS):  # the baseline first: every writer on the one shard
            result = measure(admin, processes, args.rows, args.rate, shards)
            results.append(result)
            print(f"  {processes} process(es), {shards:2d} shard(s): done", flush=True)
    rate = "as fast as each can" if not args.rate else f"{args.rate:g} calls/s each"
    print(f"\n{args.rows:,} calls per writer process ({rate}), one PostgreSQL ledger; every call stored once and "
          "the rollup equal to the raw ledger after each run")
    rows = []
    for r in results:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(r["lock_waits_by_kind"].items())) or "-"
        rows.append([r["processes"], r["shards"], f"{r['rows_per_s']:,.0f}",
                     f"{r['lock_wait_samples']} of {r['busy_samples']}", f"{100 * r['lock_wait_share']:.1f}%",
                     kinds, r["shards_used"], f"{r['rollup_rows']:,}"])
    print(table(["processes", "rollup shards", "rows/s, all processes", "busy backend samples waiting on a lock",
                 "share", "waits by kind", "shards used", "rollup rows"], rows))
    print("shards 1 = the baseline: every writer adding to the same rollup rows, as before migration 0006")
    env = print_conditions()
    write_json(args.json, {"benchmark": "writers", "conditions": env, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
