#!/usr/bin/env python3
"""Benchmark: what ``collector.metered_client`` adds to the openai SDK's own CPU cost per streamed call.

The bundled simulator runs in a separate process (so its CPU is not counted) and streams a
2,000-chunk answer (``X-Simulator-Output-Tokens: 2000``, one token per chunk). In this
process the official openai SDK reads it, chunk object by chunk object, through:

- ``plain``: ``OpenAI(http_client=httpx.Client())``, the baseline (the same httpx the
  metered client is built on, so the difference is metering alone);
- ``metered, no-op sink``: ``OpenAI(http_client=collector.metered_client(sink=...))`` with a
  sink that drops the record: the cost of metering the stream;
- ``metered, ledger writer``: the same with the real ``LedgerWriter`` writing each row into
  a SQLite ledger from its background thread (in this process, so its CPU counts too);
- ``SDK default client`` (for reference): ``OpenAI()`` with its own default http client.

CPU time (``time.process_time``: user + system of this process, all threads) is taken
per stream. The variants take turns, stream by stream (forward, then backward), so a change
in machine load hits them alike; each figure is the median over ``--streams`` streams, and
the overhead is the median of the per-round differences against ``plain``.

CPU time on a busy machine includes cache misses caused by other processes, which inflate
small per-chunk costs unevenly; ``--instructions`` also counts the instructions one stream
takes under valgrind (``plain`` and ``metered``, each in its own process, startup and a
warm-up stream subtracted): a figure that does not depend on the load (slow: minutes).

    python tests/benchmarks/bench_client.py
    python tests/benchmarks/bench_client.py --streams 30 --chunks 2000 --json client.json
    python tests/benchmarks/bench_client.py --instructions      # also valgrind instruction counts
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import REPO, Server, callgrind_instructions, print_conditions, table, write_json  # noqa: E402

KEY = "sk-bench-not-a-real-key"


_SIMULATOR = (
    "from collector.simulator import Simulator\n"
    "Simulator(host='127.0.0.1', port=0).run_forever(on_ready=lambda url: print(url, flush=True))\n"
)


class SimulatorProcess(Server):
    """The bundled simulator (``collector.simulator.Simulator``, as ``dsmeter simulate`` runs it) in a child process."""

    def __init__(self, env: dict[str, str]) -> None:
        argv = [sys.executable, "-c", _SIMULATOR]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 60.0) -> str:
        assert self.process.stdout is not None and self.process.stderr is not None
        line = self.process.stdout.readline()  # the URL, once it listens; empty if it died
        match = re.search(r"(http://[0-9.:]+)", line)
        if match is None:
            self.stop()
            raise SystemExit("the simulator did not start:\n" + line + self.process.stderr.read())
        for pipe in (self.process.stderr, self.process.stdout):
            threading.Thread(target=pipe.read, daemon=True).start()  # keep the pipes drained
        return match.group(1).rstrip("/")


def stream_once(client: Any, chunks: int) -> tuple[float, int]:
    """CPU seconds to read one streamed answer through ``client`` (an ``openai.OpenAI``), and its chunk count."""
    started = time.process_time()
    count = 0
    stream = client.chat.completions.create(
        model="deepseek-v4-flash",
        messages=[{"role": "user", "content": "Write a long essay about prompt caching."}],
        stream=True,
        extra_headers={"X-Simulator-Output-Tokens": str(chunks)},
    )
    for _ in stream:
        count += 1
    return time.process_time() - started, count


_COUNTED = """
import sys
sys.path.insert(0, {here!r})
import httpx, openai, collector
from bench_client import KEY, stream_once
url, variant, streams, chunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
http = collector.metered_client(sink=lambda record: None) if variant == "metered" else httpx.Client()
client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, http_client=http)
for _ in range(streams + 1):  # the first is a warm-up, also in the zero-stream run that is subtracted
    stream_once(client, chunks)
"""


def instructions_per_stream(url: str, variant: str, chunks: int, streams: int = 2) -> float:
    """Instructions one stream takes in a fresh process under valgrind (startup and a warm-up subtracted)."""
    script = _COUNTED.format(here=str(Path(__file__).resolve().parent))
    totals = [
        callgrind_instructions([sys.executable, "-c", script, url, variant, str(n), str(chunks)]) for n in (0, streams)
    ]
    return (totals[1] - totals[0]) / streams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="answer tokens (one per chunk) per stream (default 2000)")
    parser.add_argument("--streams", type=int, default=25, help="timed streams per variant (default 25; median reported)")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per stream under valgrind (plain vs metered; minutes)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind (apt-get install valgrind)")

    import httpx
    import openai

    import collector
    from collector.record import UsageRecord
    from collector.writer import LedgerWriter

    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-client-") as home:
        env = {**os.environ, "DSMETER_HOME": home, "PYTHONUNBUFFERED": "1"}
        env.pop("DSMETER_DATABASE_URL", None)
        os.environ["DSMETER_HOME"] = home  # the writer's spool and fingerprint secret stay in the temp dir
        simulator = SimulatorProcess(env)
        writer = LedgerWriter(f"sqlite:///{home}/bench-client.db")
        records: list[UsageRecord] = []
        try:
            base_url = simulator.url + "/v1"

            def noop(record: UsageRecord) -> None:
                records.append(record)  # kept only to check the meter saw every chunk

            def written(record: UsageRecord) -> None:
                records.append(record)
                writer.submit(record)

            def sdk(http_client: httpx.Client | None) -> Any:
                # openai 3.x is typed for its httpx2 client but takes a plain httpx.Client (its docs say so).
                return openai.OpenAI(base_url=base_url, api_key=KEY, http_client=http_client)  # type: ignore[arg-type]

            variants: dict[str, Any] = {
                "plain httpx.Client": sdk(httpx.Client()),
                "metered, no-op sink": sdk(collector.metered_client(sink=noop)),
                "metered, ledger writer": sdk(collector.metered_client(sink=written)),
                "SDK default client": sdk(None),
            }
            for client in variants.values():  # warm-up: connections, imports, the simulator's caches
                stream_once(client, args.chunks)
            samples: dict[str, list[float]] = {name: [] for name in variants}
            order = list(variants.items())
            for round_ in range(args.streams):
                # Forward then backward (ABCD DCBA ...): a trend in machine load hits every variant alike.
                for name, client in order if round_ % 2 == 0 else reversed(order):
                    gc.collect()
                    seconds, count = stream_once(client, args.chunks)
                    if count < args.chunks:
                        raise SystemExit(f"{name}: the SDK read {count} chunks, expected at least {args.chunks}")
                    samples[name].append(seconds)
            if not writer.flush(60):
                raise SystemExit("the ledger writer did not drain")
            metered = [r for r in records if r.status == "completed"]
            if len(metered) != len(records) or any((r.chunk_count or 0) < args.chunks for r in records):
                raise SystemExit("a metered stream was not recorded as completed with every chunk")
            counted = len(records)
            instructions: dict[str, float] = {}
            if args.instructions:
                for variant in ("plain", "metered"):
                    instructions[variant] = instructions_per_stream(simulator.url, variant, args.chunks)
        finally:
            writer.close()
            simulator.stop()

    base = samples["plain httpx.Client"]
    rows = []
    results: dict[str, Any] = {}
    for name, times in samples.items():
        diffs = [t - b for t, b in zip(times, base)]
        overhead = statistics.median(diffs) / statistics.median(base) * 100
        results[name] = {
            "cpu_ms_per_stream_median": round(statistics.median(times) * 1000, 2),
            "cpu_ms_per_stream_min": round(min(times) * 1000, 2),
            "us_per_chunk": round(statistics.median(times) / args.chunks * 1e6, 2),
            "overhead_vs_plain_pct": round(overhead, 2),
            "ratio_vs_plain": round(statistics.median(times) / statistics.median(base), 4),
        }
        rows.append([name, f"{results[name]['cpu_ms_per_stream_median']:.1f}", f"{results[name]['cpu_ms_per_stream_min']:.1f}",
                     f"{results[name]['us_per_chunk']:.1f}", f"{results[name]['ratio_vs_plain']:.3f}",
                     "baseline" if name.startswith("plain") else f"{overhead:+.2f}%"])
    print(f"openai SDK {openai.__version__} streaming {args.chunks} chunks from the simulator (separate process), "
          f"CPU time of this process per stream, {args.streams} streams per variant, {counted} metered calls recorded")
    print(table(["client", "CPU ms (median)", "CPU ms (min)", "us/chunk", "ratio", "overhead vs plain"], rows))
    if instructions:
        extra = instructions["metered"] / instructions["plain"] - 1
        results["instructions_per_stream"] = {k: round(v) for k, v in instructions.items()}
        results["instructions_overhead_pct"] = round(extra * 100, 2)
        print(f"instructions per stream (valgrind): plain {instructions['plain']:,.0f}, metered "
              f"{instructions['metered']:,.0f}: {extra * 100:+.2f}% "
              f"({(instructions['metered'] - instructions['plain']) / args.chunks:,.0f} per chunk)")
    print("target: metering adds under 3% to the SDK's own cost")
    env_info = print_conditions()
    write_json(args.json, {"benchmark": "client", "conditions": env_info, "chunks": args.chunks,
                           "streams": args.streams, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
