"""``dsmeter dashboard``: the Streamlit app on the same ledger as every other command.

Runs ``streamlit run`` on the packaged ``dashboard/app.py`` in a child process, with the
ledger's URL in ``DSMETER_DATABASE_URL`` (so the password never appears in a process list),
bound to loopback unless told otherwise, headless and without usage statistics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import click

from collector.commands.options import db_option
from collector.config import ENV_DATABASE_URL, database_url, redact_url

__all__ = ["dashboard", "app_path", "streamlit_command", "run_dashboard", "DEFAULT_PORT", "DEFAULT_HOST"]

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"


def app_path() -> Path:
    """The packaged Streamlit entry script (works from a checkout and from an installed wheel)."""
    import dashboard

    return Path(dashboard.__file__).resolve().parent / "app.py"


def streamlit_command(host: str, port: int) -> list[str]:
    """The command serving the packaged app: ``streamlit run`` via ``dashboard.serve``, which warms up first."""
    return [
        sys.executable, "-m", "dashboard.serve",
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        # The app is installed code, not a file being edited: no watcher threads, no reruns on save.
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--global.developmentMode", "false",
        "--client.toolbarMode", "viewer",
    ]


def run_dashboard(url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> int:
    """Serve the dashboard on ``url`` until interrupted; returns Streamlit's exit code."""
    from dashboard.engine import open_read_only

    open_read_only(url).dispose()  # a malformed or unsupported URL is a one-line error here, not in the app
    env = {**os.environ, ENV_DATABASE_URL: url}
    where = f"http://{_url_host(host)}:{port}/" if port else f"{host}, on a free port (Streamlit prints the URL)"
    click.echo(f"DeepSeek Meter dashboard on {where} (ledger: {redact_url(url)})", err=True)
    click.echo("Press Ctrl+C to stop.", err=True)
    child = subprocess.Popen(streamlit_command(host, port), env=env)

    def _forward(signum: int, _frame: FrameType | None) -> None:
        # Stopping dsmeter stops the server too, so no orphan keeps the port.
        if child.poll() is None:
            child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, _forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                # The terminal sent SIGINT to the whole group; Streamlit is shutting down too.
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
        if child.poll() is None:
            child.terminate()
            child.wait(timeout=10)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@click.command()
@db_option
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to serve on (0 picks a free one; Streamlit prints it).")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to bind. The default serves this machine only; the dashboard has no login.")
def dashboard(db: str | None, port: int, host: str) -> None:
    """Start the Streamlit dashboard (overview, chargeback, calls, what-if, prices) on the ledger.

    Read-only: the dashboard never writes to the ledger and never migrates it.
    """
    code = run_dashboard(database_url(db), host=host, port=port)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM):
        raise SystemExit(code)
