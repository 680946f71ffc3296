"""The metering proxy: an OpenAI/DeepSeek-compatible endpoint that forwards to one upstream
and meters every chat-completions (and Anthropic-format messages) call on the way.

Why aiohttp for both sides: measured on loopback with 200-chunk SSE streams, an aiohttp
server forwarding through an aiohttp client spent ~4.5 µs of CPU per chunk, against ~24 µs
for uvicorn + Starlette + httpx; both parse HTTP in C here, and the bytes go from one
socket to the other with no framework layer in between (the low-level ``web.Server``, no
router or middleware).

Each request is handled by ``ProxyApp.handle``:

- ``/metrics`` and ``/healthz`` are answered here; every other path goes to the configured
  upstream and nowhere else (``collector.proxy_http`` holds those rules).
- A metered call is driven through the shared metering core (``collector.metering``), the
  same ``CallMeter`` the httpx transport uses: the request body may gain
  ``stream_options.include_usage``, each upstream chunk goes through ``meter.feed`` and the
  bytes it returns are written to the client at once (no buffering beyond the SSE event the
  core may have to hold back to cut an injected usage-only chunk).
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

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from collector.fingerprint import fingerprint_secret
from collector.metering import (
    CallMeter,
    InvalidTags,
    Outcome,
    UpstreamDisconnected,
    UpstreamTimeout,
    UpstreamUnreachable,
    meter_for,
    prepare_request,
)
from collector.proxy_http import BadTarget, Upstream, checked_target, parse_upstream, request_headers, response_headers
from collector.proxy_metrics import MetricsExchange, ProxyMetrics, merge_snapshots, render
from collector.record import UsageRecord

__all__ = ["ProxyConfig", "ProxyApp", "Sink", "DEFAULT_PORT"]

log = logging.getLogger("dsmeter.proxy")

Sink = Callable[[UsageRecord], None]

DEFAULT_PORT = 8787
_MIB = 1 << 20
# Request headers the aiohttp client would otherwise add on its own: we forward what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
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


def _error_body(status: int, message: str, code: str) -> bytes:
    # The OpenAI/DeepSeek error envelope, so SDKs surface our own refusals like the upstream's.
    kind = "invalid_request_error" if status < 500 else "proxy_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def _neutral(error: BaseException) -> BaseException:
    """An aiohttp failure as the metering core's library-neutral error, so rows match the transport's."""
    if isinstance(error, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout()
    if isinstance(error, aiohttp.ClientConnectorError):
        return UpstreamUnreachable()
    if isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return UpstreamDisconnected()
    return error


class ProxyApp:
    """One worker's proxy: the request handler, its upstream session, metrics and sink."""

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
        self._exchange = exchange
        self._sink = sink
        self._session: aiohttp.ClientSession | None = None
        self._secret: bytes | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        # Read once per process: looking it up for every call costs filesystem calls on the hot path.
        self._secret = fingerprint_secret()
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes go through as the upstream sent them
            cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies must never reach another's call
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,  # never route through an ambient HTTP(S)_PROXY
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            return await self._handle(request)
        finally:
            self._tasks.discard(task)

    def _reject(self, status: int, message: str, code: str) -> web.Response:
        self.metrics.rejected(status)
        response = web.Response(status=status, body=_error_body(status, message, code), content_type="application/json")
        return response

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_target = request.raw_path
        if raw_target in _LOCAL_PATHS:
            return self._local(request, raw_target)
        try:
            target = checked_target(raw_target)
        except BadTarget as error:
            return self._reject(400, str(error), "invalid_request_target")
        body = await self._read_body(request)
        if body is None:
            response = self._reject(
                413,
                f"request body is larger than this proxy accepts ({self.config.max_body_bytes} bytes)",
                "request_too_large",
            )
            response.force_close()  # the unread rest of the body must not be taken for a next request
            return response
        call = prepare_request(request.method, request.path, body)
        if not call.metered:
            return await self._forward(request, target, body, request_headers(request.headers.items(), metered=False))
        try:
            meter = meter_for(
                call, request.headers, tags=self.config.tags, upstream=self.upstream.origin, secret=self._secret
            )
        except InvalidTags as error:
            return self._reject(400, f"X-Dsmeter-Tags: {error}", "invalid_tags")
        headers = request_headers(request.headers.items(), metered=True)
        gap = self.config.thinking_read_timeout if call.thinking else self.config.read_timeout
        return await self._forward(request, target, call.body, headers, meter, gap)

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            return None
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
            # The client waits for this before sending a large body (curl does past 1 MiB).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not request.body_exists:
            return b""
        body = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                return None

    def _local(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if path == "/healthz":
            state = {"status": "draining" if self.closing else "ok", "upstream": self.upstream.origin}
            return web.Response(status=503 if self.closing else 200, text=json.dumps(state), content_type="application/json")
        snapshot = self.metrics.snapshot()
        if self._exchange is not None:
            snapshot = merge_snapshots([snapshot, *self._exchange.others()])
        return web.Response(body=render(snapshot).encode(), headers={"Content-Type": _METRICS_CONTENT_TYPE})

    async def _forward(
        self,
        request: web.BaseRequest,
        target: str,
        body: bytes,
        headers: list[tuple[str, str]],
        meter: CallMeter | None = None,
        gap: float | None = None,
    ) -> web.StreamResponse:
        session = self._session
        assert session is not None, "ProxyApp.open() was not awaited"
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.connect_timeout,
            sock_connect=self.config.connect_timeout,
            sock_read=gap if gap is not None else self.config.read_timeout,
        )
        outcome: Outcome = "eof"
        error: BaseException | None = None
        upstream: aiohttp.ClientResponse | None = None
        response: web.StreamResponse | None = None
        ended = False
        self.metrics.in_flight += 1
        try:
            try:
                upstream = await session.request(
                    request.method,
                    URL(self.upstream.url_for(target), encoded=True),
                    data=body if body or request.method not in ("GET", "HEAD", "OPTIONS", "DELETE") else None,
                    headers=CIMultiDict(headers),
                    allow_redirects=False,
                    timeout=timeout,
                )
            except (asyncio.TimeoutError, aiohttp.ClientError) as failure:
                outcome = "timeout" if isinstance(failure, asyncio.TimeoutError) else "error"
                error = _neutral(failure)
                log.warning("dsmeter proxy: upstream %s failed before responding: %s", self.upstream.origin, error)
                status = 504 if outcome == "timeout" else 502
                code = "upstream_timeout" if outcome == "timeout" else "upstream_unreachable"
                if meter is None:
                    self.metrics.passthrough(status)
                return web.Response(
                    status=status,
                    body=_error_body(status, f"the upstream did not answer: {error}", code),
                    content_type="application/json",
                )
            status = upstream.status
            if meter is not None:
                meter.response_started(
                    status, upstream.headers.get("Content-Type"), upstream.headers.get("Content-Encoding")
                )
            else:
                self.metrics.passthrough(status)
            keep_length = meter is None or not (meter.call.include_usage_injected and status < 400)
            response = web.StreamResponse(
                status=status,
                reason=upstream.reason,
                headers=CIMultiDict(response_headers(upstream.headers.items(), keep_length=keep_length)),
            )
            await response.prepare(request)
            content = upstream.content
            if meter is None:
                while chunk := await content.readany():
                    await response.write(chunk)
            else:
                feed = meter.feed
                while chunk := await content.readany():
                    out = feed(chunk)
                    if out:
                        await response.write(out)
                tail = meter.feed_eof()
                if tail:
                    await response.write(tail)
            ended = True
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client hung up (or the proxy is shutting down)
            raise
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as failure:
            outcome, error = "timeout", _neutral(failure)
            assert response is not None
            # The upstream went silent: end the client's stream cleanly where it is. A body of
            # announced length cannot end early, so that connection is cut instead.
            if "Content-Length" in response.headers:
                _abort(request)
            else:
                await _end_quietly(response)
            return response
        except ConnectionResetError as failure:
            # Writing to the client failed: it is gone. (aiohttp's reset error is a ConnectionResetError.)
            outcome, error = "cancelled", failure
            return response or web.Response(status=499)
        except (aiohttp.ClientError, OSError) as failure:
            # The upstream broke mid-response: pass the break on, so the client sees what a direct call sees.
            outcome, error = "error", _neutral(failure)
            _abort(request)
            assert response is not None
            return response
        finally:
            self.metrics.in_flight -= 1
            if upstream is not None:
                if ended:
                    upstream.release()
                else:
                    # Closing the connection is what stops the provider generating (and billing).
                    upstream.close()
            if meter is not None:
                self._emit(meter.finish(outcome, error))


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


async def _end_quietly(response: web.StreamResponse) -> None:
    try:
        await response.write_eof()
    except ConnectionResetError:
        pass

