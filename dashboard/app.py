"""DeepSeek Meter dashboard: the frame and the router (``dsmeter dashboard`` runs this file).

The frame opens the ledger read-only, answers "can it be read at all?" with one clear
screen when it cannot, keeps the shared filters' place in the sidebar, and hands over to the
page the reader picked. The page has the filters drawn once its headline is out (the overview
after its figures, so they paint first), the frame after the page otherwise. Pages only
draw; their data comes from ``dashboard.data`` (cached loaders over ``collector.queries``).
"""

from __future__ import annotations

import streamlit as st

from dashboard import data, views
from dashboard.engine import DATABASE_ERRORS, LedgerState

# An emoji favicon is drawn by the browser; a Material icon one (the pages' icons, if page_icon
# were left out) is fetched from a public CDN, and the dashboard makes no outside requests.
st.set_page_config(page_title="DeepSeek Meter", page_icon="📈", layout="wide")

probe = data.ledger_probe()
if probe.state in (LedgerState.UNREACHABLE, LedgerState.OUTDATED):
    views.database_problem(probe)
    st.stop()

try:
    views.reserve_filters(probe)
    navigation = st.navigation(
        [
            st.Page("app_pages/overview.py", title="Overview", icon=":material/monitoring:", default=True),
            st.Page("app_pages/chargeback.py", title="Chargeback", icon=":material/account_balance:"),
            st.Page("app_pages/calls.py", title="Calls", icon=":material/list_alt:"),
            st.Page("app_pages/whatif.py", title="What-if", icon=":material/calculate:"),
            st.Page("app_pages/prices.py", title="Prices", icon=":material/sell:"),
        ]
    )
    views.sidebar_footer(probe)
    navigation.run()
    views.draw_filters()  # for a page that did not draw them itself
except DATABASE_ERRORS as error:
    # The ledger went away after the last probe (a restart, a dropped connection): one message,
    # and the next run probes again instead of trusting the cached "ready".
    data.forget_probe()
    views.database_problem(data.lost(probe, error))
