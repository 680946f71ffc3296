"""What-if: the capacity planner (a workload on Flash and Pro side by side) and a replay of recorded traffic.

Every figure comes from ``collector.projection`` (``estimate``, ``reprice_traffic``,
``compare_by_day``): this page only collects inputs and draws the answers.
"""

from __future__ import annotations

from datetime import date, datetime, time, timezone
from decimal import Decimal

import pandas as pd
import streamlit as st

from collector.errors import UsageError
from dashboard import charts, data, views
from dashboard import format as fmt
from dashboard.engine import LedgerState

GUIDE_DATE = date(2026, 4, 25)  # the guide's prices were "last verified 2026-04-25"
GUIDE_MODELS = ["deepseek-v4-flash", "deepseek-v4-pro"]


def _use_guide_prices() -> None:
    st.session_state["whatif_day"] = GUIDE_DATE
    st.session_state["whatif_list_prices"] = True


st.title("What-if")
views.draw_filters()
try:
    book = data.price_book()
except UsageError as error:
    st.error(f"The price book cannot be used: {error}", icon=":material/error:")
    st.stop()

st.subheader("Capacity planner")
st.caption(
    "Preloaded with the streaming guide's worked example: 1,000,000 calls a month, a 2,000-token cached "
    "system prompt, a 200-token uncached user message and a 300-token answer. The guide quotes list prices "
    f"as of {GUIDE_DATE:%Y-%m-%d}."
)
left, right = st.columns([3, 2])
with left:
    calls = st.number_input("Calls per month", min_value=0, value=1_000_000, step=10_000, key="whatif_calls")
    a, b, c = st.columns(3)
    cached = a.number_input("Cached prompt tokens / call", min_value=0, value=2000, step=100, key="whatif_cached")
    uncached = b.number_input("Uncached prompt tokens / call", min_value=0, value=200, step=10, key="whatif_uncached")
    output = c.number_input("Output tokens / call", min_value=0, value=300, step=10, key="whatif_output")
    d, e = st.columns(2)
    thinking_share = d.slider("Thinking share of calls", 0, 100, 0, format="%d%%", key="whatif_thinking")
    reasoning = e.number_input("Reasoning tokens / thinking call", min_value=0, value=0, step=100,
                               key="whatif_reasoning")
with right:
    models = st.multiselect("Models", data.plannable_models(book), default=GUIDE_MODELS, key="whatif_models")
    day = st.date_input("Prices as of (UTC)", value=data.now().date(), key="whatif_day")
    list_prices = st.checkbox("List prices (ignore promotions)", key="whatif_list_prices")
    st.button("Use the guide's prices (list, 2026-04-25)", on_click=_use_guide_prices, key="whatif_guide")
    override_cache = st.checkbox("Set the cache-hit share instead", key="whatif_override_cache",
                                 help="Re-split each call's prompt (cached + uncached) into hits and misses.")
    cache_share = st.slider("Cache-hit share of prompt tokens", 0, 100, 91, format="%d%%", key="whatif_cache_share",
                            disabled=not override_cache)
    override_peak = st.checkbox("Set the peak share", key="whatif_override_peak",
                                help="Without it, calls spread over peak and off-peak by the hours of the week.")
    peak_share = st.slider("Share of calls in peak hours", 0, 100, 50, format="%d%%", key="whatif_peak_share",
                           disabled=not override_peak)

at = datetime.combine(day, time(12, 0), tzinfo=timezone.utc)
try:
    results = data.whatif_estimate(
        book, models, at, list_prices=list_prices, calls=int(calls), cached=int(cached), uncached=int(uncached),
        output=int(output), reasoning=int(reasoning), thinking_share=Decimal(thinking_share) / 100,
        cache_hit_share=Decimal(cache_share) / 100 if override_cache else None,
        peak_share=Decimal(peak_share) / 100 if override_peak else None,
    )
except UsageError as error:
    st.warning(str(error), icon=":material/help:")
    results = []

if results:
    columns = st.columns(len(results))
    for column, result in zip(columns, results):
        with column:
            name = result.model + (f" → {result.tariff.model}" if result.via else "")
            st.metric(name, fmt.money(result.total, result.currency),
                      help=f"Tariff {', '.join(result.tariff_ids)}")
            st.dataframe(
                pd.DataFrame({
                    "bucket": ["cache hit", "cache miss", "output", "total"],
                    "cost": [fmt.money(v, result.currency) for v in
                             (result.cache_hit, result.cache_miss, result.output, result.total)],
                }),
                hide_index=True, width="stretch",
            )
            if result.promotion:
                st.caption(f"Promotion applied: {result.promotion}. At list prices: "
                           f"{fmt.money(result.list_total, result.currency)}.")
            if len(result.periods) > 1:
                st.caption("Calls by period: " + ", ".join(f"{p.period} {fmt.percent(float(p.share))}"
                                                           for p in result.periods))
    comparisons = data.compared_to_cheapest(results)
    if comparisons:
        st.caption(" · ".join(f"{model} costs {ratio:,.1f}× {cheapest}" for model, ratio, cheapest in comparisons))
    st.altair_chart(charts.estimate_bars(data.estimate_frame(results), currency=results[0].currency),
                    width="stretch")

st.divider()
st.subheader("Replay recorded traffic")
st.caption("Re-price the calls recorded in the last days (with the sidebar's model, status and tag filters) "
           "as another model, at another date's prices, or with part of the peak-hour calls moved off-peak.")
if data.ledger_probe().state is not LedgerState.READY:
    views.empty_state(data.ledger_probe())
    st.stop()

with st.form("whatif_replay"):
    r1, r2, r3, r4 = st.columns(4)
    days = r1.number_input("Last N days", min_value=1, max_value=90, value=7, key="replay_days")
    as_model = r2.selectbox("As model", ["(each call's own model)", *data.plannable_models(book)],
                            key="replay_model")
    as_of_day = r3.date_input("At prices of (UTC)", value=None, key="replay_as_of",
                              help="Empty: each call at the tariff in force at its own time.")
    shift = r4.slider("Move peak calls off-peak", 0, 100, 0, format="%d%%", key="replay_shift")
    st.form_submit_button("Replay")

window = data.last_days(views.selection(), int(days))
try:
    summary = data.replay(
        window, book,
        as_model=None if as_model.startswith("(") else as_model,
        as_of=None if as_of_day is None else datetime.combine(as_of_day, time(12, 0), tzinfo=timezone.utc),
        shift_off_peak=Decimal(shift) / 100,
    )
except UsageError as error:
    st.warning(str(error), icon=":material/help:")
    st.stop()

currency = summary.currency
m1, m2, m3 = st.columns(3)
m1.metric(f"Actual, {fmt.count(summary.calls)} calls", fmt.money(summary.actual_cost, currency))
m2.metric("Projected", fmt.money(summary.projected_cost, currency))
change = data.replay_change(summary)
m3.metric("Difference", fmt.money(summary.difference, currency),
          delta=fmt.signed_percent(change) if change is not None else None, delta_color="inverse")
if summary.projected_unpriced_calls or summary.actual_unpriced_calls:
    st.caption(f"Unpriced (left out of the sums): {fmt.count(summary.actual_unpriced_calls)} actual, "
               f"{fmt.count(summary.projected_unpriced_calls)} projected.")
st.altair_chart(charts.replay_lines(data.replay_frame(summary), currency=currency), width="stretch")
