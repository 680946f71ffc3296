"""HTTP/1.1 toward the upstream: pooled keep-alive connections, one exchange at a time each.

The proxy's counterpart of ``collector.proxy_wire`` (same parser, same reasons: the body of
a streamed call is relayed by callbacks, one per upstream read, with no task switch per
chunk). ``UpstreamPool.request`` sends a request and returns an ``Exchange`` once the
response head has arrived; ``Exchange.stream(on_body)`` then hands every further read of
the body to ``on_body`` and resolves when the body is complete.

Failures are the metering core's library-neutral errors, so rows read the same whichever
carrier had the call: ``UpstreamUnreachable`` (no connection), ``UpstreamTimeout`` (no byte
for the gap timeout), ``UpstreamDisconnected`` (the connection ended mid-response).

- The gap timeout is the longest silence allowed between two reads, and before the head.
  It is checked by one timer per gap, not re-armed per chunk.
- An idle connection is reused newest first and closed after ``idle_timeout``. If a reused
  connection turns out to have been closed by the upstream before it sent a byte, the
  request is sent again once, on a new connection: the upstream closed it while idle, so
  it never ran the call.
- ``Exchange.close()`` closes the connection at once: that is what stops the provider
  generating, and billing, when the proxy's client has gone.
- Bodies are not decompressed: the proxy forwards them as the upstream sent them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import httptools

from collector.metering import UpstreamDisconnected, UpstreamTimeout, UpstreamUnreachable
from collector.proxy_http import Upstream, first_header
from collector.proxy_wire import no_delay

__all__ = ["UpstreamPool", "Exchange"]

_IDLE_TIMEOUT = 15.0  # shorter than common upstream keep-alive timeouts (nginx 75 s, DeepSeek's own unknown)
_MAX_IDLE = 256
_MAX_HEAD_BYTES = 256 << 10
_HEAD_DONE, _BODY_DONE = 1, 2


class _Stale(Exception):
    """A reused connection was closed before the upstream sent a byte: safe to send again."""


class Exchange:
    """One request and its response on one upstream connection."""

    __slots__ = ("_conn", "status", "reason", "headers", "early", "method")

    def __init__(self, conn: _Connection, method: str) -> None:
        self._conn = conn
        self.method = method
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.early = b""  # body bytes that arrived with the head

    def header(self, name: str) -> str | None:
        """The first value of a response header (case-insensitive)."""
        return first_header(self.headers, name)

    @property
    def complete(self) -> bool:
        """The whole body has arrived already (with the head)."""
        return self._conn.state == _BODY_DONE

    def stream(
        self, on_body: Callable[[bytes], None], on_end: Callable[[bytes], None] | None = None
    ) -> asyncio.Future[None]:
        """Hand each further read of the body to ``on_body``; the future ends with the body.

        With ``on_end``, the read that completes the body goes to ``on_end`` instead (``b""`` if
        the end came with no bytes), from the read's own callback: the caller can send the
        last bytes and its own end of the response in one write.
        """
        return self._conn.stream(on_body, on_end)

    def pause(self) -> None:
        self._conn.pause()

    def resume(self) -> None:
        self._conn.resume()

    def release(self) -> None:
        """The exchange is over: keep the connection for the next request if it can be reused."""
        self._conn.release()

    def close(self) -> None:
        """Close the connection now (the provider stops generating)."""
        self._conn.close()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: Any = None
        self._parser = httptools.HttpResponseParser(self)
        self.state = 0
        self.lost = False
        self.reused = False
        self._exchange: Exchange | None = None
        self._head: asyncio.Future[Exchange] | None = None
        self._done: asyncio.Future[None] | None = None
        self._on_body: Callable[[bytes], None] | None = None
        self._on_end: Callable[[bytes], None] | None = None
        self._pieces: list[bytes] = []
        self._received = 0
        self._head_bytes = 0
        self._keep_alive = False
        self._until_eof = False  # the body has neither a length nor chunks: it ends with the connection
        self._head_only = False
        self._paused = False
        self._gap = 0.0
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._status_text: list[bytes] = []
        self._failure: BaseException | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        no_delay(transport)

    def data_received(self, data: bytes) -> None:
        if self._exchange is None:
            self.close()  # bytes nobody asked for: the connection is not in a state to reuse
            return
        self._received += len(data)
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(UpstreamDisconnected(f"the upstream sent a malformed response: {error}"))
            return
        if self.state == 0:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._fail(UpstreamDisconnected("the upstream's response head is too large"))
            return
        self._deliver()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timers()
        self._pool.forget(self)
        if self._exchange is None:
            return
        if self.state == _HEAD_DONE and self._until_eof:
            self.state = _BODY_DONE  # a close-delimited body ends here, complete
            self._keep_alive = False
            self._deliver()
            return
        if self.state != _BODY_DONE:
            if self.state == 0 and self._received == 0 and self.reused:
                self._fail(_Stale())
            else:
                self._fail(UpstreamDisconnected())

    # -- parser callbacks -----------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._status_text.append(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._exchange is not None
        self._exchange.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        status = self._parser.get_status_code()
        if status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            exchange.headers = []
            self._status_text = []
            return
        exchange.status = status
        exchange.reason = b"".join(self._status_text).decode("latin-1")
        self._keep_alive = self._parser.should_keep_alive()
        chunked = length = False
        for name, value in exchange.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = True
            elif lowered == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        no_body = self._head_only or status in (204, 304)
        self._until_eof = not (chunked or length or no_body)
        self.state = _HEAD_DONE
        if no_body:
            # llhttp cannot be told a response answers a HEAD; the body it would wait for never comes.
            self.state = _BODY_DONE
            if self._head_only:
                self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        if self.state == _HEAD_DONE:
            self.state = _BODY_DONE

    # -- the exchange ---------------------------------------------------------------------------------

    def send(self, request: bytes, method: str, gap: float) -> asyncio.Future[Exchange]:
        self._cancel_idle()
        exchange = Exchange(self, method)
        self._exchange = exchange
        self._head_only = method == "HEAD"
        self.state = 0
        self._received = 0
        self._head_bytes = 0
        self._pieces = []
        self._status_text = []
        self._on_body = None
        self._on_end = None
        self._done = None
        self._failure = None
        self._head = self._loop.create_future()
        self._gap = gap
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + gap, self._check_gap)
        self.transport.write(request)
        return self._head

    def _deliver(self) -> None:
        """After a read: hand over the head, then any body bytes, then the end of the body."""
        head = self._head
        if head is not None:
            self._head = None
            exchange = self._exchange
            assert exchange is not None
            pieces = self._pieces
            if pieces:
                exchange.early = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._pieces = []
            if not head.done():
                head.set_result(exchange)
            return
        on_body = self._on_body
        if on_body is None:
            return  # nobody is streaming yet: the pieces wait for ``stream``
        done = self.state == _BODY_DONE and self._done is not None and not self._done.done()
        pieces = self._pieces
        self._pieces = []
        data = (pieces[0] if len(pieces) == 1 else b"".join(pieces)) if pieces else b""
        try:
            if done and self._on_end is not None:
                self._on_end(data)
            elif data:
                on_body(data)
        except Exception as error:  # noqa: BLE001 - ends this exchange, never the loop
            self._fail(error)
            return
        if done:
            assert self._done is not None
            self._cancel_timers()
            self._done.set_result(None)

    def stream(
        self, on_body: Callable[[bytes], None], on_end: Callable[[bytes], None] | None
    ) -> asyncio.Future[None]:
        done = self._loop.create_future()
        self._done = done
        self._on_body = on_body
        self._on_end = on_end
        if self._pieces or self.state == _BODY_DONE:  # bytes, or the end, came before this call
            self._deliver()
        if not done.done():
            if self._failure is not None:
                done.set_exception(self._failure)
            elif self.lost:
                done.set_exception(UpstreamDisconnected())
        return done

    def _check_gap(self) -> None:
        self._timer = None
        if self._exchange is None or self.state == _BODY_DONE:
            return
        now = self._loop.time()
        if self._paused:
            self._last_read = now  # the client is slow, not the upstream: the gap starts again
        due = self._last_read + self._gap
        if now < due:
            self._timer = self._loop.call_at(due, self._check_gap)
            return
        self._fail(UpstreamTimeout())

    def _fail(self, error: BaseException) -> None:
        self._failure = error
        self._cancel_timers()
        for future in (self._head, self._done):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # the waiter may be gone (cancelled): never "exception was never retrieved"
        self._head = None
        self._keep_alive = False
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def pause(self) -> None:
        if not self._paused and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and not self.lost:
            self._paused = False
            self._last_read = self._loop.time()
            self.transport.resume_reading()

    def release(self) -> None:
        reusable = self.state == _BODY_DONE and self._keep_alive and not self.lost and not self._paused
        self._exchange = None
        self._on_body = None
        self._on_end = None
        self._done = None
        self._cancel_timers()
        if reusable:
            self.reused = True
            self._pool.keep(self)
        else:
            self.close()

    def close(self) -> None:
        self._exchange = None
        self._cancel_timers()
        self._cancel_idle()
        if self.transport is not None and not self.lost:
            self.transport.abort()
        self._pool.forget(self)

    def idle_for(self, seconds: float) -> None:
        self._idle_timer = self._loop.call_later(seconds, self.close)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class UpstreamPool:
    """Connections to the one configured upstream (TLS for https, verified against the system's CAs)."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        idle_timeout: float = _IDLE_TIMEOUT,
    ) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._host = upstream.host.strip("[]")
        self._port = upstream.port or (443 if upstream.scheme == "https" else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if upstream.scheme == "https" else None
        default_port = 443 if upstream.scheme == "https" else 80
        host_header = upstream.host if self._port == default_port else f"{upstream.host}:{self._port}"
        self._host_line = f"Host: {host_header}\r\n"
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes | None, *, gap: float
    ) -> Exchange:
        """Send the request; return once the response head is in. Raises ``UpstreamError``."""
        lines = [f"{method} {self.upstream.path_for(target)} HTTP/1.1\r\n", self._host_line]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        payload = head + body if body else head
        for _attempt in range(2):
            conn = self._take() or await self._connect()
            try:
                return await conn.send(payload, method, gap)
            except _Stale:
                continue
            except BaseException:
                conn.close()
                raise
        raise UpstreamDisconnected()

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"could not connect to the upstream within {self.connect_timeout:g} s") from None
        except ssl.SSLError as error:
            raise UpstreamUnreachable(f"TLS with the upstream failed: {error.reason or error}") from None
        except OSError as error:
            raise UpstreamUnreachable(f"could not connect to the upstream: {error.strerror or error}") from None
        self._all.add(conn)
        return conn

    def keep(self, conn: _Connection) -> None:
        if len(self._idle) >= _MAX_IDLE:
            conn.close()
            return
        conn.idle_for(self.idle_timeout)
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

