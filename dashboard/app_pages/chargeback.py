"""Chargeback: who spent it, by any tag key, API key fingerprint or end user, with shares and day-over-day change."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, views
from dashboard import format as fmt

st.title("Chargeback")
views.draw_filters()
views.require_calls()
picked = views.selection()
dimensions = data.chargeback_dimensions(picked)
dimension = st.radio("Charge back by", dimensions, horizontal=True, key="chargeback_by",
                     format_func=data.dimension_choice)
if data.reads_ledger(dimension):
    # Drawn before the query, so the reader knows why this one takes a while.
    st.caption("This grouping reads the ledger itself, not the daily rollup, so it is slower on a big ledger.")
table = data.chargeback(picked, dimension)

if table.rows.empty:
    st.info("No priced calls match these filters.", icon=":material/filter_alt_off:")
    st.stop()

st.caption(
    f"{picked.start:%Y-%m-%d} to {picked.end:%Y-%m-%d} (UTC). Day-over-day compares "
    f"{table.last_day:%b %d} with {table.previous_day:%b %d}."
)
for currency in table.currencies:
    rows = table.rows[table.rows["currency"] == currency]
    total = table.totals[currency]
    st.metric(f"Total ({currency})", fmt.money(total, currency))
    st.altair_chart(
        charts.share_bars(charts.drawable(rows, "spend"), label="group", value="spend",
                          title=f"Spend by {data.dimension_label(dimension)} ({currency})", currency=currency),
        width="stretch",
    )
    shown = rows.assign(
        spend=[fmt.money(v, currency) for v in rows["spend"]],
        share=[fmt.percent(v) for v in rows["share"]],
        last_day=[fmt.money(v, currency) for v in rows["last_day"]],
        previous_day=[fmt.money(v, currency) for v in rows["previous_day"]],
        day_over_day=[fmt.signed_percent(v) for v in rows["day_over_day"]],
        calls=[fmt.count(v) for v in rows["calls"]],
    )[["group", "calls", "spend", "share", "last_day", "previous_day", "day_over_day"]]
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "group": data.dimension_label(dimension),
            "last_day": f"{table.last_day:%b %d}",
            "previous_day": f"{table.previous_day:%b %d}",
            "day_over_day": "Day over day",
        },
    )

st.download_button(
    "Download CSV",
    data=data.chargeback_csv(table),
    file_name=f"chargeback-{dimension}-{picked.start:%Y%m%d}-{picked.end:%Y%m%d}.csv",
    mime="text/csv",
    icon=":material/download:",
    on_click="ignore",
)
