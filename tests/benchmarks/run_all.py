#!/usr/bin/env python3
"""Run every benchmark, each against the baseline it measures in the same run, and print a summary.

    python tests/benchmarks/run_all.py              # decoder, client, ledger, writers, proxy (~10 min)
    python tests/benchmarks/run_all.py --quick      # smaller runs of the same (~3 min)
    python tests/benchmarks/run_all.py --all        # also reports at 10M rows, the dashboard at 1M, LiteLLM (long)
    DSMETER_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:5432/test python tests/benchmarks/run_all.py

Each benchmark runs in its own process and prints its own table (shown as it runs); this
script then lists the headline figure of each against its baseline and its target. Set
``DSMETER_TEST_POSTGRES_URL`` to include PostgreSQL in the ledger benchmark (and to run the
writers and reports benchmarks, which need it). A benchmark that is missing or fails is reported as such;
the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchutil import REPO, print_conditions, table  # noqa: E402


@dataclass
class Bench:
    name: str
    script: str
    args: list[str]
    quick_args: list[str]
    summarise: Callable[[dict[str, Any]], list[list[str]]] | None = None
    json: bool = True  # the script takes --json FILE
    needs_postgres: bool = False
    extra: bool = False  # only with --all
    outcome: str = field(default="not run")


def _decoder(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data["results"]:
        us = r["us_per_chunk"]
        rows.append([
            f"decoder+metering, {r['workload']}, {r['reads']} reads",
            f"{us['metering']:.2f} us/chunk ({r['chunks_per_s']['metering']:,}/s)",
            f"SDK {us['openai SDK']:.1f} us: {r['sdk_over_metering']}x; json.loads {us['json.loads floor']:.2f} us: "
            f"{r['metering_over_floor']:.2f}",
            ">= 20x SDK, < 1.00 of floor",
        ])
    return rows


def _client(data: dict[str, Any]) -> list[list[str]]:
    results = data["results"]
    plain = results["plain httpx.Client"]
    rows = []
    for name in ("metered, no-op sink", "metered, ledger writer"):
        r = results[name]
        rows.append([f"openai SDK + metered_client ({name.split(', ')[1]})",
                     f"{r['cpu_ms_per_stream_median']:.1f} ms CPU/stream",
                     f"plain httpx {plain['cpu_ms_per_stream_median']:.1f} ms: {r['overhead_vs_plain_pct']:+.2f}%",
                     "< +3%"])
    if "instructions_overhead_pct" in results:
        rows.append(["openai SDK + metered_client (instructions)", "valgrind count",
                     f"{results['instructions_overhead_pct']:+.2f}% vs plain", "< +3%"])
    return rows


def _ledger(data: dict[str, Any]) -> list[list[str]]:
    targets = {"SQLite": 20_000, "PostgreSQL": 10_000}
    rows = []
    for r in data["results"]:
        rows.append([f"ledger writes, {r['database']}", f"{r['writer_rows_per_s']:,} rows/s",
                     f"store.insert {r['store_insert_rows_per_s']:,}/s; {r['bytes_per_row']:,} B/row",
                     f">= {targets[r['database']]:,}/s"])
    return rows


def _writers(data: dict[str, Any]) -> list[list[str]]:
    by_run = {(r["processes"], r["shards"]): r for r in data["results"]}
    rows = []
    for (processes, shards), r in sorted(by_run.items()):
        if shards == 1:
            continue  # the baseline, shown beside the sharded run
        base = by_run.get((processes, 1))
        rows.append([f"{processes} writer process(es), one PostgreSQL", f"{r['rows_per_s']:,.0f} rows/s, "
                     f"{100 * r['lock_wait_share']:.1f}% of busy samples waiting on a lock",
                     "one rollup shard: " + (f"{100 * base['lock_wait_share']:.1f}%" if base else "not run"),
                     "no waits on another writer"])
    return rows


def _proxy(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data.get("runs", []):
        added = r["added_ms"]
        rows.append([f"proxy, {r['concurrency']} concurrent", f"TTFB p50 {added['ttfb_p50_ms']:+.2f} ms",
                     f"streams/s x{r['throughput_ratio']:.2f} of direct", "< 1 ms TTFB p50"])
    return rows


def _litellm(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in data.get("runs", []):
        rows.append([f"proxy vs LiteLLM, {r['concurrency']} concurrent",
                     f"{r['dsmeter']['streams_per_second']:.1f} streams/s",
                     f"LiteLLM {r['litellm']['streams_per_second']:.1f}/s: {r['dsmeter_over_litellm_streams_per_second']:.1f}x",
                     ">= 50x"])
    return rows


BENCHES = [
    Bench("decoder", "bench_decoder.py", [], ["--repeat", "3", "--chunks", "1000"], _decoder),
    Bench("client", "bench_client.py", [], ["--streams", "5"], _client),
    Bench("ledger", "bench_ledger.py", [], ["--rows", "10000", "--repeat", "2"], _ledger),
    Bench("writers", "bench_writers.py", [], ["--processes", "2", "--rows", "10000"], _writers, needs_postgres=True),
    Bench("proxy", "bench_proxy.py", [], ["--quick"], _proxy),
    Bench("reports", "bench_reports.py", [], ["--rows", "1000000", "--repeat", "2"], None, json=False,
          needs_postgres=True, extra=True),
    Bench("dashboard", "bench_dashboard.py", [], ["--rows", "200000", "--runs", "2"], None, json=False, extra=True),
    # Installs LiteLLM from PyPI into its own virtualenv on first use: only with --all.
    Bench("litellm", "bench_litellm.py", [], ["--concurrency", "1,10", "--no-paced"], _litellm, extra=True),
]


def run(bench: Bench, quick: bool, workdir: Path) -> list[list[str]]:
    script = HERE / bench.script
    if not script.exists():
        bench.outcome = "missing"
        return []
    if bench.needs_postgres and not os.environ.get("DSMETER_TEST_POSTGRES_URL"):
        bench.outcome = "skipped (needs DSMETER_TEST_POSTGRES_URL)"
        return []
    out = workdir / f"{bench.name}.json"
    argv = [sys.executable, str(script), *(bench.quick_args if quick else bench.args)]
    if bench.json:
        argv += ["--json", str(out)]
    print(f"\n=== {bench.name}: {' '.join(Path(a).name if a.endswith('.py') else a for a in argv[1:])}", flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        bench.outcome = f"failed (exit {done.returncode})"
        return []
    bench.outcome = f"ok ({elapsed:.0f} s)"
    if bench.summarise is None or not out.exists():
        return [[bench.name, "see its output above", "", ""]]
    return bench.summarise(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test of every benchmark)")
    parser.add_argument("--all", action="store_true", help="also the reports (10M rows) and dashboard benchmarks")
    parser.add_argument("--only", action="append", choices=[b.name for b in BENCHES], help="only these benchmarks")
    args = parser.parse_args(argv)
    chosen = [b for b in BENCHES if (args.only and b.name in args.only) or (not args.only and (args.all or not b.extra))]
    summary: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-all-") as workdir:
        for bench in chosen:
            summary += run(bench, args.quick, Path(workdir))
    print("\n=== summary (each figure against the baseline measured in the same run)")
    if summary:
        print(table(["benchmark", "figure", "against the baseline", "target"], summary))
    print("\n" + "\n".join(f"{b.name}: {b.outcome}" for b in chosen))
    print_conditions()
    return 1 if any(b.outcome.startswith("failed") for b in chosen) else 0


if __name__ == "__main__":
    raise SystemExit(main())
