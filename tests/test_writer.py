"""LedgerWriter: the caller never waits for the database, and every call reaches the ledger exactly once.

The outage tests take the database away for real: a SQLite file whose directory is
missing, then created; and PostgreSQL behind a loopback TCP forwarder that is closed (every
connection cut, the port refusing) and then reopened on the same port, so the writer sees
the very same URL go down and come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from collector.models import Call
from collector.record import UsageRecord
from collector.spool import spool_status
from collector.store import LedgerStore
from collector.writer import LedgerWriter, default_writer

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _records(n: int, start: int = 0) -> list[UsageRecord]:
    return [
        UsageRecord(started_at=T0 + timedelta(seconds=i), requested_model="deepseek-chat", tags={"i": str(i)})
        for i in range(start, start + n)
    ]


def _ledger_ids(url: str) -> list[uuid.UUID]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("calls"):
                return []
            return list(connection.execute(sa.select(Call.request_id)).scalars())
    finally:
        engine.dispose()


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


class _Seen:
    """An on_written hook that remembers every record it was told about."""

    def __init__(self) -> None:
        self.ids: list[uuid.UUID] = []
        self._lock = threading.Lock()

    def __call__(self, records: Sequence[UsageRecord]) -> None:
        with self._lock:
            self.ids.extend(r.request_id for r in records)


def test_many_submits_from_many_threads_arrive_once(db_url: str) -> None:
    seen = _Seen()
    with LedgerWriter(db_url, batch_size=200, flush_interval=0.01) as writer:
        writer.on_written.append(seen)
        batches = [_records(500, start=1000 * t) for t in range(8)]

        def submit_all(batch: list[UsageRecord]) -> None:
            for record in batch:
                writer.submit(record)

        threads = [threading.Thread(target=submit_all, args=(b,)) for b in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert writer.flush(60)
    expected = sorted(r.request_id for b in batches for r in b)
    assert sorted(_ledger_ids(db_url)) == expected
    assert sorted(seen.ids) == expected  # each record reported to hooks once


def test_flush_returns_once_everything_submitted_is_in_the_ledger(db_url: str) -> None:
    writer = LedgerWriter(db_url, flush_interval=5.0)  # a batch would otherwise wait 5 s
    records = _records(3)
    for record in records:
        writer.submit(record)
    assert writer.flush(30)
    assert sorted(_ledger_ids(db_url)) == sorted(r.request_id for r in records)
    assert writer.close()
    assert writer.closed


def test_the_pricer_prices_each_record_before_it_is_written(db_url: str) -> None:
    def pricer(record: UsageRecord) -> UsageRecord:
        return dataclasses.replace(record, currency="USD", cost=Decimal("0.000000002800"), tariff_id="t-1")

    with LedgerWriter(db_url, pricer=pricer) as writer:
        writer.submit(_records(1)[0])
        assert writer.flush(30)
        with LedgerStore(db_url).session() as session:
            row = session.scalars(sa.select(Call)).one()
            assert (row.cost, row.currency, row.tariff_id) == (Decimal("0.0000000028"), "USD", "t-1")


def test_a_pricer_that_raises_still_writes_the_row_unpriced(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    def pricer(record: UsageRecord) -> UsageRecord:
        raise KeyError("no tariff for model deepseek-chat")

    records = _records(2)
    with caplog.at_level(logging.ERROR, logger="dsmeter.writer"), LedgerWriter(sqlite_url, pricer=pricer) as writer:
        for record in records:
            writer.submit(record)
        assert writer.flush(30)
    assert sorted(_ledger_ids(sqlite_url)) == sorted(r.request_id for r in records)
    with LedgerStore(sqlite_url).session() as session:
        assert session.scalars(sa.select(Call.cost)).all() == [None, None]
    assert "writing it unpriced" in caplog.text and "no tariff" in caplog.text


def test_a_failing_hook_does_not_stop_the_writes(sqlite_url: str) -> None:
    def broken(records: Sequence[UsageRecord]) -> None:
        raise RuntimeError("rollup bug")

    with LedgerWriter(sqlite_url, flush_interval=0.01) as writer:
        writer.on_written.append(broken)
        writer.submit(_records(1)[0])
        assert writer.flush(30)
        writer.submit(_records(1, start=1)[0])
        assert writer.flush(30)
    assert len(_ledger_ids(sqlite_url)) == 2


def test_submit_after_close_spools_and_the_next_writer_replays_it(sqlite_url: str) -> None:
    writer = LedgerWriter(sqlite_url)
    writer.close()
    late = _records(1)[0]
    writer.submit(late)  # e.g. a stream finalised during interpreter shutdown: kept, not lost
    assert spool_status(writer.spool_dir).pending_rows == 1
    with LedgerWriter(sqlite_url, retry_interval=0.1) as successor:
        assert _wait_for(lambda: _ledger_ids(sqlite_url) == [late.request_id])
        assert successor.flush(10)
    assert spool_status(writer.spool_dir).pending_files == 0


def test_an_overflowing_queue_goes_to_the_spool_and_still_arrives_once(sqlite_url: str) -> None:
    seen = _Seen()
    records = _records(300)
    with LedgerWriter(sqlite_url, max_queue=2, batch_size=10, retry_interval=0.1) as writer:
        writer.on_written.append(seen)
        for record in records:
            writer.submit(record)
        assert writer.flush(30)
        assert _wait_for(lambda: len(_ledger_ids(sqlite_url)) == 300)
    assert sorted(_ledger_ids(sqlite_url)) == sorted(r.request_id for r in records)
    assert sorted(seen.ids) == sorted(r.request_id for r in records)


def test_sqlite_unreachable_then_back_every_row_arrives_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'later' / 'ledger.db'}"  # the directory does not exist yet
    seen = _Seen()
    writer = LedgerWriter(url, retry_interval=0.1, flush_interval=0.01)
    writer.on_written.append(seen)
    records = _records(40)
    for record in records[:25]:
        writer.submit(record)
    assert writer.flush(30)  # durable: in the spool
    assert spool_status(writer.spool_dir).pending_rows == 25
    (tmp_path / "later").mkdir()
    for record in records[25:]:
        writer.submit(record)
    assert _wait_for(lambda: len(_ledger_ids(url)) == 40)
    assert writer.close()
    assert sorted(_ledger_ids(url)) == sorted(r.request_id for r in records)
    assert sorted(seen.ids) == sorted(r.request_id for r in records)
    assert spool_status(writer.spool_dir).pending_files == 0


class _Forwarder:
    """A loopback TCP forwarder that can be closed (connections cut, port refusing) and reopened on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                pump.start()
                self._threads.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(5)
        self._threads = []


@pytest.fixture
def forwarded_postgres(postgres_url: str) -> Iterator[tuple[str, _Forwarder]]:
    url = make_url(postgres_url)
    forwarder = _Forwarder(url.host or "127.0.0.1", url.port or 5432)
    forwarder.open()
    through = url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    yield through, forwarder
    forwarder.close()


def test_postgresql_going_down_and_up_again_loses_and_doubles_nothing(
    forwarded_postgres: tuple[str, _Forwarder], postgres_url: str
) -> None:
    url, forwarder = forwarded_postgres
    seen = _Seen()
    writer = LedgerWriter(url, retry_interval=0.2, flush_interval=0.01, batch_size=20)
    writer.on_written.append(seen)
    records = _records(150)

    for record in records[:50]:  # up
        writer.submit(record)
    assert writer.flush(30)
    assert len(_ledger_ids(postgres_url)) == 50

    forwarder.close()  # down: pooled connections cut, new ones refused
    for record in records[50:120]:
        writer.submit(record)
    assert writer.flush(60)  # durable in the spool while the database is away
    assert len(_ledger_ids(postgres_url)) == 50
    assert spool_status(writer.spool_dir).pending_rows == 70

    forwarder.open()  # up again, same port, same URL
    for record in records[120:]:
        writer.submit(record)
    assert _wait_for(lambda: len(_ledger_ids(postgres_url)) == 150)
    assert writer.close()

    assert sorted(_ledger_ids(postgres_url)) == sorted(r.request_id for r in records)
    assert sorted(seen.ids) == sorted(r.request_id for r in records)  # hooks: each call once
    assert spool_status(writer.spool_dir).pending_files == 0


def test_a_database_down_at_start_never_raises_into_the_caller(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    writer = LedgerWriter(f"postgresql+psycopg://u:pw@127.0.0.1:{port}/nothing", retry_interval=60)
    for record in _records(5):
        writer.submit(record)
    assert writer.flush(30)
    assert spool_status(writer.spool_dir).pending_rows == 5
    assert writer.close(10)


def test_process_exit_flushes_what_was_submitted(sqlite_url: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from datetime import datetime, timezone
        from collector.record import UsageRecord
        from collector.writer import default_writer

        writer = default_writer(sys.argv[1])
        writer.flush_interval = 30.0  # nothing would be written before exit but for atexit
        for _ in range(200):
            writer.submit(UsageRecord(started_at=datetime.now(timezone.utc)))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, sqlite_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert len(_ledger_ids(sqlite_url)) == 200


def test_default_writer_is_one_per_database_per_process(tmp_path: Path) -> None:
    a, b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    first = default_writer(a)
    assert default_writer(a) is first
    assert default_writer(b) is not first
    first.close()
    assert default_writer(a) is not first  # a closed writer is replaced
    default_writer(a).close()
    default_writer(b).close()


def _submit_in_child(writer: LedgerWriter, records: list[UsageRecord]) -> None:
    for record in records:
        writer.submit(record)
    # A forked multiprocessing child leaves through os._exit, skipping atexit: flush by hand.
    if not writer.flush(30):
        raise SystemExit(1)


def test_a_writer_inherited_through_fork_writes_from_the_child(sqlite_url: str) -> None:
    import multiprocessing

    writer = LedgerWriter(sqlite_url, flush_interval=0.01)
    parent_records, child_records = _records(5), _records(7, start=5)
    for record in parent_records:
        writer.submit(record)
    assert writer.flush(30)
    child = multiprocessing.get_context("fork").Process(target=_submit_in_child, args=(writer, child_records))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert writer.close()
    # The child's rows went to the ledger through its own thread, not into a queue nobody reads.
    assert sorted(_ledger_ids(sqlite_url)) == sorted(r.request_id for r in parent_records + child_records)
    assert spool_status(writer.spool_dir).pending_files == 0
