"""HTTP/1.1 toward the proxy's clients: parse each request, frame each response, notice a hang-up.

Why our own layer on httptools (Node's llhttp parser, in C) and plain asyncio protocols,
rather than aiohttp's server: the proxy's cost is per request and per forwarded chunk, and
both are paid in Python callbacks. Measured with ``tests/benchmarks/bench_proxy.py`` on a
2-core VM, aiohttp's server and client together spent about 20 µs of CPU per forwarded
chunk and added 1.0-1.3 ms to a lone stream's first byte; a callback relay on httptools
spent under 10 µs and added under 0.6 ms. The rest is what a proxy must do anyway: one
read and one write per chunk.

One ``ClientConnection`` per accepted socket:

- It parses one request at a time. Limits are enforced while parsing, before anything is
  forwarded: request target (414), header size and count (431), body size (413), and any
  framing llhttp refuses (400: bare CR, obs-fold, ``Content-Length`` with ``chunked``, ...).
- A complete request goes to the handler, ``await handler(request, response)``, in a task of
  its own. Requests a client pipelines behind it wait their turn; bytes arriving meanwhile are
  held (bounded: past ``_MAX_BUFFERED`` the socket stops being read).
- The client hanging up (EOF or reset) cancels that task at once: that is how the proxy
  stops the upstream, and so the provider's billing, the moment its client goes.
- ``Response`` frames what the handler sends: ``Content-Length`` when the handler gives one,
  else chunked (HTTP/1.1) or close-delimited (HTTP/1.0); no body for HEAD, 1xx, 204, 304.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httptools

from collector.proxy_http import first_header

__all__ = ["Request", "Response", "Handler", "Limits", "ClientConnection", "Connections", "REASONS", "error_body", "no_delay"]

log = logging.getLogger("dsmeter.proxy")

_MAX_BUFFERED = 256 << 10  # bytes held from a client while its current request is handled
_HIGH_WATER = 256 << 10  # client write buffer above which the upstream is paused
_LOW_WATER = 64 << 10
_LINGER = 2.0  # seconds a refused client may go on sending before the connection is closed

REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 303: "See Other", 304: "Not Modified", 307: "Temporary Redirect",
    308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """What a client may send; anything larger is refused before a byte goes upstream."""

    max_body_bytes: int = 32 << 20
    max_target_bytes: int = 8190  # the request line's target (aiohttp's and nginx's line limit)
    max_header_bytes: int = 8190  # one header, name and value
    max_headers: int = 100
    max_head_bytes: int = 64 << 10  # the whole request head
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this


class Request:
    """One parsed request. ``target`` is the raw request target; header names keep their case."""

    __slots__ = ("method", "target", "version", "headers", "body", "keep_alive")

    def __init__(
        self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive)."""
        return first_header(self.headers, name)


Handler = Callable[[Request, "Response"], Awaitable[None]]

_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)


class Response:
    """The response to one request, written straight to the client's transport."""

    __slots__ = ("_conn", "_transport", "_head_only", "_http10", "_framing", "_left", "keep_alive",
                 "started", "finished", "status", "on_pause", "on_resume")

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self._conn = conn
        self._transport = conn.transport
        self._head_only = request.method == "HEAD"
        self._http10 = request.version == "1.0"
        self._framing = _NONE
        self._left = 0
        self.keep_alive = request.keep_alive
        self.started = False
        self.finished = False
        self.status = 0
        # Set by a handler that relays a body (``relay_flow``): the client cannot keep up, and can again.
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def relay_flow(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """Have the source of the body paused while the client cannot keep up (and already, if it cannot now)."""
        self.on_pause, self.on_resume = pause, resume
        if self._conn.write_paused:
            pause()

    def close_after(self) -> None:
        """Close the connection once this response is sent (its request body may be unread)."""
        self.keep_alive = False

    def start(
        self, status: int, headers: list[tuple[str, str]], reason: str | None = None, body: bytes = b"",
        *, last: bool = False,
    ) -> None:
        """Send the status line and headers, and ``body`` with them if given (one write).

        A ``Content-Length`` among ``headers`` frames the body by length; otherwise it is
        chunked (HTTP/1.1) or ends when the connection closes (HTTP/1.0). ``last``: ``body``
        is all of it, and the response ends in the same write.
        """
        assert not self.started, "response already started"
        self.started = True
        self.status = status
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, 'Unknown')}\r\n"]
        length: int | None = None
        for name, value in headers:
            if name.lower() == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    continue
            lines.append(f"{name}: {value}\r\n")
        if self._conn.closing:
            self.keep_alive = False
        if self._head_only or status < 200 or status in (204, 304):
            self._framing = _NONE
        elif length is not None:
            self._framing, self._left = _LENGTH, length
        elif self._http10:
            self._framing = _CLOSE
            self.keep_alive = False
        else:
            self._framing = _CHUNKED
            lines.append("Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self._http10:
            lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        data = head + self._framed(body) if body else head
        if last:
            data += self._ending()
        self._transport.write(data)
        if last and self._framing == _LENGTH and self._left != 0:
            self._transport.abort()  # fewer bytes than the length announced: the client must see a break

    def _framed(self, data: bytes) -> bytes:
        framing = self._framing
        if framing == _CHUNKED:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if framing == _LENGTH:
            self._left -= len(data)
            return data
        if framing == _CLOSE:
            return data
        return b""

    def write(self, data: bytes) -> None:
        if data:
            framed = self._framed(data)
            if framed:
                self._transport.write(framed)

    def end(self, data: bytes = b"") -> None:
        """The body is complete, ``data`` its last bytes (sent with the end, in one write).

        A length-framed body that fell short cannot end cleanly: the connection is cut.
        """
        if self.finished:
            return
        out = self._framed(data) if data else b""
        out += self._ending()
        if out:
            self._transport.write(out)
        if self._framing == _LENGTH and self._left != 0:
            self._transport.abort()

    def _ending(self) -> bytes:
        """Mark the response finished; the bytes that end its body on the wire."""
        self.finished = True
        if self._framing == _CHUNKED:
            return b"0\r\n\r\n"
        if self._framing == _LENGTH and self._left != 0 or self._framing == _CLOSE:
            self.keep_alive = False
        return b""

    @property
    def length_framed(self) -> bool:
        return self._framing == _LENGTH

    def abort(self) -> None:
        """Cut the connection: the client sees the break, as it would have from the upstream."""
        self.finished = True
        self.keep_alive = False
        self._transport.abort()

    def send(self, status: int, body: bytes, content_type: str | None = None,
             headers: list[tuple[str, str]] | None = None) -> None:
        """A whole small response: status, headers and body in one write."""
        pairs = list(headers or [])
        if content_type is not None:
            pairs.append(("Content-Type", content_type))
        pairs.append(("Content-Length", str(len(body))))
        self.start(status, pairs, body=body, last=True)


class Connections:
    """The server's open client connections: to close the idle ones, and the rest once they finish."""

    def __init__(self) -> None:
        self.open: set[ClientConnection] = set()
        self.closing = False

    def close_idle(self) -> None:
        """Shutdown: stop keeping connections alive; close those with nothing in flight now."""
        self.closing = True
        for conn in list(self.open):
            conn.close_if_idle()

    def abort_all(self) -> None:
        for conn in list(self.open):
            if conn.transport is not None:
                conn.transport.abort()


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ClientConnection(asyncio.Protocol):
    """One client's connection (see the module doc)."""

    def __init__(
        self,
        handler: Handler,
        connections: Connections,
        limits: Limits,
        *,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        self._handler = handler
        self._connections = connections
        self._limits = limits
        self._on_refused = on_refused
        self.transport: Any = None
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        # The request being parsed.
        self._target: list[bytes] = []
        self._target_len = 0
        self._headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._head_len = 0
        self._in_head = False
        # Requests parsed but not yet answered, and the one being answered.
        self._queue: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._response: Response | None = None
        self._held = bytearray()  # bytes received while a request is handled
        self._refusal: _Refused | None = None  # a parse error to answer once the queue is done
        self._read_paused = False
        self.write_paused = False
        self._lost = False
        self._discarding = False  # refused: what the client still sends is read and dropped
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def closing(self) -> bool:
        return self._connections.closing

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        no_delay(transport)
        transport.set_write_buffer_limits(high=_HIGH_WATER, low=_LOW_WATER)
        self._connections.open.add(self)
        if self.closing:
            transport.close()
            return
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._task is not None or self._queue or self._refusal is not None:
            self._held += data
            if len(self._held) > _MAX_BUFFERED and not self._read_paused:
                self._read_paused = True
                self.transport.pause_reading()
            return
        self._feed(data)

    def eof_received(self) -> bool:
        return False  # a half-close is a hang-up: the transport closes, connection_lost cancels the call

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._connections.open.discard(self)
        self._disarm_idle()
        if self._task is not None:
            self._task.cancel()  # the client went away: stop the upstream call now

    def pause_writing(self) -> None:
        self.write_paused = True
        response = self._response
        if response is not None and response.on_pause is not None:
            response.on_pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        response = self._response
        if response is not None and response.on_resume is not None:
            response.on_resume()

    # -- parsing ------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._disarm_idle()
        # Counts the bytes of a head that spans reads. httptools gathers a header's pieces
        # itself before ``on_header`` sees it, so this is what bounds a header that never ends.
        # The read a head begins in is not counted: it may hold whole pipelined requests before it.
        if self._in_head:
            self._head_len += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # A request asked to switch protocols (curl's "Upgrade: h2c", a CONNECT). The request
            # itself is complete and queued; it is answered in HTTP/1.1 (a CONNECT's target is
            # refused), never upgraded. What followed it is parsed as the next request.
            self._held[:0] = data[upgrade.args[0] :]
        except httptools.HttpParserError as error:
            if self._refusal is None:
                cause = error.__context__
                self._refusal = cause if isinstance(cause, _Refused) else _Refused(400, f"malformed request: {error}")
        if self._in_head and self._head_len > self._limits.max_head_bytes and self._refusal is None:
            self._refusal = _Refused(431, "the request head is too large")
        self._next()

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_len = 0
        self._target = []
        self._target_len = 0
        self._headers = []
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._target_len += len(url)
        if self._target_len > self._limits.max_target_bytes:
            raise _Refused(414, "the request target is too long")
        self._target.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self._limits.max_header_bytes:
            raise _Refused(431, f"a request header is larger than {self._limits.max_header_bytes} bytes")
        if len(self._headers) >= self._limits.max_headers:
            raise _Refused(431, f"more than {self._limits.max_headers} request headers")
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        length = None
        expect = None
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = value
            elif lowered == "expect":
                expect = value
        if length is not None and length.strip().isdigit() and int(length) > self._limits.max_body_bytes:
            raise _Refused(413, f"request body is larger than this proxy accepts ({self._limits.max_body_bytes} bytes)")
        if expect is not None and expect.strip().lower() == "100-continue" and self._parser.get_http_version() == "1.1":
            # The client waits for this before sending a large body (curl does past 1 MiB).
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self._limits.max_body_bytes:
            raise _Refused(413, f"request body is larger than this proxy accepts ({self._limits.max_body_bytes} bytes)")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(
            method=parser.get_method().decode("ascii", "replace"),
            target=b"".join(self._target).decode("latin-1"),
            version=parser.get_http_version(),
            headers=self._headers,
            body=body,
            keep_alive=parser.should_keep_alive(),
        )
        self._body = []
        self._body_len = 0
        self._queue.append(request)

    # -- answering ----------------------------------------------------------------------------------

    def _next(self) -> None:
        """Answer the next parsed request, or a parse error once every request before it is answered."""
        if self._task is not None or self._lost:
            return
        if self._queue:
            request = self._queue.popleft()
            response = Response(self, request)
            self._response = response
            self._task = self._loop.create_task(self._answer(request, response))
            return
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._refuse(refusal)
            return
        if self._held:
            held = bytes(self._held)
            self._held.clear()
            if self._read_paused:
                self._read_paused = False
                self.transport.resume_reading()
            self._feed(held)
            return
        if self.closing and not self._in_head:
            self.transport.close()
        else:
            self._arm_idle()  # waiting for a request, or for the rest of one

    async def _answer(self, request: Request, response: Response) -> None:
        try:
            await self._handler(request, response)
        except asyncio.CancelledError:
            if not response.finished and not self._lost:
                response.abort()  # cancelled by shutdown: the client sees the stream cut
            raise
        except Exception:
            log.exception("dsmeter proxy: the handler failed")
            if response.started:
                response.abort()
            else:
                response.close_after()
                response.send(500, error_body(500, "the proxy failed", "proxy_error"), "application/json")
        finally:
            self._task = None
            self._response = None
            if not self._lost:
                self._after(response)

    def _after(self, response: Response) -> None:
        if not response.started:  # a handler that returned without answering: still an answer
            response.close_after()
            response.send(500, error_body(500, "the proxy did not answer", "proxy_error"), "application/json")
        elif not response.finished:
            response.end()
        if not response.keep_alive or self.closing or self.transport.is_closing():
            self._close()
            return
        self._next()

    def _close(self) -> None:
        self._queue.clear()
        self._held.clear()
        self.transport.close()

    def _refuse(self, refusal: _Refused) -> None:
        if self._on_refused is not None:
            self._on_refused(refusal.status)
        body = error_body(refusal.status, str(refusal), _CODES.get(refusal.status, "bad_request"))
        head = (f"HTTP/1.1 {refusal.status} {REASONS.get(refusal.status, 'Bad Request')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self.transport.write(head.encode("latin-1") + body)
        # Closing now, with the client's unread bytes in our socket, would send a reset that can
        # destroy the answer before the client reads it (a client still sending a large body
        # would see "connection reset", not the 413). So close our side only, and read and drop
        # what still comes for a moment, as nginx's lingering close does.
        self._queue.clear()
        self._held.clear()
        self._discarding = True
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._loop.call_later(_LINGER, self.transport.close)

    def close_if_idle(self) -> None:
        if self._task is None and not self._queue and self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self._lost:
            self._idle_timer = self._loop.call_later(self._limits.keepalive_timeout, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self._task is None and not self._queue and self.transport is not None:
            self.transport.close()


def no_delay(transport: Any) -> None:
    """Send each small write at once: a streamed chunk must not wait for Nagle's algorithm."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a Unix socket in a test), or already gone
            pass


def error_body(status: int, message: str, code: str) -> bytes:
    """The OpenAI/DeepSeek error envelope, so SDKs surface the proxy's own refusals like the upstream's."""
    kind = "invalid_request_error" if status < 500 else "proxy_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


_CODES = {400: "bad_request", 413: "request_too_large", 414: "request_target_too_long", 431: "request_headers_too_large"}
