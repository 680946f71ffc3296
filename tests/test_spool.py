"""The spool: rows that waited out an outage reach the ledger exactly once, and no line is ever lost."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from collector.cli import main
from collector.errors import DatabaseUnavailable
from collector.models import Call
from collector.record import UsageRecord
from collector.spool import (
    REJECTED_SUFFIX,
    REPLAYING_SUFFIX,
    SpoolFile,
    default_spool_dir,
    encode_records,
    replay_spool,
    spool_status,
)
from collector.store import LedgerStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _records(n: int, start: int = 0) -> list[UsageRecord]:
    return [
        UsageRecord(started_at=T0 + timedelta(seconds=i), requested_model="deepseek-chat", tags={"n": str(i)})
        for i in range(start, start + n)
    ]


def _spooled(spool_dir: Path, records: list[UsageRecord]) -> Path:
    """A spool file as a writer that has since exited leaves it (closed, so unlocked)."""
    spool = SpoolFile(spool_dir)
    spool.append(records)
    path = spool.path
    spool.close()
    assert path is not None
    return path


def _ids_in_ledger(store: LedgerStore) -> list[str]:
    with store.engine.connect() as connection:
        return [str(i) for i in connection.execute(sa.select(Call.request_id)).scalars()]


def test_replay_writes_every_spooled_row_and_deletes_the_file(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    records = _records(25)
    path = _spooled(tmp_path, records[:10])
    _spooled(tmp_path, records[10:])
    result = replay_spool(store, tmp_path)
    assert (result.files, result.rows, result.inserted, result.duplicates, result.rejected) == (2, 25, 25, 0, 0)
    assert sorted(_ids_in_ledger(store)) == sorted(str(r.request_id) for r in records)
    assert not path.exists() and not list(tmp_path.glob("spool-*"))
    store.close()


def test_a_crash_after_commit_before_delete_replays_with_no_duplicates(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    records = _records(30)
    _spooled(tmp_path, records)
    store.insert(records[:20])  # the crashed replay had committed these, then died before the delete
    result = replay_spool(store, tmp_path)
    assert (result.rows, result.inserted, result.duplicates) == (30, 10, 20)
    assert len(_ids_in_ledger(store)) == 30
    store.close()


def test_a_torn_last_line_is_kept_aside_and_the_rest_replayed(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LedgerStore(db_url)
    records = _records(5)
    path = _spooled(tmp_path, records[:4])
    torn = encode_records(records[4:])[:40]  # the writer died mid-line
    with open(path, "ab") as handle:
        handle.write(torn)
    with caplog.at_level(logging.WARNING, logger="dsmeter.spool"):
        result = replay_spool(store, tmp_path)
    assert (result.rows, result.inserted, result.rejected) == (4, 4, 1)
    assert "torn last line" in caplog.text
    (rejected,) = tmp_path.glob(f"*{REJECTED_SUFFIX}")
    assert rejected.read_bytes() == torn + b"\n"
    store.close()


def test_a_corrupt_line_in_the_middle_is_kept_aside_not_dropped(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    records = _records(3)
    path = tmp_path / "spool-1-abc.jsonl"
    lines = encode_records(records).splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"not": "a record"}\n' + b"\xff\xfe garbage\n" + lines[1] + lines[2])
    result = replay_spool(store, tmp_path)
    assert (result.rows, result.inserted, result.rejected) == (3, 3, 2)
    kept = (tmp_path / f"spool-1-abc{REJECTED_SUFFIX}").read_bytes()
    assert kept == b'{"not": "a record"}\n\xff\xfe garbage\n'
    store.close()


def test_a_row_the_database_refuses_is_kept_aside_and_the_others_written(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    records = _records(4)
    records[2] = dataclasses.replace(records[2], prompt_tokens=2**70)
    _spooled(tmp_path, records)
    result = replay_spool(store, tmp_path)
    assert (result.rows, result.inserted, result.duplicates, result.rejected) == (4, 3, 0, 1)
    (rejected,) = tmp_path.glob(f"*{REJECTED_SUFFIX}")
    assert json.loads(rejected.read_text())["request_id"] == str(records[2].request_id)
    store.close()


def test_a_file_a_live_writer_holds_is_not_claimed(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    live = SpoolFile(tmp_path)
    live.append(_records(3))
    assert replay_spool(store, tmp_path).files == 0
    assert live.path is not None and live.path.exists()
    live.append(_records(2, start=3))  # still the writer's own file
    assert spool_status(tmp_path).active_files == 1
    live.close()
    result = replay_spool(store, tmp_path)
    assert (result.files, result.inserted) == (1, 5)
    store.close()


def test_a_claim_left_by_a_crashed_replayer_is_taken_over(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    path = _spooled(tmp_path, _records(6))
    orphan = path.with_name(path.name[: -len(".jsonl")] + REPLAYING_SUFFIX)
    os.rename(path, orphan)  # the replayer that renamed it died: nobody holds its lock
    result = replay_spool(store, tmp_path)
    assert (result.files, result.inserted) == (1, 6)
    assert not orphan.exists()
    store.close()


def test_replayers_racing_over_the_same_files_write_each_row_once(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    records = _records(400)
    for i in range(0, 400, 20):
        _spooled(tmp_path, records[i : i + 20])
    results = []
    barrier = threading.Barrier(3)

    def replay() -> None:
        barrier.wait()
        results.append(replay_spool(store, tmp_path))

    threads = [threading.Thread(target=replay) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.files for r in results) == 20
    assert sum(r.inserted for r in results) == 400
    assert sum(r.duplicates for r in results) == 0
    assert len(_ids_in_ledger(store)) == 400
    store.close()


def test_an_outage_during_replay_hands_the_file_back_intact(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    path = _spooled(spool_dir, _records(5))
    down = LedgerStore(f"sqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}")
    with pytest.raises(DatabaseUnavailable):
        replay_spool(down, spool_dir)
    assert path.exists() and len(path.read_bytes().splitlines()) == 5
    up = LedgerStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert replay_spool(up, spool_dir).inserted == 5
    up.close()


def test_each_database_has_its_own_spool_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = default_spool_dir("sqlite:///a.db")
    assert a == default_spool_dir(f"sqlite:///{tmp_path / 'a.db'}")
    assert a != default_spool_dir("sqlite:///b.db")
    assert (a / "DATABASE").read_text().strip() == f"sqlite:///{tmp_path / 'a.db'}"


def test_spool_cli_replays_leftovers_and_reports_counts(sqlite_url: str) -> None:
    records = _records(12)
    spool_dir = default_spool_dir(sqlite_url)
    _spooled(spool_dir, records)
    runner = CliRunner()
    status = runner.invoke(main, ["spool", "status", "--db", sqlite_url])
    assert status.exit_code == 0, status.output
    assert "pending: 1 file(s), 12 row(s)" in status.stdout
    replay = runner.invoke(main, ["spool", "replay", "--db", sqlite_url])
    assert replay.exit_code == 0, replay.output
    assert replay.stdout.strip() == "files: 1  rows: 12  inserted: 12  duplicates: 0  rejected: 0"
    again = runner.invoke(main, ["spool", "replay", "--db", sqlite_url])
    assert again.stdout.strip() == "files: 0  rows: 0  inserted: 0  duplicates: 0  rejected: 0"
    assert len(_ids_in_ledger(LedgerStore(sqlite_url))) == 12


def test_spool_cli_with_an_explicit_directory_and_a_bad_one(sqlite_url: str, tmp_path: Path) -> None:
    _spooled(tmp_path / "elsewhere", _records(3))
    runner = CliRunner()
    result = runner.invoke(main, ["spool", "replay", "--db", sqlite_url, "--spool-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "inserted: 3" in result.stdout
    missing = runner.invoke(main, ["spool", "replay", "--db", sqlite_url, "--spool-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.stderr.strip() == f"dsmeter: error: spool directory {tmp_path / 'nope'} does not exist"
