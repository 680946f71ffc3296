"""A real browser on the real server: ``dsmeter dashboard`` on a seeded ledger, loaded in headless Chromium.

Chromium is driven over the DevTools protocol (a websocket): navigate, wait until the
overview's total is on the page, take a screenshot into ``test-artifacts/``. Skipped, with
the reason, only where Debian's ``chromium`` is not installed (CI installs it).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from dashboard import format as fmt
from dashboard_seed import seed_through_writer, synthetic_records

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1600",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
START_TIMEOUT_S = 60.0
RENDER_TIMEOUT_S = 60.0


class _Output:
    """Collects a child's output lines on a thread, so its pipe never fills and blocks it."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float, process: subprocess.Popen[str]) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = pattern.search(line)
                if found:
                    return found
            if process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern.pattern!r} not seen; output so far:\n{''.join(self.lines)}")


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop a child we started (its own process group, so its children go too)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _dsmeter() -> list[str]:
    script = Path(sys.executable).parent / "dsmeter"
    return [str(script)] if script.exists() else [sys.executable, "-m", "collector.cli"]


@pytest.fixture
def seeded_ledger(sqlite_url: str) -> tuple[str, datetime]:
    now = datetime.now(timezone.utc)
    seed_through_writer(sqlite_url, list(synthetic_records(400, seed=7, start=now - timedelta(days=20), end=now)))
    return sqlite_url, now


@pytest.fixture
def dashboard_server(seeded_ledger: tuple[str, datetime], tmp_path: Path) -> Iterator[str]:
    url, _ = seeded_ledger
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path)}
    process = subprocess.Popen(
        [*_dsmeter(), "dashboard", "--db", url, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    output = _Output(process.stdout)
    try:
        found = output.wait_for(re.compile(r"URL: (http://127\.0\.0\.1:\d+)"), START_TIMEOUT_S, process)
        yield found.group(1)
    finally:
        _stop(process)


class _DevTools:
    """Just enough of the Chrome DevTools protocol: send a command, wait for its answer."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self._connection = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=10)
        self._ws = self._connection.__enter__()
        self._ids = itertools.count(1)
        self.requested: list[str] = []  # every URL the page asked for (once Network.enable was called)
        self.received: list[bytes] = []  # every binary websocket message the page received (likewise)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv(timeout=30))
            if reply.get("method") == "Network.requestWillBeSent":
                self.requested.append(reply["params"]["request"]["url"])
            if reply.get("method") == "Network.webSocketFrameReceived" and reply["params"]["response"]["opcode"] == 2:
                self.received.append(base64.b64decode(reply["params"]["response"]["payloadData"]))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result

    def close(self) -> None:
        self._connection.__exit__(None, None, None)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[_DevTools]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian's chromium package; .ci/run installs it)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    process = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t.get("type") == "page")
        tools = _DevTools(page["webSocketDebuggerUrl"])
        try:
            yield tools
        finally:
            tools.close()
    finally:
        _stop(process)
        shutil.rmtree(profile, ignore_errors=True)


def _overview_total(url: str, now: datetime) -> str:
    """The overview's "spend in the selected dates" figure, from the query layer, as the page writes it."""
    from collector import queries
    from dashboard.engine import open_read_only

    engine = open_read_only(url)
    try:
        start = (now - timedelta(days=29)).date()
        since = datetime(start.year, start.month, start.day, tzinfo=timezone.utc)
        until = datetime(now.year, now.month, now.day, tzinfo=timezone.utc) + timedelta(days=1)
        totals = queries.spend_totals(engine, queries.Filters(since=since, until=until))
    finally:
        engine.dispose()
    return fmt.money(totals["USD"], "USD")


# Elements whose front-end code Streamlit fetches only when the first of its kind arrives (its
# bundle splits them out), showing a placeholder until then.
LAZILY_LOADED = {"metric", "date_input", "multiselect", "selectbox", "vega_lite_chart", "arrow_vega_lite_chart",
                 "arrow_data_frame", "button", "download_button", "radio", "number_input", "slider", "checkbox"}


def _elements(messages: list[bytes]) -> list[tuple[str, str]]:
    """(element type, text) of every new element, in the order the server sent them."""
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    shown = []
    for raw in messages:
        message = ForwardMsg()
        message.ParseFromString(raw)
        if message.WhichOneof("type") == "delta" and message.delta.WhichOneof("type") == "new_element":
            element = message.delta.new_element
            kind = element.WhichOneof("type") or ""
            text = element.heading.body if kind == "heading" else ""
            shown.append((kind, text))
    return shown


def test_dsmeter_dashboard_serves_the_overview_total_to_a_real_browser(
    dashboard_server: str, chromium: _DevTools, seeded_ledger: tuple[str, datetime]
) -> None:
    url, now = seeded_ledger
    expected = _overview_total(url, now)
    chromium.call("Page.enable")
    chromium.call("Network.enable")
    chromium.call("Page.navigate", url=dashboard_server)
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = chromium.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                             returnByValue=True)["result"].get("value", "")
        if expected in text and "Spend per day by model" in text:
            break
        time.sleep(0.25)
    time.sleep(2.5)  # let the charts draw and the sidebar finish sliding in before the picture
    shot = chromium.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    ARTIFACTS.mkdir(exist_ok=True)
    picture = ARTIFACTS / "dashboard-overview.png"
    picture.write_bytes(base64.b64decode(shot["data"]))
    assert expected in text, f"overview total {expected} not on the page; page text:\n{text[:2000]}"
    # The total paints with the message that carries it only if it is neither lazily loaded
    # itself nor queued behind elements that are (bench_dashboard.py measures what that costs).
    elements = _elements(chromium.received)
    total_at = next((i for i, (kind, text) in enumerate(elements)
                     if kind == "heading" and text.replace("\\", "") == expected), None)
    assert total_at is not None, f"the total {expected} was not sent as a heading: {elements}"
    first_lazy = next(i for i, (kind, _) in enumerate(elements) if kind in LAZILY_LOADED)
    assert total_at < first_lazy, f"{elements[first_lazy][0]} was sent before the total: {elements}"
    outside = [url for url in chromium.requested if not url.startswith((dashboard_server, "data:", "blob:", "about:"))]
    assert chromium.requested and not outside, f"the dashboard asked for outside resources: {outside}"
    assert "Traceback" not in text
    assert picture.stat().st_size > 10_000
