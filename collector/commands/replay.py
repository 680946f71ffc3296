"""``dsmeter replay``: what recorded traffic would have cost on another model, tariff or schedule. Reads only."""

from __future__ import annotations

import csv
import json
import sys
from decimal import Decimal
from typing import IO, Any

import click

from collector.commands.options import db_option
from collector.commands.pricing_cli import (
    book_for,
    instant_text,
    money_text,
    parse_instant,
    parse_share,
    percent_text,
    prices_option,
)
from collector.errors import UsageError

__all__ = ["replay"]


@click.command(name="replay")
@click.option("--since", metavar="DATE", required=True, help="First day (YYYY-MM-DD, UTC) or instant. Required.")
@click.option("--until", metavar="DATE", required=True, help="Last day (YYYY-MM-DD, UTC; inclusive) or instant. Required.")
@click.option("--as-model", "as_model", metavar="MODEL", default=None,
              help="Price every call as this model. Default: the model each call used.")
@click.option("--as-of", "as_of", metavar="TIME", default=None,
              help="Use the tariffs in force at TIME (each call keeps its own hour and day for peak/off-peak). "
              "Default: each call's own time.")
@click.option("--shift-off-peak", metavar="0..1", default=None,
              help="Share of the calls made at peak hours to move off-peak (e.g. 1 = all batch jobs at night).")
@click.option("--currency", metavar="CODE", default=None, help="Currency (USD, CNY). Default: the book's.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="Output format.")
@prices_option
@db_option
def replay(since: str, until: str, as_model: str | None, as_of: str | None, shift_off_peak: str | None,
           currency: str | None, fmt: str, prices: str | None, db: str | None) -> None:
    """Re-price the recorded calls of a range under another model or tariff, without writing anything.

    Answers "what would last month have cost on Pro?" (--as-model deepseek-v4-pro) and "what if
    the batch jobs ran off-peak?" (--shift-off-peak 1): actual against projected cost per UTC
    day and in total. Actual counts the calls priced in the same currency; calls that cannot
    be priced are counted apart, never as 0.
    """
    from sqlalchemy import exc

    from collector.commands.export import parse_time_bound
    from collector.projection import compare_by_day, reprice_traffic
    from collector.queries import Filters, traffic_frame
    from collector.store import LedgerStore, is_operational_error

    start = parse_time_bound(since, option="--since", end=False)
    stop = parse_time_bound(until, option="--until", end=True)
    if start >= stop:
        raise UsageError(f"--since {since} is not before --until {until}")
    moment = parse_instant(as_of, option="--as-of") if as_of is not None else None
    shift = parse_share(shift_off_peak, option="--shift-off-peak") or Decimal(0)
    if currency is not None and (len(currency) != 3 or not currency.isalpha()):
        raise UsageError(f"--currency must be a 3-letter code such as USD or CNY, got {currency!r}")
    book = book_for(prices)
    wanted = currency.upper() if currency else book.currency
    if as_model is not None and not book.knows(as_model):
        raise UsageError(f"unknown model {as_model!r}: the price book has no tariff or alias for it")

    store = LedgerStore(db, migrate=False)
    try:
        store.require_schema()
        try:
            frame = traffic_frame(store.engine, Filters(since=start, until=stop))
        except exc.SQLAlchemyError as error:
            if is_operational_error(error):
                raise store.unavailable(error, "read") from None
            raise
    finally:
        store.close()
    repriced = reprice_traffic(frame, book, as_model=as_model, as_of=moment, shift_off_peak=shift, currency=wanted)
    summary = compare_by_day(repriced, wanted)
    scenario = {
        "since": start.isoformat(), "until": stop.isoformat(), "as_model": as_model,
        "as_of": moment.isoformat() if moment else None, "shift_off_peak": str(shift), "currency": wanted,
        "price_book": book.origin,
    }
    out = sys.stdout
    if fmt == "json":
        _json(out, summary, scenario)
    elif fmt == "csv":
        _csv(out, summary)
    else:
        described = [f"as {as_model}" if as_model else "as the models they used",
                     f"tariffs as of {instant_text(moment)}" if moment else "tariffs of each call's own time"]
        if shift:
            described.append(f"{percent_text(shift)} of peak calls moved off-peak")
        out.write(f"replay of calls started {instant_text(start)} to {instant_text(stop)}: {', '.join(described)}; "
                  f"{wanted}\n\n")
        _table(out, summary)


def _signed(value: Decimal, currency: str) -> str:
    text = money_text(value, currency)
    return text if text.startswith("-") else "+" + text


def _table(out: IO[str], summary: Any) -> None:
    currency = summary.currency
    header = ("day", "calls", "actual", "projected", "difference")
    rows = [
        (str(r.day), f"{r.calls:,}", money_text(r.actual_cost, currency), money_text(r.projected_cost, currency),
         _signed(r.difference, currency))
        for r in summary.days.itertuples()
    ]
    rows.append(("total", f"{summary.calls:,}", money_text(summary.actual_cost, currency),
                 money_text(summary.projected_cost, currency), _signed(summary.difference, currency)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        out.write("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]) + "\n")
    if summary.actual_cost > 0:
        ratio = (summary.projected_cost / summary.actual_cost).quantize(Decimal("0.01"))
        out.write(f"\nprojected / actual: {ratio}x\n")
    if summary.actual_unpriced_calls or summary.projected_unpriced_calls:
        out.write(f"unpriced calls (not in the totals): actual {summary.actual_unpriced_calls:,}, "
                  f"projected {summary.projected_unpriced_calls:,}\n")


def _exact(value: Decimal) -> str:
    from collector.commands.export import decimal_text

    return decimal_text(value)


def _json(out: IO[str], summary: Any, scenario: dict[str, Any]) -> None:
    document = {
        "scenario": scenario,
        "days": [
            {"day": str(r.day), "calls": r.calls, "actual_cost": _exact(r.actual_cost),
             "projected_cost": _exact(r.projected_cost), "difference": _exact(r.difference),
             "actual_unpriced_calls": r.actual_unpriced_calls, "projected_unpriced_calls": r.projected_unpriced_calls}
            for r in summary.days.itertuples()
        ],
        "total": {"calls": summary.calls, "actual_cost": _exact(summary.actual_cost),
                  "projected_cost": _exact(summary.projected_cost), "difference": _exact(summary.difference),
                  "actual_unpriced_calls": summary.actual_unpriced_calls,
                  "projected_unpriced_calls": summary.projected_unpriced_calls},
    }
    out.write(json.dumps(document, indent=2) + "\n")


def _csv(out: IO[str], summary: Any) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["day", "calls", "actual_cost", "projected_cost", "difference", "actual_unpriced_calls",
                     "projected_unpriced_calls"])
    for r in summary.days.itertuples():
        writer.writerow([str(r.day), r.calls, _exact(r.actual_cost), _exact(r.projected_cost), _exact(r.difference),
                         r.actual_unpriced_calls, r.projected_unpriced_calls])
    writer.writerow(["total", summary.calls, _exact(summary.actual_cost), _exact(summary.projected_cost),
                     _exact(summary.difference), summary.actual_unpriced_calls, summary.projected_unpriced_calls])
