"""The dashboard's pages: each file only draws (run by ``st.navigation`` from ``dashboard/app.py``).

Not named ``pages/``: Streamlit treats a ``pages/`` folder beside the entry script as an old-style
multipage app and would run a page opened by direct link without the frame (no filters, no checks)."""
