"""Calls: the ledger itself, filterable and sortable, with latency percentiles, finish reasons and error classes.

The listing comes first: one page of rows is cheap at any ledger size, so it paints at once;
the percentiles and breakdowns, which read every matching call, follow.
"""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, views
from dashboard import format as fmt

st.title("Calls")
views.draw_filters()
views.require_calls()
picked = views.selection()

st.subheader("The ledger")
sort_col, order_col, size_col = st.columns([2, 1, 1])
sort_by = sort_col.selectbox("Sort by", data.CALL_SORT_KEYS, key="calls_sort", format_func=data.column_label)
descending = order_col.radio("Order", ("Descending", "Ascending"), horizontal=True, key="calls_order") == "Descending"
page_size = size_col.selectbox("Rows per page", (50, 100, 500), index=1, key="calls_page_size")
total = data.call_count(picked)
pages = max(1, -(-total // page_size))
page = st.number_input(f"Page (of {fmt.count(pages)})", min_value=1, max_value=pages, value=1, step=1,
                       key="calls_page")
listing = data.calls_page(picked, sort_by, descending, page_size, (int(page) - 1) * page_size)
first = (int(page) - 1) * page_size + 1 if total else 0
st.caption(f"Calls {fmt.count(first)}–{fmt.count(first + len(listing) - 1 if total else 0)} "
           f"of {fmt.count(total)} matching the filters.")
st.dataframe(data.calls_table(listing), hide_index=True, width="stretch")

st.subheader("Latency by model and thinking mode")
latency = data.latency(picked)
if latency.empty:
    st.caption("No call in this selection has timings.")
else:
    st.dataframe(
        data.latency_table(latency),
        hide_index=True,
        width="stretch",
    )

left, right = st.columns(2)
reasons = data.finish_reasons(picked)
left.altair_chart(charts.share_bars(reasons, label="finish_reason", value="calls", title="Finish reasons"),
                  width="stretch")
errors = data.error_classes(picked)
right.altair_chart(charts.share_bars(errors, label="error_class", value="calls",
                                     title="Calls that did not complete, by class"),
                   width="stretch")
