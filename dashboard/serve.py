"""Run the dashboard server warm: ``python -m dashboard.serve [streamlit run options]``.

``dsmeter dashboard`` starts this instead of ``streamlit run``. It imports what every page
needs (pandas, Altair, SQLAlchemy and the ledger's database driver, the query layer, the
projection) and reads the schema revision this dsmeter expects before the server listens,
then hands over to Streamlit's own ``streamlit run`` on the packaged app. Streamlit runs page
scripts in this same process, so the first visitor does not wait seconds for imports that
every later visitor gets for free.
"""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

__all__ = ["APP", "warm", "main"]

APP = Path(__file__).resolve().parent / "app.py"


def warm() -> None:
    """Import the dashboard's modules and load what is read once per process."""
    # Importing decorates the loaders with st.cache_data before `streamlit run` has made its
    # runtime, and Streamlit warns once per loader that it has none. The caches themselves are
    # made on each loader's first call, under the runtime, so those warnings are about nothing.
    import streamlit.runtime.caching.cache_data_api as cache_data_api  # its logger, as Streamlit sets it up

    cache_log = logging.getLogger(cache_data_api.__name__)
    level = cache_log.level
    cache_log.setLevel(logging.ERROR)
    try:
        import dashboard.app_pages  # noqa: F401 - importing is the point
        import dashboard.charts  # noqa: F401
        import dashboard.data  # noqa: F401
        import dashboard.views  # noqa: F401
    finally:
        cache_log.setLevel(level)
    from collector.pricebook import shipped_book
    from dashboard.engine import head_revision

    head_revision()
    shipped_book()  # the overview's cache savings price tokens with it
    _import_driver()
    _warm_streamlit()
    # Everything loaded so far lives as long as the process. Streamlit runs a full collection
    # after every script run (runner.postScriptGC), while the browser is fetching the page's
    # widget and chart code from this process: freezing takes those ~200,000 objects out of
    # every collection (it took 100-400 ms per run on a busy 2-core machine, 15-50 ms frozen).
    gc.collect()
    gc.freeze()


def _import_driver() -> None:
    """Import the ledger's database driver (psycopg: 0.2 s), which the first page run would otherwise pay."""
    from sqlalchemy.engine import make_url

    from collector.config import database_url

    try:
        make_url(database_url(None)).get_dialect().import_dbapi()
    except Exception:  # noqa: BLE001 - a bad URL or a missing driver is the app's one-line message, not a crash here
        return


def _warm_streamlit() -> None:
    """Pay now what Streamlit pays once per process on its first page run (py-spy: ~0.5 s of it)."""
    import altair as alt
    import pandas as pd
    import streamlit.delta_generator as delta_generator
    from streamlit.string_util import is_emoji

    # The emoji favicon: checking it imports streamlit.emojis, which compiles one huge regex.
    is_emoji("📈")
    # Altair builds its Vega-Lite schema validator on the first chart it checks.
    alt.Chart(pd.DataFrame({"x": [0], "y": [0]})).mark_bar().encode(x="x", y="y").to_dict()
    # The first element a process draws asks whether it runs in a REPL, by inspecting the
    # source of every frame on the stack. It runs under `streamlit run`: the answer is no.
    delta_generator._use_warning_has_been_displayed = True  # noqa: SLF001


def main(argv: list[str] | None = None) -> None:
    """``streamlit run`` on the packaged app with ``argv`` as its options, after warming up."""
    from streamlit.web import cli

    warm()
    options = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["streamlit", "run", str(APP), *options]
    cli.main()


if __name__ == "__main__":  # pragma: no cover - run by dsmeter dashboard
    main()
