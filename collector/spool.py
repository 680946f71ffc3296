"""The spool: records that could not reach the database wait here, on disk, until they can.

Layout: one directory per database (``data_dir()/spool/<key>``, so rows meant for one
ledger are never replayed into another), holding

* ``spool-<pid>-<uuid>.jsonl``: one file per writer process, one ``UsageRecord.to_dict()``
  JSON object per line. Its writer holds an exclusive ``flock`` on it while it is open, so
  no replayer claims a file that is still being written (and workers never interleave).
* ``*.jsonl.replaying``: a file claimed by a replayer (atomic rename). The replayer holds
  its lock until it is done; an unlocked ``.replaying`` file was left by a crashed replayer
  and is claimed again.
* ``*.rejected``: lines that could not be replayed (corrupt JSON, a torn last line, a record
  the database refused), kept verbatim so nothing is ever lost; fix one and rename it to
  ``.jsonl`` to replay it.

Replay is idempotent: rows are inserted with ON CONFLICT DO NOTHING and a file is deleted
only after its rows are committed, so a crash in between re-inserts nothing twice.
On platforms without ``fcntl`` a file open for writing cannot be renamed, which protects a
writer's file the same way, and a ``.replaying`` file is reclaimed once it is stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from collector.config import data_dir
from collector.errors import UsageError
from collector.record import UsageRecord
from collector.store import LedgerStore, database_identity

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SpoolFile",
    "ReplayResult",
    "SpoolStatus",
    "replay_spool",
    "spool_status",
    "default_spool_dir",
    "write_rejected",
    "pending_spool_files",
    "encode_records",
    "SPOOL_SUFFIX",
    "REPLAYING_SUFFIX",
    "REJECTED_SUFFIX",
]

log = logging.getLogger("dsmeter.spool")

SPOOL_SUFFIX = ".jsonl"
REPLAYING_SUFFIX = ".jsonl.replaying"
REJECTED_SUFFIX = ".rejected"
STALE_REPLAYING_S = 600.0  # only where files cannot be locked: a claim this old is presumed dead
REPLAY_CHUNK = 1000  # rows per transaction while replaying

OnWritten = Callable[[Sequence[UsageRecord]], None]


def default_spool_dir(url: str | None = None) -> Path:
    """The spool directory of the database ``url`` resolves to (created on demand)."""
    identity = database_identity(url)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    path = data_dir() / "spool" / key
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    marker = path / "DATABASE"
    if not marker.exists():  # for a human wondering whose rows these are
        marker.write_text(identity + "\n", encoding="utf-8")
    return path


def encode_records(records: Sequence[UsageRecord]) -> bytes:
    """JSON lines, one record per line (JSON escapes newlines inside strings, so a line is a record)."""
    return b"".join(
        json.dumps(record.to_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for record in records
    )


def _try_lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover - Windows: an open file cannot be renamed instead
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _is_at(fd: int, path: Path) -> bool:
    """The open file is still the one at ``path`` (not renamed away or deleted meanwhile)."""
    try:
        at_path = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (mine.st_dev, mine.st_ino)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class SpoolFile:
    """This process's spool file for one database: append batches, fsync, rotate. Thread-safe."""

    def __init__(self, spool_dir: Path) -> None:
        self.spool_dir = spool_dir
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._unsynced = False

    @property
    def path(self) -> Path | None:
        return self._path

    def _open(self) -> int:
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        while True:
            path = self.spool_dir / f"spool-{os.getpid()}-{uuid.uuid4().hex}{SPOOL_SUFFIX}"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            # A replayer could claim the new empty file before we lock it: then take another name.
            if _try_lock(fd) and _is_at(fd, path):
                _fsync_dir(self.spool_dir)
                self._fd, self._path = fd, path
                return fd
            os.close(fd)

    def append(self, records: Sequence[UsageRecord], *, sync: bool = True) -> None:
        """Append records; with ``sync`` they are on disk (fsync) when this returns. Raises OSError."""
        if not records:
            return
        data = encode_records(records)
        with self._lock:
            fd = self._fd if self._fd is not None else self._open()
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
                self._unsynced = not sync
            except OSError:
                # A half-written line must not be glued to the next batch's first line.
                self._close_locked()
                raise

    def sync(self) -> None:
        with self._lock:
            if self._fd is not None and self._unsynced:
                os.fsync(self._fd)
                self._unsynced = False

    def close(self) -> None:
        """Sync and close (releasing the lock), so a replayer may claim the file; the next append starts a new one."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._fd is None:
            return
        fd, self._fd, self._path = self._fd, None, None
        try:
            if self._unsynced:
                os.fsync(fd)
        finally:
            self._unsynced = False
            os.close(fd)


def write_rejected(spool_dir: Path, stem: str, lines: Sequence[bytes]) -> Path:
    """Append lines (verbatim, newline-terminated) to ``<stem>.rejected`` and fsync it."""
    path = spool_dir / f"{stem}{REJECTED_SUFFIX}"
    data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


@dataclass(frozen=True, slots=True)
class ReplayResult:
    files: int = 0  # spool files replayed and deleted
    rows: int = 0  # records read from them
    inserted: int = 0  # records newly written to the ledger
    duplicates: int = 0  # records the ledger already had (a replay after a crash, say)
    rejected: int = 0  # lines moved to *.rejected (corrupt, torn, or refused by the database)

    def __add__(self, other: ReplayResult) -> ReplayResult:
        return ReplayResult(
            self.files + other.files,
            self.rows + other.rows,
            self.inserted + other.inserted,
            self.duplicates + other.duplicates,
            self.rejected + other.rejected,
        )


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (REPLAYING_SUFFIX, SPOOL_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _claim(path: Path) -> tuple[IO[bytes], Path] | None:
    """Take ``path`` for replay: (open locked file, its .replaying path), or None if someone else has it."""
    replaying = path.with_name(_stem(path) + REPLAYING_SUFFIX)
    if fcntl is None:  # pragma: no cover - Windows: rename first (fails while a writer holds it open)
        if path != replaying:
            try:
                os.rename(path, replaying)
            except OSError:
                return None
        elif time.time() - path.stat().st_mtime < STALE_REPLAYING_S:
            return None
        return open(replaying, "rb"), replaying  # noqa: SIM115 - closed by the caller
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller, after the delete
    except FileNotFoundError:
        return None
    if not _try_lock(handle.fileno()) or not _is_at(handle.fileno(), path):
        handle.close()  # a live writer or replayer holds it, or it was replayed meanwhile
        return None
    if path != replaying:
        os.rename(path, replaying)
    return handle, replaying


def _parse(line: bytes) -> UsageRecord:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return UsageRecord.from_dict(data)


def _lines(handle: IO[bytes], name: str) -> Iterator[tuple[bytes, UsageRecord | None]]:
    """(line, record) per non-blank line; record None when the line is not a valid record."""
    for line in handle:
        if not line.strip():
            continue
        complete = line.endswith(b"\n")
        try:
            yield line, _parse(line)
        except (ValueError, KeyError, TypeError) as error:
            if complete:
                log.warning("spool %s: corrupt line moved to .rejected (%s)", name, error)
            else:
                log.warning("spool %s: torn last line (a crash mid-write) moved to .rejected", name)
            yield line, None


def _replay_file(
    store: LedgerStore, handle: IO[bytes], path: Path, on_written: OnWritten | None, chunk: int
) -> ReplayResult:
    rows = inserted = refused = 0
    rejected: list[bytes] = []
    batch: list[UsageRecord] = []

    def write(records: list[UsageRecord]) -> None:
        nonlocal inserted, refused
        added, refused_records = store.insert_isolating(records)
        inserted += len(added)
        refused += len(refused_records)
        for record, reason in refused_records:
            log.error(
                "spool %s: the database refused call %s (%s); kept in .rejected", path.name, record.request_id, reason
            )
            rejected.append(encode_records([record]))
        if added and on_written is not None:
            try:
                on_written(added)
            except Exception:  # a hook's failure must not undo or repeat the replay
                log.exception("spool: an on_written hook failed")

    for line, record in _lines(handle, path.name):
        if record is None:
            rejected.append(line)
            continue
        rows += 1
        batch.append(record)
        if len(batch) >= chunk:
            write(batch)
            batch = []
    if batch:
        write(batch)
    if rejected:
        write_rejected(path.parent, _stem(path), rejected)
    # Only now, with every row committed or kept aside, may the file go.
    path.unlink()
    _fsync_dir(path.parent)
    return ReplayResult(
        files=1, rows=rows, inserted=inserted, duplicates=rows - inserted - refused, rejected=len(rejected)
    )


def pending_spool_files(spool_dir: Path) -> list[Path]:
    """Spool files waiting for replay (pending, and claims left by a crashed replayer), oldest name first."""
    return sorted(spool_dir.glob(f"spool-*{SPOOL_SUFFIX}")) + sorted(spool_dir.glob(f"spool-*{REPLAYING_SUFFIX}"))


def replay_spool(
    store: LedgerStore,
    spool_dir: Path | None = None,
    *,
    on_written: OnWritten | None = None,
    chunk: int = REPLAY_CHUNK,
) -> ReplayResult:
    """Write every claimable spool file into the ledger, idempotently, and delete each once committed.

    Files still held by a live writer are left alone (that writer replays its own). If the
    database goes away mid-replay, ``DatabaseUnavailable`` propagates: rows already committed
    stay, and the file is handed back to be replayed again later (its committed rows then
    count as duplicates, never twice in the ledger). ``on_written`` gets each chunk of newly
    inserted records, as the writer's hooks do.
    """
    directory = spool_dir if spool_dir is not None else default_spool_dir(store.identity)
    if not directory.is_dir():
        if spool_dir is not None:
            raise UsageError(f"spool directory {directory} does not exist")
        return ReplayResult()
    total = ReplayResult()
    for path in pending_spool_files(directory):
        claimed = _claim(path)
        if claimed is None:
            continue
        handle, replaying = claimed
        try:
            total += _replay_file(store, handle, replaying, on_written, chunk)
        except BaseException:
            # Hand the file back as pending (its lock is still ours, so nobody races the rename).
            if replaying.exists():
                os.rename(replaying, replaying.with_name(_stem(replaying) + SPOOL_SUFFIX))
            raise
        finally:
            handle.close()
    if total.files:
        log.info(
            "spool replay into %s: %d file(s), %d row(s), %d inserted, %d duplicate(s), %d rejected",
            store.url, total.files, total.rows, total.inserted, total.duplicates, total.rejected,
        )
    return total


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    directory: Path
    pending_files: int  # waiting for replay (including files a live writer is still appending to)
    pending_rows: int
    pending_bytes: int
    active_files: int  # of the pending, held open by a live writer right now
    replaying_files: int
    rejected_files: int
    rejected_rows: int


def _count_lines(path: Path) -> int:
    count = 0
    last = b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (0 if last == b"\n" else 1)


def _is_locked(path: Path) -> bool:
    if fcntl is None:  # pragma: no cover
        return False
    try:
        with open(path, "rb") as handle:
            return not _try_lock(handle.fileno())  # closing the handle releases a probe lock at once
    except FileNotFoundError:
        return False


def spool_status(spool_dir: Path) -> SpoolStatus:
    """What waits in a spool directory; reads only (never claims a file)."""
    pending = sorted(spool_dir.glob(f"spool-*{SPOOL_SUFFIX}")) if spool_dir.is_dir() else []
    replaying = sorted(spool_dir.glob(f"spool-*{REPLAYING_SUFFIX}")) if spool_dir.is_dir() else []
    rejected = sorted(spool_dir.glob(f"spool-*{REJECTED_SUFFIX}")) if spool_dir.is_dir() else []
    pending_rows = pending_bytes = active = 0
    for path in pending:
        try:
            pending_rows += _count_lines(path)
            pending_bytes += path.stat().st_size
        except FileNotFoundError:  # replayed while we looked
            continue
        active += _is_locked(path)
    return SpoolStatus(
        directory=spool_dir,
        pending_files=len(pending),
        pending_rows=pending_rows,
        pending_bytes=pending_bytes,
        active_files=active,
        replaying_files=len(replaying),
        rejected_files=len(rejected),
        rejected_rows=sum(_count_lines(path) for path in rejected),
    )
