"""httpx transports that meter every chat-completions call made through them.

``metered_client()`` / ``async_metered_client()`` return ordinary httpx clients, so they
work as ``http_client=`` for the official ``openai`` SDK and in plain httpx code. Bytes
reach the caller as they arrive; a copy is parsed on the way by the shared metering core
(``collector.metering``), and one ``UsageRecord`` per call goes to the sink (by default the
background ledger writer, which never blocks the stream).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import httpx

from collector.metering import (
    TAGS_HEADER,
    CallMeter,
    Outcome,
    PreparedCall,
    UpstreamDisconnected,
    UpstreamTimeout,
    UpstreamUnreachable,
    meter_for,
    prepare_request,
)
from collector.record import UsageRecord, utcnow

__all__ = [
    "MeteringTransport",
    "AsyncMeteringTransport",
    "metered_client",
    "async_metered_client",
    "Sink",
]

log = logging.getLogger("dsmeter.transport")

Sink = Callable[[UsageRecord], None]

# The openai SDK's own default; keeping it means the SDK applies its per-request timeouts unchanged.
DEFAULT_TIMEOUT = httpx.Timeout(timeout=600.0, connect=5.0)
_TRANSPORT_KWARGS = ("verify", "cert", "http1", "http2", "limits", "trust_env", "proxy", "retries")


def _neutral(error: BaseException | None) -> BaseException | None:
    # httpx's failures in the core's library-neutral terms, so the proxy's rows for the same failure match.
    if isinstance(error, httpx.TimeoutException):
        return UpstreamTimeout()
    if isinstance(error, httpx.ConnectError):
        return UpstreamUnreachable()
    if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError)):
        return UpstreamDisconnected()
    return error


def _emit(sink: Sink, meter: CallMeter, outcome: Outcome, error: BaseException | None = None) -> None:
    """Finish the meter once and hand the record over; metering must never break the caller."""
    if meter.finished:
        return
    try:
        sink(meter.finish(outcome, _neutral(error)))
    except Exception:  # pragma: no cover - a broken sink is logged, the caller's call goes on
        log.exception("dsmeter: could not record a call")


def _upstream_of(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}"


class _Prepared:
    """A request made ready for metering: the meter, and the request to send upstream."""

    def __init__(
        self,
        request: httpx.Request,
        tags: Mapping[str, str],
        clock: Callable[[], datetime],
    ) -> None:
        call: PreparedCall = prepare_request(request.method, request.url.path, request.content)
        self.call = call
        self.meter: CallMeter | None = None
        self.request = request
        if not call.metered:
            return
        # Attribution first: a malformed tags header fails the call before anything is sent.
        self.meter = meter_for(call, request.headers, tags=tags, upstream=_upstream_of(request.url), clock=clock)
        headers = request.headers.copy()
        headers.pop(TAGS_HEADER, None)
        # Our copy is parsed as it passes, so ask for plain bytes rather than compressed ones.
        headers["accept-encoding"] = "identity"
        # httpx recomputes the length for the (possibly rewritten) body.
        headers.pop("content-length", None)
        headers.pop("transfer-encoding", None)
        self.request = httpx.Request(
            request.method, request.url, headers=headers, content=call.body, extensions=request.extensions
        )

    def started(self, response: httpx.Response) -> None:
        assert self.meter is not None
        self.meter.response_started(
            response.status_code,
            response.headers.get("content-type"),
            response.headers.get("content-encoding"),
        )


def _abandoned(sink: Sink, meter: CallMeter) -> None:
    # The response was garbage-collected without being closed: still a row, never silence.
    _emit(sink, meter, "cancelled")


class _MeteredStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, meter: CallMeter, sink: Sink) -> None:
        self._inner = inner
        self._meter = meter
        self._sink = sink
        self._finalizer = weakref.finalize(self, _abandoned, sink, meter)

    def __iter__(self) -> Iterator[bytes]:
        meter = self._meter
        feed = meter.feed  # looked up once, not once per read
        try:
            for chunk in self._inner:
                out = feed(chunk)
                if out:
                    yield out
            tail = meter.feed_eof()
            if tail:
                yield tail
        except httpx.TimeoutException as error:
            _emit(self._sink, meter, "timeout", error)
            raise
        except (httpx.TransportError, httpx.StreamError) as error:
            _emit(self._sink, meter, "error", error)
            raise
        _emit(self._sink, meter, "eof")

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            _emit(self._sink, self._meter, "cancelled")
            self._finalizer.detach()


class _AsyncMeteredStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, meter: CallMeter, sink: Sink) -> None:
        self._inner = inner
        self._meter = meter
        self._sink = sink
        self._finalizer = weakref.finalize(self, _abandoned, sink, meter)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        meter = self._meter
        feed = meter.feed  # looked up once, not once per read
        try:
            async for chunk in self._inner:
                out = feed(chunk)
                if out:
                    yield out
            tail = meter.feed_eof()
            if tail:
                yield tail
        except httpx.TimeoutException as error:
            _emit(self._sink, meter, "timeout", error)
            raise
        except (httpx.TransportError, httpx.StreamError) as error:
            _emit(self._sink, meter, "error", error)
            raise
        _emit(self._sink, meter, "eof")

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            _emit(self._sink, self._meter, "cancelled")
            self._finalizer.detach()


def _outcome_of(error: BaseException) -> Outcome:
    return "timeout" if isinstance(error, httpx.TimeoutException) else "error"


class MeteringTransport(httpx.BaseTransport):
    """Wraps another transport; meters POST …/chat/completions (and Anthropic /v1/messages)."""

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        sink: Sink,
        tags: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._transport = transport or httpx.HTTPTransport()
        self._sink = sink
        self._tags = dict(tags or {})
        self._clock = clock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        prepared = _Prepared(request, self._tags, self._clock)
        meter = prepared.meter
        if meter is None:
            return self._transport.handle_request(request)
        try:
            response = self._transport.handle_request(prepared.request)
        except BaseException as error:
            _emit(self._sink, meter, _outcome_of(error) if isinstance(error, Exception) else "cancelled", error)
            raise
        prepared.started(response)
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_MeteredStream(response.stream, meter, self._sink),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._transport.close()


class AsyncMeteringTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of ``MeteringTransport``."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        sink: Sink,
        tags: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._transport = transport or httpx.AsyncHTTPTransport()
        self._sink = sink
        self._tags = dict(tags or {})
        self._clock = clock

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        prepared = _Prepared(request, self._tags, self._clock)
        meter = prepared.meter
        if meter is None:
            return await self._transport.handle_async_request(request)
        try:
            response = await self._transport.handle_async_request(prepared.request)
        except BaseException as error:
            _emit(self._sink, meter, _outcome_of(error) if isinstance(error, Exception) else "cancelled", error)
            raise
        prepared.started(response)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_AsyncMeteredStream(response.stream, meter, self._sink),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    transport_kwargs = {k: kwargs.pop(k) for k in _TRANSPORT_KWARGS if k in kwargs}
    kwargs.setdefault("timeout", DEFAULT_TIMEOUT)
    return transport_kwargs, kwargs


def _default_sink(db: str | None) -> Sink:
    from collector.writer import default_writer

    return default_writer(db).submit


def metered_client(
    *,
    db: str | None = None,
    tags: Mapping[str, str] | None = None,
    sink: Sink | None = None,
    transport: httpx.BaseTransport | None = None,
    clock: Callable[[], datetime] = utcnow,
    **client_kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` that meters every chat-completions call into the ledger.

    ``db`` is a SQLAlchemy URL (default: ``DSMETER_DATABASE_URL``, else the embedded SQLite
    file); ``tags`` attribute every call (a request may add more with an ``X-Dsmeter-Tags``
    header, which is stripped before it leaves). Other keyword arguments go to httpx.
    """
    transport_kwargs, client_kwargs = _split_kwargs(dict(client_kwargs))
    inner = transport or httpx.HTTPTransport(**transport_kwargs)
    metering = MeteringTransport(inner, sink=sink or _default_sink(db), tags=tags, clock=clock)
    return httpx.Client(transport=metering, **client_kwargs)


def async_metered_client(
    *,
    db: str | None = None,
    tags: Mapping[str, str] | None = None,
    sink: Sink | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Callable[[], datetime] = utcnow,
    **client_kwargs: Any,
) -> httpx.AsyncClient:
    """The asyncio twin of ``metered_client`` (for ``AsyncOpenAI(http_client=...)``)."""
    transport_kwargs, client_kwargs = _split_kwargs(dict(client_kwargs))
    inner = transport or httpx.AsyncHTTPTransport(**transport_kwargs)
    metering = AsyncMeteringTransport(inner, sink=sink or _default_sink(db), tags=tags, clock=clock)
    return httpx.AsyncClient(transport=metering, **client_kwargs)
