"""What the reliability scenarios share: real parts only, on loopback.

- ``Forwarder``: a TCP forwarder in front of the real PostgreSQL that can be cut (every
  connection reset, the port refusing) and restored on the same port, so a database outage
  happens at the network level while the server itself keeps running for everyone else.
- ``SqliteLocker``: a second process holding an exclusive transaction on a SQLite ledger.
- ``ProxyProcess``: ``dsmeter proxy`` as a child process (``--workers N``), its address read
  from the line it prints when ready.
- ``run_load``: streamed chat completions at a fixed rate (an open loop: a call starts on
  schedule whatever the others are doing), each tagged ``n=<index>`` so every call can be
  found in the ledger by its own number.
- ``Ledger``: what the ledger holds, read straight from the database (never through the
  forwarder), and ``check_ledger``: every call a row exactly once, with the tokens the
  simulator says it billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.engine import make_url

__all__ = [
    "KEY",
    "Forwarder",
    "SqliteLocker",
    "ProxyProcess",
    "CallResult",
    "run_load",
    "fresh_postgres",
    "ledger_rows",
    "LedgerCheck",
    "check_ledger",
    "count_rows",
    "SpoolWatcher",
    "wait_until",
]

KEY = "sk-test-reliability-7d41e0b2c9"
SYSTEM = "You are a terse assistant for an e-commerce search team. " * 12  # a shared prefix: cache hits
MODELS = ("deepseek-v4-flash", "deepseek-v4-flash", "deepseek-v4-pro")


# -- the database side ----------------------------------------------------------------------------


class Forwarder:
    """A loopback TCP forwarder in front of a database server, with two ways for the database to go away.

    ``cut``: every connection is reset and the port refuses new ones (a server that died or
    was stopped); ``restore`` reopens the same port. ``freeze``: connections stay open but no
    byte moves either way and new connections get no answer (a server that hangs: stopped
    with SIGSTOP, stuck on storage); ``thaw`` lets everything held back through.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self._flowing = threading.Event()
        self._flowing.set()

    def open(self) -> Forwarder:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 2.0
        while True:
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError as error:
                # After cut() the old listener lives on in the kernel until the accept() blocked on
                # it returns (its 0.05 s timeout): the port is free again a moment later.
                if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    listener.close()
                    raise
                time.sleep(0.01)
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.add(client)
        self._flowing.wait()  # frozen: the handshake completed, but the server says nothing
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        client.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            self._sockets |= {client, upstream}
            self.connections += 1
        self._spawn(self._pump, client, upstream)
        self._spawn(self._pump, upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen mid-read: hold the bytes until thawed
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._sockets -= {src, dst}

    def cut(self) -> None:
        """The database is gone: live connections are reset, new ones refused."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: a reset, as when a server dies, not a polite close. shutdown() first:
                # close() alone neither wakes a thread blocked in recv() nor ends the connection.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def restore(self) -> None:
        self.open()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def url_for(self, url: str) -> str:
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)


class SqliteLocker:
    """Another process holding ``BEGIN EXCLUSIVE`` on a SQLite ledger for ``seconds``."""

    SCRIPT = (
        "import sqlite3, sys, time\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
        "conn.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "conn.execute('COMMIT')\n"
        "print('released', flush=True)\n"
    )

    def __init__(self, path: Path, seconds: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.SCRIPT, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "locked":
            self.process.kill()
            raise RuntimeError(f"could not lock {path}: {line!r}")

    def wait(self, timeout: float) -> None:
        self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database on the admin URL's server, dropped afterwards."""
    name = f"dsmeter_rel_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def ledger_rows(url: str) -> list[dict[str, Any]]:
    """Every row of ``calls``, read directly (SQLite in WAL mode lets us read past a writer's lock)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql("PRAGMA busy_timeout = 100")
            rows = conn.execute(sa.text(
                "SELECT request_id, provider_request_id, status, prompt_cache_hit_tokens, prompt_cache_miss_tokens, "
                "completion_tokens, reasoning_tokens, usage_estimated, tags FROM calls"
            )).mappings().all()
    finally:
        engine.dispose()
    out = []
    for row in rows:
        item = dict(row)
        if isinstance(item["tags"], str):
            item["tags"] = json.loads(item["tags"])
        out.append(item)
    return out


def count_rows(url: str) -> int | None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql("PRAGMA busy_timeout = 100")
            return int(conn.execute(sa.text("SELECT count(*) FROM calls")).scalar_one())
    except sa.exc.OperationalError:
        return None
    finally:
        engine.dispose()


def wait_until(predicate: Any, timeout: float, interval: float = 0.25) -> float | None:
    """Seconds until ``predicate()`` held, or None if it never did within ``timeout``."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(interval)


class SpoolWatcher:
    """Samples the spool (rows waiting for the database) in the background; keeps the peak."""

    def __init__(self, spool_dir: Path, interval: float = 0.2) -> None:
        self.spool_dir = spool_dir
        self.interval = interval
        self.peak_rows = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SpoolWatcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        from collector.spool import spool_status

        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                status = spool_status(self.spool_dir)
                self.peak_rows = max(self.peak_rows, status.pending_rows)
                self.peak_bytes = max(self.peak_bytes, status.pending_bytes)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


# -- the proxy ------------------------------------------------------------------------------------


class ProxyProcess:
    """``dsmeter proxy`` in a child process."""

    def __init__(self, upstream: str, db: str, *, workers: int = 2, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "collector.cli", "proxy", "--upstream", upstream, "--port", "0",
             "--workers", str(workers), "--db", db, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ.copy(),
            start_new_session=True,  # a signal to the test's process group never reaches it by accident
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.process.stdout, self._lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.process.stderr, self._stderr.append), daemon=True).start()
        self.base_url = ""

    @staticmethod
    def _pump(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line)

    def wait_ready(self, timeout: float = 60.0) -> ProxyProcess:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(f"the proxy did not start: {self.stderr}") from None
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.kill()
            raise RuntimeError(f"unexpected first line from the proxy: {line!r} {self.stderr}")
        self.base_url = match.group(1)
        return self

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def pids(self) -> list[int]:
        """The parent and its worker processes."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            kids = [int(p) for p in children.read_text().split()]
        except OSError:
            kids = []
        return [self.process.pid, *kids]

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the parent and every worker (a worker outlives a killed parent otherwise)."""
        for pid in reversed(self.pids()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class CallResult:
    n: int
    started: float  # seconds since the load began
    status: int | None = None
    completed: bool = False  # the client read the whole stream, [DONE] included
    error: str | None = None
    provider_id: str | None = None


def _request(n: int, output_tokens: int, chunk_delay_ms: float) -> tuple[dict[str, Any], dict[str, str]]:
    thinking = n % 5 == 0
    body: dict[str, Any] = {
        "model": MODELS[n % len(MODELS)],
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question number {n}?"}],
        "stream": True,
    }
    if thinking:
        body["thinking"] = {"type": "enabled"}
    headers = {
        "Authorization": f"Bearer {KEY}",
        "X-Dsmeter-Tags": f"n={n}",
        "X-Simulator-Output-Tokens": str(output_tokens),
        "X-Simulator-Chunk-Delay-Ms": str(chunk_delay_ms),
    }
    if thinking:
        headers["X-Simulator-Reasoning-Tokens"] = str(output_tokens // 2)
    return body, headers


_ID = re.compile(rb'"id"\s*:\s*"([^"]+)"')


async def _one(session: aiohttp.ClientSession, url: str, result: CallResult, output_tokens: int, chunk_delay_ms: float) -> None:
    body, headers = _request(result.n, output_tokens, chunk_delay_ms)
    try:
        async with session.post(url, json=body, headers=headers) as response:
            result.status = response.status
            data = await response.read()
        result.completed = response.status == 200 and data.rstrip().endswith(b"data: [DONE]")
        match = _ID.search(data)
        result.provider_id = match.group(1).decode() if match else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"


async def _load(base_url: str, rate: float, duration: float, output_tokens: int, chunk_delay_ms: float,
                on_progress: Any) -> list[CallResult]:
    total = int(rate * duration)
    results = [CallResult(n=i, started=i / rate) for i in range(total)]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        began = loop.time()
        tasks = []
        for result in results:
            delay = began + result.started - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if on_progress is not None:
                on_progress(loop.time() - began)
            tasks.append(asyncio.create_task(_one(session, base_url + "/chat/completions", result, output_tokens, chunk_delay_ms)))
        await asyncio.gather(*tasks)
    return results


def run_load(base_url: str, *, rate: float, duration: float, output_tokens: int = 40, chunk_delay_ms: float = 5.0,
             on_progress: Any = None) -> list[CallResult]:
    """``rate`` streams per second for ``duration`` seconds; ``on_progress(elapsed)`` before each start."""
    return asyncio.run(_load(base_url, rate, duration, output_tokens, chunk_delay_ms, on_progress))


# -- the check ------------------------------------------------------------------------------------


@dataclass
class LedgerCheck:
    expected: int  # calls made
    rows: int  # rows in the ledger
    present: int  # distinct calls with at least one row
    lost: int
    duplicated: int  # rows beyond the first for a call
    token_mismatches: int  # rows whose tokens differ from what the simulator billed
    not_completed: int  # rows whose status is not "completed"
    client_failures: int  # calls the client did not see complete
    unmatched_served: int  # simulator calls with no row
    examples: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (self.lost, self.duplicated, self.token_mismatches, self.unmatched_served) == (0, 0, 0, 0) \
            and self.rows == self.expected


def check_ledger(url: str, results: Sequence[CallResult], served: Sequence[Any]) -> LedgerCheck:
    rows = ledger_rows(url)
    by_n = Counter(int(row["tags"]["n"]) for row in rows if "n" in (row["tags"] or {}))
    wanted = {r.n for r in results}
    lost = sorted(wanted - set(by_n))
    duplicated = sum(count - 1 for count in by_n.values() if count > 1)
    billed = {call.request_id: call.usage for call in served if call.request_id}
    mismatches = 0
    examples = [f"lost n={n}" for n in lost[:5]]
    for row in rows:
        usage = billed.get(row["provider_request_id"])
        if usage is None:
            continue
        expected = (usage.get("prompt_cache_hit_tokens"), usage.get("prompt_cache_miss_tokens"), usage.get("completion_tokens"),
                    (usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
        got = (row["prompt_cache_hit_tokens"], row["prompt_cache_miss_tokens"], row["completion_tokens"], row["reasoning_tokens"])
        if got != expected or row["usage_estimated"]:
            mismatches += 1
            if len(examples) < 10:
                examples.append(f"tokens of {row['provider_request_id']}: row {got} != billed {expected}")
    stored = {row["provider_request_id"] for row in rows}
    unmatched = [pid for pid in billed if pid not in stored]
    return LedgerCheck(
        expected=len(results),
        rows=len(rows),
        present=len(wanted & set(by_n)),
        lost=len(lost),
        duplicated=duplicated,
        token_mismatches=mismatches,
        not_completed=sum(1 for row in rows if row["status"] != "completed"),
        client_failures=sum(1 for r in results if not r.completed),
        unmatched_served=len(unmatched),
        examples=examples,
    )
