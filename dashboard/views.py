"""Drawing pieces every page shares: the sidebar filters, headline figures, the empty state, the database problem.

Nothing here reads the ledger directly: choices for the filters come from ``dashboard.data``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import streamlit as st

from dashboard import data
from dashboard import format as fmt
from dashboard.engine import LedgerState, Probe
from dashboard.selection import ALL_TAGS, Selection

__all__ = [
    "Figure",
    "database_problem",
    "draw_filters",
    "empty_state",
    "figures",
    "require_calls",
    "reserve_filters",
    "selection",
    "sidebar_footer",
]

DEFAULT_DAYS = 30
# The filter widgets' keys: their state is the selection (see ``selection``).
KEY_DATES, KEY_MODELS, KEY_STATUSES, KEY_TAG, KEY_TAG_VALUES = (
    "filter_dates", "filter_models", "filter_statuses", "filter_tag_key", "filter_tag_values")


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
    """For pages that show recorded calls: draw the empty state (and the filters) and stop when there are none."""
    probe = data.ledger_probe()
    if probe.state is not LedgerState.READY:
        empty_state(probe)
        draw_filters()
        st.stop()


def _today() -> date:
    return data.now().date()


# The sidebar place the frame keeps for the filters in this script run (Streamlit runs each
# session's script on its own thread; the frame sets this at the start of every run).
_run = threading.local()
_FILTER_KEYS = (KEY_DATES, KEY_MODELS, KEY_STATUSES, KEY_TAG, KEY_TAG_VALUES)


def reserve_filters(probe: Probe) -> None:
    """The frame's first step: keep the filters' values for this run, and their place at the top of the sidebar.

    The page draws the widgets (``draw_filters``), and a widget drawn by a page belongs to that
    page: on the next page Streamlit would start it afresh. Setting each filter's value through
    the Session State API before any widget takes its key (Streamlit's documented way to keep
    widget values across pages) hands the value to whichever page's widget takes the key in this
    run. Values the ledger no longer offers are dropped here, before any page reads them.
    """
    state = st.session_state
    if KEY_DATES not in state:
        state[KEY_DATES] = _default_dates(_today())
    # Only a reader who has picked something needs the choices: a first visit does not wait for them.
    if probe.state is LedgerState.READY and any(state.get(key) for key in _FILTER_KEYS[1:]):
        choices = data.filter_choices()
        _keep_known(KEY_MODELS, choices.models)
        _keep_known(KEY_STATUSES, choices.statuses)
        if KEY_TAG in state and state[KEY_TAG] not in choices.tag_values:
            state[KEY_TAG] = ALL_TAGS
        _keep_known(KEY_TAG_VALUES, choices.tag_values.get(state[KEY_TAG], ()) if KEY_TAG in state else ())
    for key in _FILTER_KEYS:
        if key in state:
            state[key] = state[key]
    _run.pending = (st.sidebar.container(), probe)


def _keep_known(key: str, known: Sequence[str]) -> None:
    state = st.session_state
    if key in state:
        state[key] = [value for value in state[key] if value in known]


def draw_filters() -> None:
    """Draw the sidebar filters in the place the frame kept: once per run, later calls do nothing.

    A page calls this when its headline is out; the frame calls it after the page, for a page
    that did not. The overview calls it after its figures, so the browser paints them before
    it fetches and starts the date picker's and the lists' code. Pages read the filters with
    ``selection``, which does not depend on the widgets being drawn yet.
    """
    pending = getattr(_run, "pending", None)
    if pending is None:
        return
    _run.pending = None
    slot, probe = pending
    with slot:
        _sidebar_filters(probe)


def _sidebar_filters(probe: Probe) -> None:
    """Date range, model, status and any tag key: the widgets whose state ``selection`` reads.

    No widget is given a default: ``reserve_filters`` has put every value in the session state.
    """
    st.header("Filters")
    st.date_input("Dates (UTC)", max_value=_today() + timedelta(days=1), key=KEY_DATES)
    if probe.state is not LedgerState.READY:
        return
    choices = data.filter_choices()
    st.multiselect("Model", choices.models, key=KEY_MODELS, placeholder="All models")
    st.multiselect("Status", choices.statuses, key=KEY_STATUSES, placeholder="All statuses")
    tag_key = st.selectbox("Tag", [ALL_TAGS, *choices.tag_values], key=KEY_TAG, format_func=_tag_label)
    if tag_key != ALL_TAGS:
        st.multiselect(f"{tag_key} is", choices.tag_values.get(tag_key, ()), key=KEY_TAG_VALUES,
                       placeholder=f"Any {tag_key}")


def _default_dates(today: date) -> tuple[date, date]:
    return today - timedelta(days=DEFAULT_DAYS - 1), today


def _tag_label(key: str) -> str:
    return "Any tag" if key == ALL_TAGS else key


def _date_pair(picked: object, today: date) -> tuple[date, date]:
    """The date input gives one date while a range is half picked: treat it as a one-day range."""
    if isinstance(picked, (tuple, list)):
        if len(picked) == 2:
            return picked[0], picked[1]
        if len(picked) == 1:
            return picked[0], picked[0]
        return _default_dates(today)
    if isinstance(picked, date):
        return picked, picked
    return _default_dates(today)


def selection() -> Selection:
    """The filters as set in the sidebar: the widgets' state, or their defaults before they were first drawn.

    Read from the widgets' keys rather than from what the widgets return, so a page can use it
    before ``draw_filters`` has drawn them in this run (the state a widget reports arrives with
    the rerun it triggers, before the script starts).
    """
    state = st.session_state
    today = _today()
    start, end = _date_pair(state[KEY_DATES] if KEY_DATES in state else None, today)
    tag_key = state[KEY_TAG] if KEY_TAG in state else ALL_TAGS
    tag_values = state[KEY_TAG_VALUES] if tag_key != ALL_TAGS and KEY_TAG_VALUES in state else ()
    return Selection(
        start=start, end=end,
        models=tuple(state[KEY_MODELS]) if KEY_MODELS in state else (),
        statuses=tuple(state[KEY_STATUSES]) if KEY_STATUSES in state else (),
        tag_key=tag_key or ALL_TAGS, tag_values=tuple(tag_values),
    )


def sidebar_footer(probe: Probe) -> None:
    with st.sidebar:
        st.divider()
        st.caption(f"Ledger: `{probe.url}` (read-only)")
        st.caption("All times UTC. Figures refresh every minute.")
