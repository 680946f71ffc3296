"""Process faults (issue 7): SIGTERM loses no finished call, SIGKILL loses only what the design says,
and a crash between a commit and its bookkeeping never doubles a row.

The proxy runs as ``dsmeter proxy --workers 2`` (real child processes) in front of the bundled
simulator; every call the simulator served is looked up in the ledger afterwards, after
``dsmeter spool replay`` has written whatever a writer left in the spool. The scenario code
is shared with ``tests/benchmarks/reliability_faults.py``, which prints the figures the
README quotes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from benchmarks.reliability_common import Forwarder
from benchmarks.reliability_faults import FaultFigures, run_signal
from collector.record import UsageRecord, utcnow
from collector.spool import SpoolFile, spool_status
from collector.store import LedgerStore
from collector.writer import LedgerWriter

# What a SIGKILL may cost besides the calls in flight: records still in the writer's memory, that
# is, calls that finished within one flush interval (0.2 s) plus the write itself. Measured on a quiet
# machine: 0.13-0.31 s once warm, up to 0.67 s in the first seconds after a start; on a machine
# loaded five times over its cores, up to 2.4 s. The bound asserted is for a busy CI machine: the
# point is "the last moments", never "everything since the last restart".
SIGKILL_WINDOW_MS = 5000.0


def _kind(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def _no_doubles_exact_tokens(figures: FaultFigures) -> None:
    assert figures.duplicated == 0
    assert figures.token_mismatches == 0


def test_sigterm_mid_traffic_lets_streams_in_flight_finish_and_loses_no_call(db_url: str, isolated_home: Path) -> None:
    # Regression: the supervisor passed one SIGTERM on twice. The second forced the stop (streams in
    # flight were cancelled instead of drained) and, arriving after a worker's event loop had ended,
    # killed the worker before its writer flushed: calls it still held were lost without a word.
    figures = run_signal(_kind(db_url), db_url, signal.SIGTERM, duration=4, signal_at=2)
    assert figures.exit_code == 0
    assert figures.in_flight_at_signal > 10  # the signal really came mid-traffic
    assert (figures.lost_finished, figures.lost_in_flight) == (0, 0)
    assert figures.rows == figures.served == figures.rows_completed  # drained, not cancelled
    assert figures.client_completed_without_row == 0
    _no_doubles_exact_tokens(figures)


def test_sigkill_loses_only_calls_in_flight_and_the_last_flush(db_url: str, isolated_home: Path) -> None:
    figures = run_signal(_kind(db_url), db_url, signal.SIGKILL, duration=5, signal_at=3.5)
    assert figures.exit_code == -signal.SIGKILL
    assert figures.finished_before_signal > 100
    # Every call that finished more than one flush (and its write) before the kill has its row.
    assert figures.lost_finished_latest_ms is None or figures.lost_finished_latest_ms < SIGKILL_WINDOW_MS, figures
    assert figures.lost_finished < figures.finished_before_signal / 2, figures
    _no_doubles_exact_tokens(figures)


@pytest.mark.slow
def test_sigterm_while_the_database_hangs_spools_every_call_and_replay_writes_each_once(
    db_url: str, isolated_home: Path
) -> None:
    # PostgreSQL frozen behind the forwarder (connections open, no answer); SQLite locked by another
    # process. The workers cannot write on their way out: each must spool what it holds, within the
    # time the supervisor gives it, and a batch that was both spooled and (later) committed by the
    # database must not become two rows when the spool is replayed.
    figures = run_signal(_kind(db_url), db_url, signal.SIGTERM, duration=4, signal_at=2, hang=True)
    assert figures.exit_code == 0
    assert (figures.lost_finished, figures.lost_in_flight) == (0, 0), figures
    assert figures.rows == figures.served
    assert figures.spooled_at_exit > 0  # the writers really had to spool
    _no_doubles_exact_tokens(figures)


def _records(n: int) -> list[UsageRecord]:
    return [UsageRecord(started_at=utcnow(), requested_model="deepseek-v4-flash", prompt_tokens=i, completion_tokens=1)
            for i in range(n)]


def _ids(url: str) -> list[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return [str(uuid.UUID(str(r[0]))) for r in conn.execute(sa.text("SELECT request_id FROM calls"))]
    finally:
        engine.dispose()


def test_a_replay_killed_right_after_a_commit_leaves_no_duplicate(db_url: str, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    records = _records(2500)
    spool = SpoolFile(spool_dir)
    spool.append(records, sync=True)
    spool.close()
    LedgerStore(db_url).close()  # schema first, so the kill below lands after a replay commit
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from collector.spool import replay_spool
        from collector.store import LedgerStore

        def die(rows):  # called once a chunk of the replay has committed, before the file is done
            os.kill(os.getpid(), signal.SIGKILL)

        replay_spool(LedgerStore(sys.argv[1]), Path(sys.argv[2]), on_written=die)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script, db_url, str(spool_dir)], capture_output=True, timeout=120,
                            env=os.environ.copy())
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = len(_ids(db_url))
    assert 0 < committed < len(records)  # it died between a commit and the end of its file
    assert spool_status(spool_dir).replaying_files == 1  # the claim it held, now orphaned

    done = subprocess.run([sys.executable, "-m", "collector.cli", "spool", "replay", "--db", db_url,
                           "--spool-dir", str(spool_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"inserted: {len(records) - committed}" in done.stdout and f"duplicates: {committed}" in done.stdout
    ids = _ids(db_url)
    assert len(ids) == len(set(ids)) == len(records)
    assert sorted(ids) == sorted(str(r.request_id) for r in records)


class _CommitCutter(Forwarder):
    """Lets one COMMIT reach the server, then resets every connection before the answer gets back."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.armed = False
        self.cuts = 0

    def _pump(self, src: object, dst: object) -> None:  # type: ignore[override]
        import socket as sockets

        assert isinstance(src, sockets.socket) and isinstance(dst, sockets.socket)
        toward_server = dst.getpeername()[1] == self.target[1]
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if toward_server and self.armed and b"COMMIT" in data:
                    self.armed = False
                    time.sleep(0.3)  # the server commits; its answer is never passed back
                    self.cuts += 1
                    self.cut()
                    self.restore()
                    return
        except OSError:
            pass


@pytest.mark.parametrize("unanswered", ["the batch's commit", "the commit of its new tag set, just before"])
def test_a_commit_the_database_made_but_never_acknowledged_is_not_doubled(
    postgres_url: str, isolated_home: Path, unanswered: str
) -> None:
    from sqlalchemy.engine import make_url

    LedgerStore(postgres_url).close()
    target = make_url(postgres_url)
    cutter = _CommitCutter(target.host or "127.0.0.1", target.port or 5432).open()
    try:
        url = cutter.url_for(postgres_url)
        writer = LedgerWriter(url, retry_interval=0.3, flush_interval=0.05)
        assert writer.flush(30)
        first, batch = _records(1), _records(300)
        records = batch
        if unanswered == "the batch's commit":
            # A first call stores the tag set of them all (none), so the next COMMIT is a batch's own.
            writer.submit(first[0])
            assert writer.flush(30) and len(_ids(postgres_url)) == 1
            records = first + batch
        # Otherwise the writer has not stored their tag set yet, and commits that first.
        cutter.armed = True
        for record in batch:
            writer.submit(record)
        assert writer.flush(60)
        deadline = time.monotonic() + 30
        while len(_ids(postgres_url)) < len(records) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.close(30)
    finally:
        cutter.close()
    assert cutter.cuts == 1  # a COMMIT really went unanswered
    ids = _ids(postgres_url)
    assert len(ids) == len(set(ids)) == len(records)
    assert spool_status(writer.spool_dir).pending_rows == 0
