"""``LedgerWriter``: the stream never waits for the database.

``submit(record)`` puts the record on an in-memory queue and returns; it never blocks on
the database and never raises. A daemon thread takes batches (up to ``batch_size`` records
or ``flush_interval`` seconds), prices them (``pricer``), and writes them with one
``LedgerStore.insert`` per batch. If the database is down, each batch goes to this
process's spool file instead (fsynced), and every ``retry_interval`` seconds the thread
tries to replay the spool; when the database is back the rows arrive, each exactly once
(inserts are idempotent on ``request_id``). A record the database refuses outright (a value
out of range) is kept in the spool's ``.rejected`` file, never dropped.

``flush()`` waits until everything submitted so far is durable (in the database or the
spool). ``close()`` flushes and stops; it also runs at interpreter exit. A queue grown past
``max_queue`` (the database is slower than the traffic) sends records straight to the spool.

Records carry only key fingerprints, never API keys, so nothing logged here can leak one.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from collector.config import database_url, redact_url
from collector.errors import DatabaseUnavailable
from collector.pricing import default_pricer
from collector.record import UsageRecord
from collector.rollups import RollupHook
from collector.spool import (
    SpoolFile,
    default_spool_dir,
    encode_records,
    pending_spool_files,
    replay_spool,
    write_rejected,
)
from collector.store import LedgerStore, database_identity

__all__ = ["LedgerWriter", "default_writer", "Pricer", "OnWritten"]

log = logging.getLogger("dsmeter.writer")

Pricer = Callable[[UsageRecord], UsageRecord]
OnWritten = Callable[[Sequence[UsageRecord]], None]

DEFAULT_MAX_QUEUE = 100_000
# Rows per transaction when calls queue up faster than they are written. A batch is whatever
# arrived within flush_interval, so at ordinary rates batches stay small; under a backlog each
# commit (an fsync) and each rollup upsert is shared by more rows: 2,000 writes 1.3x faster than
# 500 (tests/benchmarks/bench_ledger.py) and holds SQLite's write lock about 0.2 s.
DEFAULT_BATCH_SIZE = 2_000
DEFAULT_CLOSE_TIMEOUT = 30.0


class _Marker:
    """A flush (or stop) request travelling the queue behind every record submitted before it."""

    __slots__ = ("event", "ok", "stop")

    def __init__(self, *, stop: bool = False) -> None:
        self.event = threading.Event()
        self.ok = False
        self.stop = stop


class LedgerWriter:
    """Batched, non-blocking writes to the ledger, with an on-disk spool for outages."""

    def __init__(
        self,
        url: str | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval: float = 0.2,
        spool_dir: Path | None = None,
        pricer: Pricer | None = None,
        retry_interval: float = 5.0,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        if batch_size < 1 or flush_interval < 0 or retry_interval <= 0 or max_queue < 1:
            raise ValueError("batch_size and max_queue must be >= 1, flush_interval >= 0, retry_interval > 0")
        self._raw_url = database_url(url)
        self.identity = database_identity(self._raw_url)  # also rejects a malformed URL now, not in the thread
        self.url = redact_url(self._raw_url)
        self.spool_dir = spool_dir if spool_dir is not None else default_spool_dir(self._raw_url)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.max_queue = max_queue
        # By default, records that arrive unpriced are priced by the price book in effect
        # (DSMETER_PRICES, else the shipped book); pass pricer=lambda r: r to store them as they are.
        self.pricer: Pricer = pricer if pricer is not None else default_pricer()
        self.on_written: list[OnWritten] = []
        # The reporting rollup (collector.rollups) follows every batch committed here, spool
        # replays included, through this writer's own store: in the batch's own transaction.
        self.rollup = RollupHook(self._get_store)
        self._closed = False
        self._close_lock = threading.Lock()
        self._init_process_state()
        atexit.register(self._close_at_exit)
        self._ensure_thread()  # replays what earlier processes left in the spool, without waiting for a submit

    def _init_process_state(self) -> None:
        """Everything that belongs to one process (after a fork the child builds its own)."""
        self._pid = os.getpid()
        self._queue: queue.SimpleQueue[UsageRecord | _Marker] = queue.SimpleQueue()  # put() is reentrant-safe
        self._spool = SpoolFile(self.spool_dir)
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store: LedgerStore | None = None
        self._inflight: list[UsageRecord] = []
        self._unwritten: list[UsageRecord] = []  # could reach neither the database nor the spool
        self._unwritten_lock = threading.Lock()
        self._down = False
        self._needs_replay = True  # at start, rows left in the spool by an earlier process
        self._next_replay = 0.0

    # -- the caller's side ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, record: UsageRecord) -> None:
        """Hand a record over. Never blocks on the database, never raises."""
        try:
            if self._pid != os.getpid():
                self._after_fork()
            if self._closed or self._queue.qsize() >= self.max_queue:
                self._spool_now([record])
                return
            self._ensure_thread()
            self._queue.put(record)
            if self._closed and not self._thread_alive():
                self._drain_to_spool()  # close() finished between our check and our put
        except Exception:  # noqa: BLE001 - metering must never break the caller's call
            log.exception("dsmeter: could not queue call %s", getattr(record, "request_id", "?"))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is in the database or the spool; False on timeout."""
        if threading.current_thread() is self._thread:
            return False  # called from an on_written hook: the thread cannot wait for itself
        if not self._thread_alive():
            self._drain_to_spool()
            self._spool.sync()
            return not self._unwritten
        marker = _Marker()
        self._queue.put(marker)
        return marker.event.wait(timeout) and marker.ok

    def close(self, timeout: float | None = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """Flush and stop the thread. If the database hangs past ``timeout``, what is left is spooled."""
        with self._close_lock:
            if self._closed:
                return True
            self._closed = True
        atexit.unregister(self._close_at_exit)
        ok = True
        if self._thread_alive():
            marker = _Marker(stop=True)
            self._queue.put(marker)
            ok = marker.event.wait(timeout) and marker.ok
            thread = self._thread
            if thread is not None:
                thread.join(1.0)
            if not marker.event.is_set():
                # The thread is stuck in the database: spool its batch and the queue ourselves.
                # A row both spooled and later committed is harmless: replay skips it.
                log.warning("ledger %s did not answer within %ss; spooling what is left", self.url, timeout)
                self._spool_now(list(self._inflight))
        self._drain_to_spool()
        self._spool.close()
        if not self._thread_alive() and self._store is not None:
            self._store.close()
        _forget(self)
        return ok and not self._unwritten

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _close_at_exit(self) -> None:
        self.close()

    # -- helpers shared by both sides ----------------------------------------------------

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="dsmeter-writer", daemon=True)
                thread.start()
                self._thread = thread

    def _after_fork(self) -> None:
        # The parent's thread does not exist here and its spool file (and lock) is the parent's.
        with self._close_lock:
            if self._pid != os.getpid():
                self._init_process_state()

    def _spool_now(self, records: Sequence[UsageRecord]) -> None:
        if not records:
            return
        try:
            self._spool.append(records, sync=True)
            self._needs_replay = True
            if self._closed:
                # Nobody here will replay it: unlock it for the next writer or `dsmeter spool replay`.
                self._spool.close()
        except OSError as error:
            with self._unwritten_lock:
                self._unwritten.extend(records)
            # Last resort so the rows exist somewhere a human can recover them from.
            log.error(
                "cannot spool %d call(s) to %s (%s); the records follow:\n%s",
                len(records), self.spool_dir, error, encode_records(records).decode(errors="replace"),
            )

    def _drain_to_spool(self) -> None:
        leftovers: list[UsageRecord] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Marker):
                item.ok = True  # everything before it is now in the spool
                item.event.set()
            else:
                leftovers.append(item)
        self._spool_now(leftovers)

    # -- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._open_store()
        while True:
            batch, marker = self._collect()
            if batch:
                self._write(batch)
            self._maybe_replay()
            if marker is not None:
                try:
                    self._spool.sync()
                    marker.ok = not self._unwritten
                except OSError:
                    log.exception("cannot sync the spool file")
                marker.event.set()
                if marker.stop:
                    return

    def _open_store(self) -> None:
        # Connect and check the schema now, not when the first batch arrives: a process that has just
        # started would otherwise hold its first calls in memory for that long (a crash loses them).
        try:
            self._get_store().ensure_schema()  # the store itself connects lazily: make it connect now
        except DatabaseUnavailable as error:
            log.warning("ledger unavailable (%s); spooling calls to %s until it is back", error, self.spool_dir)
            self._mark_down()
        except Exception:  # noqa: BLE001 - the first write retries and reports it
            log.exception("could not open the ledger %s", self.url)

    def _collect(self) -> tuple[list[UsageRecord], _Marker | None]:
        wait = max(0.0, self._next_replay - time.monotonic()) if self._replay_due_at_all() else None
        try:
            first = self._queue.get(timeout=wait)
        except queue.Empty:
            return [], None
        if isinstance(first, _Marker):
            return [], first
        batch = [first]
        deadline = time.monotonic() + self.flush_interval
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if isinstance(item, _Marker):
                return batch, item
            batch.append(item)
        return batch, None

    def _price(self, record: UsageRecord) -> UsageRecord:
        if self.pricer is None:
            return record
        try:
            return self.pricer(record)
        except Exception:  # noqa: BLE001 - an unpriced row beats a lost one; `dsmeter reprice` can fix it
            log.exception("pricing call %s failed; writing it unpriced", record.request_id)
            return record

    def _get_store(self) -> LedgerStore:
        if self._store is None:
            self._store = LedgerStore(self._raw_url)
        return self._store

    def _write(self, batch: list[UsageRecord]) -> None:
        records = [self._price(record) for record in batch]
        if self._down:
            self._spool_now(records)  # no point waiting on a dead server; the retry timer probes it
            return
        self._inflight = records
        try:
            added, refused = self._get_store().insert_isolating(records, companion=self.rollup)
        except DatabaseUnavailable as error:
            log.warning(
                "ledger unavailable (%s); spooling calls to %s and retrying every %gs",
                error, self.spool_dir, self.retry_interval,
            )
            self._mark_down()
            self._spool_now(records)
            return
        except Exception:  # noqa: BLE001 - unexpected: keep the rows (spool), the replay retries them
            log.exception("writing %d call(s) failed; spooling them", len(records))
            self._mark_down()
            self._spool_now(records)
            return
        finally:
            self._inflight = []
        if self.rollup.pending:
            self.rollup.flush()  # sums the batch's transaction could not take: a transaction of their own
        self._reject(refused)
        self._notify(added)

    def _replayed(self, added: Sequence[UsageRecord]) -> None:
        """Rows a replay committed: their sums join the rollup now, then the hooks hear of them."""
        if added:
            self.rollup(added)
        self._notify(added)

    def _mark_down(self) -> None:
        self._down = True
        self._needs_replay = True
        self._next_replay = time.monotonic() + self.retry_interval

    def _reject(self, refused: Sequence[tuple[UsageRecord, str]]) -> None:
        if not refused:
            return
        for record, reason in refused:
            log.error("the ledger refused call %s (%s); kept in %s", record.request_id, reason, self.spool_dir)
        try:
            write_rejected(
                self.spool_dir,
                f"spool-{os.getpid()}-{uuid.uuid4().hex}",
                [encode_records([record]) for record, _ in refused],
            )
        except OSError:
            self._spool_now([record for record, _ in refused])  # at worst it is refused again on replay

    def _notify(self, added: Sequence[UsageRecord]) -> None:
        if not added:
            return
        for hook in list(self.on_written):
            try:
                hook(added)
            except Exception:  # noqa: BLE001 - a hook must not take the writer down
                log.exception("an on_written hook failed")

    def _replay_due_at_all(self) -> bool:
        return self._needs_replay or bool(self._unwritten)

    def _maybe_replay(self) -> None:
        if not self._replay_due_at_all() or time.monotonic() < self._next_replay:
            return
        # Cleared first, so a record spooled meanwhile (by an overflowing submit) sets it
        # again and is replayed next round rather than forgotten.
        self._needs_replay = False
        if not self._unwritten and not self._down and not pending_spool_files(self.spool_dir):
            return  # nothing waits: do not even connect
        was_down = self._down
        try:
            store = self._get_store()
            with self._unwritten_lock:
                unwritten, self._unwritten = self._unwritten, []
            if unwritten:
                try:
                    added, refused = store.insert_isolating(unwritten, companion=self.rollup)
                except BaseException:
                    with self._unwritten_lock:
                        self._unwritten[:0] = unwritten
                    raise
                self._reject(refused)
                self._notify(added)
            self._spool.close()  # let the replay claim our own file too
            result = replay_spool(store, self.spool_dir, on_written=self._replayed)
        except DatabaseUnavailable as error:
            log.debug("ledger still unavailable: %s", error)
            self._mark_down()
            return
        except Exception:  # noqa: BLE001 - e.g. a full disk while replaying; try again later
            log.exception("spool replay failed; retrying in %gs", self.retry_interval)
            self._mark_down()
            return
        self._down = False
        if was_down or result.files:
            log.log(
                logging.WARNING if was_down else logging.INFO,
                "ledger %s is writable; replayed %d spooled call(s) (%d new)",
                self.url, result.rows, result.inserted,
            )


_writers: dict[str, LedgerWriter] = {}
_writers_lock = threading.Lock()


def default_writer(url: str | None = None) -> LedgerWriter:
    """The process's shared writer for the database ``url`` resolves to (created on first use)."""
    key = database_url(url)
    with _writers_lock:
        writer = _writers.get(key)
        if writer is None or writer.closed:
            writer = LedgerWriter(key)
            _writers[key] = writer
        return writer


def _forget(writer: LedgerWriter) -> None:
    with _writers_lock:
        for key, candidate in list(_writers.items()):
            if candidate is writer:
                del _writers[key]


def _reset_after_fork() -> None:
    # The lock may have been held by another thread at fork time; the child starts clean.
    global _writers_lock
    _writers_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
