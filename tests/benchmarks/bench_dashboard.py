"""Benchmark: first paint of the dashboard's overview on a 1,000,000-row ledger (target: under 2 s).

    python tests/benchmarks/bench_dashboard.py [--rows 1000000] [--db URL [--no-seed]] [--keep PATH]
                                               [--browser [--rounds 7]] [--raw]

Seeds the ledger quickly with large ``LedgerStore.insert`` batches (no HTTP; 30 days of
calls ending now), builds the daily rollup once (as ``dsmeter rollup`` does; a running writer
keeps it current from then on), then measures:

* **server first paint**: a fresh ``AppTest`` session of ``dashboard/app.py`` on the overview
  with every cache cleared, i.e. all the SQL and drawing a first visitor's page needs; best and
  median of several cold runs, and one warm run (caches filled);
* with ``--browser`` (needs Debian's chromium): ``dsmeter dashboard`` in a real headless Chromium
  (a new profile per visit: nothing cached in the browser), from navigation until the
  overview's spend figure is on screen, and until its four charts are drawn. Each round starts
  a new server and measures its first visitor (every server cache cold) and a second visitor
  (figures cached), then a one-line Streamlit page in the same browser: the baseline, what
  loading Streamlit's front end costs on this machine at that moment. Rounds interleave the
  three so a busy spell slows all of them; medians, ranges and the 1-minute load average are
  printed.

``--keep PATH`` keeps the seeded SQLite file there and reuses it on the next run; ``--db URL
--no-seed`` measures an existing ledger (its newest call is taken as "now").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

BATCH = 20_000
DAYS = 30


def build_rollup(url: str) -> float:
    """Re-derive the daily rollup from the seeded rows (what ``dsmeter rollup`` does); returns seconds.

    Bulk inserts bypass the writer, so the rollup a running writer keeps current has to be
    built once here, as a user upgrading an existing ledger would.
    """
    from collector.rollups import rebuild
    from collector.store import LedgerStore

    began = time.perf_counter()
    store = LedgerStore(url)
    try:
        result = rebuild(store)
    finally:
        store.close()
    if not result.complete:
        raise SystemExit("the rollup did not cover the whole ledger after a full rebuild")
    return time.perf_counter() - began


def seed(url: str, rows: int, now: datetime) -> float:
    """Insert ``rows`` synthetic calls over the last ``DAYS`` days; returns the seconds it took."""
    from collector.store import LedgerStore
    from dashboard_seed import synthetic_records

    began = time.perf_counter()
    store = LedgerStore(url)
    try:
        batch = []
        for record in synthetic_records(rows, seed=42, start=now - timedelta(days=DAYS), end=now):
            batch.append(record)
            if len(batch) == BATCH:
                store.insert(batch)
                batch = []
                print(f"\r  seeded {call_count(store.engine):,} rows", end="", file=sys.stderr, flush=True)
        if batch:
            store.insert(batch)
    finally:
        store.close()
    print(file=sys.stderr)
    return time.perf_counter() - began


def settle(url: str) -> None:
    """Leave the seeded ledger as a month of writes and autovacuum would: statistics gathered, and on
    PostgreSQL vacuumed, so the first read after a bulk load does not pay for setting hint bits on
    every row (the first cold run took 11 s instead of 0.5 s without this)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("VACUUM (ANALYZE)" if engine.dialect.name == "postgresql" else "ANALYZE")
    finally:
        engine.dispose()


@contextmanager
def rollup_marked_incomplete(url: str) -> Iterator[None]:
    """Make every query read the raw ledger for a while (the rollup rows stay; the flag is put back)."""
    import sqlalchemy as sa

    from collector.reporting_schema import ROLLUP_STATE

    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(ROLLUP_STATE.update().values(complete=False))
        yield
    finally:
        with engine.begin() as connection:
            connection.execute(ROLLUP_STATE.update().values(complete=True))
        engine.dispose()


def migrate(url: str) -> None:
    from collector.store import LedgerStore

    store = LedgerStore(url)
    try:
        store.migrate()
    finally:
        store.close()


def last_call(url: str) -> tuple[datetime, int]:
    """The newest call's start in a ledger being reused (the measured "now"), and how many calls it holds."""
    from collector.queries import filter_choices
    from dashboard.engine import open_read_only

    engine = open_read_only(url)
    try:
        last = filter_choices(engine).last_call
        count = call_count(engine)
    finally:
        engine.dispose()
    if last is None:
        raise SystemExit(f"{url} holds no calls to measure")
    return last, count


def call_count(engine: Engine) -> int:
    """How many calls the ledger behind ``engine`` holds."""
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM calls").scalar_one())


def first_paint(url: str, runs: int) -> tuple[list[float], float, str]:
    """Cold AppTest runs of the overview (caches cleared each time), then one warm run; and the total shown."""
    import streamlit as st
    from dashboard_figures import figure
    from streamlit.testing.v1 import AppTest

    os.environ["DSMETER_DATABASE_URL"] = url
    app = str(ROOT / "dashboard" / "app.py")
    cold: list[float] = []
    shown = ""
    for _ in range(runs):
        st.cache_data.clear()
        st.cache_resource.clear()
        at = AppTest.from_file(app, default_timeout=120)
        began = time.perf_counter()
        at.run()
        cold.append(time.perf_counter() - began)
        if at.exception:
            raise SystemExit(f"the overview raised: {at.exception[0].message}")
        shown = figure(at, "Spend, ")
    began = time.perf_counter()
    at.run()
    warm = time.perf_counter() - began
    cold.append(warm)  # last entry is the warm run
    return cold, warm, shown


# Four Vega charts on the overview, each drawn into a canvas (or an SVG) once its code has loaded.
_CHARTS_DRAWN = ("document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] canvas, "
                 "[data-testid=\"stVegaLiteChart\"] svg.marks').length")
OVERVIEW_CHARTS = 4


@dataclass(frozen=True)
class Visit:
    shown: float  # seconds from navigation until the expected text is on screen
    charts: float | None  # ... until ``charts`` charts are drawn (None when not asked for)


def _visit(address: str, expected: str, charts: int = 0) -> Visit:
    """A new visitor (a fresh headless Chromium profile): seconds from navigation until ``expected`` is on screen,
    and until ``charts`` charts are drawn."""
    import httpx
    from test_dashboard_browser import CHROMIUM, CHROMIUM_FLAGS, _DevTools, _stop

    probe = (f"[document.body ? document.body.innerText.includes({json.dumps(expected)}) : false, "
             f"{_CHARTS_DRAWN}]")
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            while not (port_file.exists() and port_file.read_text().strip()):
                time.sleep(0.05)
            port = int(port_file.read_text().splitlines()[0])
            page = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
            tools = _DevTools(page["webSocketDebuggerUrl"])
            try:
                began = time.perf_counter()
                tools.call("Page.navigate", url=address)
                shown: float | None = None
                while time.perf_counter() - began < 120:
                    on_screen, drawn = tools.call("Runtime.evaluate", expression=probe,
                                                  returnByValue=True)["result"].get("value", [False, 0])
                    now = time.perf_counter() - began
                    if on_screen and shown is None:
                        shown = now
                    if shown is not None and drawn >= charts:
                        return Visit(shown, now if charts else None)
                    time.sleep(0.02)
                raise SystemExit(f"{expected} (and {charts} charts) never appeared in the browser")
            finally:
                tools.close()
        finally:
            _stop(browser)


@dataclass(frozen=True)
class Round:
    load: float  # 1-minute load average when the round began
    first: Visit  # the first visitor of a server just started: every server cache cold
    second: Visit  # the next visitor: the figures cached on the server
    baseline: float  # the one-line Streamlit page


def _start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    import re

    from test_dashboard_browser import _Output

    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    address = _Output(server.stdout).wait_for(re.compile(r"URL: (http://127\.0\.0\.1:\d+)"), 120,
                                              server).group(1)
    return server, address


def browser_rounds(url: str, expected: str, rounds: int) -> list[Round]:
    """``dsmeter dashboard`` against a one-line Streamlit page, in the same browser, ``rounds`` times."""
    from test_dashboard_browser import _dsmeter, _stop

    done: list[Round] = []
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "one_line.py"
        page.write_text('import streamlit as st\n\nst.write("one line of text")\n')
        floor, floor_address = _start([
            sys.executable, "-m", "streamlit", "run", str(page), "--server.port", "0", "--server.address",
            "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none"])
        try:
            _visit(floor_address, "one line of text")  # the server's own first run
            for n in range(rounds):
                load = os.getloadavg()[0]
                server, address = _start([*_dsmeter(), "dashboard", "--db", url, "--port", "0"])
                try:
                    first = _visit(address, expected, OVERVIEW_CHARTS)
                    second = _visit(address, expected, OVERVIEW_CHARTS)
                finally:
                    _stop(server)
                baseline = _visit(floor_address, "one line of text").shown
                done.append(Round(load, first, second, baseline))
                print(f"  round {n + 1}: load {load:.1f}; first visitor {first.shown:.2f} s (charts "
                      f"{first.charts:.2f} s), second {second.shown:.2f} s (charts {second.charts:.2f} s); "
                      f"one-line page {baseline:.2f} s", flush=True)
        finally:
            _stop(floor)
    return done


def _spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def report_browser(rounds: list[Round], target: float = 2.0) -> None:
    baseline = statistics.median(r.baseline for r in rounds)
    loads = [r.load for r in rounds]
    print(f"overview first paint in headless Chromium (navigation -> total on screen), {len(rounds)} rounds, "
          f"load average {min(loads):.1f}-{max(loads):.1f}:")
    for name, visits in (("first visitor (server caches cold)", [r.first for r in rounds]),
                         ("second visitor (figures cached)", [r.second for r in rounds])):
        shown = [v.shown for v in visits]
        charts = [v.charts for v in visits if v.charts is not None]
        under = sum(1 for v in shown if v < target)
        print(f"  {name}: total {_spread(shown)}, {statistics.median(shown) / baseline:.2f}x the one-line page, "
              f"under {target:g} s in {under} of {len(shown)}; all four charts drawn {_spread(charts)}")
    print(f"  one-line Streamlit page, same browser, same rounds: {_spread([r.baseline for r in rounds])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="ledger URL to seed (default: a temporary SQLite file)")
    parser.add_argument("--keep", type=Path, help="SQLite file to keep and reuse between runs")
    parser.add_argument("--no-seed", action="store_true", help="with --db: measure that ledger as it is")
    parser.add_argument("--runs", type=int, default=3, help="cold first-paint runs")
    parser.add_argument("--browser", action="store_true", help="also time first paint in headless Chromium")
    parser.add_argument("--rounds", type=int, default=7, help="browser rounds (each: a new server, two visitors, "
                        "the one-line page)")
    parser.add_argument("--raw", action="store_true",
                        help="also time the server side with the rollup marked incomplete (reads the raw ledger)")
    args = parser.parse_args()

    os.environ.setdefault("DSMETER_HOME", tempfile.mkdtemp(prefix="dsmeter-bench-"))
    now = datetime.now(timezone.utc).replace(microsecond=0)
    scratch = None
    if args.db:
        url = args.db
        reuse = args.no_seed
    else:
        if args.keep:
            path = args.keep.resolve()
        else:
            scratch = tempfile.TemporaryDirectory(prefix="dsmeter-bench-")
            path = Path(scratch.name) / "ledger.db"
        url = f"sqlite:///{path}"
        reuse = path.exists()
    if reuse:
        migrate(url)  # a ledger kept from an older checkout: the dashboard reads only the newest schema
        now, rows = last_call(url)
        print(f"reusing {url} ({rows:,} calls, the last at {now:%Y-%m-%d %H:%M} UTC)")
    else:
        rows = args.rows
        took = seed(url, rows, now)
        print(f"seeded {args.rows:,} rows in {took:.1f} s ({args.rows / took:,.0f} rows/s)")
        print(f"built the daily rollup in {build_rollup(url):.1f} s")
        settle(url)
    os.environ["DSMETER_DASHBOARD_NOW"] = now.isoformat()  # the dashboard's "today" is the seeded month's last day

    timings, warm, shown = first_paint(url, args.runs)
    cold = timings[:-1]
    print(f"overview first paint (server, cold cache) on {rows:,} rows: best {min(cold):.2f} s, "
          f"median {statistics.median(cold):.2f} s over {len(cold)} runs; warm {warm:.3f} s; total shown {shown}")
    if args.raw:
        with rollup_marked_incomplete(url):
            raw, _, _ = first_paint(url, 1)
        print(f"the same without the rollup (raw ledger): {raw[0]:.2f} s")
    if args.browser:
        report_browser(browser_rounds(url, shown, args.rounds))
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
