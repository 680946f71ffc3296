"""``dsmeter rollup``: build, repair or check the daily rollup that keeps reports fast."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import click

from collector.commands.options import db_option
from collector.errors import UsageError

__all__ = ["rollup"]

EXIT_DRIFT = 4

ROLLUP_EXIT_CODES = """\b
Exit codes:
  0  rebuilt (or, with --check, the rollup equals the raw ledger)
  2  bad input
  3  the database is unavailable
  4  --check found groups where the rollup differs from the raw ledger
"""


def _day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected a UTC day YYYY-MM-DD") from None


@click.command(name="rollup", epilog=ROLLUP_EXIT_CODES)
@db_option
@click.option("--since", "since_text", default=None, metavar="YYYY-MM-DD", help="First UTC day (default: the first).")
@click.option("--until", "until_text", default=None, metavar="YYYY-MM-DD", help="Last UTC day, included (default: the last).")
@click.option("--days", type=click.IntRange(1), default=None, metavar="N", help="The last N UTC days, today included.")
@click.option("--check", is_flag=True, help="Compare the rollup with the raw ledger instead of rebuilding.")
def rollup(db: str | None, since_text: str | None, until_text: str | None, days: int | None, check: bool) -> None:
    """Re-derive the daily rollup from the raw ledger for a range of UTC days (idempotent).

    Without a range every day is rebuilt and the rollup is marked complete, so reports read it.
    Writers keep it current by themselves; run this after upgrading a ledger that already had
    calls, or nightly with --days 2 to repair anything a crashed writer left behind.
    """
    from collector.rollups import compare, rebuild
    from collector.store import LedgerStore

    if days is not None and (since_text or until_text):
        raise UsageError("give --days or --since/--until, not both")
    since = _day(since_text, "--since") if since_text else None
    until = _day(until_text, "--until") + timedelta(days=1) if until_text else None
    if days is not None:
        today = datetime.now(timezone.utc).date()
        since, until = today - timedelta(days=days - 1), today + timedelta(days=1)
    if since is not None and until is not None and until <= since:
        raise UsageError("--until is before --since")
    store = LedgerStore(db)
    try:
        if check:
            drifts = compare(store, since, until)
            if not drifts:
                click.echo("the rollup equals the raw ledger")
                return
            for drift in drifts[:20]:
                click.echo(f"differs: {drift.key}: rollup {drift.rollup} ledger {drift.ledger}")
            click.echo(f"{len(drifts)} group(s) differ; run `dsmeter rollup` over those days to repair them")
            click.get_current_context().exit(EXIT_DRIFT)
        result = rebuild(store, since, until)
    finally:
        store.close()
    click.echo(f"rebuilt {result.days} day(s), {result.rows} rollup row(s); "
               + ("reports read the rollup" if result.complete else
                  "not complete yet: run `dsmeter rollup` without a range once so reports use it"))
