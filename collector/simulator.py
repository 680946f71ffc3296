"""The bundled DeepSeek-compatible simulator: a real HTTP/1.1 server on loopback.

Tests, the demo and the benchmarks use it as the upstream. It answers like the real
API (see ``shared/reference/deepseek-api-facts.md`` and the captures in
``shared/fixtures/deepseek``): DeepSeek's chunk layout with usage on the last content
chunk, ``reasoning_content`` in thinking mode, tool-call fragments, prefix caching in
64-token units per API key, DeepSeek's error bodies, and an Anthropic-format surface.
Faults and pacing are asked for per request with ``X-Simulator-*`` headers (see
:mod:`collector.simulator_options`) or server-wide with ``fault_rate``/``chunk_delay_ms``.

Everything it serves is logged as a :class:`ServedCall` (never the API key, only a
short hash of it), so a test can compare the meter's rows with what was really billed.
A call is in :attr:`Simulator.calls` from the moment it arrives (``finished_at`` None
while in flight); ``wait_for_calls(n)`` waits for arrivals, ``finished=True`` for ends.

Two ways to run it::

    with Simulator(seed=0) as sim:          # in-process, on a background thread
        client = OpenAI(base_url=sim.base_url, api_key="sk-test")

    Simulator(port=8788).run_forever()      # `dsmeter simulate`: blocks until SIGINT/SIGTERM

Output is deterministic: the answer to a request depends only on the seed and the
messages, ids on the seed and the order of requests, and ``created`` can be frozen, so
the same requests to two simulators with the same seed produce identical bytes.

To add a route (as ``GET /user/balance`` was) write an aiohttp handler and list it in
:meth:`Simulator._routes`, or call :meth:`Simulator.add_route` before ``start()``;
a handler finds the simulator as ``request.app[SIMULATOR_KEY]`` and can use
:meth:`Simulator.api_key_hash` and :func:`error_response`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Protocol

from aiohttp import web

from collector import event_loop
from collector.errors import UsageError
from collector.simulator_anthropic import (
    IN_STREAM_ERROR as ANTHROPIC_IN_STREAM_ERROR,
)
from collector.simulator_balance import Account
from collector.simulator_anthropic import (
    AnthropicRenderer,
    AnthropicRequest,
    anthropic_auth_error,
    anthropic_error,
    anthropic_fault_error,
    anthropic_usage,
    parse_anthropic_request,
)
from collector.simulator_chat import (
    CHAT_MODELS,
    IN_STREAM_ERROR,
    ChatRenderer,
    ChatRequest,
    auth_error,
    deepseek_error,
    deepseek_usage,
    fault_error,
    parse_chat_request,
)
from collector.simulator_events import Event, Rejection
from collector.simulator_log import CallLog, CallState, Outcome, ServedCall
from collector.simulator_options import OptionError, RequestOptions, parse_options
from collector.simulator_plan import Answer, PlanRequest, plan_answer, seeded_rng
from collector.simulator_tokens import PrefixCache, render_prompt

__all__ = ["SIMULATOR_KEY", "Handler", "Outcome", "ServedCall", "Simulator", "error_response"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEEPALIVE_INTERVAL_S = 0.05  # DeepSeek sends keep-alives while a request waits to be scheduled
_YIELD_EVERY = 32  # with no chunk delay, still let other streams run now and then
# The mix of faults `fault_rate` draws from: mostly rate limiting, some overload, some cuts.
_RANDOM_FAULTS: tuple[tuple[int | str, float], ...] = ((429, 0.5), (503, 0.25), ("disconnect", 0.25))


def error_response(rejection: Rejection) -> web.Response:
    return web.Response(status=rejection.status, body=rejection.payload, content_type="application/json")


def _bearer_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


def _anthropic_key(headers: Mapping[str, str]) -> str | None:
    return headers.get("x-api-key", "").strip() or _bearer_key(headers)


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class _Parsed(Protocol):
    @property
    def requested_model(self) -> str: ...
    @property
    def response_model(self) -> str: ...
    @property
    def thinking(self) -> bool: ...
    @property
    def stream(self) -> bool: ...
    @property
    def tools_raw(self) -> list[Any] | None: ...
    @property
    def segments(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def conversation(self) -> str: ...
    def plan_request(self, output_tokens: int | None, reasoning_tokens: int | None) -> PlanRequest: ...


class _Surface(Protocol):
    """What differs between the DeepSeek and the Anthropic formats; the server does the rest."""

    endpoint: str

    def api_key(self, headers: Mapping[str, str]) -> str | None: ...
    def auth_error(self) -> Rejection: ...
    def invalid(self, message: str) -> Rejection: ...
    def fault_error(self, status: int) -> Rejection: ...
    def parse(self, body: Any) -> _Parsed: ...
    def include_usage(self, parsed: Any) -> bool: ...
    def usage(self, parsed: Any, prompt: int, hit: int, completion: int, reasoning: int) -> dict[str, Any]: ...
    def in_stream_error(self) -> Event: ...
    def stream_events(self, parsed: Any, answer: Answer, usage: dict[str, Any], ident: _Identity, options: RequestOptions) -> list[Event]: ...
    def body(self, parsed: Any, answer: Answer, usage: dict[str, Any], ident: _Identity) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Identity:
    response_id: str
    created: int
    fingerprint: str


class _ChatSurface:
    endpoint = "chat.completions"

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return _bearer_key(headers)

    def auth_error(self) -> Rejection:
        return auth_error()

    def invalid(self, message: str) -> Rejection:
        return deepseek_error(400, message)

    def fault_error(self, status: int) -> Rejection:
        return fault_error(status)

    def parse(self, body: Any) -> ChatRequest:
        return parse_chat_request(body)

    def include_usage(self, parsed: ChatRequest) -> bool:
        return parsed.include_usage

    def usage(self, parsed: ChatRequest, prompt: int, hit: int, completion: int, reasoning: int) -> dict[str, Any]:
        return deepseek_usage(prompt, hit, completion, reasoning if parsed.thinking else None)

    def in_stream_error(self) -> Event:
        return Event(json.dumps(IN_STREAM_ERROR, separators=(",", ":")))

    def _renderer(self, parsed: ChatRequest, ident: _Identity, openai_style: bool = False) -> ChatRenderer:
        return ChatRenderer(
            response_id=ident.response_id,
            created=ident.created,
            model=parsed.response_model,
            fingerprint=ident.fingerprint,
            thinking=parsed.thinking,
            include_usage=parsed.include_usage,
            openai_style=openai_style,
        )

    def stream_events(self, parsed: ChatRequest, answer: Answer, usage: dict[str, Any], ident: _Identity, options: RequestOptions) -> list[Event]:
        return self._renderer(parsed, ident, options.openai_style).stream_events(answer, usage)

    def body(self, parsed: ChatRequest, answer: Answer, usage: dict[str, Any], ident: _Identity) -> bytes:
        return self._renderer(parsed, ident).body(answer, usage)


class _AnthropicSurface:
    endpoint = "anthropic.messages"

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        return _anthropic_key(headers)

    def auth_error(self) -> Rejection:
        return anthropic_auth_error()

    def invalid(self, message: str) -> Rejection:
        return anthropic_error(400, "invalid_request_error", message)

    def fault_error(self, status: int) -> Rejection:
        return anthropic_fault_error(status)

    def parse(self, body: Any) -> AnthropicRequest:
        return parse_anthropic_request(body)

    def include_usage(self, parsed: AnthropicRequest) -> bool:
        return False

    def usage(self, parsed: AnthropicRequest, prompt: int, hit: int, completion: int, reasoning: int) -> dict[str, Any]:
        return anthropic_usage(prompt, hit, completion)

    def in_stream_error(self) -> Event:
        return Event(json.dumps(ANTHROPIC_IN_STREAM_ERROR, separators=(",", ":")), "error")

    def stream_events(self, parsed: AnthropicRequest, answer: Answer, usage: dict[str, Any], ident: _Identity, options: RequestOptions) -> list[Event]:
        return AnthropicRenderer(message_id=ident.response_id, model=parsed.response_model).stream_events(answer, usage)

    def body(self, parsed: AnthropicRequest, answer: Answer, usage: dict[str, Any], ident: _Identity) -> bytes:
        return AnthropicRenderer(message_id=ident.response_id, model=parsed.response_model).body(answer, usage)


_CHAT = _ChatSurface()
_ANTHROPIC = _AnthropicSurface()

SIMULATOR_KEY: web.AppKey[Simulator] = web.AppKey("simulator")


def _frame(event: Event, newline: str) -> bytes:
    head = f"event: {event.name}{newline}" if event.name else ""
    return f"{head}data: {event.data}{newline}{newline}".encode("utf-8")


def _broken_frame(event: Event, newline: str) -> bytes:
    """``event`` cut off mid-object. A chat chunk is cut just inside its delta, so the broken
    bytes do not depend on ``include_usage`` (which only changes the chunk's tail)."""
    data = event.data
    mark = data.find('"delta":')
    cut = mark + len('"delta":') if mark >= 0 else len(data) // 2
    head = f"event: {event.name}{newline}" if event.name else ""
    return f"{head}data: {data[:cut]}{newline}{newline}".encode("utf-8")


async def _write(resp: web.StreamResponse, data: bytes, piece: int | None) -> None:
    if piece is None or len(data) <= piece:
        await resp.write(data)
        return
    for start in range(0, len(data), piece):
        await resp.write(data[start : start + piece])


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except (OSError, IndexError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UsageError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.setblocking(False)
    return sock


class _Serving:
    """What the server needs while answering one call, beside the call's public record."""

    __slots__ = ("state", "response", "server_cut", "tokens_sent", "billed")

    def __init__(self, state: CallState) -> None:
        self.state = state
        self.response: web.StreamResponse | None = None
        self.server_cut = False  # the simulator itself cut the connection (a fault, or stopping)
        self.tokens_sent = 0  # completion tokens a stream has put on the wire
        self.billed: Callable[[int], dict[str, Any]] | None = None  # usage for that many tokens


class Simulator:
    """A DeepSeek-compatible HTTP server. ``start()``/``stop()`` or use it as a context manager.

    ``created`` freezes the ``created`` field of every response (for byte-identical
    replays); otherwise ``clock()`` (default ``time.time``) stamps it. ``log_limit`` keeps
    only that many most recent calls in :attr:`calls` (for long benchmark runs).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk_delay_ms: float = 0.0,
        fault_rate: float = 0.0,
        created: int | None = None,
        clock: Callable[[], float] = time.time,
        log_limit: int | None = None,
        shutdown_timeout: float = 1.0,
    ) -> None:
        if not 0.0 <= fault_rate <= 1.0:
            raise UsageError(f"fault rate must be between 0 and 1, got {fault_rate}")
        if not 0.0 <= chunk_delay_ms <= 600_000.0:
            raise UsageError(f"chunk delay must be between 0 and 600000 ms, got {chunk_delay_ms}")
        if not 0 <= port <= 65535:
            raise UsageError(f"port must be between 0 and 65535, got {port}")
        self.seed = seed
        self.host = host
        self.port = port
        self.chunk_delay_ms = chunk_delay_ms
        self.fault_rate = fault_rate
        self.created = created
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        # One fingerprint per "deployment", 32 hex digits like DeepSeek's since 2026-08.
        self.fingerprint = hashlib.blake2b(f"fingerprint/{seed}".encode(), digest_size=16).hexdigest()
        self._cache = PrefixCache()
        self._log = CallLog(log_limit)
        self._lock = threading.Lock()
        self._sequence = 0
        self._fault_rng = random.Random(seed)
        self._extra_routes: list[tuple[str, str, Handler]] = []
        # GET /user/balance: drops as calls are billed at the price book's prices; tests call account.top_up().
        self.account = Account()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``handler`` too (it finds this simulator as ``request.app[SIMULATOR_KEY]``)."""
        if self._runner is not None:
            raise RuntimeError("add routes before the simulator starts")
        self._extra_routes.append((method, path, handler))

    def _routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/chat/completions", self._handle_chat),
            ("POST", "/v1/chat/completions", self._handle_chat),
            ("POST", "/anthropic/v1/messages", self._handle_anthropic),
            ("GET", "/models", self._handle_models),
            ("GET", "/v1/models", self._handle_models),
            ("GET", "/user/balance", self._handle_balance),
            ("GET", "/v1/user/balance", self._handle_balance),
            *self._extra_routes,
        ]

    async def _open(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[SIMULATOR_KEY] = self
        for method, path, handler in self._routes():
            app.router.add_route(method, path, handler)
        # handler_cancellation: a client that goes away cancels its handler at once, which is
        # how the simulator notices a cancel even while it pauses between chunks.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        await web.SockSite(runner, sock, backlog=1024).start()
        self._runner = runner
        self._stop_event = asyncio.Event()
        self._stopping = False
        self.port = sock.getsockname()[1]

    async def _close(self) -> None:
        self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()  # releases stalled streams
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Simulator:
        """Serve on a background thread; returns once the port is bound and listening."""
        if self._thread is not None:
            raise RuntimeError("the simulator is already running")
        sock = _bind(self.host, self.port)
        loop = event_loop.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open(sock))
            except BaseException as error:  # handed to start() in the caller's thread
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="deepseek-simulator", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            sock.close()
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop serving: stalled streams are cut, others get ``shutdown_timeout`` seconds to end."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=self.shutdown_timeout + 10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            self._loop = self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def run_forever(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve in this thread until SIGINT or SIGTERM, then stop cleanly (no KeyboardInterrupt)."""
        sock = _bind(self.host, self.port)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            await self._open(sock)
            assert self._stop_event is not None
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._stop_event.set)
            try:
                if on_ready is not None:
                    on_ready(self.base_url)
                await self._stop_event.wait()
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
                await self._close()

        event_loop.run(main())

    # ----- the log -----------------------------------------------------------------------

    @property
    def calls(self) -> list[ServedCall]:
        """Every call in arrival order, those still in flight included (``finished_at`` None)."""
        return self._log.calls()

    @property
    def in_flight(self) -> int:
        return self._log.in_flight

    def wait_for_calls(self, n: int, timeout: float = 5.0, *, finished: bool = False) -> list[ServedCall]:
        """Block until ``n`` calls have arrived (or, with ``finished``, ended); TimeoutError otherwise."""
        return self._log.wait(n, timeout, finished)

    def reset(self) -> None:
        """Forget served calls and the context cache; restart ids and random faults from the seed."""
        self._log.clear()
        self._cache.clear()
        with self._lock:
            self._sequence = 0
            self._fault_rng = random.Random(self.seed)

    def api_key_hash(self, request: web.Request) -> str | None:
        """The short hash of the request's Bearer key, or None when it has none (answer 401)."""
        key = _bearer_key(request.headers)
        return _hash_key(key) if key else None

    # ----- handlers ----------------------------------------------------------------------

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        if self.api_key_hash(request) is None:
            return error_response(auth_error())
        data = [{"id": name, "object": "model", "owned_by": "deepseek"} for name in CHAT_MODELS]
        return web.json_response({"object": "list", "data": data})

    async def _handle_balance(self, request: web.Request) -> web.StreamResponse:
        if self.api_key_hash(request) is None:
            return error_response(_CHAT.auth_error())
        return web.json_response(self.account.payload())

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _CHAT)

    async def _handle_anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _ANTHROPIC)

    async def _serve(self, request: web.Request, surface: _Surface) -> web.StreamResponse:
        serving = _Serving(CallState(request.path, surface.endpoint, request.headers))
        self._log.arrive(serving.state)
        try:
            return await self._serve_call(request, surface, serving)
        except asyncio.CancelledError:
            self._interrupted(serving)
            raise
        except ConnectionResetError:  # a write found the client gone
            self._interrupted(serving)
            if serving.response is None:
                raise
            return serving.response
        finally:
            serving.response = None
            state = serving.state  # billed before it counts as finished: a test that waited sees the balance
            self.account.bill(state.response_model or state.requested_model, state.billed_usage,
                              datetime.fromtimestamp(self.clock(), timezone.utc))
            self._log.finish(serving.state)

    def _interrupted(self, serving: _Serving) -> None:
        state = serving.state
        if serving.server_cut:
            return
        if serving.billed is not None and state.usage is None:
            state.billed_usage = serving.billed(serving.tokens_sent)  # generation stops with the stream
        if self._stopping:
            if state.outcome is not Outcome.STALLED:
                state.outcome = Outcome.DISCONNECTED
            return
        state.client_closed_at = time.monotonic()
        if state.outcome is not Outcome.STALLED:
            state.outcome = Outcome.CLIENT_CLOSED

    @staticmethod
    def _reject(state: CallState, rejection: Rejection) -> web.Response:
        state.status = rejection.status
        state.outcome = Outcome.ERROR
        return error_response(rejection)

    def _draw_fault(self) -> int | str | None:
        if self.fault_rate <= 0.0:
            return None
        with self._lock:
            roll, pick = self._fault_rng.random(), self._fault_rng.random()
        if roll >= self.fault_rate:
            return None
        for fault, weight in _RANDOM_FAULTS:
            if pick < weight:
                return fault
            pick -= weight
        return _RANDOM_FAULTS[-1][0]

    def _identity(self, conversation: str) -> _Identity:
        # Seeded by the order of calls and the conversation only, not the raw body, so a
        # proxy that adds stream_options on the way still gets the same id as a direct call.
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        digest = hashlib.blake2b(f"{self.seed}/{sequence}/{conversation}".encode(), digest_size=16).digest()
        created = self.created if self.created is not None else int(self.clock())
        return _Identity(str(uuid.UUID(bytes=digest, version=4)), created, self.fingerprint)

    async def _serve_call(self, request: web.Request, surface: _Surface, serving: _Serving) -> web.StreamResponse:
        state = serving.state
        key = surface.api_key(request.headers)
        if key is None:
            return self._reject(state, surface.auth_error())
        state.key_hash = _hash_key(key)
        try:
            options = parse_options(request.headers, default_chunk_delay_ms=self.chunk_delay_ms)
        except OptionError as error:
            return self._reject(state, surface.invalid(str(error)))
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as error:  # UnicodeDecodeError included
            return self._reject(state, surface.invalid(f"Invalid Format: the request body is not valid JSON ({error})"))
        try:
            parsed = surface.parse(body)
        except Rejection as rejection:
            return self._reject(state, rejection)
        state.requested_model = parsed.requested_model
        state.response_model = parsed.response_model
        state.stream = parsed.stream
        state.include_usage = surface.include_usage(parsed)
        state.thinking = parsed.thinking

        fault = options.fault if options.fault is not None else self._draw_fault()
        state.fault = None if fault is None else str(fault)
        if isinstance(fault, int):
            return self._reject(state, surface.fault_error(fault))

        ident = self._identity(parsed.conversation)
        state.request_id = ident.response_id
        prompt = render_prompt(parsed.segments, parsed.tools_raw)
        hit = self._cache.hit_and_store(state.key_hash, prompt)
        plan = parsed.plan_request(options.output_tokens, options.reasoning_tokens)
        answer = plan_answer(plan, seeded_rng(self.seed, parsed.conversation))
        n_reasoning = len(answer.reasoning)

        def billed(completion: int) -> dict[str, Any]:
            return surface.usage(parsed, len(prompt), hit, completion, min(n_reasoning, completion))

        usage = billed(answer.completion_tokens)
        state.billed_usage = usage
        if parsed.stream:
            events = surface.stream_events(parsed, answer, usage, ident, options)
            serving.billed = billed
            return await self._stream(request, serving, events, answer, options, fault, surface.in_stream_error())
        body_bytes = surface.body(parsed, answer, usage, ident)
        return await self._respond(request, serving, body_bytes, answer, usage, options, fault, surface.in_stream_error())

    # ----- writing ---------------------------------------------------------------------

    async def _queue(self, resp: web.StreamResponse, state: CallState, queue_ms: float, frame: bytes) -> None:
        """Keep-alives (or blank lines) every 50 ms while the request 'waits to be scheduled'."""
        if queue_ms <= 0:
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        queue = queue_ms / 1000
        # One per started 50 ms, counted not timed, so a loaded machine sends the same bytes.
        count = math.ceil(queue / KEEPALIVE_INTERVAL_S)
        for index in range(count):
            state.keepalives_sent += 1
            await resp.write(frame)
            wait = start + min((index + 1) * KEEPALIVE_INTERVAL_S, queue) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _hold(self, request: web.Request, serving: _Serving) -> None:
        """Stall: send nothing more until the client leaves (which cancels us) or the server stops."""
        serving.state.outcome = Outcome.STALLED
        assert self._stop_event is not None
        await self._stop_event.wait()
        self._cut(request, serving)

    @staticmethod
    def _cut(request: web.Request, serving: _Serving) -> None:
        """Close the connection mid-body: the chunked body ends without its terminator."""
        serving.server_cut = True
        transport = request.transport
        if transport is not None:
            transport.close()

    async def _stream(
        self,
        request: web.Request,
        serving: _Serving,
        events: list[Event],
        answer: Answer,
        options: RequestOptions,
        fault: int | str | None,
        error_event: Event,
    ) -> web.StreamResponse:
        state = serving.state
        billed = serving.billed
        assert billed is not None
        newline = "\r\n" if options.crlf else "\n"
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        resp.enable_chunked_encoding()
        state.status = 200
        serving.response = resp
        await resp.prepare(request)
        await self._queue(resp, state, options.queue_ms, f": keep-alive{newline}{newline}".encode())

        n_chunks = sum(1 for e in events if e.chunk)  # chunk events come first; [DONE] (if any) last
        trigger = n_chunks // 2 if options.fault_after is None else options.fault_after
        if fault == "disconnect":
            usage_at = next((i for i, e in enumerate(events) if e.usage), n_chunks - 1)
            trigger = min(trigger, usage_at)  # a cut stream never delivers usage
        trigger = min(trigger, n_chunks)
        piece = options.chunk_bytes
        delay = options.chunk_delay_ms / 1000
        loop = asyncio.get_running_loop()
        started = loop.time()
        for index in range(len(events) + 1):
            if fault is not None and index == trigger:
                if fault == "disconnect":
                    state.outcome = Outcome.DISCONNECTED
                    state.billed_usage = billed(serving.tokens_sent)
                    self._cut(request, serving)
                    return resp
                if fault == "stall":
                    state.billed_usage = billed(serving.tokens_sent)
                    await self._hold(request, serving)
                    return resp
                if fault == "error-event":
                    state.outcome = Outcome.ERROR
                    state.billed_usage = billed(serving.tokens_sent)
                    await _write(resp, _frame(error_event, newline), piece)
                    await resp.write_eof()
                    return resp
                if fault == "malformed" and n_chunks:
                    await _write(resp, _broken_frame(events[min(index, n_chunks - 1)], newline), piece)
            if index == len(events):
                break
            event = events[index]
            if event.chunk and delay > 0 and state.chunks_sent > 0:
                # Pace against a schedule, not by sleeping a fixed time, so load does not stretch streams.
                wait = started + state.chunks_sent * delay - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            elif index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            # The record says what is on the wire before it is: a client that has read a
            # chunk must find it counted.
            if event.chunk:
                state.chunks_sent += 1
                serving.tokens_sent += event.tokens
            if event.usage:
                state.usage = billed(serving.tokens_sent)
            if index == len(events) - 1:
                state.outcome = Outcome.COMPLETED
                state.finish_reason = answer.finish_reason
            await _write(resp, _frame(event, newline), piece)
        await resp.write_eof()
        return resp

    async def _respond(
        self,
        request: web.Request,
        serving: _Serving,
        body: bytes,
        answer: Answer,
        usage: dict[str, Any],
        options: RequestOptions,
        fault: int | str | None,
        error_event: Event,
    ) -> web.StreamResponse:
        state = serving.state
        # A non-streaming answer arrives when its stream would have finished (one pause per chunk).
        generation = options.chunk_delay_ms / 1000 * (answer.completion_tokens + 1)
        if fault == "malformed":
            body = body[: len(body) // 2]
        elif fault == "error-event":
            body = error_event.data.encode("utf-8")
        final = Outcome.ERROR if fault == "error-event" else Outcome.COMPLETED
        if options.queue_ms <= 0 and fault not in ("disconnect", "stall"):
            if generation > 0:
                await asyncio.sleep(generation)
            state.status = 200
            state.outcome = final
            if fault is None:
                state.usage, state.finish_reason = usage, answer.finish_reason
            return web.Response(status=200, body=body, content_type="application/json")

        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        state.status = 200
        serving.response = resp
        await resp.prepare(request)
        # DeepSeek sends blank lines while a non-streaming request waits to be scheduled.
        await self._queue(resp, state, options.queue_ms, b"\r\n" if options.crlf else b"\n")
        if fault == "stall":
            await self._hold(request, serving)
            return resp
        if generation > 0:
            await asyncio.sleep(generation)
        if fault == "disconnect":
            state.outcome = Outcome.DISCONNECTED
            await _write(resp, body[: len(body) // 2], options.chunk_bytes)
            self._cut(request, serving)
            return resp
        state.outcome = final
        if fault is None:
            state.usage, state.finish_reason = usage, answer.finish_reason
        await _write(resp, body, options.chunk_bytes)
        await resp.write_eof()
        return resp
