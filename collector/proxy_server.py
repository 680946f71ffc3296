"""Running the proxy: sockets, worker processes, signals, graceful shutdown.

``run_proxy(config)`` is what ``dsmeter proxy`` calls. With one worker the proxy runs in
this process. With ``--workers N`` the parent reserves the port and starts N worker
processes; each binds its own listening socket to that port with ``SO_REUSEPORT``, so the
kernel spreads connections over them, and each has its own event loop, upstream
connection pool and ledger writer (all writing into the one database). The parent only
supervises: it restarts a worker that dies and passes shutdown on.

Shutdown (SIGTERM, or SIGINT / Ctrl-C): stop accepting, let in-flight calls finish for up
to ``drain_timeout`` seconds, cancel the rest (each is still a ``cancelled`` row), flush
the writer. A second signal skips the wait.

``ProxyThread`` runs one proxy on a background thread of the calling process: for tests
and for embedding (the demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from collector.errors import UsageError
from collector.event_loop import run as run_loop
from collector.proxy import ProxyApp, ProxyConfig, Sink
from collector.proxy_metrics import MetricsExchange
from collector.proxy_wire import ClientConnection, Connections
from collector.record import UsageRecord

if TYPE_CHECKING:
    from collector.writer import LedgerWriter

__all__ = ["run_proxy", "serve", "bind_socket", "configure_logging", "ProxyThread", "Stopper"]

log = logging.getLogger("dsmeter.proxy")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's metrics snapshots (multi-worker only)
_BACKLOG = 2048  # a burst of hundreds of new streams must not wait on SYN retries
_WORKER_START_TIMEOUT = 60.0


class Stopper:
    """Asks a serving loop to stop; asked twice, to stop without waiting for in-flight calls."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()

    def request(self) -> None:
        if self.stop.is_set():
            self.force.set()
        self.stop.set()


def configure_logging(verbose: bool = False) -> None:
    """Log lines to stderr for a proxy process (the CLI, and each worker process it starts)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    for name in ("dsmeter", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.DEBUG if verbose else logging.INFO)
        logger.propagate = False


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A bound (and listening) TCP socket; ``UsageError`` with the reason if the address is unusable."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UsageError(f"cannot resolve --host {host!r}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve(
    app: ProxyApp,
    sock: socket.socket,
    stopper: Stopper,
    *,
    on_ready: Callable[[str], None] | None = None,
    exchange: MetricsExchange | None = None,
) -> None:
    """Serve on ``sock`` until ``stopper`` asks, then drain and shut down (see the module doc)."""
    await app.open()
    loop = asyncio.get_running_loop()
    connections = Connections()
    limits = app.limits
    rejected = app.metrics.rejected

    def connection() -> ClientConnection:
        return ClientConnection(app.handle, connections, limits, on_refused=rejected)

    server = await loop.create_server(connection, sock=sock, backlog=_BACKLOG)
    publisher: asyncio.Task[None] | None = None
    try:
        if exchange is not None:
            publisher = asyncio.create_task(_publish_forever(app, exchange))
        if on_ready is not None:
            on_ready(_url_of(sock))
        await stopper.stop.wait()
        app.closing = True
        server.close()  # stop accepting; calls in flight go on
        connections.close_idle()  # idle keep-alive connections close now, busy ones after their call
        drain = asyncio.create_task(app.drain(app.config.drain_timeout))
        forced = asyncio.create_task(stopper.force.wait())
        await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            await app.drain(0.0)
        forced.cancel()
        cancelled = drain.result() if drain.done() and not drain.cancelled() else None
        if cancelled:
            log.warning("dsmeter proxy: cancelled %d call(s) still running after the drain timeout", cancelled)
    finally:
        if publisher is not None:
            publisher.cancel()
        server.close()
        connections.abort_all()
        await app.close()
        if exchange is not None:
            exchange.publish(app.metrics.snapshot(exiting=True))


async def _publish_forever(app: ProxyApp, exchange: MetricsExchange) -> None:
    while True:
        try:
            exchange.publish(app.metrics.snapshot())
        except OSError as error:
            log.warning("dsmeter proxy: could not publish metrics: %s", error)
        await asyncio.sleep(PUBLISH_INTERVAL)


def _install_signals(stopper: Stopper, signals: tuple[signal.Signals, ...]) -> None:
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, stopper.request)


def _make_writer(db: str | None) -> LedgerWriter:
    from collector.writer import default_writer

    return default_writer(db)


def _freeze_startup_heap(writer: LedgerWriter) -> None:
    """Load what a proxy process keeps for life, then take it out of the garbage collector's way.

    A full collection walks every tracked object with the event loop stopped: in a proxy
    process, about 82,000 of them from imports, SQLAlchemy and the price book. One came 36 s
    into a bench_proxy run and took 45.6 ms, which every stream in flight waited out. Frozen,
    a collection walks only what was made since.
    """
    book = getattr(writer.pricer, "book", None)
    if callable(book):
        book()  # else the writer thread loads it at the first call, after the freeze
    gc.collect()
    gc.freeze()


def _count_cost_when_written(app: ProxyApp, writer: LedgerWriter) -> Callable[[], None]:
    """Count cost in the metrics once the writer has priced and stored a call; returns the undo.

    The hook runs on the writer's thread; the metrics belong to the event loop, so it hands over.
    """
    loop = asyncio.get_running_loop()

    def hook(records: Sequence[UsageRecord]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has already stopped: nobody scrapes any more
            loop.call_soon_threadsafe(app.metrics.written, list(records))

    writer.on_written.append(hook)
    return lambda: writer.on_written.remove(hook)


# -- one process ---------------------------------------------------------------------------------


def _run_single(config: ProxyConfig, on_ready: Callable[[str], None]) -> None:
    sock = bind_socket(config.host, config.port)
    writer = _make_writer(config.db)
    _freeze_startup_heap(writer)
    try:

        async def main() -> None:
            stopper = Stopper()
            _install_signals(stopper, (signal.SIGINT, signal.SIGTERM))
            app = ProxyApp(config, writer.submit)
            detach = _count_cost_when_written(app, writer)
            try:
                await serve(app, sock, stopper, on_ready=on_ready)
            finally:
                detach()

        run_loop(main())
    finally:
        sock.close()
        _close_writer(writer)


def _close_writer(writer: LedgerWriter) -> None:
    """Flush the writer (to the ledger, or to the spool if the ledger hangs) whatever signal comes next.

    Once the event loop is gone, SIGTERM is back to its default action and would kill the process
    with records still in memory; the flush is bounded by the writer's own close timeout instead.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    writer.close()


# -- several processes ---------------------------------------------------------------------------


def _worker_main(config: ProxyConfig, index: int, metrics_dir: str, ready: Any, verbose: bool) -> None:
    # Ctrl-C reaches the whole process group; the parent decides and tells us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(verbose)
    try:
        sock = bind_socket(config.host, config.port, reuse_port=True)
        writer = _make_writer(config.db)
    except Exception as error:
        ready.put(("failed", index, str(error)))
        return
    exchange = MetricsExchange(Path(metrics_dir), f"{index}-{os.getpid()}")
    _freeze_startup_heap(writer)
    try:

        async def main() -> None:
            stopper = Stopper()
            _install_signals(stopper, (signal.SIGTERM,))
            app = ProxyApp(config, writer.submit, exchange=exchange)
            detach = _count_cost_when_written(app, writer)
            try:
                await serve(
                    app,
                    sock,
                    stopper,
                    on_ready=lambda _url: ready.put(("ready", index, os.getpid())),
                    exchange=exchange,
                )
            finally:
                detach()

        run_loop(main())
    finally:
        sock.close()
        _close_writer(writer)


class _Supervisor:
    def __init__(self, config: ProxyConfig, metrics_dir: str) -> None:
        self.config = config
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")  # no inherited threads, locks or loops
        self.ready: Any = self.context.Queue()
        self.workers: dict[int, Any] = {}
        self.stopping = 0  # how many shutdown signals arrived

    def start(self, index: int) -> None:
        process = self.context.Process(
            target=_worker_main,
            args=(self.config, index, self.metrics_dir, self.ready, log.getEffectiveLevel() <= logging.DEBUG),
            name=f"dsmeter-proxy-{index}",
            daemon=False,
        )
        process.start()
        self.workers[index] = process

    def wait_ready(self, indexes: set[int]) -> None:
        deadline = time.monotonic() + _WORKER_START_TIMEOUT
        waiting = set(indexes)
        while waiting:
            if self.stopping:
                raise KeyboardInterrupt
            try:
                kind, index, detail = self.ready.get(timeout=0.2)
            except Exception:  # queue.Empty
                for i in waiting:
                    if not self.workers[i].is_alive():
                        raise UsageError(f"proxy worker {i} exited while starting (exit code {self.workers[i].exitcode})")
                if time.monotonic() > deadline:
                    raise UsageError(f"proxy workers did not start within {_WORKER_START_TIMEOUT:.0f} s") from None
                continue
            if kind == "failed":
                raise UsageError(f"proxy worker {index} could not start: {detail}")
            waiting.discard(index)

    def signal_all(self) -> None:
        for process in self.workers.values():
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def on_signal(self, signum: int, frame: Any) -> None:
        self.stopping += 1
        self.signal_all()  # a second signal reaches the workers as a second SIGTERM: stop now

    def supervise(self) -> None:
        while not self.stopping:
            sentinels = [p.sentinel for p in self.workers.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.5)
            if self.stopping:
                break
            for index, process in list(self.workers.items()):
                if not process.is_alive():
                    log.error("dsmeter proxy: worker %d exited (code %s); starting a new one", index, process.exitcode)
                    process.join()
                    self.start(index)
                    try:
                        self.wait_ready({index})
                    except UsageError as error:
                        log.error("dsmeter proxy: %s", error)
                        time.sleep(1.0)

    def join(self) -> None:
        from collector.writer import DEFAULT_CLOSE_TIMEOUT

        # A worker drains, then flushes its writer (bounded by the writer's close timeout): killing it
        # sooner loses the records it still holds.
        deadline = time.monotonic() + self.config.drain_timeout + DEFAULT_CLOSE_TIMEOUT + 15.0
        for process in self.workers.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.workers.values():
            if process.is_alive():
                log.error("dsmeter proxy: worker %s did not stop in time; killing it", process.name)
                process.kill()
                process.join()


def _run_workers(config: ProxyConfig, on_ready: Callable[[str], None]) -> None:
    # Holds the port (port 0 becomes a real one) without listening, so it never takes a connection.
    reservation = bind_socket(config.host, config.port, reuse_port=True, listen=False)
    config = replace(config, port=reservation.getsockname()[1])
    metrics_dir = tempfile.mkdtemp(prefix="dsmeter-proxy-metrics-")
    supervisor = _Supervisor(config, metrics_dir)
    previous = {s: signal.signal(s, supervisor.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(config.workers):
            supervisor.start(index)
        supervisor.wait_ready(set(range(config.workers)))
        on_ready(_url_of(reservation))
        supervisor.supervise()
    except KeyboardInterrupt:
        pass
    finally:
        if not supervisor.stopping:
            # Signals are passed on by on_signal; one more here would turn a graceful stop into a forced one.
            supervisor.signal_all()
        supervisor.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reservation.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def run_proxy(config: ProxyConfig, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; ``on_ready(url)`` once every worker is accepting connections."""
    announce = on_ready or (lambda url: None)
    if config.workers < 1:
        raise UsageError("--workers must be at least 1")
    _migrate(config.db)
    if config.workers == 1:
        _run_single(config, announce)
    else:
        _run_workers(config, announce)


def _migrate(db: str | None) -> None:
    """Bring the ledger to the current schema once, before the workers start writing to it.

    A ledger that cannot be reached does not stop the proxy: calls are still forwarded and the
    writer spools their records until the database is back.
    """
    from collector.errors import DatabaseUnavailable
    from collector.store import LedgerStore

    store = LedgerStore(db)
    try:
        store.migrate()
    except DatabaseUnavailable as error:
        log.warning("dsmeter proxy: %s; records will be spooled until it is back", error)
    finally:
        store.close()


# -- in a thread ---------------------------------------------------------------------------------


class ProxyThread:
    """A proxy on a background thread: ``with ProxyThread(config, sink) as proxy: proxy.base_url``.

    Records go to ``sink``, or to ``writer`` (whose stored, priced calls then count cost in the metrics).
    """

    def __init__(self, config: ProxyConfig, sink: Sink | None = None, *, writer: LedgerWriter | None = None) -> None:
        if (sink is None) == (writer is None):
            raise ValueError("give a sink or a writer")
        self.config = config
        self._writer = writer
        self.app = ProxyApp(config, writer.submit if writer is not None else sink)  # type: ignore[arg-type]
        self._sock = bind_socket(config.host, config.port)
        self.base_url = _url_of(self._sock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopper: Stopper | None = None
        self._thread = threading.Thread(target=self._run, name="dsmeter-proxy", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopper = Stopper()
            detach = _count_cost_when_written(self.app, self._writer) if self._writer is not None else None
            try:
                await serve(self.app, self._sock, self._stopper, on_ready=lambda _url: self._started.set())
            finally:
                if detach is not None:
                    detach()

        try:
            run_loop(main())
        except BaseException as error:  # surfaced by start()/stop()
            self._error = error
        finally:
            self._started.set()
            self._sock.close()

    def start(self) -> ProxyThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self, *, force: bool = False) -> None:
        """Stop accepting, drain (bounded by the config's drain timeout) and wait for the thread."""
        if self._loop is not None and self._stopper is not None and self._thread.is_alive():
            stopper = self._stopper
            with contextlib.suppress(RuntimeError):  # the loop may finish (and close) between the two
                self._loop.call_soon_threadsafe(stopper.request)
                if force:
                    self._loop.call_soon_threadsafe(stopper.request)
        self._thread.join(self.config.drain_timeout + 30)
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the proxy's loop and return its result (for reading metrics from a test)."""
        assert self._loop is not None
        result: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["value"] = fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)
        return result.get("value")

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

