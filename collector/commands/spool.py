"""``dsmeter spool``: the rows that waited out a database outage on disk."""

from __future__ import annotations

from pathlib import Path

import click

from collector.commands.options import db_option

__all__ = ["spool"]

_spool_dir_option = click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Spool directory. Default: the one dsmeter keeps for this database in its data directory.",
)


@click.group(name="spool")
def spool() -> None:
    """Inspect or replay the on-disk spool of calls not yet written to the ledger.

    Writers replay their spool by themselves once the database is back; `replay` is for
    rows left behind by processes that have since exited.
    """


@spool.command("replay")
@db_option
@_spool_dir_option
def replay_command(db: str | None, spool_dir: Path | None) -> None:
    """Write every spooled call into the ledger (each exactly once) and delete the replayed files."""
    from collector.rollups import RollupHook
    from collector.spool import replay_spool
    from collector.store import LedgerStore

    store = LedgerStore(db)
    try:
        result = replay_spool(store, spool_dir, on_written=RollupHook(store))  # late arrivals reach the rollup
    finally:
        store.close()
    click.echo(
        f"files: {result.files}  rows: {result.rows}  inserted: {result.inserted}  "
        f"duplicates: {result.duplicates}  rejected: {result.rejected}"
    )
    if result.rejected:
        click.echo(
            f"dsmeter: {result.rejected} line(s) could not be replayed and were kept in *.rejected files "
            "in the spool directory (see `dsmeter spool status`)",
            err=True,
        )


@spool.command("status")
@db_option
@_spool_dir_option
def status_command(db: str | None, spool_dir: Path | None) -> None:
    """Show what waits in the spool (reads only)."""
    from collector.spool import default_spool_dir, spool_status

    status = spool_status(spool_dir if spool_dir is not None else default_spool_dir(db))
    click.echo(f"spool directory: {status.directory}")
    click.echo(
        f"pending: {status.pending_files} file(s), {status.pending_rows} row(s), {status.pending_bytes} bytes"
        + (f" ({status.active_files} still being written by a running process)" if status.active_files else "")
    )
    if status.replaying_files:
        click.echo(f"being replayed: {status.replaying_files} file(s)")
    click.echo(f"rejected: {status.rejected_files} file(s), {status.rejected_rows} line(s)")
