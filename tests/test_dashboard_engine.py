"""The dashboard's engine is read-only at the database, never migrates, and names each ledger state in one line."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc

from collector.errors import UsageError
from collector.record import UsageRecord
from collector.store import LedgerStore
from dashboard.engine import LedgerState, open_read_only, probe


def _migrated(url: str, *records: UsageRecord) -> None:
    store = LedgerStore(url)
    try:
        store.migrate()
        if records:
            store.insert(list(records))
    finally:
        store.close()


def test_the_database_itself_refuses_a_write_through_the_dashboards_engine(db_url: str) -> None:
    _migrated(db_url, UsageRecord(started_at=datetime(2026, 11, 1, tzinfo=timezone.utc), requested_model="m"))
    engine = open_read_only(db_url)
    try:
        with pytest.raises(exc.DBAPIError) as refused, engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM calls"))
        assert "read" in str(refused.value).lower()  # "readonly database" / "read-only transaction"
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM calls")).scalar_one() == 1
    finally:
        engine.dispose()


def test_a_ledger_file_that_does_not_exist_is_missing_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nothing-yet.db"
    url = f"sqlite:///{path}"
    engine = open_read_only(url)
    result = probe(engine, url)
    engine.dispose()
    assert result.state is LedgerState.MISSING
    assert not path.exists()


def test_a_database_without_the_schema_is_missing_and_the_dashboard_does_not_create_it(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        Path(db_url.removeprefix("sqlite:///")).touch()
    engine = open_read_only(db_url)
    try:
        assert probe(engine, db_url).state is LedgerState.MISSING
        with engine.connect() as connection:
            assert not sa.inspect(connection).has_table("calls")
            assert not sa.inspect(connection).has_table("alembic_version")
    finally:
        engine.dispose()


def test_a_migrated_ledger_without_calls_is_empty_and_with_one_call_is_ready(db_url: str) -> None:
    _migrated(db_url)
    engine = open_read_only(db_url)
    try:
        assert probe(engine, db_url).state is LedgerState.EMPTY
        _migrated(db_url, UsageRecord(started_at=datetime(2026, 11, 1, tzinfo=timezone.utc)))
        assert probe(engine, db_url).state is LedgerState.READY
    finally:
        engine.dispose()


def test_a_ledger_at_another_schema_revision_asks_for_db_upgrade_instead_of_migrating(db_url: str) -> None:
    _migrated(db_url)
    writable = sa.create_engine(db_url)
    with writable.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = 'older'"))
    writable.dispose()
    engine = open_read_only(db_url)
    try:
        result = probe(engine, db_url)
    finally:
        engine.dispose()
    assert result.state is LedgerState.OUTDATED
    assert "older" in result.message and "dsmeter db upgrade" in result.message


def test_an_unreachable_server_is_one_line_without_the_password() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://reader:s3cret-pw@127.0.0.1:{port}/ledger"
    engine = open_read_only(url)
    result = probe(engine, url)
    engine.dispose()
    assert result.state is LedgerState.UNREACHABLE
    assert "s3cret-pw" not in result.message and "***" in result.message
    assert "\n" not in result.message and "cannot read the ledger database" in result.message


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "not a url at all", "sqlite://"])
def test_urls_the_dashboard_cannot_read_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError):
        open_read_only(url)
