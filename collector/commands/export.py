"""``dsmeter export``: the ledger, one row per call, as JSON lines or CSV on stdout."""

from __future__ import annotations

import csv
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import IO, Any

import click

from collector.commands.options import db_option
from collector.errors import UsageError

__all__ = ["export", "parse_time_bound", "decimal_text"]

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_time_bound(text: str, *, option: str, end: bool) -> datetime:
    """``YYYY-MM-DD`` (a UTC day) or an ISO datetime (UTC unless it has an offset) as an aware UTC bound.

    A start bound is the first instant it names. An end bound (``end=True``) is exclusive and
    covers what it names: a day up to its end, a datetime up to and including that instant.
    """
    value = text.strip()
    if _DAY.fullmatch(value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise UsageError(f"{option} {text!r}: no such date") from None
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return start + timedelta(days=1) if end else start
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: expected a date YYYY-MM-DD or an ISO datetime such as 2026-03-01T12:00:00+08:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    moment = moment.astimezone(timezone.utc)
    return moment + timedelta(microseconds=1) if end else moment


def decimal_text(value: Decimal) -> str:
    """An exact Decimal in plain notation (never an exponent), without trailing zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _plain(value: Any) -> Any:
    """A JSON-ready value: exact strings for money, ISO 8601 UTC for times."""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return _plain(value)


def _write_jsonl(rows: Iterable[dict[str, Any]], out: IO[str], columns: tuple[str, ...]) -> None:
    del columns  # every row already has them, in order
    for row in rows:
        out.write(json.dumps({k: _plain(v) for k, v in row.items()}, ensure_ascii=False) + "\n")


def _write_csv(rows: Iterable[dict[str, Any]], out: IO[str], columns: tuple[str, ...]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in columns])


_WRITERS: dict[str, Callable[[Iterable[dict[str, Any]], IO[str], tuple[str, ...]], None]] = {
    "jsonl": _write_jsonl,
    "csv": _write_csv,
}


@click.command(name="export")
@click.option(
    "--format", "fmt", type=click.Choice(sorted(_WRITERS)), default="jsonl", show_default=True, help="Output format."
)
@click.option(
    "--since", metavar="DATE", default=None, help="First day (YYYY-MM-DD, UTC) or instant (ISO datetime) to include."
)
@click.option(
    "--until",
    metavar="DATE",
    default=None,
    help="Last day (YYYY-MM-DD, UTC; inclusive) or instant (ISO datetime; inclusive).",
)
@db_option
def export(fmt: str, since: str | None, until: str | None, db: str | None) -> None:
    """Print the ledger, one row per call, ordered by start time, to stdout.

    Money is exact (decimal strings); times are ISO 8601 UTC; unknown values are empty (CSV)
    or null (JSONL); tags are a JSON object. Reads only: never creates or migrates a database.
    """
    from sqlalchemy import exc

    from collector.queries import EXPORT_COLUMNS, iter_export_rows
    from collector.store import LedgerStore, is_operational_error

    start = parse_time_bound(since, option="--since", end=False) if since else None
    stop = parse_time_bound(until, option="--until", end=True) if until else None
    if start is not None and stop is not None and start >= stop:
        raise UsageError(f"--since {since} is not before --until {until}")

    store = LedgerStore(db, migrate=False)
    try:
        store.require_schema()
        out = sys.stdout  # looked up now: click's test runner swaps it
        try:
            _WRITERS[fmt](iter_export_rows(store.engine, start, stop), out, EXPORT_COLUMNS)
            out.flush()
        except exc.SQLAlchemyError as error:
            if is_operational_error(error):
                raise store.unavailable(error, "read") from None
            raise
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as Unix tools do, without a traceback
            # when Python flushes stdout at exit.
            _silence_stdout()
            raise SystemExit(141) from None
    finally:
        store.close()


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's buffer)
        pass
