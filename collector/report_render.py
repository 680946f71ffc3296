"""Render a ``Report`` as Markdown, CSV, JSON or one self-contained HTML page. Pure: text in, text out.

Deterministic: the same report gives the same bytes (fixed order everywhere, no clock). The
only varying field is ``generated_at``, present only when the report carries one, and then
only in the header (the first lines of Markdown and CSV, a top-level JSON key, the HTML
header).

Money: JSON and CSV carry exact decimal strings (what the ledger holds); Markdown, HTML and
the webhook text show 2 decimal places, or 6 for a non-zero amount under 1.
The HTML page has inline CSS and inline SVG charts; it fetches nothing, so it works offline
and inside a mail.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from html import escape
from typing import Any

from collector.budgets import BudgetStatus, scope_label
from collector.queries import Totals
from collector.reports import Period, Report, change_percent

__all__ = ["FORMATS", "render", "render_markdown", "render_csv", "render_json", "render_html", "report_dict",
           "slack_text", "webhook_payload", "exact", "money"]

FORMATS: tuple[str, ...] = ("md", "csv", "json", "html")
_TOKEN_LABELS = {"cache_hit": "cache-hit input", "cache_miss": "cache-miss input", "output": "output",
                 "reasoning": "of which reasoning"}


# -- numbers ---------------------------------------------------------------------------------------


def exact(value: Decimal) -> str:
    """A Decimal as plain text without exponent or trailing zeros (``0.000123``, ``12``)."""
    if value == 0:
        return "0"
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def money(value: Decimal, currency: str | None) -> str:
    """``12.34 USD``; 6 places for a non-zero amount under 1 (``0.000123 USD``)."""
    places = Decimal("0.01") if value == 0 or abs(value) >= Decimal("0.995") else Decimal("0.000001")
    amount = value.quantize(places, ROUND_HALF_EVEN)
    text = f"{amount:,}"
    return f"{text} {currency}" if currency else text


def _int(value: int) -> str:
    return f"{value:,}"


def _pct(value: Decimal | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+}%"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}%"


def _share(value: Decimal) -> str:
    return f"{(value * 100).quantize(Decimal('0.1'), ROUND_HALF_EVEN)}%"


def _group(value: str | None) -> str:
    return "(none)" if value is None else value


def _currencies(report: Report) -> list[str]:
    return sorted(set(report.totals.cost) | set(report.previous_totals.cost))


def _period_text(period: Period) -> str:
    return period.label + ("" if period.tz == "UTC" else f" ({period.tz})")


# -- a flat list of the headline figures, shared by every format -----------------------------------


def _headline(report: Report) -> list[tuple[str, str | None, Any, Any]]:
    """(metric, currency, this period, previous period): the totals table, in a fixed order."""
    now, before = report.totals, report.previous_totals
    rows: list[tuple[str, str | None, Any, Any]] = [
        ("calls", None, now.calls, before.calls),
        ("errors", None, now.errors, before.errors),
        ("cancels", None, now.cancels, before.cancels),
    ]
    for status in sorted(set(now.statuses) | set(before.statuses)):
        if status not in ("error", "cancelled"):
            rows.append((f"status {status}", None, now.statuses.get(status, 0), before.statuses.get(status, 0)))
    rows.append(("unpriced calls", None, now.unpriced_calls, before.unpriced_calls))
    rows.append(("estimated-usage calls", None, now.estimated_calls, before.estimated_calls))
    for bucket in ("cache_hit", "cache_miss", "output", "reasoning"):
        rows.append((f"tokens {_TOKEN_LABELS[bucket]}", None, now.tokens[bucket], before.tokens[bucket]))
    rows.append(("cache-hit ratio", None, now.cache_hit_ratio, before.cache_hit_ratio))
    zero = Decimal(0)
    for currency in _currencies(report):
        a, b = now.cost.get(currency), before.cost.get(currency)
        rows.append(("cost", currency, a.total if a else zero, b.total if b else zero))
        for bucket in ("cache_hit", "cache_miss", "output"):
            rows.append((f"cost {_TOKEN_LABELS[bucket]}", currency, getattr(a, bucket) if a else zero,
                         getattr(b, bucket) if b else zero))
        rows.append(("saved by the cache", currency, now.cache_saved.get(currency, zero),
                     before.cache_saved.get(currency, zero)))
    return rows


def _cell(value: Any, currency: str | None, *, exact_money: bool) -> str:
    if value is None:
        return "n/a" if not exact_money else ""
    if isinstance(value, float):
        return _ratio(value) if not exact_money else repr(round(value, 6))
    if isinstance(value, Decimal):
        return exact(value) if exact_money else money(value, currency)
    if isinstance(value, int):
        return str(value) if exact_money else _int(value)
    return str(value)


def _change(now: Any, before: Any) -> str:
    if isinstance(now, float) or now is None or before is None or isinstance(before, float):
        if isinstance(now, float) and isinstance(before, float):
            return f"{(now - before) * 100:+.1f} pts"
        return "n/a"
    return _pct(change_percent(Decimal(now), Decimal(before)))


# -- Markdown --------------------------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join(" --- " for _ in header) + "|"]
    out.extend(line(row) for row in rows)
    return out


def _budget_rows(statuses: Sequence[BudgetStatus]) -> list[list[str]]:
    return [
        [scope_label(s.budget.scope), money(s.budget.monthly, s.budget.currency),
         money(s.month_to_date, s.budget.currency), _share(s.share), money(s.forecast, s.budget.currency),
         _share(s.forecast_share), s.state]
        for s in statuses
    ]


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    if report.generated_at is not None:
        lines += [f"Generated at: {report.generated_at.isoformat()}", ""]
    lines.append(f"Period: {_period_text(report.period)}; compared with {_period_text(report.previous)}.")
    if report.filters:
        lines.append(f"Calls tagged {scope_label(report.filters)} only.")
    lines += ["", "## Totals", ""]
    lines += _md_table(
        ["", "this period", "previous period", "change"],
        [[name + (f" ({currency})" if currency else ""), _cell(now, currency, exact_money=False),
          _cell(before, currency, exact_money=False), _change(now, before)]
         for name, currency, now, before in _headline(report)],
    )
    lines += ["", "## Month to date", ""]
    if report.month:
        lines += _md_table(
            ["currency", "month to date", f"run rate per day ({report.month[0].run_rate_days} days)",
             "forecast for the month"],
            [[m.currency, money(m.month_to_date, m.currency), money(m.run_rate, m.currency),
              money(m.forecast, m.currency)] for m in report.month],
        )
    else:
        lines.append("No spend this month.")
    if report.budgets:
        lines += ["", "## Budgets", ""]
        lines += _md_table(["scope", "budget", "spent", "share", "forecast", "forecast share", "state"],
                           _budget_rows(report.budgets))
    if report.group_by:
        lines += ["", f"## Breakdown by {', '.join(report.group_by)}", ""]
        lines += _md_table(
            [*report.group_by, "currency", "calls", "cost", "previous", "change"],
            [[*(_group(g) for g in row.groups), row.currency or "(unpriced)", _int(row.calls),
              money(row.cost, row.currency), money(row.previous_cost, row.currency), _pct(row.change_percent)]
             for row in report.breakdown],
        ) if report.breakdown else ["No calls."]
    lines += ["", f"## Top spenders by {report.top_by}", ""]
    lines += _md_table(
        [report.top_by, "currency", "calls", "cost", "share"],
        [[_group(t.group), t.currency, _int(t.calls), money(t.cost, t.currency), _share(t.share)]
         for t in report.top_spenders],
    ) if report.top_spenders else ["No priced calls."]
    lines += ["", "## Daily spend", ""]
    lines += _md_table(
        ["day", "currency", "calls", "cost"],
        [[d.day.isoformat(), d.currency, _int(d.calls), money(d.cost, d.currency)] for d in report.daily],
    ) if report.daily else ["No priced calls."]
    return "\n".join(lines) + "\n"


# -- CSV -------------------------------------------------------------------------------------------


def render_csv(report: Report) -> str:
    """Long format: ``section,item,group,currency,metric,value``; exact values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "item", "group", "currency", "metric", "value"])
    if report.generated_at is not None:
        writer.writerow(["header", "generated_at", "", "", "", report.generated_at.isoformat()])
    for name, period in (("period", report.period), ("previous", report.previous)):
        writer.writerow(["header", name, "", "", "first", period.first.isoformat()])
        writer.writerow(["header", name, "", "", "last", period.last.isoformat()])
        writer.writerow(["header", name, "", "", "tz", period.tz])
    for key, value in report.filters.items():
        writer.writerow(["header", "tag filter", key, "", "", value])
    for name, currency, now, before in _headline(report):
        writer.writerow(["totals", name, "", currency or "", "this period", _cell(now, currency, exact_money=True)])
        writer.writerow(["totals", name, "", currency or "", "previous period",
                         _cell(before, currency, exact_money=True)])
    for m in report.month:
        for metric, amount in (("month to date", m.month_to_date), ("run rate per day", m.run_rate),
                               ("forecast", m.forecast)):
            writer.writerow(["month", m.month_start.date().isoformat(), "", m.currency, metric, exact(amount)])
    for s in report.budgets:
        label = scope_label(s.budget.scope)
        for metric, value in (("budget", exact(s.budget.monthly)), ("spent", exact(s.month_to_date)),
                              ("share", exact(s.share)), ("forecast", exact(s.forecast)), ("state", s.state)):
            writer.writerow(["budget", label, "", s.budget.currency, metric, value])
    for row in report.breakdown:
        group = ",".join(f"{k}={_group(v)}" for k, v in zip(report.group_by, row.groups))
        for metric, text in (("calls", str(row.calls)), *((f"tokens {b}", str(v)) for b, v in row.tokens.items()),
                             ("cost", exact(row.cost)), ("previous cost", exact(row.previous_cost))):
            writer.writerow(["breakdown", ",".join(report.group_by), group, row.currency or "", metric, text])
    for t in report.top_spenders:
        for metric, text in (("calls", str(t.calls)), ("cost", exact(t.cost)), ("share", exact(t.share))):
            writer.writerow(["top", report.top_by, _group(t.group), t.currency, metric, text])
    for d in report.daily:
        writer.writerow(["daily", d.day.isoformat(), "", d.currency, "calls", str(d.calls)])
        writer.writerow(["daily", d.day.isoformat(), "", d.currency, "cost", exact(d.cost)])
    return buffer.getvalue()


# -- JSON ------------------------------------------------------------------------------------------


def _json_totals(t: Totals) -> dict[str, Any]:
    return {
        "calls": t.calls,
        "statuses": dict(t.statuses),
        "errors": t.errors,
        "cancels": t.cancels,
        "unpriced_calls": t.unpriced_calls,
        "estimated_calls": t.estimated_calls,
        "tokens": dict(t.tokens),
        "cache_hit_ratio": None if t.cache_hit_ratio is None else round(t.cache_hit_ratio, 6),
        "cost": {c: {"total": exact(v.total), "cache_hit": exact(v.cache_hit), "cache_miss": exact(v.cache_miss),
                     "output": exact(v.output)} for c, v in sorted(t.cost.items())},
        "cache_saved": {c: exact(v) for c, v in sorted(t.cache_saved.items())},
    }


def _json_period(p: Period) -> dict[str, Any]:
    return {"kind": p.kind, "first": p.first.isoformat(), "last": p.last.isoformat(), "tz": p.tz,
            "since": p.since.isoformat(), "until": p.until.isoformat()}


def report_dict(report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {
        "title": report.title,
        "period": _json_period(report.period),
        "previous_period": _json_period(report.previous),
        "filters": {"tags": dict(report.filters)},
        "totals": _json_totals(report.totals),
        "previous_totals": _json_totals(report.previous_totals),
        "month": [{"currency": m.currency, "month_start": m.month_start.isoformat(),
                   "month_end": m.month_end.isoformat(), "as_of": m.as_of.isoformat(),
                   "month_to_date": exact(m.month_to_date), "run_rate_per_day": exact(m.run_rate),
                   "run_rate_days": m.run_rate_days, "forecast": exact(m.forecast)} for m in report.month],
        "budgets": [{"scope": dict(s.budget.scope), "currency": s.budget.currency, "monthly": exact(s.budget.monthly),
                     "soft": exact(s.budget.soft), "spent": exact(s.month_to_date), "share": exact(s.share),
                     "forecast": exact(s.forecast), "forecast_share": exact(s.forecast_share), "state": s.state,
                     "reason": s.reason} for s in report.budgets],
        "breakdown": {
            "by": list(report.group_by),
            "rows": [{"groups": dict(zip(report.group_by, row.groups)), "currency": row.currency, "calls": row.calls,
                      "tokens": dict(row.tokens), "cost": exact(row.cost), "previous_cost": exact(row.previous_cost),
                      "change": exact(row.change),
                      "change_percent": None if row.change_percent is None else exact(row.change_percent)}
                     for row in report.breakdown],
        },
        "top_spenders": {"by": report.top_by, "rows": [
            {"group": t.group, "currency": t.currency, "calls": t.calls, "cost": exact(t.cost), "share": exact(t.share)}
            for t in report.top_spenders]},
        "daily": [{"day": d.day.isoformat(), "currency": d.currency, "calls": d.calls, "cost": exact(d.cost)}
                  for d in report.daily],
    }
    if report.generated_at is not None:
        out["generated_at"] = report.generated_at.isoformat()
    return out


def render_json(report: Report) -> str:
    return json.dumps(report_dict(report), ensure_ascii=False, indent=2, sort_keys=True) + "\n"


# -- HTML ------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;margin:0;background:#f5f6f8}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #d9dce3;padding-bottom:4px}
.meta{color:#5b6270;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d9dce3;border-radius:6px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:18px}.card span{color:#5b6270;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d9dce3}
th,td{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f5;font-weight:600}
.ok{color:#1a7f37}.soft{color:#9a6700}.exceeded{color:#cf222e;font-weight:600}
svg{background:#fff;border:1px solid #d9dce3;border-radius:6px;max-width:100%;height:auto}
svg text{font:11px sans-serif;fill:#5b6270}
""".strip()


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _bars_svg(title: str, labels: Sequence[str], values: Sequence[Decimal], currency: str) -> str:
    """A vertical bar chart (one bar per label), drawn as inline SVG."""
    width, height, left, bottom, top = 940, 240, 70, 40, 24
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max(values, default=Decimal(0))
    n = max(len(values), 1)
    step = plot_w / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">', f'<text x="{left}" y="16">{escape(title)}</text>']
    for fraction in (Decimal(0), Decimal("0.5"), Decimal(1)):
        y = top + plot_h - float(fraction) * plot_h
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#eceef2"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(money(peak * fraction, None))}'
                     f'</text>')
    label_every = max(1, n // 16)
    for i, (label, value) in enumerate(zip(labels, values)):
        h = float(value / peak) * plot_h if peak > 0 else 0.0
        x = left + i * step + step * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" '
                     f'fill="#3b6fd8"><title>{escape(label)}: {escape(money(value, currency))}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + step * 0.35:.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                         f'{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _hbars_svg(title: str, labels: Sequence[str], values: Sequence[Decimal], currency: str) -> str:
    """Horizontal bars (breakdowns, top spenders), longest first as given."""
    row_h, left, width = 22, 260, 940
    height = 30 + row_h * max(len(values), 1)
    peak = max(values, default=Decimal(0))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">', f'<text x="8" y="16">{escape(title)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 26 + i * row_h
        w = float(value / peak) * (width - left - 140) if peak > 0 else 0.0
        short = label if len(label) <= 40 else label[:39] + "\u2026"
        parts.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end">{escape(short)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="#3b6fd8"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 14}">{escape(money(value, currency))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    now = report.totals
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{escape(report.title)}</title>"]
    if report.generated_at is not None:
        out.append(f'<meta name="generated-at" content="{escape(report.generated_at.isoformat())}">')
    out += [f"<style>{_CSS}</style></head><body><main>", f"<h1>{escape(report.title)}</h1>"]
    meta = f"Period {_period_text(report.period)}, compared with {_period_text(report.previous)}."
    if report.filters:
        meta += f" Calls tagged {scope_label(report.filters)} only."
    if report.generated_at is not None:
        meta += f" Generated at {report.generated_at.isoformat()}."
    out.append(f'<p class="meta">{escape(meta)}</p>')
    cards = []
    for currency in _currencies(report):
        cost = now.cost.get(currency)
        total = cost.total if cost else Decimal(0)
        before = report.previous_totals.cost.get(currency)
        change = _pct(change_percent(total, before.total if before else Decimal(0)))
        cards.append((money(total, currency), f"spent ({change} vs previous)"))
        cards.append((money(now.cache_saved.get(currency, Decimal(0)), currency), "saved by the cache"))
    cards += [(_int(now.calls), "calls"), (_int(now.errors), "errors"), (_int(now.cancels), "cancelled"),
              (_ratio(now.cache_hit_ratio), "cache-hit ratio")]
    for m in report.month:
        cards.append((money(m.forecast, m.currency), f"month-end forecast ({money(m.month_to_date, m.currency)} so far)"))
    out.append('<div class="cards">' + "".join(
        f'<div class="card"><b>{escape(value)}</b><span>{escape(label)}</span></div>' for value, label in cards)
        + "</div>")
    out.append("<h2>Totals</h2>")
    out.append(_html_table(
        ["", "this period", "previous period", "change"],
        [[name + (f" ({currency})" if currency else ""), _cell(a, currency, exact_money=False),
          _cell(b, currency, exact_money=False), _change(a, b)] for name, currency, a, b in _headline(report)],
    ))
    if report.daily:
        out.append("<h2>Daily spend</h2>")
        for currency in sorted({d.currency for d in report.daily}):
            days = [d for d in report.daily if d.currency == currency]
            out.append(_bars_svg(f"Spend per day ({currency})", [d.day.strftime("%m-%d") for d in days],
                                 [d.cost for d in days], currency))
    out.append("<h2>Month to date</h2>")
    out.append(_html_table(
        ["currency", "month to date", "run rate per day", "forecast for the month"],
        [[m.currency, money(m.month_to_date, m.currency), money(m.run_rate, m.currency),
          money(m.forecast, m.currency)] for m in report.month],
    ) if report.month else "<p>No spend this month.</p>")
    if report.budgets:
        out.append("<h2>Budgets</h2>")
        out.append(_html_table(["scope", "budget", "spent", "share", "forecast", "forecast share", "state"],
                               _budget_rows(report.budgets), [s.state for s in report.budgets]))
    if report.group_by:
        out.append(f"<h2>Breakdown by {escape(', '.join(report.group_by))}</h2>")
        for currency in sorted({r.currency for r in report.breakdown if r.currency}):
            rows = [r for r in report.breakdown if r.currency == currency][:15]
            out.append(_hbars_svg(f"Cost by {', '.join(report.group_by)} ({currency})",
                                  [" / ".join(_group(g) for g in r.groups) for r in rows], [r.cost for r in rows],
                                  currency))
        out.append(_html_table(
            [*report.group_by, "currency", "calls", "cost", "previous", "change"],
            [[*(_group(g) for g in row.groups), row.currency or "(unpriced)", _int(row.calls),
              money(row.cost, row.currency), money(row.previous_cost, row.currency), _pct(row.change_percent)]
             for row in report.breakdown],
        ))
    out.append(f"<h2>Top spenders by {escape(report.top_by)}</h2>")
    out.append(_html_table(
        [report.top_by, "currency", "calls", "cost", "share"],
        [[_group(t.group), t.currency, _int(t.calls), money(t.cost, t.currency), _share(t.share)]
         for t in report.top_spenders],
    ) if report.top_spenders else "<p>No priced calls.</p>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# -- dispatch and the webhook ----------------------------------------------------------------------


def render(report: Report, fmt: str) -> str:
    if fmt == "md":
        return render_markdown(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "json":
        return render_json(report)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"unknown format {fmt!r}")


def slack_text(report: Report) -> str:
    """A few lines for a chat channel (Slack mrkdwn)."""
    now, before = report.totals, report.previous_totals
    lines = [f"*{report.title}*"]
    spend = []
    for currency in _currencies(report):
        a, b = now.cost.get(currency), before.cost.get(currency)
        total, was = (a.total if a else Decimal(0)), (b.total if b else Decimal(0))
        spend.append(f"{money(total, currency)} ({_pct(change_percent(total, was))} vs {report.previous.label})")
    lines.append(("Spent " + ", ".join(spend) if spend else "No priced calls")
                 + f"; {_int(now.calls)} calls, {_int(now.errors)} errors, {_int(now.cancels)} cancelled"
                 + f", cache-hit ratio {_ratio(now.cache_hit_ratio)}.")
    for m in report.month:
        lines.append(f"Month to date {money(m.month_to_date, m.currency)}, forecast {money(m.forecast, m.currency)}.")
    for s in report.budgets:
        if s.state != "ok":
            lines.append(f"Budget {scope_label(s.budget.scope)}: {s.state.upper()}, {s.reason}.")
    return "\n".join(lines)


def webhook_payload(report: Report) -> dict[str, Any]:
    """What ``--notify`` POSTs: Slack's ``text`` plus the whole report as JSON data."""
    return {"text": slack_text(report), "report": report_dict(report)}
