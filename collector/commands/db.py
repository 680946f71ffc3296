"""``dsmeter db``: create or upgrade the ledger's schema, or show where it stands."""

from __future__ import annotations

import click

from collector.commands.options import db_option

__all__ = ["db"]


@click.group(name="db")
def db() -> None:
    """Manage the ledger database's schema (Alembic migrations)."""


@db.command("upgrade")
@db_option
def upgrade_command(db: str | None) -> None:
    """Create the ledger or migrate it to the newest schema (safe to run any time, from any number of hosts)."""
    from collector.store import LedgerStore

    store = LedgerStore(db, migrate=False)
    try:
        revision = store.migrate()
    finally:
        store.close()
    click.echo(f"{store.url}: schema at revision {revision} (head)")


@db.command("current")
@db_option
def current_command(db: str | None) -> None:
    """Show the ledger's schema revision and the newest this dsmeter knows (changes nothing)."""
    from collector.store import LedgerStore, head_revision

    store = LedgerStore(db, migrate=False)
    try:
        current = store.current_revision()
    finally:
        store.close()
    head = head_revision()
    if current is None:
        state = "no ledger yet (run `dsmeter db upgrade`, or just start metering)"
    elif current == head:
        state = f"{current} (head)"
    else:
        state = f"{current} (head is {head}: run `dsmeter db upgrade`)"
    click.echo(f"{store.url}: {state}")
