"""Database outage under load (issue 7): every call is a row afterwards, exactly once, with exact tokens.

Streams go through ``dsmeter proxy --workers 2`` (a real child process) to the bundled
simulator at 50 streams/s; in the middle the ledger goes away. PostgreSQL is cut at the
network level (a TCP forwarder in front of the real server resets every connection and
refuses new ones, then comes back on the same port); SQLite is locked by another process
holding an exclusive transaction. Then the proxy gets SIGTERM and the ledger is compared
with the simulator's log of what it served and billed.

The short variant runs by default (8 s of load, 3 s without a database); the full one
(60 s, 20 s) is marked ``slow`` and runs in CI. ``tests/benchmarks/reliability_outage.py``
runs the same scenario and prints the figures the README quotes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability_outage import OutageFigures, run_outage


def _url_kind(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def _assert_exact(figures: OutageFigures) -> None:
    assert figures.calls == int(figures.rate * figures.duration)
    assert (figures.rows, figures.lost, figures.duplicated) == (figures.calls, 0, 0), figures.examples
    assert figures.token_mismatches == 0 and figures.unmatched_served == 0, figures.examples
    assert figures.not_completed == 0 and figures.client_failures == 0  # the outage never reached a client
    assert figures.proxy_exit_code == 0
    # The outage really happened while calls were finishing: rows were missing when it ended.
    assert figures.rows_at_restore is not None and figures.rows_at_restore < figures.calls


def test_a_short_database_outage_under_load_loses_and_doubles_nothing(db_url: str, isolated_home: Path) -> None:
    kind = _url_kind(db_url)
    figures = run_outage(kind, db_url, rate=50, duration=8, outage=3)
    _assert_exact(figures)
    if kind == "postgresql":
        assert figures.spool_peak_rows > 0  # rows waited in the spool, then were replayed


@pytest.mark.slow
def test_sixty_seconds_at_fifty_streams_a_second_with_the_database_away_for_twenty(db_url: str, isolated_home: Path) -> None:
    kind = _url_kind(db_url)
    figures = run_outage(kind, db_url, rate=50, duration=60, outage=20)
    _assert_exact(figures)
    if kind == "postgresql":
        assert figures.spool_peak_rows > 0
