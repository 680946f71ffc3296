"""``dsmeter reprice``: re-price stored calls after a correction to the price book, with an audit entry each."""

from __future__ import annotations

import sys
from decimal import Decimal

import click

from collector.commands.options import db_option
from collector.commands.pricing_cli import book_for, instant_text, money_text, prices_option
from collector.errors import UsageError

__all__ = ["reprice"]


@click.command(name="reprice")
@click.option("--since", metavar="DATE", required=True,
              help="First day (YYYY-MM-DD, UTC) or instant (ISO datetime) of the calls to re-price. Required.")
@click.option("--until", metavar="DATE", default=None,
              help="Last day (YYYY-MM-DD, UTC; inclusive) or instant (inclusive). Default: no end.")
@click.option("--dry-run", is_flag=True, default=False, help="Show what would change; write nothing.")
@prices_option
@db_option
def reprice(since: str, until: str | None, dry_run: bool, prices: str | None, db: str | None) -> None:
    """Re-price the calls started in a range with the price book as it is now.

    Prints the old and new totals and every call whose price changes; then (unless --dry-run)
    writes the new prices, each with an audit row (OS user, time, price book, old and new
    tariff and cost) in the reprice_audit table. Calls outside the range are never touched.
    Running it twice changes nothing the second time.
    """
    from collector.commands.export import parse_time_bound
    from collector.repricing import reprice as run
    from collector.store import LedgerStore

    start = parse_time_bound(since, option="--since", end=False)
    stop = parse_time_bound(until, option="--until", end=True) if until else None
    if stop is not None and start >= stop:
        raise UsageError(f"--since {since} is not before --until {until}")
    book = book_for(prices)
    store = LedgerStore(db, migrate=not dry_run)
    try:
        result = run(store, book, start, stop, dry_run=dry_run)
    finally:
        store.close()

    out = sys.stdout
    span = f"{instant_text(start)} to {instant_text(stop)}" if stop else f"{instant_text(start)} on"
    out.write(f"{'dry run: ' if dry_run else ''}reprice of calls started {span} with {result.price_book}\n")
    out.write(f"{result.calls:,} calls in range, {len(result.changes):,} with a new price\n")
    currencies = sorted(set(result.old_totals) | set(result.new_totals))
    for currency in currencies or [book.currency]:
        old = result.old_totals.get(currency)
        new = result.new_totals.get(currency)
        out.write(f"  total {currency}: old {money_text(old, currency, places=6) if old is not None else '-'}"
                  f"  new {money_text(new, currency, places=6) if new is not None else '-'}\n")
    out.write(f"  unpriced calls: old {result.old_unpriced:,}  new {result.new_unpriced:,}\n")
    for change in result.changes:
        out.write(
            f"{change.request_id}  {instant_text(change.started_at)}  {change.model or '-'}  "
            f"{change.old.tariff_id or '-'} -> {change.new.tariff_id or '-'}  "
            f"{_cost(change.old.cost, change.old.currency)} -> {_cost(change.new.cost, change.new.currency)}\n"
        )
    if dry_run:
        out.write("dry run: nothing written\n")
    else:
        out.write(f"written: {result.written:,} calls re-priced, audit run {result.run_id}\n")
        if result.rollup_days is not None:
            out.write(f"reporting rollup re-derived for {result.rollup_days} day(s)\n")


def _cost(value: Decimal | None, currency: str | None) -> str:
    from collector.commands.export import decimal_text

    return "unpriced" if value is None else f"{decimal_text(value)} {currency}"
