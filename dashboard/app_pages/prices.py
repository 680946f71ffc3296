"""Prices: the tariff in force per model now or at any date, the history as a timeline, and where each figure came from."""

from __future__ import annotations

from datetime import datetime, time, timezone

import streamlit as st

from collector.errors import UsageError
from dashboard import charts, data, views
from dashboard import format as fmt

st.title("Prices")
views.draw_filters()
try:
    book = data.price_book()
except UsageError as error:  # a team's own book (DSMETER_PRICES) that does not validate
    st.error(f"The price book cannot be used: {error}", icon=":material/error:")
    st.stop()

per = sorted({tariff.per_tokens for tariff in book.tariffs})
st.caption(f"{book.name} — {book.origin}. Prices per {' or '.join(fmt.count(n) for n in per)} tokens; "
           f"calls are priced by their `{book.price_at}` time.")

now = data.now()
day_col, time_col = st.columns(2)
day = day_col.date_input("In force on (UTC)", value=now.date(), key="prices_day")
clock = time_col.time_input("at (UTC)", value=time(now.hour, now.minute), key="prices_time", step=900)
at = datetime.combine(day, clock, tzinfo=timezone.utc)

picked = views.selection()
in_force = data.tariffs_in_force(book, at, picked.models)
st.subheader(f"In force at {at:%Y-%m-%d %H:%M} UTC")
if in_force.empty:
    st.info("The book has no tariff in force then" + (" for the selected models." if picked.models else "."),
            icon=":material/event_busy:")
else:
    shown = in_force.assign(
        hit=[fmt.rate(v, c) for v, c in zip(in_force["hit"], in_force["currency"])],
        miss=[fmt.rate(v, c) for v, c in zip(in_force["miss"], in_force["currency"])],
        output=[fmt.rate(v, c) for v, c in zip(in_force["output"], in_force["currency"])],
        list_prices=[
            "" if h is None else f"{fmt.rate(h, c)} / {fmt.rate(m, c)} / {fmt.rate(o, c)}"
            for h, m, o, c in zip(in_force["list_hit"], in_force["list_miss"], in_force["list_output"],
                                  in_force["currency"])
        ],
        since=[f"{v:%Y-%m-%d %H:%M}" for v in in_force["start"]],
        until=["still in force" if v is None else f"{v:%Y-%m-%d %H:%M}" for v in in_force["end"]],
        promotion=in_force["promotion"].fillna(""),
    )[["model", "period", "currency", "hit", "miss", "output", "promotion", "list_prices", "since", "until",
       "schedule", "tariff", "source"]]
    st.dataframe(shown, hide_index=True, width="stretch", column_config={
        "hit": "Cache hit / 1M", "miss": "Cache miss / 1M", "output": "Output / 1M",
        "list_prices": "List prices (hit / miss / output)", "source": st.column_config.TextColumn("Source", width="large"),
    })

aliases = data.aliases_in_force(book, at)
if not aliases.empty:
    st.markdown("**Names billed as another model then**")
    st.dataframe(aliases.assign(
        since=[f"{v:%Y-%m-%d %H:%M}" for v in aliases["since"]],
        until=["" if v is None else f"{v:%Y-%m-%d %H:%M}" for v in aliases["until"]],
    ), hide_index=True, width="stretch")

st.subheader("History")
everything = data.book_models(book)
chosen = st.multiselect("Models", everything, default=[m for m in (picked.models or everything) if m in everything],
                        key="prices_models")
history = data.tariff_history(book, chosen, until=max(now, at))
if history.empty:
    st.caption("No entries for these models.")
else:
    st.altair_chart(
        charts.tariff_timeline(charts.drawable(history, "hit", "miss", "output"),
                               title=f"Tariff periods (colour: output price per 1M, {book.currency})"),
        width="stretch",
    )
    st.dataframe(
        history.assign(
            start=[f"{v:%Y-%m-%d %H:%M}" for v in history["start"]],
            end=["still in force" if still else f"{v:%Y-%m-%d %H:%M}" for v, still in zip(history["end"], history["open"])],
            promotion=history["promotion"].fillna(""),
            note=history["note"].fillna(""),
        )[["model", "start", "end", "label", "promotion", "tariff", "source", "note"]],
        hide_index=True,
        width="stretch",
        column_config={"label": "Prices (hit / miss / output per 1M)",
                       "source": st.column_config.TextColumn("Source", width="large"),
                       "note": st.column_config.TextColumn("Note", width="large")},
    )
