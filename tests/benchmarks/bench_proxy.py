#!/usr/bin/env python3
"""Benchmark: what the metering proxy adds to a streamed call, against the simulator on loopback.

Starts the bundled simulator and ``dsmeter proxy`` as separate processes, then streams
chat completions at 1, 10 and 100 concurrent streams, alternately straight to the
simulator and through the proxy, in the same run. For each it reports:

- time to first byte and to last byte (p50, p99), and what the proxy adds to each;
- streams per second (closed loop: each of N clients starts its next stream when one ends);
- the proxy's CPU time per forwarded chunk (all its processes, from /proc), and so how
  many cores it needs for 100 concurrent streams at a given token rate;
- paced runs: 100 concurrent streams at a realistic token rate, in several rounds
  alternating direct and proxy, and the cores the proxy actually used for them. Twice: with
  steady arrivals (the 100 streams start spread over one stream's length, so 100 stay in
  flight as in a service under constant load), and as a burst (all 100 start at the same
  instant, the hardest case for first-byte latency: the last request waits behind 99).

The load generator (``loadgen.py``, a lean httptools client), the simulator and the proxy share this machine's
cores, so absolute figures depend on the machine; the direct runs are the baseline.

    python tests/benchmarks/bench_proxy.py                 # the full run (about a minute)
    python tests/benchmarks/bench_proxy.py --quick         # a smoke run
    python tests/benchmarks/bench_proxy.py --workers 2 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import REPO, Server  # noqa: E402
from loadgen import Sample, closed_loop  # noqa: E402


# -- processes -----------------------------------------------------------------------------------


class Child(Server):
    """A child process that prints ``http://host:port`` on its first line of stdout when ready."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.url = ""
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def wait_url(self, timeout: float = 60.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = re.search(r"(http://[0-9.:\[\]]+)", line)
            if match:
                self.url = match.group(1)
                threading.Thread(target=self.process.stdout.read, daemon=True).start()  # keep the pipe drained
                return self.url
        raise SystemExit(f"{self.process.args!r} did not start:\n{''.join(self._stderr)}")


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str  # "direct" | "proxy"
    concurrency: int
    streams: int
    wall_seconds: float
    samples: list[Sample] = field(repr=False)
    proxy_cpu_seconds: float | None = None

    @property
    def chunks(self) -> int:
        return sum(s.chunks for s in self.samples)

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(s, attr) for s in self.samples)
        index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
        return values[index]

    @property
    def streams_per_second(self) -> float:
        return self.streams / self.wall_seconds


def paced_arrivals(chunks: int, rate: float) -> list[tuple[str, float, int]]:
    """The paced runs' two arrival patterns: (name, stagger seconds, streams) for 100 workers.

    Steady: one stream lasts ``chunks / rate`` seconds; starting the 100 that far apart in all
    keeps 100 in flight with arrivals evenly spread. Burst: all 100 at the same instant.
    """
    return [("steady", chunks / rate / 100, 300), ("burst", 0.0, 200)]


def measure(target: str, base_url: str, concurrency: int, streams: int, body: bytes, headers: dict[str, str],
            proxy: Server | None, stagger: float = 0.0) -> Run:
    cpu_before = proxy.cpu_seconds() if proxy else 0.0
    wall, samples = closed_loop(base_url + "/chat/completions", concurrency, streams, body, headers, stagger)
    cpu = proxy.cpu_seconds() - cpu_before if proxy else None
    return Run(target, concurrency, streams, wall, samples, cpu)


# -- report ----------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def report(pairs: list[tuple[Run, Run]], paced: dict[str, list[tuple[Run, Run]]], rate: float) -> dict[str, Any]:
    print()
    print("conc  target   streams/s   TTFB p50  TTFB p99   TTLB p50  TTLB p99   (ms)")
    results: list[dict[str, Any]] = []
    for direct, proxied in pairs:
        for run in (direct, proxied):
            print(f"{run.concurrency:4d}  {run.target:7s} {run.streams_per_second:10.1f}  "
                  f"{_ms(run.pct('ttfb', 50))} {_ms(run.pct('ttfb', 99))}  {_ms(run.pct('ttlb', 50))} {_ms(run.pct('ttlb', 99))}")
        added = {f"{attr}_p{q}_ms": (proxied.pct(attr, q) - direct.pct(attr, q)) * 1000 for attr in ("ttfb", "ttlb") for q in (50, 99)}
        cpu_per_chunk = (proxied.proxy_cpu_seconds or 0.0) / max(1, proxied.chunks)
        ratio = proxied.streams_per_second / direct.streams_per_second
        print(f"      added    ratio {ratio:5.2f}   {added['ttfb_p50_ms']:+8.2f} {added['ttfb_p99_ms']:+8.2f}  "
              f"{added['ttlb_p50_ms']:+8.2f} {added['ttlb_p99_ms']:+8.2f}   proxy CPU {cpu_per_chunk * 1e6:.1f} us/chunk")
        results.append({
            "concurrency": direct.concurrency,
            "direct": _summary(direct),
            "proxy": _summary(proxied),
            "added_ms": added,
            "throughput_ratio": ratio,
            "proxy_cpu_us_per_chunk": cpu_per_chunk * 1e6,
        })
    out: dict[str, Any] = {"runs": results}
    worst = max(r["proxy_cpu_us_per_chunk"] for r in results)
    needed = worst * 1e-6 * 100 * rate
    print(f"\nproxy CPU per chunk (worst level): {worst:.1f} us -> 100 streams at {rate:g} chunks/s need {needed:.2f} cores")
    out["cores_for_100_streams_at_rate"] = {"chunks_per_second_per_stream": rate, "cores": needed}
    for arrivals, rounds in paced.items():
        out[f"paced_{arrivals}"] = paced_report(rounds, rate, arrivals)
    return out


def paced_report(rounds: list[tuple[Run, Run]], rate: float, arrivals: str) -> dict[str, Any]:
    """The paced streams, round by round: 100 streams share the cores with the simulator and the
    load generator, so one round proves little; the median over rounds of what the proxy added is the figure."""
    how = "arriving steadily" if arrivals == "steady" else "all started at once"
    print(f"\npaced, {how}: 100 concurrent streams at ~{rate:g} chunks/s each, {len(rounds)} rounds (direct, then proxy)")
    print("round  TTFB p50 direct  proxy   added    TTLB p50 added   proxy cores")
    added_ttfb, added_ttlb, cores = [], [], []
    for n, (direct, proxied) in enumerate(rounds, 1):
        added_ttfb.append((proxied.pct("ttfb", 50) - direct.pct("ttfb", 50)) * 1000)
        added_ttlb.append((proxied.pct("ttlb", 50) - direct.pct("ttlb", 50)) * 1000)
        cores.append((proxied.proxy_cpu_seconds or 0.0) / proxied.wall_seconds)
        print(f"{n:5d}  {direct.pct('ttfb', 50) * 1000:15.2f} {proxied.pct('ttfb', 50) * 1000:6.2f} {added_ttfb[-1]:+7.2f}"
              f"   {added_ttlb[-1]:+14.2f}   {cores[-1]:11.2f}")
    summary = {"ttfb_p50_added_ms": statistics.median(added_ttfb), "ttlb_p50_added_ms": statistics.median(added_ttlb),
               "proxy_cores_used": statistics.median(cores)}
    print(f"median added: TTFB p50 {summary['ttfb_p50_added_ms']:+.2f} ms (range {min(added_ttfb):+.2f} to "
          f"{max(added_ttfb):+.2f}), TTLB p50 {summary['ttlb_p50_added_ms']:+.2f} ms; proxy used "
          f"{summary['proxy_cores_used']:.2f} cores")
    return {**summary, "rounds": [{"direct": _summary(d), "proxy": _summary(p)} for d, p in rounds]}


def _summary(run: Run) -> dict[str, Any]:
    return {
        "streams": run.streams,
        "chunks": run.chunks,
        "streams_per_second": run.streams_per_second,
        "ttfb_ms": {"p50": run.pct("ttfb", 50) * 1000, "p99": run.pct("ttfb", 99) * 1000},
        "ttlb_ms": {"p50": run.pct("ttlb", 50) * 1000, "p99": run.pct("ttlb", 99) * 1000},
        "proxy_cpu_seconds": run.proxy_cpu_seconds,
        "mean_ttlb_ms": statistics.fmean(s.ttlb for s in run.samples) * 1000,
    }


# The simulator in its own process, announcing its address on stdout.
_SIMULATOR = (
    "from collector.simulator import Simulator\n"
    "Simulator(seed=0, port=0).run_forever(on_ready=lambda url: print(url, flush=True))\n"
)


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,10,100", help="comma-separated concurrent stream counts (default 1,10,100)")
    parser.add_argument("--streams", type=int, default=0, help="streams per level and target (default: 300, at least 3x the concurrency)")
    parser.add_argument("--output-tokens", type=int, default=100, help="answer tokens per stream, one per chunk (default 100)")
    parser.add_argument("--workers", type=int, default=1, help="proxy worker processes (default 1)")
    parser.add_argument("--db", default=None, help="ledger URL for the proxy (default: a temporary SQLite file)")
    parser.add_argument("--paced-rate", type=float, default=50.0,
                        help="chunks per second per stream for the paced run and the capacity figure (default 50)")
    parser.add_argument("--no-paced", action="store_true", help="skip the paced 100-stream run")
    parser.add_argument("--paced-rounds", type=int, default=5, help="paced rounds, each direct then proxy (default 5)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1,10 concurrent, few streams)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)

    levels = [1, 10] if args.quick else [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-") as home:
        env = {**os.environ, "DSMETER_HOME": home, "PYTHONUNBUFFERED": "1"}
        env.pop("DSMETER_DATABASE_URL", None)
        db = args.db or f"sqlite:///{home}/bench.db"
        simulator = Child([sys.executable, "-c", _SIMULATOR], env)
        proxy: Child | None = None
        try:
            sim_url = simulator.wait_url()
            proxy = Child([sys.executable, "-m", "collector.cli", "proxy", "--port", "0", "--upstream", sim_url,
                           "--workers", str(args.workers), "--db", db], env)
            proxy_url = proxy.wait_url()
            print(f"simulator {sim_url}  proxy {proxy_url} ({args.workers} worker(s), ledger {db.split('@')[-1]})")
            body = json.dumps({"model": "deepseek-v4-flash", "stream": True,
                               "messages": [{"role": "system", "content": "You are terse. " * 40},
                                            {"role": "user", "content": "Say something about caching."}]}).encode()
            headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-not-a-real-key",
                       "X-Simulator-Output-Tokens": str(args.output_tokens)}
            pairs: list[tuple[Run, Run]] = []
            for level in levels:
                streams = args.streams or (30 if args.quick else max(300, 3 * level))
                direct = measure("direct", sim_url, level, streams, body, headers, None)
                proxied = measure("proxy", proxy_url, level, streams, body, headers, proxy)
                pairs.append((direct, proxied))
                print(f"  {level:3d} concurrent: done ({streams} streams each way)")
            paced: dict[str, list[tuple[Run, Run]]] = {}
            if not args.no_paced and not args.quick:
                paced_headers = {**headers, "X-Simulator-Chunk-Delay-Ms": f"{1000.0 / args.paced_rate:g}"}
                for arrivals, spread, streams in paced_arrivals(args.output_tokens, args.paced_rate):
                    paced[arrivals] = [
                        (measure("direct", sim_url, 100, streams, body, paced_headers, None, spread),
                         measure("proxy", proxy_url, 100, streams, body, paced_headers, proxy, spread))
                        for _ in range(args.paced_rounds)]
            figures = report(pairs, paced, args.paced_rate)
            figures["settings"] = {"workers": args.workers, "output_tokens": args.output_tokens, "cpus": os.cpu_count(),
                                   "python": sys.version.split()[0]}
            if args.json:
                Path(args.json).write_text(json.dumps(figures, indent=2))
        finally:
            if proxy is not None:
                proxy.stop()
            simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
