"""``dsmeter reconcile``: the provider's balance drop against the ledger's spend."""

from __future__ import annotations

import json
import os

import click

from collector.commands.options import db_option
from collector.errors import UsageError

__all__ = ["reconcile"]

EXIT_DRIFT = 4  # --max-drift given and the drift is larger

RECONCILE_EXIT_CODES = """\b
Exit codes:
  0  snapshot stored and compared (or the first snapshot: nothing to compare yet)
  2  bad input (no key in the environment variable, a bad --upstream or --since)
  3  the database is unavailable
  4  --max-drift given and the drift is larger (in percent of the provider's usage)
  6  the API could not be reached, refused the key, or answered something else
"""


@click.command(name="reconcile", epilog=RECONCILE_EXIT_CODES)
@db_option
@click.option("--upstream", default="https://api.deepseek.com", show_default=True, metavar="URL",
              help="The API whose GET /user/balance is read.")
@click.option("--api-key-env", default="DEEPSEEK_API_KEY", show_default=True, metavar="NAME",
              help="Environment variable holding the API key (the key is never printed or stored).")
@click.option("--since", "since_text", default=None, metavar="YYYY-MM-DD|ISO",
              help="Reconcile every snapshot since then. Default: since the previous snapshot.")
@click.option("--this-key-only", is_flag=True,
              help="Compare with calls made with this key only (default: every call; the balance is the account's).")
@click.option("--max-drift", type=click.FloatRange(0), default=None, metavar="PERCENT",
              help="Exit 4 when |drift| exceeds this percentage of the provider's usage.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
def reconcile(db: str | None, upstream: str, api_key_env: str, since_text: str | None, this_key_only: bool,
              max_drift: float | None, fmt: str) -> None:
    """Store a dated /user/balance snapshot and compare the balance drop with the ledger, per currency.

    Top-ups show as jumps and are reported, never counted as negative spend.
    """
    from decimal import Decimal

    from collector.commands.export import parse_time_bound
    from collector.fingerprint import key_fingerprint
    from collector.reconcile import reconcile as run, upstream_origin
    from collector.report_render import exact, money
    from collector.store import LedgerStore

    origin = upstream_origin(upstream)
    api_key = os.environ.get(api_key_env, "").strip()
    if not api_key:
        raise UsageError(f"no API key: set the environment variable {api_key_env} (or name another with --api-key-env)")
    since = parse_time_bound(since_text, option="--since", end=False) if since_text else None
    fingerprints = (key_fingerprint(api_key),) if this_key_only else ()
    store = LedgerStore(db)
    try:
        result = run(store, origin, api_key, since=since, key_fingerprints=fingerprints)
    finally:
        store.close()
    if fmt == "json":
        click.echo(json.dumps({
            "upstream": result.upstream,
            "taken_at": result.reading.taken_at.isoformat(),
            "is_available": result.reading.is_available,
            "balances": [{"currency": b.currency, "total": exact(b.total),
                          "granted": None if b.granted is None else exact(b.granted),
                          "topped_up": None if b.topped_up is None else exact(b.topped_up)}
                         for b in result.reading.balances],
            "currencies": [{
                "currency": c.currency, "provider_usage": exact(c.provider_usage), "ledger_spend": exact(c.ledger_spend),
                "drift": exact(c.drift), "drift_percent": None if c.drift_percent is None else exact(c.drift_percent),
                "top_ups": exact(c.top_ups), "unmeasured_windows": c.unmeasured_windows,
                "windows": [{"start": w.start.isoformat(), "end": w.end.isoformat(),
                             "balance_before": exact(w.balance_before), "balance_after": exact(w.balance_after),
                             "ledger_spend": exact(w.ledger_spend),
                             "provider_usage": None if w.provider_usage is None else exact(w.provider_usage),
                             "top_up": exact(w.top_up), "exact_top_up": w.exact_top_up} for w in c.windows],
            } for c in result.currencies],
        }, indent=2, sort_keys=True))
    else:
        click.echo(f"{result.upstream} at {result.reading.taken_at.isoformat()}: "
                   + ", ".join(money(b.total, b.currency) for b in result.reading.balances)
                   + ("" if result.reading.is_available else " (not available: balance too low)"))
        for c in result.currencies:
            if not c.windows:
                click.echo(f"{c.currency}: first snapshot; run again later to compare")
                continue
            percent = "n/a" if c.drift_percent is None else f"{c.drift_percent:+}%"
            click.echo(f"{c.currency}: provider usage {money(c.provider_usage, c.currency)}, "
                       f"ledger {money(c.ledger_spend, c.currency)}, drift {money(c.drift, c.currency)} ({percent})")
            for w in c.windows:
                if w.top_up:
                    how = "exactly" if w.exact_top_up else "implied by the ledger; usage in this window not measured"
                    click.echo(f"  top-up of {money(w.top_up, c.currency)} between {w.start.isoformat()} and "
                               f"{w.end.isoformat()} ({how})")
    if max_drift is not None:
        limit = Decimal(str(max_drift))
        if any(c.drift_percent is not None and abs(c.drift_percent) > limit for c in result.currencies):
            click.get_current_context().exit(EXIT_DRIFT)
