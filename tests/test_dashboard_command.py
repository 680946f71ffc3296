"""``dsmeter dashboard``: the packaged app, loopback by default, headless, no usage stats, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from collector.cli import main
from collector.commands.dashboard import DEFAULT_HOST, app_path, streamlit_command


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_app_it_runs_is_the_packaged_entry_script_with_its_pages() -> None:
    app = app_path()
    assert app.name == "app.py" and app.is_file()
    for page in ("overview", "chargeback", "calls", "whatif", "prices"):
        assert (app.parent / "app_pages" / f"{page}.py").is_file(), page


def test_streamlit_is_headless_without_usage_stats_and_bound_where_asked() -> None:
    from dashboard.serve import APP

    command = streamlit_command("127.0.0.1", 8765)
    assert command[1:3] == ["-m", "dashboard.serve"] and APP == app_path()
    assert _option(command, "--server.address") == "127.0.0.1"
    assert _option(command, "--server.port") == "8765"
    assert _option(command, "--server.headless") == "true"
    assert _option(command, "--browser.gatherUsageStats") == "false"


def test_it_binds_loopback_unless_told_otherwise() -> None:
    assert DEFAULT_HOST == "127.0.0.1"
    help_text = CliRunner().invoke(main, ["dashboard", "--help"]).output
    assert "--host" in help_text and "127.0.0.1" in help_text and "--port" in help_text and "--db" in help_text


def test_a_database_url_it_cannot_use_is_one_line_and_exit_2_before_any_server_starts() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "collector.cli", "dashboard", "--db", "mysql://u:hunter2@db/x", "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "dsmeter: error:" in proc.stderr and "SQLite and PostgreSQL" in proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_port_out_of_range_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["dashboard", "--port", "70000"])
    assert result.exit_code == 2 and "70000" in result.output


def test_demo_ends_by_serving_the_dashboard_on_the_ledger_it_recorded(tmp_path: Path) -> None:
    import os
    import re
    import signal

    import httpx

    from test_dashboard_browser import _Output, _dsmeter, _stop

    url = f"sqlite:///{tmp_path / 'demo.db'}"
    process = subprocess.Popen(
        [*_dsmeter(), "demo", "--db", url, "--days", "1", "--calls-per-day", "20", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = _Output(process.stdout)
    try:
        address = output.wait_for(re.compile(r"URL: (http://127\.0\.0\.1:\d+)"), 120, process).group(1)
        assert "Recorded 20 calls" in "".join(output.lines)
        assert f"(ledger: {url})" in "".join(output.lines)
        health = httpx.get(f"{address}/_stcore/health", timeout=10)
        assert health.status_code == 200 and health.text == "ok"
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        _stop(process)


def test_warming_the_server_pays_streamlits_first_run_costs_before_any_visitor() -> None:
    # A fresh interpreter, as `dsmeter dashboard` starts one: what warm() leaves loaded there
    # is what the first visitor's page run no longer waits for (found with py-spy).
    script = (
        "import sys\n"
        "import streamlit.delta_generator as dg\n"
        "assert 'streamlit.emojis' not in sys.modules and not dg._use_warning_has_been_displayed\n"
        "from dashboard.serve import warm\n"
        "warm()\n"
        "from collector.pricebook import shipped_book\n"
        "print('streamlit.emojis' in sys.modules, dg._use_warning_has_been_displayed,\n"
        "      shipped_book.cache_info().currsize, 'dashboard.data' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True", "1", "True"]


def test_warming_the_server_imports_the_ledgers_driver_and_freezes_what_it_loaded() -> None:
    # psycopg's import (0.2 s) was the first PostgreSQL visitor's to pay; and Streamlit's
    # collection after every script run scanned every object the imports left (100-400 ms).
    script = (
        "import gc, sys\n"
        "assert 'psycopg' not in sys.modules and gc.get_freeze_count() == 0\n"
        "from dashboard.serve import warm\n"
        "warm()\n"
        "print('psycopg' in sys.modules, gc.get_freeze_count() > 100_000)\n"
    )
    env = {**os.environ, "DSMETER_DATABASE_URL": "postgresql+psycopg://reader@127.0.0.1:9/ledger"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]


def test_warming_the_server_prints_no_warnings_about_caches_it_has_not_made_yet() -> None:
    # Importing the pages decorates their loaders with st.cache_data before `streamlit run` has
    # a runtime, and Streamlit warned once per loader ("No runtime found, using
    # MemoryCacheStorageManager"): a dozen lines a new user saw under `dsmeter demo`. The caches
    # themselves are made on first call, under the runtime, so the warning is about nothing.
    done = subprocess.run([sys.executable, "-c", "from dashboard.serve import warm\nwarm()\n"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No runtime found" not in done.stderr + done.stdout
    assert "WARNING" not in done.stderr
