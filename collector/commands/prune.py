"""``dsmeter prune``: remove raw calls older than a date once the daily rollup holds their days."""

from __future__ import annotations

from datetime import date

import click

from collector.commands.options import db_option
from collector.errors import UsageError

__all__ = ["prune"]

PRUNE_EXIT_CODES = """\b
Exit codes:
  0  pruned (or nothing to prune; with --dry-run, nothing removed)
  1  not confirmed
  2  bad input (a malformed or future date)
  3  the database is unavailable
  4  refused: a day before the date is not fully rolled up (run `dsmeter rollup` first)
"""


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--before {text!r}: expected a UTC day YYYY-MM-DD") from None


@click.command(name="prune", epilog=PRUNE_EXIT_CODES)
@db_option
@click.option("--before", "before_text", required=True, metavar="YYYY-MM-DD",
              help="Remove the calls that started before this UTC day (00:00 UTC).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for cron).")
def prune(db: str | None, before_text: str, dry_run: bool, yes: bool) -> None:
    """Remove raw calls older than --before, keeping their days in the daily rollup.

    Refuses unless the rollup holds every day being removed exactly (reports keep showing
    them). On PostgreSQL whole months are dropped as partitions, and partitions for the coming
    months are created; run it monthly (e.g. from cron with --yes). Logged in ledger_prunes.
    """
    from collector.prune import prune as run_prune
    from collector.store import LedgerStore

    before = _day(before_text)
    store = LedgerStore(db)
    try:
        if not dry_run and not yes:
            plan = run_prune(store, before, dry_run=True)
            click.echo(_describe(plan.calls, plan.partitions, before, "would remove"))
            click.confirm("Remove them?", abort=True)
        plan = run_prune(store, before, dry_run=dry_run)
    finally:
        store.close()
    click.echo(_describe(plan.calls, plan.partitions, before, "would remove" if dry_run else "removed"))


def _describe(calls: int, partitions: list[str], before: date, verb: str) -> str:
    text = f"{verb} {calls:,} call(s) that started before {before.isoformat()} 00:00 UTC"
    if partitions:
        text += f" ({len(partitions)} monthly partition(s): {', '.join(partitions)})"
    return text
