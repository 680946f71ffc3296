"""``dsmeter prices``: show the tariff in force, or check a price book."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import IO

import click

from collector.commands.pricing_cli import book_for, instant_text, parse_instant, percent_text, prices_option
from collector.errors import UsageError
from collector.pricebook import Alias, PriceBook, Tariff, check_book
from collector.timeofuse import Schedule

__all__ = ["prices", "EXIT_BOOK_INVALID"]

EXIT_BOOK_INVALID = 1  # `prices check` found problems (each printed with its file and line)


@click.group(name="prices")
def prices() -> None:
    """The price book: what each model costs when, and where that comes from.

    The book is --prices FILE, else $DSMETER_PRICES, else the one shipped with dsmeter.
    """


@prices.command("show")
@click.option("--at", "at_text", metavar="TIME", default=None,
              help="Show the tariffs in force at TIME (YYYY-MM-DD = 00:00 UTC, or ISO datetime). Default: now.")
@click.option("--model", "model", metavar="MODEL", default=None,
              help="Only this model (an alias shows what it is billed as).")
@prices_option
def show_command(at_text: str | None, model: str | None, prices: str | None) -> None:
    """Show the tariffs in force (prices per period and currency, schedule, source, notes) and aliases."""
    at = parse_instant(at_text, option="--at")
    book = book_for(prices)
    out = sys.stdout
    out.write(f"price book: {book.name}\n  from {book.origin}\n")
    out.write(f"  priced in {book.currency} by each call's {book.price_at}; "
              f"currencies known: {', '.join(book.currencies) or 'none'}\n")
    out.write(f"in force at {instant_text(at)}:\n")
    if model is not None:
        _show_model(out, book, model, at)
        return
    models = sorted({t.model for t in book.tariffs if t.covers(at)})
    shown = 0
    for name in models:
        for tariff in _in_force(book, name, at):
            _write_tariff(out, tariff, at)
            shown += 1
    if not shown:
        first = book.first_start
        hint = f" (the book starts at {instant_text(first)})" if first is not None and at < first else ""
        raise UsageError(f"no tariff is in force at {instant_text(at)}{hint}")
    aliases = book.aliases_at(at)
    if aliases:
        out.write("\naliases in force:\n")
        for alias in aliases:
            _write_alias(out, alias)


def _in_force(book: PriceBook, model: str, at: datetime) -> list[Tariff]:
    """The entries pricing ``model`` at ``at``: one per currency layer, highest layer first."""
    found: list[Tariff] = []
    covered: set[str] = set()
    for tariff in sorted((t for t in book.tariffs if t.model == model and t.covers(at)), key=lambda t: t.layer):
        new = set(tariff.currencies) - covered
        if new:
            found.append(tariff)
            covered |= new
    return found


def _show_model(out: IO[str], book: PriceBook, model: str, at: datetime) -> None:
    resolution = book.resolve(model, at)
    if resolution is None:
        if not book.knows(model):
            raise UsageError(f"unknown model {model!r}: the price book has no tariff or alias for it")
        raise UsageError(f"{model} has no {book.currency} tariff at {instant_text(at)}")
    for alias in resolution.aliases:
        out.write("\n")
        _write_alias(out, alias)
    for tariff in _in_force(book, resolution.tariff.model, at):
        _write_tariff(out, tariff, at)


def _write_alias(out: IO[str], alias: Alias) -> None:
    out.write(f"  {alias.name} -> billed as {alias.model}, from {instant_text(alias.start)} "
              f"to {instant_text(alias.end)}\n    source: {alias.source}\n")
    if alias.note:
        out.write(f"    note: {_one_line(alias.note)}\n")


def _write_tariff(out: IO[str], tariff: Tariff, at: datetime) -> None:
    out.write(f"\n{tariff.model}  [{tariff.id}]  from {instant_text(tariff.start)} to {instant_text(tariff.end)}\n")
    if tariff.schedule is not None:
        out.write(_describe_schedule(tariff.schedule))
    period_now = tariff.period_at(at)
    unit = f"per {tariff.per_tokens:,} tokens"
    header = ("period", "currency", "cache hit", "cache miss", "output")
    rows: list[tuple[str, ...]] = []
    for period in tariff.periods:
        for currency in tariff.currencies:
            rates = tariff.rates(period, currency)
            if rates is None:
                continue
            mark = " *" if period == period_now else ""
            rows.append((period + mark, currency, str(rates.hit), str(rates.miss), str(rates.output)))
            if tariff.list_prices is not None:
                listed = tariff.rates(period, currency, list_prices=True)
                if listed is not None:
                    rows.append(("  list", currency, str(listed.hit), str(listed.miss), str(listed.output)))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    out.write(f"  prices {unit} (* = the period at that instant):\n")
    for row in (header, *rows):
        out.write("    " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                  .rstrip() + "\n")
    if tariff.promotion:
        out.write(f"  promotion: {tariff.promotion}\n")
    out.write(f"  source: {_one_line(tariff.source)}\n")
    if tariff.note:
        out.write(f"  note: {_one_line(tariff.note)}\n")
    out.write(f"  defined at {tariff.location}\n")


def _describe_schedule(schedule: Schedule) -> str:
    windows = "; ".join(w.describe() for w in schedule.windows)
    shares = ", ".join(f"{p} {percent_text(s)}" for p, s in schedule.week_shares().items())
    text = f"  time of use ({schedule.name}, {schedule.time_zone}): {windows}; otherwise {schedule.default}\n"
    text += f"    share of a plain week's hours: {shares}\n"
    if schedule.calendar is not None:
        calendar = schedule.calendar
        years = ", ".join(str(y) for y in calendar.years) or "undated"
        text += f"    holidays ({calendar.name}, {years}): only {schedule.default} applies on them\n"
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


@prices.command("check")
@click.argument("file", required=False, metavar="[FILE]")
@prices_option
def check_command(file: str | None, prices: str | None) -> None:
    """Validate a price book and say exactly what is wrong and where (file:line: entry: problem).

    FILE defaults to the book in effect (--prices, $DSMETER_PRICES, or the shipped book).
    Exit codes: 0 the book is valid; 1 it has problems (all listed on stderr); 2 bad usage.
    """
    book, problems = check_book(file or prices)
    if problems:
        for problem in problems:
            click.echo(str(problem), err=True)
        click.echo(f"dsmeter: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the price book", err=True)
        raise SystemExit(EXIT_BOOK_INVALID)
    assert book is not None
    models = sorted({t.model for t in book.tariffs})
    click.echo(f"ok: {book.origin}: {len(book.tariffs)} tariffs for {len(models)} models, {len(book.aliases)} aliases, "
               f"{len(book.schedules)} schedules, {len(book.calendars)} calendars")
