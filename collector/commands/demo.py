"""``dsmeter demo``: real collected data in one command, no API key.

Starts the bundled simulator, drives a month of realistic traffic through the real
metering path (``metered_client`` → ledger writer → SQL) with a settable clock, and prints
what was recorded. By default the demo writes to its own ledger file, recreated on each
run, so demo traffic never mixes with a real ledger.
"""

from __future__ import annotations

import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import click

from collector.commands.options import db_option
from collector.config import data_dir, redact_url

__all__ = ["demo"]


def _demo_url(db: str | None) -> str:
    if db:
        return db
    path = Path(data_dir()) / "demo.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _fmt_int(value: int | None) -> str:
    return f"{value:,}" if value is not None else "-"


def _summarise(url: str) -> list[str]:
    from collector.queries import iter_export_rows
    from collector.store import LedgerStore

    store = LedgerStore(url)
    try:
        rows = list(iter_export_rows(store.engine, None, None))
    finally:
        store.close()
    by_status = Counter(row["status"] for row in rows)
    lines = [f"Recorded {len(rows):,} calls: " + ", ".join(f"{n:,} {s}" for s, n in by_status.most_common())]
    header = f"  {'model':<20}{'calls':>8}{'cache-hit':>14}{'cache-miss':>14}{'output':>12}{'reasoning':>12}{'cost':>14}"
    lines.append(header)
    models: dict[str, dict[str, int]] = {}
    costs: dict[str, tuple[Decimal, str]] = {}
    for row in rows:
        model = row["model"] or row["requested_model"] or "?"
        agg = models.setdefault(model, Counter())
        agg["calls"] += 1
        for bucket in ("prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens",
                       "reasoning_tokens"):
            agg[bucket] += row[bucket] or 0
        if row.get("cost") not in (None, ""):
            total, _ = costs.get(model, (Decimal(0), ""))
            costs[model] = (total + Decimal(str(row["cost"])), str(row.get("currency") or ""))
    for model, agg in sorted(models.items()):
        cost = costs.get(model)
        cost_text = f"{cost[0]:,.4f} {cost[1]}" if cost else "unpriced"
        lines.append(
            f"  {model:<20}{agg['calls']:>8,}{agg['prompt_cache_hit_tokens']:>14,}"
            f"{agg['prompt_cache_miss_tokens']:>14,}{agg['completion_tokens']:>12,}"
            f"{agg['reasoning_tokens']:>12,}{cost_text:>14}"
        )
    estimated = sum(1 for row in rows if row["usage_estimated"])
    lines.append(f"  {estimated:,} rows carry estimated tokens (calls that ended without usage).")
    return lines


@click.command()
@db_option
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 365),
              help="How many days of history to record (backfilled with a settable clock).")
@click.option("--calls-per-day", default=80, show_default=True, type=click.IntRange(1, 10_000),
              help="Average calls per day.")
@click.option("--seed", default=0, show_default=True, help="Seed for the workload and the simulator.")
@click.option("--no-dashboard", is_flag=True, help="Stop after recording instead of starting the dashboard.")
@click.option("--port", default=8501, show_default=True, type=click.IntRange(0, 65535),
              help="Port for the dashboard (bound to 127.0.0.1).")
def demo(db: str | None, days: int, calls_per_day: int, seed: int, no_dashboard: bool, port: int) -> None:
    """Meter a month of realistic traffic from the bundled simulator into a demo ledger.

    Flash and Pro, thinking and not, tool calls, cache hits from a shared system prompt,
    rate limits, server errors, disconnects and callers who hang up: every call goes
    through collector.metered_client exactly as in an application. Without --db the demo
    writes to its own ledger file (recreated each run), never to your real ledger. Then it
    starts the dashboard on that ledger (http://127.0.0.1:8501/) until Ctrl+C.
    """
    import collector
    from collector.simulator import Simulator
    from collector.workload import SettableClock, backfill_window, drive, plan_calls
    from collector.writer import LedgerWriter

    url = _demo_url(db)
    start, end = backfill_window(days)
    calls = plan_calls(days * calls_per_day, seed=seed, start=start, end=end)
    click.echo("DeepSeek Meter demo: no API key needed, the upstream is the bundled simulator.")
    click.echo(f"  ledger: {redact_url(url)}")
    began = time.monotonic()
    clock = SettableClock()
    with Simulator(seed=seed) as sim, LedgerWriter(url) as writer:
        click.echo(f"  simulator: {sim.base_url}")
        click.echo(f"  recording {len(calls):,} calls over {days} days ...")
        with collector.metered_client(sink=writer.submit, clock=clock) as client:
            outcomes = drive(client, sim.base_url, calls, clock)
        writer.flush()
    click.echo(f"  done in {time.monotonic() - began:.1f} s; the client saw: "
               + ", ".join(f"{n:,} {k}" for k, n in outcomes.most_common()))
    click.echo("")
    for line in _summarise(url):
        click.echo(line)
    click.echo("")
    # The same ledger for the next commands; a URL the user gave is shown without its password.
    db_flag = f" --db '{redact_url(url) if db else url}'"
    if no_dashboard:
        click.echo(f"Next: dsmeter dashboard{db_flag}, or dsmeter export --format csv{db_flag} | head")
        return
    from collector.commands.dashboard import run_dashboard

    click.echo(f"Also: dsmeter export --format csv{db_flag} | head")
    click.echo("")
    run_dashboard(url, port=port)
