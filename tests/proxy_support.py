"""What the proxy tests share: a sink that collects the proxy's records, and a proxy starter.

The ``start_proxy`` fixture (tests/conftest.py) starts ``ProxyThread``s on a free port with a
``RecordSink`` each and stops them (forced) when the test ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from collector.proxy import ProxyConfig
from collector.proxy_server import ProxyThread
from collector.record import UsageRecord

__all__ = ["RecordSink", "StartProxy", "proxy_starter"]


class RecordSink:
    """A thread-safe list of the records a proxy (or a metered client) hands over."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self._lock = threading.Lock()

    def __call__(self, record: UsageRecord) -> None:
        with self._lock:
            self.records.append(record)

    def wait(self, n: int, timeout: float = 5.0) -> list[UsageRecord]:
        # The proxy hands its record over as its handler ends, a moment after the client saw the end.
        deadline = time.monotonic() + timeout
        while len(self.records) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        return list(self.records)


StartProxy = Callable[..., tuple[ProxyThread, RecordSink]]


def proxy_starter() -> Iterator[StartProxy]:
    started: list[ProxyThread] = []

    def start(upstream: str, **options: Any) -> tuple[ProxyThread, RecordSink]:
        sink = RecordSink()
        proxy = ProxyThread(ProxyConfig(upstream=upstream, port=0, **options), sink).start()
        started.append(proxy)
        return proxy, sink

    yield start
    for proxy in started:
        proxy.stop(force=True)
