"""The benchmarks' load generator: a lean HTTP/1.1 streaming client, closed loop, on loopback.

Every target (the simulator directly, dsmeter's proxy, LiteLLM's) shares the machine's
cores with the client that loads it, so what the client spends per chunk is taken from
the target. This one parses with httptools on uvloop and does nothing per read but count
events: about a quarter of what aiohttp's client spent per stream here, so the figures say
more about the targets and less about the client. Each of N workers keeps one keep-alive
connection and starts its next stream when one ends. With ``stagger``, worker k waits k times
that long before its first measured stream: N streams stay in flight, but they arrive spread
out, as real traffic does, instead of N at the same instant.

Time to first byte is taken at the first byte of the body (the first SSE bytes), as a
streaming client sees it; time to last byte when the body is complete.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from collector import event_loop

__all__ = ["Sample", "closed_loop"]


@dataclass
class Sample:
    ttfb: float  # seconds from sending the request to the first byte of the body
    ttlb: float  # ... to the last byte
    chunks: int  # SSE events (``data:`` lines) received


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._done: asyncio.Future[Sample] | None = None
        self._started = 0.0
        self._first: float | None = None
        self._events = 0
        self._tail = b""
        self._status = 0
        self._error = b""
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes) -> asyncio.Future[Sample]:
        assert self._transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._first = None
        self._events = 0
        self._tail = b""
        self._status = 0
        self._error = b""
        self._started = time.perf_counter()
        self._transport.write(payload)
        return self._done

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._first is None:
            self._first = time.perf_counter()
        if self._status != 200:
            self._error += body[:2000]
            return
        # An event's "data: " may be split across two reads: count over the seam once.
        joined = self._tail + body
        self._events += joined.count(b"data: ") - self._tail.count(b"data: ")
        self._tail = joined[-5:]

    def on_message_complete(self) -> None:
        ended = time.perf_counter()
        self.reusable = self._parser.should_keep_alive()
        done = self._done
        if done is None or done.done():
            return
        if self._status != 200:
            done.set_exception(RuntimeError(f"HTTP {self._status}: {self._error[:300]!r}"))
            return
        done.set_result(Sample(ttfb=(self._first or ended) - self._started, ttlb=ended - self._started,
                               chunks=self._events))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"the connection closed mid-response ({exc})"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _request(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return parts.hostname, parts.port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _run(url: str, concurrency: int, streams: int, body: bytes, headers: dict[str, str],
               stagger: float) -> tuple[float, list[Sample]]:
    host, port, payload = _request(url, body, headers)
    loop = asyncio.get_running_loop()

    async def connect() -> _Connection:
        return (await loop.create_connection(_Connection, host, port))[1]

    connections = [await connect() for _ in range(concurrency)]
    try:
        # One stream per connection first, so connecting and warming up are not measured. Staggered,
        # each worker's own first stream is that warm-up, so the measured streams all begin once the
        # ramp is over and every one of them starts with the others in flight.
        if not stagger:
            await asyncio.gather(*(conn.send(payload) for conn in connections))
        remaining = streams
        samples: list[Sample] = []

        async def worker(slot: int) -> None:
            nonlocal remaining
            if stagger:
                await asyncio.sleep(slot * stagger)
                await connections[slot].send(payload)
            while remaining > 0:
                remaining -= 1
                began = time.perf_counter()
                if not connections[slot].reusable:  # the server closed it: a client reconnects, and waits for that
                    connections[slot] = await connect()
                sample = await connections[slot].send(payload)
                waited = connections[slot]._started - began
                samples.append(Sample(sample.ttfb + waited, sample.ttlb + waited, sample.chunks))

        started = time.perf_counter()
        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
        return time.perf_counter() - started, samples
    finally:
        for conn in connections:
            conn.close()


def closed_loop(url: str, concurrency: int, streams: int, body: bytes, headers: dict[str, str],
                stagger: float = 0.0) -> tuple[float, list[Sample]]:
    """``streams`` POSTs to ``url`` from ``concurrency`` connections at once: wall seconds and one sample each.

    ``stagger`` spreads the workers' first streams ``stagger`` seconds apart (see the module's docstring)."""
    result: list[tuple[float, list[Sample]]] = []

    async def main() -> None:
        result.append(await _run(url, concurrency, streams, body, headers, stagger))

    event_loop.run(main())
    return result[0]
