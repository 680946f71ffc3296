"""``dsmeter budget``: monthly spending limits per tag scope, and the check a nightly job alerts on."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import click

from collector.commands.options import db_option

__all__ = ["budget"]

CHECK_EXIT_CODES = """\b
Exit codes:
  0  every budget is ok (or none is set)
  2  bad input
  3  the database is unavailable or not migrated
  4  a budget reached its soft threshold (spent >= soft x monthly) or its month-end forecast is over it
  5  a budget is exceeded (spent > monthly)
  6  the --notify webhook failed (the result was still printed)
"""

_tag_option = click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE",
                           help="The budget's scope: calls carrying this tag (repeatable; none = every call).")
_currency_option = click.option("--currency", default="USD", show_default=True, help="The budget's currency.")


@click.group(name="budget", epilog=CHECK_EXIT_CODES)
def budget() -> None:
    """Monthly budgets on the spend of a scope of calls (all calls, or calls with given tags)."""


@budget.command("set")
@db_option
@_tag_option
@click.option("--monthly", required=True, metavar="AMOUNT", help="The monthly limit, e.g. 500 (positive).")
@_currency_option
@click.option("--soft", default="0.8", show_default=True, metavar="FRACTION",
              help="Soft threshold as a fraction of the budget (0.8) or a percentage (80%).")
@click.option("--allow-new-tag", is_flag=True, help="Accept a tag key no call carries yet.")
def set_command(db: str | None, tags: tuple[str, ...], monthly: str, currency: str, soft: str,
                allow_new_tag: bool) -> None:
    """Create a budget, or change the amounts of the one for the same scope and currency."""
    from collector.budgets import parse_amount, parse_currency, parse_scope, parse_soft, scope_label, set_budget
    from collector.store import LedgerStore

    scope, amount, fraction, code = parse_scope(tags), parse_amount(monthly), parse_soft(soft), parse_currency(currency)
    store = LedgerStore(db)
    try:
        spec, created = set_budget(store, scope, amount, currency=code, soft=fraction, allow_new_tags=allow_new_tag)
    finally:
        store.close()
    click.echo(f"{'created' if created else 'updated'} budget for {scope_label(spec.scope)}: "
               f"{spec.monthly} {spec.currency} a month, soft threshold {spec.soft}")


@budget.command("list")
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_command(db: str | None, fmt: str) -> None:
    """Every budget."""
    from collector.budgets import list_budgets, scope_label
    from collector.commands.report import reading_ledger
    from collector.report_render import exact

    with reading_ledger(db) as store:
        specs = list_budgets(store.engine)
    if fmt == "json":
        click.echo(json.dumps([{"scope": s.scope, "currency": s.currency, "monthly": exact(s.monthly),
                                "soft": exact(s.soft)} for s in specs], indent=2, sort_keys=True))
        return
    if not specs:
        click.echo("no budgets (add one with `dsmeter budget set --tag team=search --monthly 500`)")
        return
    for s in specs:
        click.echo(f"{scope_label(s.scope)}\t{exact(s.monthly)} {s.currency}\tsoft {exact(s.soft)}")


@budget.command("remove")
@db_option
@_tag_option
@_currency_option
def remove_command(db: str | None, tags: tuple[str, ...], currency: str) -> None:
    """Delete the budget for a scope and currency."""
    from collector.budgets import parse_scope, remove_budget, scope_label
    from collector.store import LedgerStore

    scope = parse_scope(tags)
    store = LedgerStore(db)
    try:
        spec = remove_budget(store, scope, currency)
    finally:
        store.close()
    click.echo(f"removed the {spec.currency} budget for {scope_label(spec.scope)}")


@budget.command("check", epilog=CHECK_EXIT_CODES)
@db_option
@click.option("--date", "date_text", default=None, metavar="today|yesterday|YYYY-MM-DD",
              help="Judge as of the end of this day (in --tz). Default: now.")
@click.option("--tz", "tz", default=None, metavar="ZONE", help="IANA time zone for months and days. Default: UTC.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--notify", "notify_url", default=None, metavar="URL",
              help="POST the result (JSON with a Slack-compatible `text`) to this webhook when a budget is not ok.")
def check_command(db: str | None, date_text: str | None, tz: str | None, fmt: str, notify_url: str | None) -> None:
    """Each budget's spend this month, share and month-end forecast; the exit code says the worst state."""
    from collector.budgets import evaluate, exit_code_for, scope_label
    from collector.notify import check_webhook_url, post_webhook
    from collector.report_render import exact, money
    from collector.commands.report import reading_ledger
    from collector.reports import parse_date, parse_tz

    tz_name, zone = parse_tz(tz)
    now = datetime.now(timezone.utc)
    if date_text is None:
        as_of = now
    else:
        day = parse_date(date_text, now.astimezone(zone).date()) + timedelta(days=1)
        as_of = datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(timezone.utc)
    if notify_url is not None:
        check_webhook_url(notify_url)
    with reading_ledger(db) as store:
        statuses = evaluate(store.engine, as_of, tz=zone)
    rows = [{"scope": s.budget.scope, "currency": s.budget.currency, "monthly": exact(s.budget.monthly),
             "soft": exact(s.budget.soft), "spent": exact(s.month_to_date), "share": exact(s.share),
             "forecast": exact(s.forecast), "forecast_share": exact(s.forecast_share), "state": s.state,
             "reason": s.reason} for s in statuses]
    if fmt == "json":
        click.echo(json.dumps({"as_of": as_of.isoformat(), "budgets": rows}, indent=2, sort_keys=True))
    elif not statuses:
        click.echo("no budgets")
    else:
        for s in statuses:
            click.echo(f"{s.state.upper():9} {scope_label(s.budget.scope)}: spent {money(s.month_to_date, s.budget.currency)}"
                       f" of {money(s.budget.monthly, s.budget.currency)} ({exact((s.share * 100).normalize())}%),"
                       f" forecast {money(s.forecast, s.budget.currency)}")
    code = exit_code_for(statuses)
    if notify_url is not None and code:
        lines = [f"*dsmeter budgets as of {as_of.isoformat()}*"] + [
            f"{s.state.upper()}: {scope_label(s.budget.scope)}, {s.reason}" for s in statuses if s.state != "ok"]
        post_webhook(notify_url, {"text": "\n".join(lines), "as_of": as_of.isoformat(), "budgets": rows})
    if code:
        click.get_current_context().exit(code)
