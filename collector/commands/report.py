"""``dsmeter report``: the nightly spend report (Markdown, CSV, JSON or self-contained HTML)."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import click

from collector.commands.options import db_option
from collector.errors import UsageError

if TYPE_CHECKING:
    from collector.store import LedgerStore

__all__ = ["report", "write_output", "reading_ledger"]

EXIT_CODES_HELP = """\b
Exit codes:
  0  report written; every budget ok (or none set)
  2  bad input (date, time zone, --group-by, a tag key no call carries, output path)
  3  the database is unavailable or not migrated
  4  report written; a budget reached its soft threshold or is forecast to exceed
  5  report written; a budget is exceeded
  6  report written, but the --notify webhook failed (takes precedence over 4 and 5)
"""


@contextmanager
def reading_ledger(db: str | None) -> Iterator[LedgerStore]:
    """A store on an existing ledger for a read-only command, without importing Alembic on the way.

    ``LedgerStore.require_schema`` imports Alembic, a third of a second of a report's start-up;
    so it runs only when something failed, to say why in one line (no ledger there, an empty
    database, an older schema: ``dsmeter db upgrade``). A missing SQLite file is never created.
    """
    from sqlalchemy import exc

    from collector.store import LedgerStore, is_operational_error

    store = LedgerStore(db, migrate=False)
    try:
        path = store.sqlite_path
        if path is not None and not path.exists():
            store.require_schema()  # raises "no ledger at ..."
        try:
            yield store
        except (exc.ProgrammingError, exc.OperationalError) as error:
            store.require_schema()  # a missing table or column: explains which upgrade is needed
            if is_operational_error(error):
                raise store.unavailable(error, "read") from None
            raise
    finally:
        store.close()


def write_output(text: str, output: Path | None) -> None:
    """Write ``text`` to ``output`` atomically (a reader never sees half a report), or to stdout."""
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    directory = output.resolve().parent
    if not directory.is_dir():
        raise UsageError(f"--output {output}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{output.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, output)
    except OSError as error:
        raise UsageError(f"--output {output}: {error.strerror or error}") from None


@click.command(name="report", epilog=EXIT_CODES_HELP)
@db_option
@click.option("--date", "date_text", default="yesterday", show_default=True, metavar="yesterday|today|YYYY-MM-DD",
              help="The (last) day the report covers, in --tz.")
@click.option("--period", type=click.Choice(["day", "week", "month"]), default="day", show_default=True,
              help="day: that day; week: the 7 days ending on it; month: its month up to it.")
@click.option("--tz", "tz", default=None, metavar="ZONE", help="IANA time zone for days and months. Default: UTC.")
@click.option("--group-by", "group_by", default=None, metavar="ITEMS",
              help="Breakdown, e.g. model,tag:team (items: model, status, key, user, tag:<key>; grouped jointly).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only calls carrying this tag (repeatable).")
@click.option("--top-by", default="key", show_default=True, metavar="ITEM",
              help="Top spenders by key (fingerprint), model, status, user (the body's `user` field) or tag:<key>.")
@click.option("--top", "top_limit", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="How many top spenders.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv", "json", "html"]), default="md", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report to FILE (atomically) instead of stdout.")
@click.option("--notify", "notify_url", default=None, metavar="URL",
              help="Also POST the report as JSON with a Slack-compatible `text` to this webhook.")
@click.option("--no-budgets", is_flag=True, help="Leave budgets out (and their exit codes).")
@click.option("--stamp", is_flag=True,
              help="Put a generated-at time in the header. Without it the same ledger gives the same bytes.")
def report(db: str | None, date_text: str, period: str, tz: str | None, group_by: str | None, tags: tuple[str, ...],
           top_by: str, top_limit: int, fmt: str, output: Path | None, notify_url: str | None, no_budgets: bool,
           stamp: bool) -> None:
    """Spend for a day, week or month: totals, breakdown, change, top spenders, month-end forecast, budgets.

    \b
    Nightly from cron (crontab syntax; see README):
    30 1 * * *  dsmeter report --date yesterday --format html --output /srv/reports/daily.html --notify "$WEBHOOK"
    """
    from collector.budgets import exit_code_for, parse_scope
    from collector.notify import check_webhook_url, post_webhook
    from collector.report_render import render, webhook_payload
    from collector.reports import build_report, parse_date, parse_group_by, parse_tz

    tz_name, zone = parse_tz(tz)
    day = parse_date(date_text, datetime.now(timezone.utc).astimezone(zone).date())
    scope = parse_scope(tags)
    if notify_url is not None:
        check_webhook_url(notify_url)
    parse_group_by(group_by)  # syntax first, before touching the database
    parse_group_by(top_by)
    with reading_ledger(db) as store:
        engine = store.engine
        items = parse_group_by(group_by, engine)
        top_items = parse_group_by(top_by, engine)
        if len(top_items) != 1:
            raise UsageError("--top-by takes one item")
        built = build_report(engine, day=day, period=period, tz=tz, group_by=items, tags=scope, top_by=top_items[0],
                             top_limit=top_limit, with_budgets=not no_budgets,
                             generated_at=datetime.now(timezone.utc).replace(microsecond=0) if stamp else None)
    if built.source == "ledger" and tz_name == "UTC":
        click.echo("dsmeter: the rollup is not built for this ledger, so the raw ledger was read "
                   "(run `dsmeter rollup` once to make reports fast)", err=True)
    write_output(render(built, fmt), output)
    if notify_url is not None:
        post_webhook(notify_url, webhook_payload(built))
    code = exit_code_for(built.budgets)
    if code:
        click.get_current_context().exit(code)
