"""The dashboard's connection to the ledger: read-only by construction, never migrating.

The dashboard only reads, so it does not use ``LedgerStore`` (which migrates on first write
and switches SQLite to WAL on connect, both writes). Instead the database itself is asked to
refuse writes: SQLite is opened with ``mode=ro`` (a URI filename), PostgreSQL sessions start
with ``default_transaction_read_only``. ``probe`` tells the app which of four states the
ledger is in, so each gets one clear screen instead of a traceback.
"""

from __future__ import annotations

import enum
import functools
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.engine.url import URL

from collector.config import database_url, redact_url
from collector.errors import DatabaseUnavailable, UsageError
from collector.queries import has_calls
from collector.store import SUPPORTED_DIALECTS
from collector.store import head_revision as _read_head_revision

__all__ = [
    "DATABASE_ERRORS",
    "LedgerState",
    "Probe",
    "describe_error",
    "head_revision",
    "open_read_only",
    "probe",
    "sqlite_path",
]

# What a page's query raises when the database goes away between two runs (DBAPIError covers
# the drivers' operational and interface errors; DatabaseUnavailable is dsmeter's own).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (exc.DBAPIError, DatabaseUnavailable)
POSTGRES_CONNECT_TIMEOUT_S = 5  # a dashboard that waits longer than this for a dead server looks hung
SQLITE_BUSY_TIMEOUT_S = 10.0


class LedgerState(str, enum.Enum):
    READY = "ready"  # schema at head, at least one call
    EMPTY = "empty"  # schema at head, no calls yet
    MISSING = "missing"  # no ledger there yet (no file, or no dsmeter schema)
    OUTDATED = "outdated"  # a schema this dashboard does not read
    UNREACHABLE = "unreachable"  # the database could not be opened or queried


@dataclass(frozen=True, slots=True)
class Probe:
    state: LedgerState
    message: str  # one line, safe to show (no password)
    url: str  # the URL with its password hidden


@functools.cache
def head_revision() -> str:
    """The schema this dsmeter reads; read once per process (loading the migration scripts takes a while)."""
    return _read_head_revision()


def _parse(url: str | None) -> URL:
    raw = database_url(url)
    try:
        parsed = make_url(raw)
    except exc.ArgumentError:
        raise UsageError(f"not a database URL: {redact_url(raw)}") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise UsageError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact_url(raw)}: "
            "dsmeter supports SQLite and PostgreSQL"
        )
    return parsed


def sqlite_path(url: str | None) -> Path | None:
    """The file of a file-based SQLite URL, else None (PostgreSQL, or in-memory SQLite)."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    assert parsed.database is not None
    return Path(parsed.database)


def open_read_only(url: str | None) -> Engine:
    """An engine on ``url`` (resolved like every command) that the database itself keeps read-only.

    Creating it does no I/O. Raises ``UsageError`` for a URL that is not a supported database.
    """
    parsed = _parse(url)
    if parsed.get_backend_name() == "sqlite":
        path = sqlite_path(url)
        if path is None:
            raise UsageError("the dashboard reads a ledger file; an in-memory SQLite database has nothing in it")
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"

        def connect() -> sqlite3.Connection:
            # check_same_thread off: Streamlit runs each session's script on its own thread,
            # and the engine (with its pool) is shared between sessions.
            connection = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)
            return connection

        return sa.create_engine("sqlite+pysqlite://", creator=connect)
    connect_args: dict[str, Any] = {"options": "-c default_transaction_read_only=on"}
    if "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return sa.create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)


def describe_error(error: BaseException, url: str | None) -> str:
    """The first line of a database error, without the URL's password: fit to show on screen."""
    return _reason(error, _parse(url))


def _reason(error: BaseException, url: URL) -> str:
    source = error.orig if isinstance(error, exc.DBAPIError) and error.orig is not None else error
    text = str(source).strip()
    first = text.splitlines()[0] if text else type(source).__name__
    if url.password:
        first = first.replace(str(url.password), "***")
    return first[:300]


def probe(engine: Engine, url: str | None) -> Probe:
    """Which state the ledger at ``url`` is in, read through ``engine`` (from ``open_read_only``)."""
    from alembic.runtime.migration import MigrationContext

    parsed = _parse(url)
    shown = parsed.render_as_string(hide_password=True)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return Probe(LedgerState.MISSING, f"no ledger file at {path} yet", shown)
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            if not inspector.has_table("calls"):
                return Probe(LedgerState.MISSING, f"{shown} holds no dsmeter ledger yet", shown)
            current = MigrationContext.configure(connection).get_current_revision()
            head = head_revision()
            if current != head:
                return Probe(
                    LedgerState.OUTDATED,
                    f"the ledger at {shown} is at schema revision {current} but this dashboard reads {head}: "
                    "run `dsmeter db upgrade`",
                    shown,
                )
        any_call = has_calls(engine)
    except exc.SQLAlchemyError as error:
        return Probe(LedgerState.UNREACHABLE, f"cannot read the ledger database {shown}: {_reason(error, parsed)}", shown)
    if not any_call:
        return Probe(LedgerState.EMPTY, f"the ledger at {shown} has no calls yet", shown)
    return Probe(LedgerState.READY, f"reading {shown}", shown)
