"""Alembic environment for the dsmeter ledger.

Run by ``dsmeter db upgrade`` / ``LedgerStore.migrate()`` (which set ``sqlalchemy.url``
programmatically) and by the plain ``alembic`` CLI from the repository root (where an
empty ``sqlalchemy.url`` in alembic.ini means: resolve it like every dsmeter command,
``DSMETER_DATABASE_URL`` or the embedded SQLite file).

Online runs go through ``collector.store.migration_connection``: one transaction holding
the migration lock (PostgreSQL advisory lock, SQLite ``BEGIN IMMEDIATE``), so concurrent
starters never race, and SQLite foreign keys are off during batch table rebuilds.
``render_as_batch=True`` lets later revisions ALTER on SQLite; append them as 0002, 0003…
with ``down_revision`` set to the previous one (one linear chain).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from collector.config import database_url
from collector.models import Base
from collector import reprice_schema  # noqa: F401 - puts the reprice audit (0002) on Base.metadata
from collector import reporting_schema  # noqa: F401 - puts the reporting tables (0003) on Base.metadata
from collector import retention_schema  # noqa: F401 - puts the retention log (0004) on Base.metadata
from collector.partitions import include_object as include_partitioning
from collector.store import migration_connection

config = context.config

if config.config_file_name is not None:
    # Only for the `alembic` CLI; a programmatic run must not reconfigure the app's logging.
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return database_url(config.get_main_option("sqlalchemy.url") or None)


def _include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    # PostgreSQL's monthly partitions of calls (0004) are not stray tables, and the call_tags
    # foreign key they rule out is absent there on purpose (see collector/partitions.py).
    bind = context.get_bind() if not context.is_offline_mode() else None
    dialect = bind.dialect.name if bind is not None else ""
    return include_partitioning(dialect, obj, name, type_, reflected, compare_to)


def _configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_object=_include_object,
        **kwargs,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is not None:  # an in-memory SQLite store migrates over its own connection
        _run(given)
        return
    with migration_connection(_url()) as connection:
        _run(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
