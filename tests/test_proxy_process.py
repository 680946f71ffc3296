"""``dsmeter proxy`` as a real process (one or several workers) writing the real ledger.

The proxy runs as ``python -m collector.cli proxy`` with the test's data directory; the
upstream is the simulator on loopback; rows are read back from SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from collector.proxy import ProxyConfig
from collector.proxy_server import ProxyThread
from collector.queries import iter_export_rows
from collector.record import UsageRecord
from collector.simulator import Simulator
from collector.store import LedgerStore
from collector.writer import LedgerWriter

KEY = "sk-test-proxy-process-0123456789"
MESSAGES = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "Hello."}]


class ProxyProcess:
    """``dsmeter proxy`` in a child process; its address comes from the line it prints when ready."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "collector.cli", "proxy", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        self.base_url = ""

    def _pump_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def wait_ready(self, timeout: float = 60.0) -> ProxyProcess:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            pytest.fail(f"the proxy did not start: {''.join(self._stderr)}")
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        self.base_url = match.group(1)
        return self

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.process.send_signal(signum)
        code = self.process.wait(timeout)
        time.sleep(0.05)  # let the stderr pump take the last lines
        return code

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.kill()


def _rows(db: str) -> list[dict[str, Any]]:
    store = LedgerStore(db)
    try:
        return list(iter_export_rows(store.engine, None, None))
    finally:
        store.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.postgres
def test_200_concurrent_streams_through_two_workers_land_in_postgresql_exactly(
    postgres_url: str, proxies: list[ProxyProcess]
) -> None:
    with Simulator(seed=11) as sim:
        proxy = ProxyProcess("--upstream", sim.base_url, "--workers", "2", "--db", postgres_url)
        proxies.append(proxy)
        proxy.wait_ready()

        async def run() -> list[int]:
            limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
            async with httpx.AsyncClient(limits=limits, timeout=60) as http:
                client = openai.AsyncOpenAI(api_key=KEY, base_url=proxy.base_url, max_retries=0, http_client=http)

                async def one(i: int) -> int:
                    stream = await client.chat.completions.create(
                        model="deepseek-v4-flash", stream=True,
                        messages=[*MESSAGES, {"role": "user", "content": f"question {i}"}],
                        extra_headers={"X-Simulator-Output-Tokens": "40", "X-Dsmeter-Tags": f"batch=b{i % 4}"},
                    )
                    return sum([1 async for _ in stream])

                return await asyncio.gather(*[one(i) for i in range(200)])

        try:
            chunk_counts = asyncio.run(run())
        except openai.APIError as error:
            pytest.fail(f"{error!r}; proxy log:\n{proxy.stderr}")
        assert len(chunk_counts) == 200 and all(chunk_counts)
        time.sleep(1.5)  # one metrics publish interval: every worker's counters are in the sum
        scraped = {httpx.get(proxy.base_url + "/metrics").text for _ in range(4)}
        for text in scraped:  # whichever worker answers, it reports the whole proxy
            assert _metric(text, "dsmeter_proxy_workers") == 2
            assert _metric(text, 'dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="completed"}') == 200
        assert proxy.stop() == 0, proxy.stderr
        served = {call.request_id: call.usage for call in sim.calls}
    assert "Traceback" not in proxy.stderr
    rows = _rows(postgres_url)
    assert len(rows) == 200
    assert {row["status"] for row in rows} == {"completed"}
    assert len({row["request_id"] for row in rows}) == 200
    for row in rows:
        usage = served[row["provider_request_id"]]
        assert row["completion_tokens"] == usage["completion_tokens"] == 40
        assert row["prompt_cache_hit_tokens"] == usage["prompt_cache_hit_tokens"]
        assert row["prompt_cache_miss_tokens"] == usage["prompt_cache_miss_tokens"]
    assert sum(row["completion_tokens"] for row in rows) == 200 * 40


def test_ctrl_c_lets_the_stream_in_flight_finish_then_exits_quietly(
    sqlite_url: str, proxies: list[ProxyProcess]
) -> None:
    with Simulator(seed=5) as sim:
        proxy = ProxyProcess("--upstream", sim.base_url, "--db", sqlite_url, "--drain-timeout", "20")
        proxies.append(proxy)
        proxy.wait_ready()
        chunks: list[Any] = []
        streaming = threading.Event()

        def call() -> None:
            client = openai.OpenAI(api_key=KEY, base_url=proxy.base_url, max_retries=0)
            with client.chat.completions.create(
                model="deepseek-v4-flash", messages=MESSAGES, stream=True,
                extra_headers={"X-Simulator-Output-Tokens": "30", "X-Simulator-Chunk-Delay-Ms": "30"},
            ) as stream:
                for chunk in stream:
                    chunks.append(chunk)
                    streaming.set()

        caller = threading.Thread(target=call)
        caller.start()
        assert streaming.wait(10)
        code = proxy.stop(signal.SIGINT)
        caller.join(10)
    assert code == 0
    assert "Traceback" not in proxy.stderr and "KeyboardInterrupt" not in proxy.stderr
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"
    rows = _rows(sqlite_url)
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [("completed", 30)]


def test_sigterm_with_workers_cancels_what_outlives_the_drain_and_records_it(
    sqlite_url: str, proxies: list[ProxyProcess]
) -> None:
    with Simulator(seed=5) as sim:
        proxy = ProxyProcess("--upstream", sim.base_url, "--db", sqlite_url, "--workers", "2", "--drain-timeout", "0.5")
        proxies.append(proxy)
        proxy.wait_ready()
        streaming = threading.Event()

        def call() -> None:
            client = openai.OpenAI(api_key=KEY, base_url=proxy.base_url, max_retries=0)
            try:
                with client.chat.completions.create(
                    model="deepseek-v4-flash", messages=MESSAGES, stream=True,
                    extra_headers={"X-Simulator-Output-Tokens": "5000", "X-Simulator-Chunk-Delay-Ms": "5"},
                ) as stream:
                    for _ in stream:
                        streaming.set()
            except (openai.APIError, httpx.HTTPError):
                pass

        caller = threading.Thread(target=call)
        caller.start()
        assert streaming.wait(10)
        started = time.monotonic()
        assert proxy.stop() == 0, proxy.stderr
        assert time.monotonic() - started < 10
        caller.join(10)
    rows = _rows(sqlite_url)
    assert [row["status"] for row in rows] == ["cancelled"]
    assert rows[0]["completion_tokens"] and rows[0]["completion_tokens"] < 5000


def test_bad_options_are_one_line_errors(proxies: list[ProxyProcess]) -> None:
    bad_upstream = subprocess.run(
        [sys.executable, "-m", "collector.cli", "proxy", "--upstream", "ftp://example.com"],
        capture_output=True, text=True, timeout=60,
    )
    assert bad_upstream.returncode == 2
    assert bad_upstream.stderr.strip().splitlines() == [
        "dsmeter: error: --upstream must be an http:// or https:// URL, got 'ftp://example.com'"
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        busy = subprocess.run(
            [sys.executable, "-m", "collector.cli", "proxy", "--upstream", "http://127.0.0.1:9", "--port", port],
            capture_output=True, text=True, timeout=60,
        )
    assert busy.returncode == 2
    assert len(busy.stderr.strip().splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr


def test_proxied_calls_land_in_the_ledger_once_each_and_written_cost_reaches_the_metrics(db_url: str) -> None:
    def pricer(record: UsageRecord) -> UsageRecord:
        # A stand-in tariff: the writer applies whatever pricer it is given before storing.
        return record.replace(cost=Decimal("0.000001") * (record.completion_tokens or 0), currency="USD")

    writer = LedgerWriter(db_url, pricer=pricer)
    with Simulator(seed=3) as sim:
        with ProxyThread(ProxyConfig(upstream=sim.base_url, port=0, tags={"via": "proxy"}), writer=writer) as proxy:
            client = openai.OpenAI(api_key=KEY, base_url=proxy.base_url, max_retries=0)
            for _ in range(3):
                with client.chat.completions.create(model="deepseek-v4-flash", messages=MESSAGES, stream=True) as s:
                    list(s)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="deepseek-v4-flash", messages=MESSAGES, stream=True,
                                               extra_headers={"X-Simulator-Fault": "429"})
            time.sleep(0.1)
            assert writer.flush(timeout=30)
            time.sleep(0.1)
            metrics = httpx.get(proxy.base_url + "/metrics").text
        served = [c.usage for c in sim.calls if c.usage]
    writer.close()
    rows = _rows(db_url)
    assert len(rows) == 4
    completed = [r for r in rows if r["status"] == "completed"]
    assert sorted(r["completion_tokens"] for r in completed) == sorted(u["completion_tokens"] for u in served)
    assert all(r["tags"] == {"via": "proxy"} for r in rows)
    expected_cost = Decimal("0.000001") * sum(u["completion_tokens"] for u in served)
    assert Decimal(str(_metric(metrics, 'dsmeter_proxy_cost_total{model="deepseek-v4-flash",currency="USD"}'))) == expected_cost


def test_a_proxy_process_loads_its_price_book_then_takes_its_startup_heap_out_of_collections(tmp_path: Any) -> None:
    import gc

    from collector.proxy_server import _freeze_startup_heap

    writer = LedgerWriter(f"sqlite:///{tmp_path / 'ledger.db'}", spool_dir=tmp_path / "spool")
    frozen = gc.get_freeze_count()
    try:
        _freeze_startup_heap(writer)
        book = writer.pricer.book()  # type: ignore[attr-defined]
        assert book is not None
        assert gc.get_freeze_count() > frozen
        # Loaded before the freeze, so no collection walks it: frozen objects are in no generation.
        assert not any(obj is book for obj in gc.get_objects())
    finally:
        gc.unfreeze()
        writer.close()
