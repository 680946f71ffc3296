"""Overview: spend today, this month and the month-end forecast; where the money went, day by day.

The figures go first and are drawn with ``views.figures`` (they paint without waiting for any
front-end code to load); the sidebar filters next; the charts, whose Vega code is the heaviest
thing the browser fetches, last.
"""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, views
from dashboard import format as fmt

st.title("Overview")
views.require_calls()
picked = views.selection()
overview = data.headline(picked)
days = (picked.start, picked.end)

for currency in overview.currencies:
    money = overview.money[currency]
    suffix = f" ({currency})" if len(overview.currencies) > 1 else ""
    views.figures([
        views.Figure(f"Spend today{suffix}", fmt.money(money.today, currency)),
        views.Figure(f"This month{suffix}", fmt.money(money.month_to_date, currency)),
        views.Figure(
            f"Month-end forecast{suffix}", fmt.money(money.forecast, currency),
            help=f"As of the start of today (UTC): the month's spend on its complete days plus the mean daily "
                 f"spend of the last {data.RUN_RATE_DAYS} complete days for each day left, today included.",
        ),
        views.Figure(
            f"Spend, {picked.start:%b %d} – {picked.end:%b %d}{suffix}", fmt.money(money.in_range, currency),
            help="Total of the calls matching the filters, in the selected dates.",
        ),
    ])

views.figures([
    views.Figure("Calls", fmt.count(overview.calls)),
    views.Figure("Errors", fmt.count(overview.errors), help="Calls that ended with an error status."),
    views.Figure("Cancelled", fmt.count(overview.cancels), help="Calls the caller closed early."),
    views.Figure("Cache-hit ratio", fmt.percent(overview.cache_hit_ratio),
                 help="Cache-hit prompt tokens as a share of all prompt tokens."),
    views.Figure(
        "Saved by the cache",
        " + ".join(fmt.money(amount, currency) for currency, amount in overview.cache_saved.items()) or "—",
        help="What the cache-hit tokens would have cost at the cache-miss price, minus what they cost.",
    ),
])
st.caption(
    f"Tokens billed: {fmt.tokens(overview.tokens['cache_hit'])} cache hit · "
    f"{fmt.tokens(overview.tokens['cache_miss'])} cache miss · {fmt.tokens(overview.tokens['output'])} output "
    f"(of which {fmt.tokens(overview.tokens['reasoning'])} reasoning)."
)
views.draw_filters()  # the figures are out: now the filter widgets, then the charts
if overview.unpriced_calls:
    one = overview.unpriced_calls == 1
    st.warning(
        f"{fmt.count(overview.unpriced_calls)} {'call in this range has' if one else 'calls in this range have'} "
        "tokens but no price (a model the price book does not know, or usage too incomplete to price); "
        f"{'it counts as a call' if one else 'they count as calls'}, not as spend. "
        "The Calls page shows why in each row's tariff column.",
        icon=":material/help:",
    )

daily = data.daily_charts(picked)  # after the figures are on screen
for currency in overview.currencies:
    by_model = daily.spend_by_day_model[daily.spend_by_day_model["currency"] == currency]
    by_bucket = daily.spend_by_day_bucket[daily.spend_by_day_bucket["currency"] == currency]
    left, right = st.columns(2)
    left.altair_chart(
        charts.stacked_daily(charts.drawable(by_model, "spend"), value="spend", stack="model",
                             title=f"Spend per day by model ({currency})", currency=currency, days=days),
        width="stretch",
    )
    right.altair_chart(
        charts.stacked_daily(charts.drawable(by_bucket, "spend"), value="spend", stack="bucket",
                             title=f"Spend per day by token bucket ({currency})", currency=currency,
                             order=list(data.BUCKETS), days=days),
        width="stretch",
    )

left, right = st.columns(2)
left.altair_chart(
    charts.daily_line(daily.cache_hit_by_day, value="cache_hit_ratio", title="Cache-hit ratio per day",
                      percent=True, days=days),
    width="stretch",
)
right.altair_chart(
    charts.stacked_daily(daily.calls_by_day_status, value="calls", stack="status",
                         title="Calls per day by outcome", colours=charts.STATUS_COLOURS, days=days),
    width="stretch",
)
if overview.source == "ledger":
    st.caption("Read from the raw ledger: its daily rollup is not built yet. `dsmeter rollup` builds it once "
               "(writers keep it current), and this page then reads a few rows per day instead of every call.")
