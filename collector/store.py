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
from collector.models import CALL_TAGS, CALLS, call_row, json_dumps, tag_pairs
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
        engine = sa.create_engine(url, connect_args=connect_args, json_serializer=json_dumps, **kwargs)
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


_UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE for a duplicate key


class _AlreadyStored(Exception):
    """Raised inside the fast path's savepoint when some of the batch was stored already: rolls it back."""


class TransactionCompanion(Protocol):
    """Writes that must commit with a batch of calls or not at all (the writer's rollup)."""

    def prepare(self, connection: Connection, rows: list[Any]) -> None:
        """Called before the batch's transaction begins, on its connection, with the ``calls`` rows it will add."""

    def stage(self, connection: Connection, rows: list[Any]) -> None:
        """Called inside the batch's transaction with the ``calls`` rows it added (``collector.models.CallRow``)."""

    def settle(self, committed: bool) -> None:
        """Called once after ``stage``: whether that transaction committed."""


class BulkInsert:
    """One INSERT compiled once for the dialect, run as a driver-level executemany.

    Values go through each column type's own bind processor (Money, UTCDateTime, Uuid,
    JSON), exactly as SQLAlchemy would, but without its per-row statement machinery: with
    psycopg that is one pipelined round trip per batch, with sqlite3 one C-level loop.
    Rows are dicts (``execute``) or sequences in the table's column order (``execute_values``).
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
        if sorted(self._names) != sorted(keys):  # pragma: no cover - every statement here binds every column
            raise ValueError(f"{table.name}: the statement must bind each column once")
        # Where each statement parameter sits in a row given in table order.
        self._order = None if self._names == keys else operator.itemgetter(*[keys.index(n) for n in self._names])
        # One C-level lookup of every value, then Python only for the columns that convert
        # (a third of them): the per-row loop over all columns was a third of the writer's CPU.
        self._values = operator.itemgetter(*self._names)
        self._convert = [(i, process) for i, name in enumerate(self._names) if (process := processors.get(name))]

    def _converted(self, values: Any) -> tuple[Any, ...]:
        if self._convert:
            values = list(values)
            for i, process in self._convert:
                values[i] = process(values[i])
        return tuple(values)

    def values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """The row's converted values, in statement order."""
        values = self._values(row)
        return self._converted((values,) if len(self._names) == 1 else values)

    def row_values(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """Like ``values``, for a row given in the table's column order (a ``CallRow``)."""
        return self._converted(row if self._order is None else self._order(row))

    def _run(self, connection: Connection, values: list[tuple[Any, ...]]) -> int:
        if not values:
            return 0
        params = values if self.positional else [dict(zip(self._names, row)) for row in values]
        return int(connection.exec_driver_sql(self.sql, params).rowcount)

    def execute(self, connection: Connection, rows: list[dict[str, Any]]) -> int:
        """Run the statement once per row; returns the rows it changed (0 for ON CONFLICT DO NOTHING skips)."""
        return self._run(connection, [self.values(row) for row in rows])

    def execute_values(self, connection: Connection, values: list[tuple[Any, ...]]) -> int:
        """``execute`` for values already converted, in statement order (``row_values``)."""
        return self._run(connection, values)


class BulkCopy:
    """``COPY table (every column) FROM STDIN`` with psycopg, of values converted as ``BulkInsert`` converts them.

    For PostgreSQL's server, COPY is about half the CPU of the same rows as a pipelined
    INSERT executemany (no per-row parse, bind and executor start), and for the client
    psycopg formats each row in C. It cannot skip a row that is already there: a duplicate
    fails the whole COPY (see ``LedgerStore._write_rows``).
    """

    def __init__(self, table: sa.Table, dialect: sa.Dialect) -> None:
        quote = dialect.identifier_preparer.quote
        self.sql = f"COPY {quote(table.name)} ({', '.join(quote(column.name) for column in table.columns)}) FROM STDIN"

    def execute_values(self, connection: Connection, values: list[tuple[Any, ...]]) -> None:
        """COPY rows of converted values in the table's column order (``BulkInsert.row_values``).

        They are converted before the COPY starts, so a value the bind processors refuse (a
        float for money, a naive datetime) raises there, as it does for an INSERT.
        """
        if not values:
            return
        with _driver_errors(connection, self.sql):
            cursor = connection.connection.cursor()
            try:
                with cursor.copy(self.sql) as copy:
                    write = copy.write_row
                    for row in values:
                        write(row)
            finally:
                cursor.close()


@contextmanager
def _driver_errors(connection: Connection, statement: str) -> Iterator[None]:
    """Driver errors raised on the raw DBAPI cursor, as SQLAlchemy's own exceptions (what callers classify)."""
    dbapi = connection.dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as error:
        invalidated = connection.dialect.is_disconnect(error, connection.connection.dbapi_connection, None)
        raise exc.DBAPIError.instance(
            statement, None, error, dbapi.Error, connection_invalidated=invalidated, dialect=connection.dialect
        ) from error


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
        add_calls = insert(calls).on_conflict_do_nothing(index_elements=call_key)
        self._insert_calls = BulkInsert(add_calls, calls, dialect)
        # For a batch some of which is stored already: RETURNING names exactly the rows this
        # statement inserted (a row another writer committed first is skipped, not returned).
        self._insert_calls_returning = add_calls.returning(calls.c.request_id)
        self._insert_tags = BulkInsert(
            insert(tags).on_conflict_do_nothing(index_elements=[tags.c.request_id, tags.c.key]), tags, dialect
        )
        self._copy_calls: BulkCopy | None = None
        self._copy_tags: BulkCopy | None = None
        if self.dialect == "postgresql" and dialect.driver == "psycopg":
            self._copy_calls, self._copy_tags = BulkCopy(calls, dialect), BulkCopy(tags, dialect)
        # A tag row's request_id is bound exactly as its call's (same column type): it is taken
        # from the call's converted values rather than converted again.
        if [c.key for c in tags.columns] != ["request_id", "key", "value"] or not isinstance(
            tags.c.request_id.type, type(calls.c.request_id.type)
        ):  # pragma: no cover - a schema change must revisit _tag_values
            raise RuntimeError("call_tags is no longer (request_id, key, value) with the calls' request_id type")
        self._request_id_slot = [c.key for c in calls.columns].index("request_id")

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
        rows = [call_row(record) for record in unique.values()]
        self.ensure_schema()
        staged = committed = False
        try:
            with self._engine.connect() as connection:
                if companion is not None:
                    companion.prepare(connection, rows)
                # SQLite: take the write lock first, so what this transaction finds stored (the calls
                # its insert skipped, the days its rollup re-derives) stays as found until it commits.
                connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
                with connection.begin():
                    added = self._write_rows(connection, rows)
                    if companion is not None and added:
                        staged = True
                        companion.stage(
                            connection, rows if len(added) == len(rows) else [r for r in rows if r.request_id in added]
                        )
                committed = True
        except exc.SQLAlchemyError as error:
            if is_operational_error(error):
                raise self.unavailable(error, "write to") from None
            raise
        finally:
            if staged and companion is not None:
                companion.settle(committed)
        if len(added) == len(unique):
            return list(unique.values())
        return [record for request_id, record in unique.items() if request_id in added]

    def _tag_values(self, rows: list[Any], call_values: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The ``call_tags`` rows of these calls, converted, in column order (request_id, key, value)."""
        slot = self._request_id_slot
        return [(values[slot], key, value) for row, values in zip(rows, call_values) for key, value in tag_pairs(row.tags)]

    def _write_rows(self, connection: Connection, rows: list[Any]) -> set[uuid.UUID]:
        """Write the calls not stored yet and their tags, in the caller's transaction; return the ids written.

        A batch is almost always entirely new (a request id repeats only when a spool replay or
        a retried batch meets rows that did commit), so that case takes the fast path, in a
        savepoint: on PostgreSQL (psycopg) a COPY of every row, which a duplicate makes fail
        whole; on SQLite an executemany whose row count says whether every row went in. If one
        was stored already, the savepoint is rolled back and the batch is inserted again with
        ``ON CONFLICT DO NOTHING RETURNING``, which names exactly the rows it added.
        """
        # Converted once, before anything is sent: a value the column types refuse raises here.
        call_values = [self._insert_calls.row_values(row) for row in rows]
        try:
            with connection.begin_nested():
                if self._copy_calls is not None and self._copy_tags is not None:
                    self._copy_calls.execute_values(connection, call_values)
                    self._copy_tags.execute_values(connection, self._tag_values(rows, call_values))
                    return {row.request_id for row in rows}
                if self._insert_calls.execute_values(connection, call_values) == len(rows):
                    self._insert_tags.execute_values(connection, self._tag_values(rows, call_values))
                    return {row.request_id for row in rows}
                raise _AlreadyStored
        except _AlreadyStored:
            pass
        except exc.IntegrityError as error:
            if getattr(error.orig, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        added = set(connection.execute(self._insert_calls_returning, [row._asdict() for row in rows]).scalars())
        kept = [(row, values) for row, values in zip(rows, call_values) if row.request_id in added]
        self._insert_tags.execute_values(connection, self._tag_values([r for r, _ in kept], [v for _, v in kept]))
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
