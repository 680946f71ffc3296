"""The metering proxy: an OpenAI/DeepSeek-compatible endpoint that forwards to one upstream
and meters every chat-completions (and Anthropic-format messages) call on the way.

The HTTP on both sides is ours, on httptools and asyncio protocols (``collector.proxy_wire``
toward clients, ``collector.upstream_pool`` toward the upstream); the module doc of
``proxy_wire`` says why. The event loop is uvloop where it is installed.

Each request is handled by ``ProxyApp.handle``:

- ``/metrics`` and ``/healthz`` are answered here; every other path goes to the configured
  upstream and nowhere else (``collector.proxy_http`` holds those rules).
- A metered call is driven through the shared metering core (``collector.metering``), the
  same ``CallMeter`` the httpx transport uses: the request body may gain
  ``stream_options.include_usage``, each upstream read goes through ``meter.feed`` and the
  bytes it returns are written to the client at once, from the read's own callback (no
  buffering beyond the SSE event the core may have to hold back to cut an injected
  usage-only chunk).
- Every metered call becomes exactly one record, whatever happens: the client hanging up
  (``cancelled``; the upstream connection is closed at once so the provider stops
  generating), the upstream going silent longer than the gap timeout (``timeout``; the
  client gets a 504 if nothing was sent yet, else a clean end of the stream), the upstream
  failing or cutting the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from urllib.parse import unquote

from multidict import CIMultiDict

from collector.fingerprint import fingerprint_secret
from collector.metering import (
    CallMeter,
    InvalidTags,
    Outcome,
    UpstreamError,
    UpstreamTimeout,
    meter_for,
    prepare_request,
)
from collector.proxy_http import BadTarget, Upstream, checked_target, parse_upstream, request_headers, response_headers
from collector.proxy_metrics import MetricsExchange, ProxyMetrics, merge_snapshots, render
from collector.proxy_wire import Limits, Request, Response, error_body
from collector.record import UsageRecord
from collector.upstream_pool import Exchange, UpstreamPool

__all__ = ["ProxyConfig", "ProxyApp", "Sink", "DEFAULT_PORT"]

log = logging.getLogger("dsmeter.proxy")

Sink = Callable[[UsageRecord], None]

DEFAULT_PORT = 8787
_MIB = 1 << 20
_LOCAL_PATHS = frozenset({"/metrics", "/healthz"})
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Everything a proxy process needs; plain data so it can be handed to worker processes."""

    upstream: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: str | None = None
    workers: int = 1
    max_body_bytes: int = 32 * _MIB
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # the longest gap between two reads from the upstream
    thinking_read_timeout: float = 300.0  # the same for calls that ask for thinking mode
    drain_timeout: float = 30.0  # on shutdown, how long in-flight calls may take to finish
    tags: Mapping[str, str] = field(default_factory=dict)  # attributed to every call

    def __post_init__(self) -> None:
        parse_upstream(self.upstream)  # fail early, with the CLI's one-line error


class ProxyApp:
    """One worker's proxy: the request handler, its upstream connections, metrics and sink."""

    def __init__(
        self,
        config: ProxyConfig,
        sink: Sink,
        *,
        metrics: ProxyMetrics | None = None,
        exchange: MetricsExchange | None = None,
    ) -> None:
        self.config = config
        self.upstream: Upstream = parse_upstream(config.upstream)
        self.metrics = metrics or ProxyMetrics()
        self._metrics_exchange = exchange
        self._sink = sink
        self._pool: UpstreamPool | None = None
        self._secret: bytes | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return Limits(max_body_bytes=self.config.max_body_bytes)

    async def open(self) -> None:
        # Read once per process: looking it up for every call costs filesystem calls on the hot path.
        self._secret = fingerprint_secret()
        self._pool = UpstreamPool(self.upstream, connect_timeout=self.config.connect_timeout)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for in-flight calls, then cancel the rest (each still a row)."""
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        return len(pending)

    # -- records --------------------------------------------------------------------------------

    def _emit(self, record: UsageRecord) -> None:
        self.metrics.observe(record)
        try:
            self._sink(record)
        except Exception:  # a broken sink is logged; the client's call goes on
            log.exception("dsmeter proxy: could not record a call")

    # -- handler --------------------------------------------------------------------------------

    async def handle(self, request: Request, response: Response) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(request, response)
        finally:
            self._tasks.discard(task)

    def _reject(self, response: Response, status: int, message: str, code: str) -> None:
        self.metrics.rejected(status)
        response.close_after()  # a client that sent this may not be speaking HTTP to us as we think (a CONNECT)
        response.send(status, error_body(status, message, code), "application/json")

    async def _handle(self, request: Request, response: Response) -> None:
        raw_target = request.target
        if raw_target in _LOCAL_PATHS:
            self._local(request, response, raw_target)
            return
        try:
            target = checked_target(raw_target)
        except BadTarget as error:
            self._reject(response, 400, str(error), "invalid_request_target")
            return
        body = request.body
        call = prepare_request(request.method, unquote(target.partition("?")[0]), body)
        if not call.metered:
            await self._forward(request, response, target, body, request_headers(request.headers, metered=False))
            return
        headers = CIMultiDict(request.headers)
        try:
            meter = meter_for(call, headers, tags=self.config.tags, upstream=self.upstream.origin, secret=self._secret)
        except InvalidTags as error:
            self._reject(response, 400, f"X-Dsmeter-Tags: {error}", "invalid_tags")
            return
        gap = self.config.thinking_read_timeout if call.thinking else self.config.read_timeout
        await self._forward(request, response, target, call.body, request_headers(request.headers, metered=True), meter, gap)

    def _local(self, request: Request, response: Response, path: str) -> None:
        if request.method not in ("GET", "HEAD"):
            response.send(405, b"", None, [("Allow", "GET, HEAD")])
            return
        if path == "/healthz":
            state = {"status": "draining" if self.closing else "ok", "upstream": self.upstream.origin}
            response.send(503 if self.closing else 200, json.dumps(state).encode(), "application/json")
            return
        snapshot = self.metrics.snapshot()
        if self._metrics_exchange is not None:
            snapshot = merge_snapshots([snapshot, *self._metrics_exchange.others()])
        response.send(200, render(snapshot).encode(), _METRICS_CONTENT_TYPE)

    async def _forward(
        self,
        request: Request,
        response: Response,
        target: str,
        body: bytes,
        headers: list[tuple[str, str]],
        meter: CallMeter | None = None,
        gap: float | None = None,
    ) -> None:
        pool = self._pool
        assert pool is not None, "ProxyApp.open() was not awaited"
        outcome: Outcome = "eof"
        error: BaseException | None = None
        exchange: Exchange | None = None
        ended = False
        self.metrics.in_flight += 1
        try:
            try:
                exchange = await pool.request(
                    request.method,
                    target,
                    headers,
                    body if body or request.method not in ("GET", "HEAD", "OPTIONS", "DELETE") else None,
                    gap=gap if gap is not None else self.config.read_timeout,
                )
            except UpstreamError as failure:
                outcome = "timeout" if isinstance(failure, UpstreamTimeout) else "error"
                error = failure
                log.warning("dsmeter proxy: upstream %s failed before responding: %s", self.upstream.origin, error)
                status = 504 if outcome == "timeout" else 502
                code = "upstream_timeout" if outcome == "timeout" else "upstream_unreachable"
                if meter is None:
                    self.metrics.passthrough(status)
                response.send(status, error_body(status, f"the upstream did not answer: {error}", code), "application/json")
                return
            status = exchange.status
            if meter is not None:
                meter.response_started(status, exchange.header("Content-Type"), exchange.header("Content-Encoding"))
            else:
                self.metrics.passthrough(status)
            keep_length = meter is None or not (meter.call.include_usage_injected and status < 400)
            out_headers = response_headers(exchange.headers, keep_length=keep_length)
            write, end = response.write, response.end
            relay: Callable[[bytes], None]
            finish: Callable[[bytes], None]
            if meter is None:
                relay, finish = write, end
                first = exchange.early
            else:
                feed, feed_eof = meter.feed, meter.feed_eof

                def relay_metered(data: bytes) -> None:
                    out = feed(data)
                    if out:
                        write(out)

                def finish_metered(data: bytes) -> None:
                    # The last read and the end of the response go out in one write.
                    out = feed(data) if data else b""
                    tail = feed_eof()
                    end(out + tail if tail else out)

                relay, finish = relay_metered, finish_metered

                first = feed(exchange.early) if exchange.early else b""
            if exchange.complete:  # the whole body came with the head: one write for all of it
                if meter is not None:
                    first += meter.feed_eof()
                response.start(status, out_headers, exchange.reason, first, last=True)
            else:
                response.start(status, out_headers, exchange.reason, first)
                response.relay_flow(exchange.pause, exchange.resume)
                await exchange.stream(relay, finish)
            ended = True
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client hung up (or the proxy is shutting down)
            raise
        except UpstreamTimeout as failure:
            outcome, error = "timeout", failure
            # The upstream went silent: end the client's stream cleanly where it is. A body of
            # announced length cannot end early, so that connection is cut instead.
            if response.length_framed:
                response.abort()
            else:
                response.end()
        except UpstreamError as failure:
            # The upstream broke mid-response: pass the break on, so the client sees what a direct call sees.
            outcome, error = "error", failure
            response.abort()
        finally:
            self.metrics.in_flight -= 1
            if exchange is not None:
                if ended:
                    exchange.release()
                else:
                    # Closing the connection is what stops the provider generating (and billing).
                    exchange.close()
            if meter is not None:
                self._emit(meter.finish(outcome, error))
