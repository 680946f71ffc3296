#!/usr/bin/env python3
"""Reliability: what a SIGTERM or a SIGKILL to the proxy costs, in calls, measured.

Streams go through ``dsmeter proxy --workers 2`` to the bundled simulator at a fixed rate;
mid-traffic the proxy gets SIGTERM (the graceful stop: stop accepting, let streams in
flight finish, flush the writer) or SIGKILL (every proxy process at once, no warning).
Afterwards ``dsmeter spool replay`` writes whatever a writer spooled, and the ledger is
compared with the simulator's log of every call it served:

- calls that finished before the signal and have no row ("lost finished"), and how long
  before the signal the latest of them finished;
- calls in flight at the signal and have no row ("lost in flight");
- duplicated rows and token mismatches (must be 0 in every case).

With ``--hang`` the database hangs (PostgreSQL: frozen behind a TCP forwarder; SQLite:
locked by another process) from one second into the run until after the proxy has exited,
so the writers must spool on their way out.

    python tests/benchmarks/reliability_faults.py                   # SIGTERM and SIGKILL, both databases
    python tests/benchmarks/reliability_faults.py --signal SIGKILL --runs 5 --database sqlite
    python tests/benchmarks/reliability_faults.py --hang --signal SIGTERM
"""

from __future__ import annotations

import argparse
import json
import os
import signal as signals
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_common import (  # noqa: E402
    CallResult,
    Forwarder,
    ProxyProcess,
    SqliteLocker,
    ledger_rows,
    run_load,
)
from reliability_outage import database_for  # noqa: E402

__all__ = ["FaultFigures", "run_signal", "main"]


@dataclass
class FaultFigures:
    database: str
    signal: str
    hang: bool
    rate: float
    duration: float
    signal_at: float
    calls_started: int
    served: int  # calls the simulator answered, whatever their outcome
    in_flight_at_signal: int
    finished_before_signal: int
    rows: int
    rows_completed: int
    rows_cancelled: int
    lost_finished: int  # finished before the signal, no row
    lost_finished_latest_ms: float | None  # how long before the signal the oldest of those finished
    lost_in_flight: int
    duplicated: int
    token_mismatches: int
    client_completed_without_row: int
    spooled_at_exit: int  # rows the writers left in the spool
    replay_inserted: int  # rows `dsmeter spool replay` wrote afterwards
    exit_code: int | None


def _served(sim: object, calls: int, timeout: float = 10.0) -> list[object]:
    """The simulator's log once every call it took has ended (it logs a call on arrival)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = sim.calls  # type: ignore[attr-defined]
        if all(call.finished_at is not None for call in served):
            return served
        time.sleep(0.05)
    return sim.calls  # type: ignore[attr-defined]


def _replay(url: str) -> tuple[int, int]:
    """``dsmeter spool replay`` in a fresh process; returns (rows in the spool, rows inserted)."""
    done = subprocess.run([sys.executable, "-m", "collector.cli", "spool", "replay", "--db", url],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"spool replay failed: {done.stderr}")
    fields = dict(part.split(": ") for part in done.stdout.strip().split("  "))
    return int(fields["rows"]), int(fields["inserted"])


def run_signal(
    kind: str,
    url: str,
    signum: int,
    *,
    rate: float = 50.0,
    duration: float = 5.0,
    signal_at: float = 3.5,
    output_tokens: int = 100,
    chunk_delay_ms: float = 8.0,
    workers: int = 2,
    hang: bool = False,
) -> FaultFigures:
    from collector.simulator import Simulator

    forwarder: Forwarder | None = None
    proxy_db = url
    # Only a hang needs the forwarder: its Python threads share this process with the load and the
    # simulator, and the extra latency they add would lengthen what a SIGKILL finds unwritten.
    if kind == "postgresql" and hang:
        from sqlalchemy.engine import make_url

        target = make_url(url)
        forwarder = Forwarder(target.host or "127.0.0.1", target.port or 5432).open()
        proxy_db = forwarder.url_for(url)
    locker: SqliteLocker | None = None
    signalled: dict[str, float] = {}

    def hang_database() -> None:
        nonlocal locker
        if forwarder is not None:
            forwarder.freeze()
        else:
            locker = SqliteLocker(Path(url.removeprefix("sqlite:///")), 600)

    try:
        with Simulator(seed=23) as sim:
            proxy = ProxyProcess(sim.base_url, proxy_db, workers=workers).wait_ready()

            def send() -> None:
                signalled["at"] = time.monotonic()
                if signum == signals.SIGKILL:
                    proxy.kill()
                else:
                    proxy.send(signum)

            timers = [threading.Timer(signal_at, send)]
            if hang:
                timers.append(threading.Timer(min(1.0, signal_at / 2), hang_database))
            for timer in timers:
                timer.start()
            try:
                results: list[CallResult] = run_load(proxy.base_url, rate=rate, duration=duration,
                                                     output_tokens=output_tokens, chunk_delay_ms=chunk_delay_ms)
                for timer in timers:
                    timer.join(30)
                exit_code = proxy.process.wait(120)  # never a second SIGTERM: that would force the stop
            finally:
                for timer in timers:
                    timer.cancel()
                proxy.kill()
            served = _served(sim, len(results))
    finally:
        if forwarder is not None:
            forwarder.thaw()
        if locker is not None:
            locker.kill()
    try:
        spooled, inserted = _replay(proxy_db)
    finally:
        if forwarder is not None:
            forwarder.close()

    at = signalled["at"]
    rows = ledger_rows(url)
    by_provider: dict[str | None, list[dict[str, object]]] = {}
    for row in rows:
        by_provider.setdefault(row["provider_request_id"], []).append(row)
    by_n: dict[int, int] = {}
    for row in rows:
        n = int(row["tags"]["n"])
        by_n[n] = by_n.get(n, 0) + 1
    lost_finished_ages: list[float] = []
    lost_in_flight = mismatches = in_flight = finished_before = 0
    for call in served:
        mine = by_provider.get(call.request_id, [])
        running = call.started_at < at and (call.finished_at is None or call.finished_at >= at)
        in_flight += running
        finished_before += call.finished_at is not None and call.finished_at < at
        if not mine:
            if running or call.started_at >= at:
                lost_in_flight += 1
            else:
                lost_finished_ages.append((at - call.finished_at) * 1000.0)
            continue
        usage = call.usage  # as it went on the wire; None if it never did
        if usage is not None:
            expected = (usage["prompt_cache_hit_tokens"], usage["prompt_cache_miss_tokens"], usage["completion_tokens"],
                        (usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
            got = (mine[0]["prompt_cache_hit_tokens"], mine[0]["prompt_cache_miss_tokens"], mine[0]["completion_tokens"],
                   mine[0]["reasoning_tokens"])
            mismatches += got != expected
    completed_n = {r.n for r in results if r.completed}
    return FaultFigures(
        database=kind, signal=signals.Signals(signum).name, hang=hang, rate=rate, duration=duration, signal_at=signal_at,
        calls_started=len(results), served=len(served), in_flight_at_signal=in_flight,
        finished_before_signal=finished_before, rows=len(rows),
        rows_completed=sum(1 for r in rows if r["status"] == "completed"),
        rows_cancelled=sum(1 for r in rows if r["status"] == "cancelled"),
        lost_finished=len(lost_finished_ages),
        lost_finished_latest_ms=round(max(lost_finished_ages), 1) if lost_finished_ages else None,
        lost_in_flight=lost_in_flight, duplicated=sum(c - 1 for c in by_n.values() if c > 1),
        token_mismatches=mismatches, client_completed_without_row=len(completed_n - set(by_n)),
        spooled_at_exit=spooled, replay_inserted=inserted, exit_code=exit_code,
    )


def _print(f: FaultFigures) -> None:
    hang = ", database hanging" if f.hang else ""
    print(f"\n{f.database}: {f.signal} at {f.signal_at:g} s into {f.rate:g} streams/s{hang}")
    print(f"  served {f.served} calls: {f.finished_before_signal} finished before the signal, {f.in_flight_at_signal} in flight")
    print(f"  rows {f.rows} ({f.rows_completed} completed, {f.rows_cancelled} cancelled); duplicated {f.duplicated}; "
          f"token mismatches {f.token_mismatches}")
    print(f"  lost: {f.lost_finished} finished call(s) (oldest finished {f.lost_finished_latest_ms} ms before the signal), "
          f"{f.lost_in_flight} in flight; client-completed calls without a row {f.client_completed_without_row}")
    print(f"  spooled at exit {f.spooled_at_exit}, written by spool replay {f.replay_inserted}; exit code {f.exit_code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--signal", choices=["SIGTERM", "SIGKILL", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each case (SIGKILL timing varies)")
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--at", type=float, default=3.5, help="seconds after the proxy is ready to send the signal")
    parser.add_argument("--hang", action="store_true", help="the database hangs from 1 s in until after the exit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    kinds = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
    sigs = ["SIGTERM", "SIGKILL"] if args.signal == "both" else [args.signal]
    figures = []
    for kind in kinds:
        for name in sigs:
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="dsmeter-faults-") as tmp:
                    os.environ["DSMETER_HOME"] = str(Path(tmp) / "home")
                    with database_for(kind, Path(tmp)) as url:
                        result = run_signal(kind, url, getattr(signals, name), rate=args.rate, hang=args.hang,
                                            signal_at=args.at, duration=args.at + 1.5)
                _print(result)
                figures.append(result)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    bad = [f for f in figures if f.duplicated or f.token_mismatches or (f.signal == "SIGTERM" and (f.lost_finished or f.lost_in_flight))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
