#!/usr/bin/env python3
"""Reliability: the ledger loses nothing while its database is down under load.

Streams go through ``dsmeter proxy --workers 2`` to the bundled simulator at a fixed rate
(50 streams/s for 60 s by default); in the middle the database goes away for 20 s:

- PostgreSQL: cut at the network level by a TCP forwarder the proxy connects through
  (live connections reset, new ones refused), then restored on the same port. The
  machine's PostgreSQL server keeps running for everyone else.
- SQLite: another process holds an exclusive transaction on the ledger file.

Then the proxy gets SIGTERM, and the ledger is compared with what the simulator says it
served: every call must be a row exactly once (by its own ``n`` tag), with exactly the
tokens the simulator billed. Printed per database: rows expected / written / lost /
duplicated, token mismatches, the spool's peak (rows waiting on disk), and the time from
the database's return until the ledger had every row.

    python tests/benchmarks/reliability_outage.py                       # both, 60 s, 20 s outage
    python tests/benchmarks/reliability_outage.py --database sqlite --duration 20 --outage 6
    python tests/benchmarks/reliability_outage.py --json outage.json

PostgreSQL comes from DSMETER_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
a fresh database is created on that server and dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reliability_common import (  # noqa: E402
    Forwarder,
    LedgerCheck,
    ProxyProcess,
    SpoolWatcher,
    SqliteLocker,
    check_ledger,
    count_rows,
    fresh_postgres,
    run_load,
    wait_until,
)

__all__ = ["OutageFigures", "run_outage", "database_for", "main"]

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class OutageFigures:
    database: str
    rate: float
    duration: float
    outage: float
    workers: int
    calls: int
    rows: int
    lost: int
    duplicated: int
    token_mismatches: int
    not_completed: int
    client_failures: int
    unmatched_served: int
    spool_peak_rows: int
    spool_peak_bytes: int
    rows_at_restore: int | None  # in the ledger when the database came back
    complete_after_seconds: float | None  # from the end of the load until every row was in the ledger
    proxy_exit_code: int
    examples: list[str]

    @property
    def exact(self) -> bool:
        return (self.lost, self.duplicated, self.token_mismatches, self.unmatched_served) == (0, 0, 0, 0) \
            and self.rows == self.calls and self.proxy_exit_code == 0


@contextlib.contextmanager
def database_for(kind: str, workdir: Path, postgres_admin: str | None = None) -> Iterator[str]:
    """A fresh, empty ledger URL of the given kind."""
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'ledger.db'}"
    else:
        with fresh_postgres(postgres_admin or os.environ.get("DSMETER_TEST_POSTGRES_URL") or DEFAULT_POSTGRES) as url:
            yield url


def run_outage(
    kind: str,
    url: str,
    *,
    rate: float = 50.0,
    duration: float = 60.0,
    outage: float = 20.0,
    workers: int = 2,
    output_tokens: int = 40,
    chunk_delay_ms: float = 5.0,
    catch_up_timeout: float = 60.0,
) -> OutageFigures:
    """Run the scenario against an empty ledger at ``url`` (this process's DSMETER_HOME holds the spool)."""
    from collector.simulator import Simulator
    from collector.spool import default_spool_dir

    forwarder: Forwarder | None = None
    proxy_db = url
    if kind == "postgresql":
        from sqlalchemy.engine import make_url

        target = make_url(url)
        forwarder = Forwarder(target.host or "127.0.0.1", target.port or 5432).open()
        proxy_db = forwarder.url_for(url)
    cut_at = (duration - outage) / 2
    state: dict[str, Any] = {"restored_at": None, "rows_at_restore": None}
    locker: SqliteLocker | None = None
    timers: list[threading.Timer] = []

    def cut() -> None:
        nonlocal locker
        state["cut_at"] = time.monotonic()
        if forwarder is not None:
            forwarder.cut()
        else:
            locker = SqliteLocker(Path(url.removeprefix("sqlite:///")), outage)

    def restore() -> None:
        if forwarder is not None:
            forwarder.restore()
        elif locker is not None:
            locker.wait(outage + 30)
        state["restored_at"] = time.monotonic()
        state["rows_at_restore"] = count_rows(url)

    with Simulator(seed=11) as sim:
        proxy = ProxyProcess(sim.base_url, proxy_db, workers=workers).wait_ready()
        watcher = SpoolWatcher(default_spool_dir(proxy_db)).start()
        try:
            timers = [threading.Timer(cut_at, cut), threading.Timer(cut_at + outage, restore)]
            for timer in timers:
                timer.start()
            results = run_load(proxy.base_url, rate=rate, duration=duration, output_tokens=output_tokens,
                               chunk_delay_ms=chunk_delay_ms)
            for timer in timers:
                timer.join(outage + 60)
            calls = len(results)
            waited = wait_until(lambda: (count_rows(url) or 0) >= calls, catch_up_timeout, interval=0.05)
            exit_code = proxy.stop(signal.SIGTERM)
        finally:
            for timer in timers:
                timer.cancel()
            watcher.stop()
            proxy.kill()
            if locker is not None:
                locker.kill()
            if forwarder is not None:
                forwarder.close()
        with contextlib.suppress(TimeoutError):
            sim.wait_for_calls(len(results), timeout=10, finished=True)
        served = sim.calls
    check: LedgerCheck = check_ledger(url, results, served)
    return OutageFigures(
        database=kind, rate=rate, duration=duration, outage=outage, workers=workers,
        calls=check.expected, rows=check.rows, lost=check.lost, duplicated=check.duplicated,
        token_mismatches=check.token_mismatches, not_completed=check.not_completed,
        client_failures=check.client_failures, unmatched_served=check.unmatched_served,
        spool_peak_rows=watcher.peak_rows, spool_peak_bytes=watcher.peak_bytes,
        rows_at_restore=state["rows_at_restore"],
        complete_after_seconds=None if waited is None else round(waited, 2),
        proxy_exit_code=exit_code, examples=check.examples,
    )


def _print(figures: OutageFigures) -> None:
    f = figures
    print(f"\n{f.database}: {f.rate:g} streams/s for {f.duration:g} s through {f.workers} workers, "
          f"database away for {f.outage:g} s in the middle")
    print(f"  rows expected {f.calls}, written {f.rows}, lost {f.lost}, duplicated {f.duplicated}, "
          f"token mismatches {f.token_mismatches}, rows not 'completed' {f.not_completed}")
    print(f"  client-side failures {f.client_failures}; simulator calls without a row {f.unmatched_served}")
    print(f"  spool peak {f.spool_peak_rows} rows ({f.spool_peak_bytes / 1024:.0f} KiB); rows in the ledger when the "
          f"database came back {f.rows_at_restore}; every row in {f.complete_after_seconds} s after the last call")
    print(f"  proxy exit code after SIGTERM {f.proxy_exit_code}; {'EXACT' if f.exact else 'NOT EXACT'}")
    for example in f.examples:
        print(f"    {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--rate", type=float, default=50.0, help="streams started per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds the database is away, in the middle")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    kinds = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
    all_figures = []
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="dsmeter-outage-") as tmp:
            workdir = Path(tmp)
            os.environ["DSMETER_HOME"] = str(workdir / "home")  # the proxy's spool, and ours to watch
            with database_for(kind, workdir) as url:
                figures = run_outage(kind, url, rate=args.rate, duration=args.duration, outage=args.outage,
                                     workers=args.workers)
        _print(figures)
        all_figures.append(figures)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(f), "exact": f.exact} for f in all_figures], indent=2))
    return 0 if all(f.exact for f in all_figures) else 1


if __name__ == "__main__":
    sys.exit(main())
