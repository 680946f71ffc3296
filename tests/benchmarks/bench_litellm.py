#!/usr/bin/env python3
"""Benchmark: the metering proxy against LiteLLM's proxy, on the same simulator, in the same run.

LiteLLM is what teams would put in front of DeepSeek instead. This script installs it from
PyPI into a virtualenv of its own (``--litellm-venv``, created on first use, the version
pinned by ``--litellm-version``), starts the bundled simulator, ``dsmeter proxy`` and
``litellm`` with the same number of worker processes, and streams the same chat completions
straight to the simulator, through dsmeter and through LiteLLM:

- closed loop at 1, 10 and 100 concurrent streams of ``--output-tokens`` chunks: streams
  per second, time to first and last byte (p50, p99), and dsmeter's streams/s over LiteLLM's;
- each proxy's CPU time per stream (all its processes, from /proc), and so the streams per
  second one core of it carries. The closed loop shares the machine's cores among the load
  generator, the simulator and the proxy, so once a proxy is cheap its streams/s measures
  the other two; CPU per stream is what the proxy itself costs, whatever else runs;
- paced: 100 concurrent streams of 100 chunks 20 ms apart (a realistic generation), time to
  first byte p50 of each, and what each proxy adds to the direct figure; with steady
  arrivals (the streams start spread out, 100 always in flight) and as a burst (all at once).

LiteLLM runs in its lightest setup (no database, no master key, no callbacks), so it does
less than dsmeter, which meters every call into its SQLite ledger. LiteLLM does not pass a
client's headers to the provider, so the simulator's per-request knobs (output tokens,
chunk delay) are set for it in its model list (``extra_headers``); dsmeter and the direct
runs send the same headers themselves.

    python tests/benchmarks/bench_litellm.py                      # 1 worker each (a few minutes)
    python tests/benchmarks/bench_litellm.py --workers 2 --json litellm.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import _SIMULATOR, Child, Run, measure, paced_arrivals  # noqa: E402
from benchutil import Server, print_conditions  # noqa: E402

DEFAULT_VERSION = "1.106.0"
BODY_MESSAGES = [{"role": "system", "content": "You are terse. " * 40},
                 {"role": "user", "content": "Say something about caching."}]


def ensure_litellm(venv: Path, version: str) -> Path:
    """The ``litellm`` command of a virtualenv holding exactly ``litellm[proxy]==version`` (installed if absent)."""
    command = venv / "bin" / "litellm"
    marker = venv / f".dsmeter-bench-litellm-{version}"
    if command.exists() and marker.exists():
        return command
    print(f"installing litellm[proxy]=={version} into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={version}"], check=True)
    marker.touch()
    return command


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiteLLM(Server):
    """``litellm --config`` on loopback, pointed at the simulator, ready when its liveness probe answers."""

    def __init__(self, command: Path, sim_url: str, workers: int, output_tokens: int, paced_delay_ms: float,
                 home: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # LiteLLM refuses to start without a master key; with one and no database it checks
        # the key in memory, the cheapest authentication it has.
        self.master_key = "sk-" + secrets.token_hex(32)
        config = home / "litellm.yaml"
        models = []
        for name, delay in (("bench", None), ("bench-paced", paced_delay_ms)):
            headers = {"X-Simulator-Output-Tokens": str(output_tokens if delay is None else 100)}
            if delay is not None:
                headers["X-Simulator-Chunk-Delay-Ms"] = f"{delay:g}"
            models.append({"model_name": name, "litellm_params": {
                "model": "openai/deepseek-v4-flash", "api_base": sim_url, "api_key": "sk-bench-not-a-real-key",
                "extra_headers": headers}})
        # JSON is YAML: no YAML library needed on our side.
        config.write_text(json.dumps({"model_list": models, "litellm_settings": {"telemetry": False}}))
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
               "LITELLM_TELEMETRY": "False", "NO_DOCS": "True", "HOME": str(home),
               "LITELLM_MASTER_KEY": self.master_key}
        self.log = (home / "litellm.log").open("w")
        self.process = subprocess.Popen(
            [str(command), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.port),
             "--num_workers", str(workers)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=home,
        )
        self._home = home

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"litellm exited ({self.process.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health/liveliness", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise SystemExit(f"litellm did not answer within {timeout:g}s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self._home / "litellm.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        super().stop()
        self.log.close()


def _same_streams(*runs: Run) -> None:
    """Refuse to compare runs whose streams differ (say, a knob LiteLLM did not pass on)."""
    per_stream = [run.chunks / run.streams for run in runs]
    if max(per_stream) - min(per_stream) > 2:
        raise SystemExit(f"the targets streamed different answers (events per stream: {per_stream}); not comparable")


def _cpu_per_stream(run: Run) -> float:
    return (run.proxy_cpu_seconds or 0.0) / run.streams


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "stream": True, "messages": BODY_MESSAGES}).encode()


def _row(label: str, run: Run) -> str:
    return (f"{run.concurrency:4d}  {label:8s} {run.streams_per_second:9.1f}  {run.pct('ttfb', 50) * 1000:9.2f} "
            f"{run.pct('ttfb', 99) * 1000:9.2f}  {run.pct('ttlb', 50) * 1000:9.2f} {run.pct('ttlb', 99) * 1000:9.2f}")


def _figures(run: Run) -> dict[str, Any]:
    return {"streams": run.streams, "streams_per_second": run.streams_per_second,
            "ttfb_ms": {"p50": run.pct("ttfb", 50) * 1000, "p99": run.pct("ttfb", 99) * 1000},
            "ttlb_ms": {"p50": run.pct("ttlb", 50) * 1000, "p99": run.pct("ttlb", 99) * 1000},
            "proxy_cpu_seconds": run.proxy_cpu_seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,10,100", help="comma-separated concurrent stream counts")
    parser.add_argument("--streams", type=int, default=0,
                        help="streams per level and target (default: 3x the concurrency, at least 60)")
    parser.add_argument("--output-tokens", type=int, default=200, help="chunks per closed-loop stream (default 200)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of each proxy (default 1)")
    parser.add_argument("--paced-rate", type=float, default=50.0, help="chunks/s per paced stream (default 50)")
    parser.add_argument("--no-paced", action="store_true", help="skip the paced 100-stream run")
    parser.add_argument("--litellm-version", default=DEFAULT_VERSION, help=f"LiteLLM from PyPI (default {DEFAULT_VERSION})")
    parser.add_argument("--litellm-venv", type=Path, default=None,
                        help="its virtualenv (default ~/.cache/dsmeter-bench/litellm-VERSION)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = parser.parse_args(argv)

    venv = args.litellm_venv or Path.home() / ".cache" / "dsmeter-bench" / f"litellm-{args.litellm_version}"
    litellm_command = ensure_litellm(venv, args.litellm_version)
    levels = [int(x) for x in args.concurrency.split(",")]
    delay_ms = 1000.0 / args.paced_rate
    with tempfile.TemporaryDirectory(prefix="dsmeter-bench-litellm-") as home_dir:
        home = Path(home_dir)
        env = {**os.environ, "DSMETER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("DSMETER_DATABASE_URL", None)
        simulator = Child([sys.executable, "-c", _SIMULATOR], env)
        dsmeter: Child | None = None
        litellm: LiteLLM | None = None
        try:
            sim_url = simulator.wait_url()
            dsmeter = Child([sys.executable, "-m", "collector.cli", "proxy", "--port", "0", "--upstream", sim_url,
                             "--workers", str(args.workers), "--db", f"sqlite:///{home}/bench.db"], env)
            dsmeter_url = dsmeter.wait_url()
            litellm = LiteLLM(litellm_command, sim_url, args.workers, args.output_tokens, delay_ms, home)
            litellm.wait_ready()
            print(f"simulator {sim_url}  dsmeter {dsmeter_url}  litellm {litellm.url} "
                  f"({args.workers} worker(s) each; LiteLLM {args.litellm_version})", flush=True)
            headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench-not-a-real-key",
                       "X-Simulator-Output-Tokens": str(args.output_tokens)}
            their_headers = {**headers, "Authorization": f"Bearer {litellm.master_key}"}
            results: list[dict[str, Any]] = []
            print("\nconc  target   streams/s   TTFB p50  TTFB p99   TTLB p50  TTLB p99   (ms)")
            for level in levels:
                streams = args.streams or max(60, 3 * level)
                direct = measure("direct", sim_url, level, streams, _body("deepseek-v4-flash"), headers, None)
                ours = measure("dsmeter", dsmeter_url, level, streams, _body("deepseek-v4-flash"), headers, dsmeter)
                theirs = measure("litellm", litellm.url, level, streams, _body("bench"), their_headers, litellm)
                _same_streams(direct, ours, theirs)
                for label, run in (("direct", direct), ("dsmeter", ours), ("litellm", theirs)):
                    print(_row(label, run))
                ratio = ours.streams_per_second / theirs.streams_per_second
                our_cpu, their_cpu = _cpu_per_stream(ours), _cpu_per_stream(theirs)
                print(f"      dsmeter/litellm streams/s: {ratio:.1f}x;  CPU per stream: dsmeter {our_cpu * 1000:.2f} ms, "
                      f"litellm {their_cpu * 1000:.1f} ms: {their_cpu / our_cpu:.1f}x (streams/s per core "
                      f"{1 / our_cpu:.0f} vs {1 / their_cpu:.1f})", flush=True)
                results.append({"concurrency": level, "direct": _figures(direct), "dsmeter": _figures(ours),
                                "litellm": _figures(theirs), "dsmeter_over_litellm_streams_per_second": ratio,
                                "cpu_seconds_per_stream": {"dsmeter": our_cpu, "litellm": their_cpu},
                                "litellm_over_dsmeter_cpu_per_stream": their_cpu / our_cpu})
            out: dict[str, Any] = {"runs": results}
            if not args.no_paced:
                paced_headers = {**headers, "X-Simulator-Output-Tokens": "100", "X-Simulator-Chunk-Delay-Ms": f"{delay_ms:g}"}
                for arrivals, stagger, streams in paced_arrivals(100, args.paced_rate):  # paced streams: 100 chunks
                    direct = measure("direct", sim_url, 100, streams, _body("deepseek-v4-flash"), paced_headers, None, stagger)
                    ours = measure("dsmeter", dsmeter_url, 100, streams, _body("deepseek-v4-flash"), paced_headers, dsmeter,
                                   stagger)
                    theirs = measure("litellm", litellm.url, 100, streams, _body("bench-paced"),
                                     {**paced_headers, **their_headers}, litellm, stagger)
                    _same_streams(direct, ours, theirs)
                    base = direct.pct("ttfb", 50) * 1000
                    print(f"\npaced, {arrivals}: 100 concurrent streams, 100 chunks {delay_ms:g} ms apart; TTFB p50: "
                          f"direct {base:.1f} ms, dsmeter {ours.pct('ttfb', 50) * 1000:.1f} ms "
                          f"({ours.pct('ttfb', 50) * 1000 - base:+.1f}), litellm {theirs.pct('ttfb', 50) * 1000:.1f} ms "
                          f"({theirs.pct('ttfb', 50) * 1000 - base:+.1f})", flush=True)
                    out[f"paced_{arrivals}"] = {"direct": _figures(direct), "dsmeter": _figures(ours),
                                                "litellm": _figures(theirs)}
            out["settings"] = {"workers": args.workers, "output_tokens": args.output_tokens,
                               "litellm_version": args.litellm_version}
            print_conditions()
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2))
        finally:
            for child in (litellm, dsmeter):
                if child is not None:
                    child.stop()
            simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
