"""``dsmeter estimate``: the what-if calculator. A workload in, its cost per model out, side by side."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import IO, Any

import click

from collector.commands.pricing_cli import (
    book_for,
    instant_text,
    money_text,
    parse_count,
    parse_instant,
    parse_share,
    percent_text,
    prices_option,
)
from collector.errors import UsageError

__all__ = ["estimate", "ratio_text"]


def ratio_text(total: Decimal, cheapest: Decimal) -> str:
    if cheapest <= 0:
        return "-"
    return f"{(total / cheapest).quantize(Decimal('0.01'), rounding=ROUND_HALF_UP)}x"


def _exact(value: Decimal | None) -> str | None:
    from collector.commands.export import decimal_text

    return None if value is None else decimal_text(value)


@click.command(name="estimate")
@click.option("--calls", metavar="N", default=None, help="Calls per month (or per any period you like). Required.")
@click.option("--cached-prompt-tokens", metavar="N", default=None,
              help="Prompt tokens per call that hit the context cache. Default 0.")
@click.option("--uncached-prompt-tokens", metavar="N", default=None,
              help="Prompt tokens per call that miss the cache. Default 0.")
@click.option("--output-tokens", metavar="N", default=None, help="Answer tokens per call. Default 0.")
@click.option("--reasoning-tokens", metavar="N", default=None,
              help="Reasoning (thinking) tokens per thinking call, billed as output. Default 0.")
@click.option("--thinking-share", metavar="0..1", default=None,
              help="Share of calls that think (get --reasoning-tokens). Default 1.")
@click.option("--cache-hit-share", metavar="0..1", default=None,
              help="Re-split each call's prompt (cached + uncached) into cache hits by this share.")
@click.option("--peak-share", metavar="0..1", default=None,
              help="Share of calls made in peak hours, where prices have peak and off-peak. "
              "Default: the share of the week's hours that are peak under that tariff.")
@click.option("--model", "models", metavar="MODEL", multiple=True,
              help="Model to price (repeatable). Default: every model with its own tariff at --at.")
@click.option("--at", "at_text", metavar="TIME", default=None,
              help="Price with the tariffs in force at TIME (YYYY-MM-DD = 00:00 UTC, or ISO datetime). Default: now.")
@click.option("--list-prices", is_flag=True, default=False,
              help="Use list prices where a promotion applied (the guide's figures); default: what was billed.")
@click.option("--currency", metavar="CODE", default=None, help="Currency (USD, CNY). Default: the book's.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True,
              help="Output format.")
@prices_option
def estimate(calls: str | None, cached_prompt_tokens: str | None, uncached_prompt_tokens: str | None,
             output_tokens: str | None, reasoning_tokens: str | None, thinking_share: str | None,
             cache_hit_share: str | None, peak_share: str | None, models: tuple[str, ...], at_text: str | None,
             list_prices: bool, currency: str | None, fmt: str, prices: str | None) -> None:
    """Estimate what a workload costs on each model, side by side, with the ratio to the cheapest.

    Example (the streaming guide's worked example, to the cent):

      dsmeter estimate --calls 1000000 --cached-prompt-tokens 2000 --uncached-prompt-tokens 200
      --output-tokens 300 --at 2026-04-25 --list-prices

    Without --list-prices the prices actually billed are used, and a promotion that applied
    is named. Money in json/csv is exact; the table rounds to cents.
    """
    from collector.projection import Workload
    from collector.projection import estimate as project

    workload = Workload(
        calls=parse_count(calls, option="--calls"),
        cached_prompt_tokens=parse_count(cached_prompt_tokens, option="--cached-prompt-tokens", default=0),
        uncached_prompt_tokens=parse_count(uncached_prompt_tokens, option="--uncached-prompt-tokens", default=0),
        output_tokens=parse_count(output_tokens, option="--output-tokens", default=0),
        reasoning_tokens=parse_count(reasoning_tokens, option="--reasoning-tokens", default=0),
        thinking_share=_or_one(parse_share(thinking_share, option="--thinking-share")),
        cache_hit_share=parse_share(cache_hit_share, option="--cache-hit-share"),
        peak_share=parse_share(peak_share, option="--peak-share"),
    )
    if currency is not None and (len(currency) != 3 or not currency.isalpha()):
        raise UsageError(f"--currency must be a 3-letter code such as USD or CNY, got {currency!r}")
    at = parse_instant(at_text, option="--at")
    book = book_for(prices)
    results = project(workload, book, list(models) or None, at,
                      currency=currency.upper() if currency else None, list_prices=list_prices)
    cheapest = min(r.total for r in results)
    out = sys.stdout
    if fmt == "json":
        _write_json(out, results, workload, at, list_prices, cheapest, book.origin)
    elif fmt == "csv":
        _write_csv(out, results, cheapest)
    else:
        _write_table(out, results, workload, at, list_prices, cheapest)


def _or_one(share: Decimal | None) -> Decimal:
    return Decimal(1) if share is None else share


def _tokens(value: Decimal) -> str:
    return f"{value:,}" if value == value.to_integral_value() else f"{value:,f}"


def _write_table(out: IO[str], results: list[Any], workload: Any, at: datetime, list_prices: bool,
                 cheapest: Decimal) -> None:
    currency = results[0].currency
    per_call = [
        f"{_tokens(Decimal(workload.cached_prompt_tokens))} cached + "
        f"{_tokens(Decimal(workload.uncached_prompt_tokens))} uncached prompt tokens",
        f"{_tokens(Decimal(workload.output_tokens))} output tokens",
    ]
    if workload.reasoning_tokens:
        per_call.append(f"{_tokens(Decimal(workload.reasoning_tokens))} reasoning tokens on "
                        f"{percent_text(Decimal(workload.thinking_share))} of calls")
    if workload.cache_hit_share is not None:
        per_call.append(f"cache-hit share {percent_text(Decimal(workload.cache_hit_share))}")
    out.write(f"{_tokens(Decimal(workload.calls))} calls; per call: {', '.join(per_call)}\n")
    basis = "list prices (promotions ignored)" if list_prices else "prices billed (promotions applied)"
    out.write(f"tariffs in force at {instant_text(at)}, {basis}, {currency}\n\n")

    headers = ("model", "cache hit", "cache miss", "output", "total", "ratio")
    rows = [
        (r.model, money_text(r.cache_hit, currency), money_text(r.cache_miss, currency),
         money_text(r.output, currency), money_text(r.total, currency), ratio_text(r.total, cheapest))
        for r in results
    ]
    widths = [max(len(str(row[i])) for row in (headers, *rows)) for i in range(len(headers))]
    for row in (headers, *rows):
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        out.write("  ".join(cells).rstrip() + "\n")
    out.write("\n")
    for r in results:
        out.write(f"{r.model}: {money_text(r.cache_hit, currency)} + {money_text(r.cache_miss, currency)} + "
                  f"{money_text(r.output, currency)} = {money_text(r.total, currency)}\n")
        name = f"{r.via} billed as {r.tariff.model}, " if r.via else ""
        periods = "; ".join(
            f"{p.tariff_id}" + (f" ({percent_text(p.share)} of calls)" if len(r.periods) > 1 else "")
            for p in r.periods
        )
        out.write(f"  {name}tariff {periods}\n")
        if r.promotion is not None:
            out.write(f"  promotion applied: {r.promotion} (at list prices: {money_text(r.list_total, currency)})\n")
        elif r.list_prices and r.tariff.promotion is not None:
            out.write(f"  list prices; billed instead under the promotion: {r.tariff.promotion}\n")


def _model_dict(r: Any, cheapest: Decimal) -> dict[str, Any]:
    return {
        "model": r.model,
        "billed_as": r.tariff.model,
        "currency": r.currency,
        "cache_hit": _exact(r.cache_hit),
        "cache_miss": _exact(r.cache_miss),
        "output": _exact(r.output),
        "total": _exact(r.total),
        "ratio_to_cheapest": None if cheapest <= 0 else _exact((r.total / cheapest).quantize(Decimal("0.0001"))),
        "tariff_entry": r.tariff.id,
        "periods": [
            {"period": p.period, "share": _exact(Decimal(p.share.numerator) / Decimal(p.share.denominator)),
             "tariff_id": p.tariff_id}
            for p in r.periods
        ],
        "list_prices": r.list_prices,
        "promotion": r.promotion,
        "list_total": _exact(r.list_total),
        "source": r.tariff.source,
    }


def _write_json(out: IO[str], results: list[Any], workload: Any, at: datetime, list_prices: bool,
                cheapest: Decimal, origin: str) -> None:
    document = {
        "at": at.astimezone(timezone.utc).isoformat(),
        "list_prices": list_prices,
        "price_book": origin,
        "workload": {
            "calls": _exact(Decimal(workload.calls)),
            "cached_prompt_tokens": _exact(Decimal(workload.cached_prompt_tokens)),
            "uncached_prompt_tokens": _exact(Decimal(workload.uncached_prompt_tokens)),
            "output_tokens": _exact(Decimal(workload.output_tokens)),
            "reasoning_tokens": _exact(Decimal(workload.reasoning_tokens)),
            "thinking_share": _exact(Decimal(workload.thinking_share)),
            "cache_hit_share": None if workload.cache_hit_share is None else _exact(Decimal(workload.cache_hit_share)),
            "peak_share": None if workload.peak_share is None else _exact(Decimal(workload.peak_share)),
        },
        "models": [_model_dict(r, cheapest) for r in results],
    }
    out.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")


_CSV_COLUMNS = ("model", "billed_as", "currency", "cache_hit", "cache_miss", "output", "total", "ratio_to_cheapest",
                "tariff_ids", "promotion", "list_total")


def _write_csv(out: IO[str], results: list[Any], cheapest: Decimal) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for r in results:
        row = _model_dict(r, cheapest)
        row["tariff_ids"] = " ".join(p["tariff_id"] for p in row["periods"])
        writer.writerow(["" if row[c] is None else row[c] for c in _CSV_COLUMNS])
