"""API keys never reach a table, log, metric, report or export; the fingerprint secret stays secret.

The whole suite runs under ``secrets_guard`` (see tests/secrets_guard.py): every database,
log record, command output and file it produces is searched for the keys the tests use.
These tests make that check non-vacuous: they push a key through every path that could
carry it (the upstream echoing it back in an error, in a stream error event, a spooled
outage, an export in both formats, DEBUG logging), check the rows really are there, and
check the guard itself finds a key where one was planted.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import collector
from collector.cli import main
from collector.fingerprint import SECRET_FILE, fingerprint_secret, key_fingerprint
from collector.record import UsageRecord, utcnow
from collector.spool import SpoolFile, replay_spool
from collector.store import LedgerStore
from collector.writer import LedgerWriter
from secrets_guard import KEY_PATTERN, find_secrets, known_secrets, scan_path, scan_postgres

KEY = "sk-test-secrets-4f1c9a7e2b6d8035"
USAGE = {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
         "prompt_cache_hit_tokens": 32, "prompt_cache_miss_tokens": 8}


# -- an upstream that echoes the caller's key back wherever it can --------------------------------


class _EchoingUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.rfile.read(int(self.headers.get("content-length", "0")))
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        if self.path.startswith("/reject"):
            body = json.dumps({"error": {"message": f"Authentication Fails, Your api key: {key} is invalid",
                                         "type": "authentication_error", "code": "invalid_request_error"}}).encode()
            self._send(401, "application/json", body)
        elif self.path.startswith("/stream-error"):
            events = [{"id": "c1", "model": "deepseek-v4-flash", "choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                      {"error": {"message": f"quota exceeded for key {key}", "type": "rate_limit_error"}}]
            self._send(200, "text/event-stream", b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))
        else:
            events = [{"id": "c2", "model": "deepseek-v4-flash",
                       "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": "stop"}], "usage": USAGE}]
            body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
            self._send(200, "text/event-stream", body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _call(client: httpx.Client, url: str) -> None:
    body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {KEY}", "x-dsmeter-tags": "team=search"}
    with client.stream("POST", url, json=body, headers=headers) as response:
        for _ in response.iter_raw():
            pass


def _rows(url: str) -> list[dict[str, object]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text("SELECT * FROM calls"))]
    finally:
        engine.dispose()


def test_a_key_echoed_back_by_the_upstream_reaches_no_row_spool_export_or_log(
    db_url: str, upstream: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spool_dir = tmp_path / "spool"
    records: list[UsageRecord] = []
    with collector.metered_client(sink=records.append) as client:
        for path in ("/reject", "/stream-error", "/ok"):
            _call(client, f"{upstream}{path}/chat/completions")
    assert [r.status for r in records] == ["error", "error", "completed"]

    # Half the calls wait out an outage in the spool, half go through the writer.
    spool = SpoolFile(spool_dir)
    spool.append(records[:2], sync=True)
    spool.close()  # as a process that wrote it and exited
    store = LedgerStore(db_url)
    try:
        replayed = replay_spool(store, spool_dir)
    finally:
        store.close()
    with LedgerWriter(db_url, spool_dir=spool_dir) as writer:
        writer.submit(records[2])
    assert replayed.inserted == 2

    rows = _rows(db_url)
    assert len(rows) == 3  # the key-bearing calls really are in the ledger
    assert {r["key_fingerprint"] for r in rows} == {key_fingerprint(KEY)}
    assert any("Authentication Fails" in str(r["error_message"]) for r in rows)

    runner = CliRunner()
    exports = [runner.invoke(main, ["export", "--db", db_url, "--format", fmt]) for fmt in ("jsonl", "csv")]
    assert all(result.exit_code == 0 for result in exports), [r.output for r in exports]
    assert all(result.output.count("\n") >= 3 for result in exports)

    leaks = [*find_secrets(json.dumps([r.to_dict() for r in records]), "records", [KEY]),
             *find_secrets("\n".join(r.output for r in exports), "exports", [KEY]),
             *find_secrets(caplog.text, "logs", [KEY]),
             *scan_path(tmp_path, [KEY])]
    if db_url.startswith("postgresql"):
        leaks += scan_postgres(db_url)
    assert leaks == []
    assert KEY in known_secrets()  # and the session guard looks for it everywhere else too


def test_the_guard_finds_a_key_planted_in_a_table_a_file_and_a_log(db_url: str, tmp_path: Path) -> None:
    planted = "sk-" + "planted" + uuid.uuid4().hex  # built at run time: not one of the suite's keys
    assert planted not in known_secrets()
    store = LedgerStore(db_url)
    try:
        record = UsageRecord(started_at=utcnow(), error_message=f"oops {planted} oops", status="error")
        assert store.insert([record]) == 1
        if db_url.startswith("postgresql"):
            found = scan_postgres(db_url, [planted])
            assert found and "calls" in found[0].where and planted not in str(found[0])
        else:
            store.close()
            assert scan_path(Path(db_url.removeprefix("sqlite:///")), [planted])
        with store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM calls"))
    finally:
        store.close()
    (tmp_path / "report.html").write_text(f"<td>{planted}</td>")
    assert scan_path(tmp_path, [planted])
    (tmp_path / "report.html").unlink()
    assert find_secrets(f"GET /?key={planted} 200", "a log line", [planted])


def test_every_key_literal_in_the_tests_is_looked_for() -> None:
    literals = set()
    for path in Path(__file__).parent.rglob("*.py"):
        literals |= set(KEY_PATTERN.findall(path.read_text()))
    assert KEY in literals
    assert literals <= known_secrets()


# -- the fingerprint secret -------------------------------------------------------------------------


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_fingerprint_secret_file_is_created_owner_only_even_under_a_permissive_umask(
    isolated_home: Path, permissive_umask: None
) -> None:
    secret = fingerprint_secret()
    path = isolated_home / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().strip() == secret and len(secret) >= 32


def test_fingerprint_secret_is_never_printed_by_commands_logs_or_records(
    isolated_home: Path, upstream: str, caplog: pytest.LogCaptureFixture, sqlite_url: str
) -> None:
    caplog.set_level(logging.DEBUG)
    records: list[UsageRecord] = []
    with collector.metered_client(sink=records.append) as client:
        _call(client, f"{upstream}/reject/chat/completions")
        _call(client, f"{upstream}/ok/chat/completions")
    secret = (isolated_home / SECRET_FILE).read_text().strip()
    with LedgerWriter(sqlite_url) as writer:
        for record in records:
            writer.submit(record)
    runner = CliRunner()
    outputs = [runner.invoke(main, args) for args in (
        ["export", "--help"], ["db", "upgrade", "--db", sqlite_url], ["export", "--db", sqlite_url, "--format", "jsonl"],
        ["spool", "status", "--db", sqlite_url],
    )]
    assert all(result.exit_code == 0 for result in outputs), [r.output for r in outputs]
    text = "\n".join([caplog.text, *(r.output for r in outputs), json.dumps([r.to_dict() for r in records])])
    assert records[0].key_fingerprint and records[0].key_fingerprint in text  # the fingerprint is shown...
    assert secret not in text  # ...the secret behind it never
    assert scan_path(isolated_home, [secret], allow=[isolated_home / SECRET_FILE]) == []


def test_a_fingerprint_reveals_neither_the_key_nor_can_be_checked_without_the_secret() -> None:
    one, other = key_fingerprint(KEY, b"secret-one"), key_fingerprint(KEY, b"secret-two")
    assert one != other and KEY not in one and KEY[3:] not in one
    assert key_fingerprint(KEY, b"secret-one") == one  # stable on one installation


def _secret_in_child(
    home: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[str], slow: bool
) -> None:
    import time

    from collector import fingerprint

    os.environ["DSMETER_HOME"] = home
    os.environ.pop("DSMETER_FINGERPRINT_SECRET", None)
    if slow:
        # A worker descheduled while it makes the secret (a busy machine): the others must
        # never see its file before it is whole.
        token_hex = fingerprint.secrets.token_hex

        def slow_token_hex(nbytes: int) -> str:
            time.sleep(0.5)
            return token_hex(nbytes)

        fingerprint.secrets.token_hex = slow_token_hex  # type: ignore[assignment]
    start.wait()
    if not slow:
        time.sleep(0.1)  # let the slow one get there first
    try:
        out.put(fingerprint.fingerprint_secret().decode())
    except RuntimeError as error:
        out.put(f"error: {error}")


def test_processes_starting_at_once_all_get_the_one_secret_and_none_sees_it_half_written(tmp_path: Path) -> None:
    # Proxy workers start together on a fresh home: one creates the secret while the others read it.
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(6), context.Queue()
    children = [context.Process(target=_secret_in_child, args=(str(tmp_path), start, out, n == 0)) for n in range(6)]
    for child in children:
        child.start()
    secrets_seen = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(30)
    assert len(set(secrets_seen)) == 1, secrets_seen
    assert len(secrets_seen[0]) >= 32 and not secrets_seen[0].startswith("error")
    assert (tmp_path / SECRET_FILE).read_bytes().strip().decode() == secrets_seen[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == [SECRET_FILE]  # no temporary file left behind
