"""``LedgerStore``: the one object that owns the ledger's engine, migrations and writes.

Everything that writes the ledger goes through ``LedgerStore.insert`` (idempotent: a call
already stored is skipped, never doubled, so a batch can be retried or replayed from the
spool any number of times). Reads go through ``collector.queries`` with ``store.engine``.

The schema comes only from Alembic (``migrations/``), never from ``create_all``: a store
migrates to head on first use unless told not to (``migrate=False``, for read-only commands,
which call ``require_schema()`` instead). Several processes may start at once: the upgrade
runs inside one transaction that first takes a PostgreSQL advisory lock, or on SQLite a
``BEGIN IMMEDIATE`` write lock (others wait out the busy timeout), so exactly one process
creates the schema and the others find it done.
"""

from __future__ import annotations

import operator
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, StaticPool

from collector.config import database_url, redact_url
from collector.errors import DatabaseUnavailable, UsageError
from collector.models import CALL_TAGS, CALLS, row_from_record, tag_rows_from_record
from collector.record import UsageRecord

__all__ = [
    "LedgerStore",
    "migration_connection",
    "database_identity",
    "alembic_config",
    "head_revision",
    "is_operational_error",
    "SUPPORTED_DIALECTS",
]

SUPPORTED_DIALECTS = ("sqlite", "postgresql")
SQLITE_BUSY_TIMEOUT_S = 30.0  # writers queue behind each other this long before "database is locked"
POSTGRES_CONNECT_TIMEOUT_S = 10  # a down server must fail fast, not after the OS's TCP timeout
# Any fixed 64-bit number; only dsmeter's migrations take this advisory lock.
_MIGRATION_LOCK_KEY = 0x64736D6574657231  # "dsmeter1"


def is_operational_error(error: BaseException) -> bool:
    """True when the database could not be used (down, unreachable, locked), not when it refused the data."""
    if isinstance(error, DatabaseUnavailable):
        return True
    if isinstance(error, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError, exc.DisconnectionError)):
        return True
    return isinstance(error, exc.DBAPIError) and bool(error.connection_invalidated)


def _reason(error: BaseException, url: URL) -> str:
    """The first line of a driver error, with the URL's password cut out in case a driver echoes it."""
    source = error.orig if isinstance(error, exc.DBAPIError) and error.orig is not None else error
    text = str(source).strip().splitlines()[0] if str(source).strip() else type(source).__name__
    if url.password:
        text = text.replace(str(url.password), "***")
    return text[:300]


def _parse_url(url: str) -> URL:
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise UsageError(f"not a database URL: {redact_url(url)!s}") from None
    if parsed.get_backend_name() not in SUPPORTED_DIALECTS:
        raise UsageError(
            f"unsupported database {parsed.get_backend_name()!r} in {redact_url(url)}: "
            "dsmeter supports SQLite and PostgreSQL"
        )
    return parsed


# Alembic keeps the running migration in module globals (``alembic.context``, ``alembic.op``),
# so two threads migrating at once (two writers starting on two fresh ledgers) would run each
# other's operations on each other's connections: with SQLite that ends in a segfault.
# Across processes the database's own lock (see migration_connection) keeps them apart.
_ALEMBIC_LOCK = threading.Lock()


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _create_engine(url: URL, *, for_migration: bool = False) -> Engine:
    kwargs: dict[str, Any] = {}
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_S
        connect_args["check_same_thread"] = False  # the writer thread and callers share the pool
        if _is_memory_sqlite(url):
            kwargs["poolclass"] = StaticPool  # one connection, or every checkout is a new empty db
    else:
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        kwargs["pool_pre_ping"] = True  # a restarted server leaves dead pooled connections behind
    if for_migration:
        kwargs["poolclass"] = StaticPool if _is_memory_sqlite(url) else NullPool
    try:
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as error:
        raise UsageError(f"cannot use database URL {url.render_as_string(hide_password=True)}: {error}") from None
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, for_migration=for_migration)
    return engine


def _configure_sqlite(engine: Engine, *, for_migration: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from pysqlite: SQLAlchemy's "begin" event below issues
        # BEGIN itself, so a transaction begins where SQLAlchemy's does (not at the first DML).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
            # Off while migrating: a batch migration recreates tables, and with foreign keys on,
            # dropping `calls` would cascade-delete every call_tags row.
            cursor.execute(f"PRAGMA foreign_keys = {'OFF' if for_migration else 'ON'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A migration takes the write lock before it reads the schema version, so two
        # processes never both decide to create the tables; so does a write (see insert_new).
        if for_migration:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql(connection.get_execution_options().get("dsmeter_sqlite_begin", "BEGIN"))


def _script_location() -> str:
    import migrations

    return str(Path(migrations.__file__).resolve().parent)


def alembic_config(url: str) -> Any:
    """An Alembic ``Config`` for ``url`` that works from a checkout or an installed package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", _script_location())
    # ConfigParser interpolation: a '%' in a URL (an escaped password) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(_script_location()).get_heads()
    if len(heads) != 1:  # pragma: no cover - a broken chain is a bug in migrations/, caught by tests
        raise RuntimeError(f"migrations must form one linear chain; heads are {heads}")
    return heads[0]


@contextmanager
def migration_connection(url: str) -> Iterator[Connection]:
    """A connection in one transaction that holds the migration lock until it commits.

    Used by ``migrations/env.py`` for every online Alembic run (``dsmeter db upgrade``,
    the ``alembic`` CLI, the tests' ``alembic check``).
    """
    parsed = _parse_url(url)
    engine = _create_engine(parsed, for_migration=True)
    try:
        with engine.begin() as connection:
            if parsed.get_backend_name() == "postgresql":
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            yield connection
            if parsed.get_backend_name() == "sqlite":
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left {len(broken)} rows breaking foreign keys: {broken[:3]}")
    finally:
        engine.dispose()


def database_identity(url: str | None = None) -> str:
    """A stable, password-free name for a database: the URL without password, SQLite paths absolute.

    Two URLs naming the same database give the same identity (e.g. to key its spool directory).
    """
    parsed = _parse_url(database_url(url))
    if parsed.get_backend_name() == "sqlite" and not _is_memory_sqlite(parsed):
        assert parsed.database is not None
        return f"sqlite:///{Path(parsed.database).resolve()}"
    return parsed.set(drivername=parsed.get_backend_name()).render_as_string(hide_password=True)


_ID_CHUNK = 500  # ids per "IN (...)" lookup, well under SQLite's bound-parameter limit


class TransactionCompanion(Protocol):
    """Writes that must commit with a batch of calls or not at all (the writer's rollup)."""

    def stage(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        """Called inside the batch's transaction with the ``calls`` rows it added."""

    def settle(self, committed: bool) -> None:
        """Called once after ``stage``: whether that transaction committed."""


class BulkInsert:
    """One INSERT compiled once for the dialect, run as a driver-level executemany.

    Values go through each column type's own bind processor (Money, UTCDateTime, Uuid,
    JSON), exactly as SQLAlchemy would, but without its per-row statement machinery: with
    psycopg that is one pipelined round trip per batch, with sqlite3 one C-level loop.
    """

    def __init__(self, statement: Any, table: sa.Table, dialect: sa.Dialect) -> None:
        keys = [column.key for column in table.columns]
        compiled = statement.compile(dialect=dialect, column_keys=keys)
        self.sql = str(compiled)
        processors = {
            column.key: column.type.dialect_impl(dialect).bind_processor(dialect) for column in table.columns
        }
        names = list(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        self.positional = names is not None
        self._names = names if names is not None else keys
        # One C-level lookup of every value, then Python only for the columns that convert
        # (a third of them): the per-row loop over all columns was a third of the writer's CPU.
        self._values = operator.itemgetter(*self._names)
        self._convert = [(i, process) for i, name in enumerate(self._names) if (process := processors.get(name))]

    def params(self, row: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = self._values(row)
        if len(self._names) == 1:
            values = (values,)
        if self._convert:
            values = list(values)
            for i, process in self._convert:
                values[i] = process(values[i])
        return tuple(values) if self.positional else dict(zip(self._names, values))

    def execute(self, connection: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            connection.exec_driver_sql(self.sql, [self.params(row) for row in rows])


class LedgerStore:
    """The ledger: ``LedgerStore(url)`` then ``insert(records)``; reads use ``.engine`` and ``collector.queries``.

    ``url`` is resolved like every command (``--db``, then ``DSMETER_DATABASE_URL``, then the
    embedded SQLite file). Creating a store does no I/O; the first write migrates to head
    (unless ``migrate=False``). Failures to connect or migrate raise ``DatabaseUnavailable``
    with a one-line message that never contains the URL's password.
    """

    def __init__(self, url: str | None = None, *, migrate: bool = True) -> None:
        self._raw_url = database_url(url)
        self._parsed = _parse_url(self._raw_url)
        self._auto_migrate = migrate
        self._migrated = False
        self._lock = threading.Lock()
        self._engine = _create_engine(self._parsed)
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        calls, tags = CALLS, CALL_TAGS
        dialect = self._engine.dialect
        # PostgreSQL partitions calls by month (migration 0004), so its key is (request_id,
        # started_at) there, (request_id) before: no conflict target fits both. A replayed
        # record has the same started_at, so this is the same idempotency.
        call_key = None if self.dialect == "postgresql" else [calls.c.request_id]
        self._insert_calls = BulkInsert(
            insert(calls).on_conflict_do_nothing(index_elements=call_key), calls, dialect
        )
        self._insert_tags = BulkInsert(
            insert(tags).on_conflict_do_nothing(index_elements=[tags.c.request_id, tags.c.key]), tags, dialect
        )

    # -- identity ---------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def url(self) -> str:
        """The URL with its password hidden: safe to print or log."""
        return self._parsed.render_as_string(hide_password=True)

    @property
    def identity(self) -> str:
        """A stable, password-free name for the database (see ``database_identity``)."""
        return database_identity(self._raw_url)

    @property
    def dialect(self) -> str:
        return self._parsed.get_backend_name()

    @property
    def sqlite_path(self) -> Path | None:
        """The ledger file of a file-based SQLite URL, else None."""
        if self.dialect != "sqlite" or _is_memory_sqlite(self._parsed):
            return None
        assert self._parsed.database is not None
        return Path(self._parsed.database)

    def __repr__(self) -> str:
        return f"LedgerStore({self.url!r})"

    def unavailable(self, error: BaseException, doing: str) -> DatabaseUnavailable:
        return DatabaseUnavailable(f"cannot {doing} the ledger database {self.url}: {_reason(error, self._parsed)}")

    # -- schema -------------------------------------------------------------------------

    def migrate(self) -> str:
        """Upgrade the database to the newest schema (safe to run from many processes at once); returns it."""
        from alembic import command
        from alembic.util import CommandError

        with self._lock, _ALEMBIC_LOCK:
            config = alembic_config(self._raw_url)
            try:
                if _is_memory_sqlite(self._parsed):
                    # Another engine would see another, empty, in-memory database.
                    with self._engine.begin() as connection:
                        config.attributes["connection"] = connection
                        command.upgrade(config, "head")
                else:
                    command.upgrade(config, "head")
            except DatabaseUnavailable:
                raise
            except (exc.SQLAlchemyError, CommandError, OSError, RuntimeError) as error:
                raise self.unavailable(error, "migrate") from None
            self._migrated = True
        if self.dialect == "postgresql":
            self._ensure_partitions()
        return head_revision()

    def _ensure_partitions(self) -> None:
        """Monthly partitions of calls a few months ahead (see ``collector.partitions``)."""
        from collector.partitions import ensure_partitions
        from collector.record import utcnow

        try:
            with self._engine.begin() as connection:
                ensure_partitions(connection, utcnow().date())
        except exc.SQLAlchemyError as error:
            raise self.unavailable(error, "migrate") from None

    def ensure_schema(self) -> None:
        """Migrate now if this store migrates on first use and has not yet."""
        if self._auto_migrate and not self._migrated:
            self.migrate()

    def current_revision(self) -> str | None:
        """The schema revision the database is at; None for an empty database or a missing SQLite file."""
        from alembic.runtime.migration import MigrationContext

        path = self.sqlite_path
        if path is not None and not path.exists():
            return None  # connecting would create an empty file
        try:
            with self._engine.connect() as connection:
                return MigrationContext.configure(connection).get_current_revision()
        except exc.SQLAlchemyError as error:
            raise self.unavailable(error, "read") from None

    def require_schema(self) -> None:
        """For read-only commands: the ledger exists and is at this dsmeter's schema; never creates or migrates."""
        path = self.sqlite_path
        if path is not None and not path.exists():
            raise DatabaseUnavailable(
                f"no ledger at {path}: nothing has been recorded there yet (check --db or DSMETER_DATABASE_URL)"
            )
        current, head = self.current_revision(), head_revision()
        if current is None:
            raise DatabaseUnavailable(f"{self.url} holds no dsmeter ledger yet; run `dsmeter db upgrade` to create one")
        if current != head:
            raise DatabaseUnavailable(
                f"the ledger at {self.url} is at schema revision {current} but this dsmeter reads {head}; "
                "run `dsmeter db upgrade` with the newest dsmeter"
            )

    # -- writes -------------------------------------------------------------------------

    def insert(self, records: Sequence[UsageRecord]) -> int:
        """Store records in one transaction; ones already stored (same request_id) are skipped. Returns rows added."""
        return len(self.insert_new(records))

    def insert_new(
        self, records: Sequence[UsageRecord], companion: TransactionCompanion | None = None
    ) -> list[UsageRecord]:
        """Like ``insert``, but returns the records that were actually added (for hooks that must not double-count).

        ``companion`` (the writer's rollup) writes what follows from the added rows in the same
        transaction, so both commit together or not at all; it is told how the transaction ended.
        """
        unique: dict[uuid.UUID, UsageRecord] = {}
        for record in records:
            unique.setdefault(record.request_id, record)
        if not unique:
            return []
        rows = [row_from_record(record) for record in unique.values()]
        self.ensure_schema()
        staged = committed = False
        try:
            with self._engine.connect() as connection:
                # SQLite: take the write lock first, so the ids we find absent stay absent until we commit.
                connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
                with connection.begin():
                    added = self._insert_calls_rows(connection, rows)
                    tag_rows = [
                        tag_row
                        for request_id, record in unique.items()
                        if request_id in added
                        for tag_row in tag_rows_from_record(record)
                    ]
                    if tag_rows:
                        self._insert_tags.execute(connection, tag_rows)
                    if companion is not None and added:
                        staged = True
                        companion.stage(connection, [row for row in rows if row["request_id"] in added])
                committed = True
        except exc.SQLAlchemyError as error:
            if is_operational_error(error):
                raise self.unavailable(error, "write to") from None
            raise
        finally:
            if staged and companion is not None:
                companion.settle(committed)
        return [record for request_id, record in unique.items() if request_id in added]

    def _insert_calls_rows(self, connection: Connection, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
        """Insert ``calls`` rows (ON CONFLICT DO NOTHING); return the ids this transaction added."""
        ids = [row["request_id"] for row in rows]
        calls = CALLS
        if self.dialect == "sqlite":
            # We hold the write lock (BEGIN IMMEDIATE): nobody else can add rows until we commit.
            present: set[uuid.UUID] = set()
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                present.update(connection.execute(sa.select(calls.c.request_id).where(calls.c.request_id.in_(chunk))).scalars())
            rows = [row for row in rows if row["request_id"] not in present]
            self._insert_calls.execute(connection, rows)
            return {row["request_id"] for row in rows}
        self._insert_calls.execute(connection, rows)
        # The rows this transaction wrote carry its transaction id; rows that were already
        # there (or that a concurrent writer just committed) do not. Exact, without RETURNING
        # (which would force a slow multi-VALUES statement instead of a pipelined executemany).
        added: set[uuid.UUID] = set(
            connection.execute(
                sa.text(
                    "SELECT request_id FROM calls WHERE request_id = ANY(:ids) AND started_at = ANY(:starts) "
                    "AND xmin = pg_current_xact_id()::xid"
                ),
                # started_at lets PostgreSQL look only in the partitions of these calls' months.
                {"ids": ids, "starts": sorted({row["started_at"] for row in rows})},
            ).scalars()
        )
        return added

    def insert_isolating(
        self, records: Sequence[UsageRecord], companion: TransactionCompanion | None = None
    ) -> tuple[list[UsageRecord], list[tuple[UsageRecord, str]]]:
        """Insert what the database accepts; return (added, refused with the reason).

        One bad record (a value the database refuses) must not keep the good ones out, so a
        refused batch is split in halves until the bad records stand alone. An outage is not
        a refusal: ``DatabaseUnavailable`` propagates and nothing is judged.
        """
        try:
            return self.insert_new(records, companion), []
        except DatabaseUnavailable:
            raise
        except Exception as error:  # noqa: BLE001 - any refusal of the data, reported with its record
            if is_operational_error(error):
                raise self.unavailable(error, "write to") from None
            if len(records) <= 1:
                return [], [(record, _reason(error, self._parsed)) for record in records]
        middle = len(records) // 2
        added_a, refused_a = self.insert_isolating(records[:middle], companion)
        added_b, refused_b = self.insert_isolating(records[middle:], companion)
        return added_a + added_b, refused_a + refused_b

    # -- sessions -------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """An ORM session in one transaction: committed on success, rolled back on error."""
        self.ensure_schema()
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            yield session

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
