"""Benchmark: first paint of the dashboard's overview on a 1,000,000-row ledger (target: under 2 s).

    python tests/benchmarks/bench_dashboard.py [--rows 1000000] [--db URL [--no-seed]] [--keep PATH] [--browser]

Seeds the ledger quickly with large ``LedgerStore.insert`` batches (no HTTP; 30 days of
calls ending now), builds the daily rollup once (as ``dsmeter rollup`` does; a running writer
keeps it current from then on), then measures:

* **server first paint**: a fresh ``AppTest`` session of ``dashboard/app.py`` on the overview
  with every cache cleared, i.e. all the SQL and drawing a first visitor's page needs; best and
  median of several cold runs, and one warm run (caches filled);
* with ``--browser`` (needs Debian's chromium): ``dsmeter dashboard`` in a real headless Chromium,
  from navigation until the overview's spend figure is on screen, for the first visitor after
  the server started and for a new visitor a minute later (cached figures expired).

``--keep PATH`` keeps the seeded SQLite file there and reuses it on the next run; ``--db URL
--no-seed`` measures an existing ledger (its newest call is taken as "now").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

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
                print(f"\r  seeded {store_count(store):,} rows", end="", file=sys.stderr, flush=True)
        if batch:
            store.insert(batch)
        if store.dialect == "postgresql":
            with store.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE calls")
                connection.exec_driver_sql("ANALYZE call_tags")
        else:
            with store.engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
    finally:
        store.close()
    print(file=sys.stderr)
    return time.perf_counter() - began


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


def last_call(url: str) -> datetime:
    """The newest call's start in a ledger being reused: the measured "now"."""
    from collector.queries import filter_choices
    from dashboard.engine import open_read_only

    engine = open_read_only(url)
    try:
        last = filter_choices(engine).last_call
    finally:
        engine.dispose()
    if last is None:
        raise SystemExit(f"{url} holds no calls to measure")
    return last


def store_count(store: object) -> int:
    from collector.store import LedgerStore

    assert isinstance(store, LedgerStore)
    with store.engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT count(*) FROM calls").scalar_one())


def first_paint(url: str, runs: int) -> tuple[list[float], float, str]:
    """Cold AppTest runs of the overview (caches cleared each time), then one warm run; and the total shown."""
    import streamlit as st
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
        shown = next(m.value for m in at.metric if m.label.startswith("Spend,"))
    began = time.perf_counter()
    at.run()
    warm = time.perf_counter() - began
    cold.append(warm)  # last entry is the warm run
    return cold, warm, shown


def _visit(address: str, expected: str) -> float:
    """A new visitor (a fresh headless Chromium profile): seconds from navigation until ``expected`` is on screen."""
    import subprocess

    import httpx
    from test_dashboard_browser import CHROMIUM, CHROMIUM_FLAGS, _DevTools, _stop

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
                while time.perf_counter() - began < 120:
                    text = tools.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                      returnByValue=True)["result"].get("value", "")
                    if expected in text:
                        return time.perf_counter() - began
                    time.sleep(0.02)
                raise SystemExit(f"{expected} never appeared in the browser")
            finally:
                tools.close()
        finally:
            _stop(browser)


def browser_paint(url: str, expected: str) -> tuple[float, float]:
    """``dsmeter dashboard`` in real headless Chromium: the first visit after the server started, and a
    new visitor a minute later, when the cached figures have expired (a warm server, cold data)."""
    import re
    import subprocess

    from test_dashboard_browser import _dsmeter, _Output, _stop

    from dashboard.data import CACHE_TTL_S

    server = subprocess.Popen([*_dsmeter(), "dashboard", "--db", url, "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = _Output(server.stdout)
        address = output.wait_for(re.compile(r"URL: (http://127\.0\.0\.1:\d+)"), 120, server).group(1)
        first = _visit(address, expected)
        time.sleep(CACHE_TTL_S + 2)
        later = _visit(address, expected)
        return first, later
    finally:
        _stop(server)


def browser_floor() -> float:
    """The same measurement on a one-line Streamlit page: what loading Streamlit itself costs here."""
    import re
    import subprocess

    from test_dashboard_browser import _Output, _stop

    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "one_line.py"
        page.write_text('import streamlit as st\n\nst.write("one line of text")\n')
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(page), "--server.port", "0", "--server.address",
             "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        try:
            address = _Output(server.stdout).wait_for(re.compile(r"URL: (http://127\.0\.0\.1:\d+)"), 120,
                                                      server).group(1)
            _visit(address, "one line of text")  # the server's own first run
            return min(_visit(address, "one line of text") for _ in range(2))
        finally:
            _stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", help="ledger URL to seed (default: a temporary SQLite file)")
    parser.add_argument("--keep", type=Path, help="SQLite file to keep and reuse between runs")
    parser.add_argument("--no-seed", action="store_true", help="with --db: measure that ledger as it is")
    parser.add_argument("--runs", type=int, default=3, help="cold first-paint runs")
    parser.add_argument("--browser", action="store_true", help="also time first paint in headless Chromium")
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
        now = last_call(url)
        print(f"reusing {url} (its last call: {now:%Y-%m-%d %H:%M} UTC)")
    else:
        took = seed(url, args.rows, now)
        print(f"seeded {args.rows:,} rows in {took:.1f} s ({args.rows / took:,.0f} rows/s)")
        print(f"built the daily rollup in {build_rollup(url):.1f} s")
    os.environ["DSMETER_DASHBOARD_NOW"] = now.isoformat()  # the dashboard's "today" is the seeded month's last day

    timings, warm, shown = first_paint(url, args.runs)
    cold = timings[:-1]
    print(f"overview first paint (server, cold cache) on {args.rows:,} rows: best {min(cold):.2f} s, "
          f"median {statistics.median(cold):.2f} s over {len(cold)} runs; warm {warm:.3f} s; total shown {shown}")
    if args.raw:
        with rollup_marked_incomplete(url):
            raw, _, _ = first_paint(url, 1)
        print(f"the same without the rollup (raw ledger): {raw[0]:.2f} s")
    if args.browser:
        first, later = browser_paint(url, shown)
        print(f"overview first paint in headless Chromium (navigate -> total on screen): {first:.2f} s for the "
              f"first visitor after the server started, {later:.2f} s for a new visitor once the cache expired")
        print(f"a one-line Streamlit page in the same browser, for comparison: {browser_floor():.2f} s")
    if scratch is not None:
        scratch.cleanup()


if __name__ == "__main__":
    main()
