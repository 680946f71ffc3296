"""Drawing pieces every page shares: the sidebar filters, headline figures, the empty state, the database problem.

Nothing here reads the ledger directly: choices for the filters come from ``dashboard.data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import streamlit as st

from dashboard import data
from dashboard import format as fmt
from dashboard.engine import LedgerState, Probe
from dashboard.selection import ALL_TAGS, Selection

__all__ = ["Figure", "database_problem", "empty_state", "figures", "sidebar_filters", "sidebar_footer", "selection",
           "require_calls"]

_SELECTION_KEY = "dsmeter_selection"
DEFAULT_DAYS = 30


@dataclass(frozen=True, slots=True)
class Figure:
    label: str
    value: str  # already formatted: money with its currency, a count, a percentage
    help: str | None = None


def figures(row: Sequence[Figure]) -> None:
    """Headline figures side by side, each its label (and help) over its value, laid out as ``st.metric`` does.

    Drawn as Markdown over a heading rather than with ``st.metric``: Streamlit's front end
    fetches the code for ``st.metric``, as for every widget and chart, only when the first one
    arrives, shows a placeholder until then, and reveals the placeholders together, which on
    the overview was after the Vega chart code had loaded too: the figures reached the browser
    0.6-0.7 s before they were shown. Markdown and headings are in the front end's main
    bundle, so these paint with the message that carries them.
    """
    for column, figure in zip(st.columns(len(row)), row):
        with column.container(gap=None):
            st.markdown(fmt.markdown_text(figure.label), help=figure.help)
            st.header(fmt.markdown_text(figure.value), anchor=False)


def database_problem(probe: Probe) -> None:
    """The whole screen when the ledger cannot be read: one message, what to do, no traceback."""
    st.title("DeepSeek Meter")
    st.error(probe.message, icon=":material/database:")
    if probe.state is LedgerState.UNREACHABLE:
        st.markdown(
            "Check that the database is running and that `--db` (or `DSMETER_DATABASE_URL`) names it, "
            "then reload this page."
        )


def empty_state(probe: Probe) -> None:
    """What a reader sees before anything is metered: how to start, not an error."""
    st.info(f"Nothing has been metered into this ledger yet ({probe.url}).", icon=":material/inbox:")
    st.markdown(
        """
**Start metering** — any of these fills the ledger this dashboard reads:

1. **See it with demo data, no API key:** `dsmeter demo` records a month of realistic traffic
   from the bundled simulator and opens this dashboard on it.
2. **From Python:** pass a metered client to the OpenAI SDK; every call becomes a ledger row.
   ```python
   from openai import OpenAI
   import collector
   client = OpenAI(base_url="https://api.deepseek.com", http_client=collector.metered_client())
   ```
3. **From any language:** run `dsmeter proxy --upstream https://api.deepseek.com` and point
   your client's `base_url` at it.

Use the same `--db URL` (or `DSMETER_DATABASE_URL`) for the meter and for `dsmeter dashboard`.
The What-if and Prices pages work without any recorded calls.
"""
    )


def require_calls() -> None:
    """For pages that show recorded calls: draw the empty state and stop when there are none."""
    probe = data.ledger_probe()
    if probe.state is not LedgerState.READY:
        empty_state(probe)
        st.stop()


def _today() -> date:
    return data.now().date()


def sidebar_filters(probe: Probe) -> None:
    """Date range, model, status and any tag key: drawn once by the frame, read by every page."""
    with st.sidebar:
        st.header("Filters")
        today = _today()
        picked = st.date_input(
            "Dates (UTC)",
            value=(today - timedelta(days=DEFAULT_DAYS - 1), today),
            max_value=today + timedelta(days=1),
            key="filter_dates",
        )
        start, end = _date_pair(picked, today)
        models: tuple[str, ...] = ()
        statuses: tuple[str, ...] = ()
        tag_key = ALL_TAGS
        tag_values: tuple[str, ...] = ()
        if probe.state is LedgerState.READY:
            choices = data.filter_choices()
            models = tuple(st.multiselect("Model", choices.models, key="filter_models", placeholder="All models"))
            statuses = tuple(
                st.multiselect("Status", choices.statuses, key="filter_statuses", placeholder="All statuses")
            )
            keys = [ALL_TAGS, *choices.tag_values]
            tag_key = st.selectbox("Tag", keys, key="filter_tag_key", format_func=_tag_label)
            if tag_key != ALL_TAGS:
                tag_values = tuple(
                    st.multiselect(f"{tag_key} is", choices.tag_values.get(tag_key, ()), key="filter_tag_values",
                                   placeholder=f"Any {tag_key}")
                )
    st.session_state[_SELECTION_KEY] = Selection(
        start=start, end=end, models=models, statuses=statuses, tag_key=tag_key, tag_values=tag_values
    )


def _tag_label(key: str) -> str:
    return "Any tag" if key == ALL_TAGS else key


def _date_pair(picked: object, today: date) -> tuple[date, date]:
    """The date input gives one date while a range is half picked: treat it as a one-day range."""
    if isinstance(picked, (tuple, list)):
        if len(picked) == 2:
            return picked[0], picked[1]
        if len(picked) == 1:
            return picked[0], picked[0]
        return today - timedelta(days=DEFAULT_DAYS - 1), today
    if isinstance(picked, date):
        return picked, picked
    return today - timedelta(days=DEFAULT_DAYS - 1), today


def selection() -> Selection:
    """The filters as set in the sidebar (defaults if the frame has not drawn them, e.g. in a unit test)."""
    current = st.session_state.get(_SELECTION_KEY)
    if isinstance(current, Selection):
        return current
    today = _today()
    return Selection(start=today - timedelta(days=DEFAULT_DAYS - 1), end=today)


def sidebar_footer(probe: Probe) -> None:
    with st.sidebar:
        st.divider()
        st.caption(f"Ledger: `{probe.url}` (read-only)")
        st.caption("All times UTC. Figures refresh every minute.")
