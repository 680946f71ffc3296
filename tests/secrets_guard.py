"""A pytest plugin: no API key the suite uses may appear in anything the suite produces.

Which keys: every ``sk-…`` literal (``sk-`` and at least 8 of ``[A-Za-z0-9_-]``) written in
any file under ``tests/``, read at start-up, plus any key a test builds at run time and
hands to ``register_secret``. Every fingerprint secret (``fingerprint.key`` in a test's data
directory) is a secret too: it may exist in its own file and nowhere else.

Where it looks:

* every database a test used, while the test's fixtures are still alive (before the
  PostgreSQL database is dropped): every row of every table, read as text on the server
  (``row::text``), and the SQLite file with its WAL and journal as raw bytes;
* every log record of the whole session (a handler on the root logger, with the
  ``dsmeter`` loggers opened down to DEBUG), message and traceback;
* every test's captured stdout, stderr and log sections, and its failure text;
* everything ``click.testing.CliRunner`` returns (reports and exports printed by commands);
* at the end, every file under the session's temporary directory: ledgers, spool and
  rejected files, exports, reports, metrics snapshots, logs of subprocesses written there
  (fingerprint secrets are not looked for in files over 64 MiB: large ledgers, where no code
  path writes them).

A leak found during a test fails that test's teardown, naming where it was found; the
session-end sweep fails the run. The check cannot see the stdout of a subprocess a test
reads through a pipe and never writes down; the tests that start the proxy check its
/metrics and logs explicitly (tests/test_secrets.py).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["register_secret", "known_secrets", "find_secrets", "scan_path", "scan_postgres", "Leak", "KEY_PATTERN"]

KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
TESTS_DIR = Path(__file__).resolve().parent
FINGERPRINT_FILE = "fingerprint.key"
_SKIP_SUFFIXES = (".pyc",)
# Fingerprint secrets (hex) are not looked for in files larger than this: those are ledgers full of
# hex ids, where the search is slow, and no code path writes the secret near a table. API keys are.
_HEX_SCAN_LIMIT = 64 << 20


@dataclass(frozen=True)
class Leak:
    where: str  # "table calls in postgresql…/dsmeter_t_…", "log dsmeter.writer", "file …"
    secret: str  # shortened, so the report itself does not print the whole key
    context: str  # what surrounded it, with the secret masked

    def __str__(self) -> str:
        return f"{self.secret} in {self.where}: …{self.context}…"


class _Registry:
    """Known secrets, matched fast: candidates are found by shape, then looked up.

    API keys are ``sk-…`` strings (a candidate leaks if it contains a known key); fingerprint
    secrets are 64 hex digits (a window of a hex run leaks if it is a known secret). Any other
    registered string is searched for as it is.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: set[str] = set()
        self.hex: set[str] = set()
        self.other: set[str] = set()

    def add(self, *secrets: str) -> None:
        with self.lock:
            for secret in secrets:
                if not secret:
                    continue
                if KEY_PATTERN.fullmatch(secret):
                    self.keys.add(secret)
                elif _HEX64.fullmatch(secret):
                    self.hex.add(secret.lower())
                else:
                    self.other.add(secret)

    def size(self) -> int:
        return len(self.keys) + len(self.hex) + len(self.other)

    def all(self) -> set[str]:
        with self.lock:
            return self.keys | self.hex | self.other

    def find(self, text: str, *, hex_secrets: bool = True) -> list[tuple[int, int, str]]:
        """(start, end, secret) of every known secret in ``text``."""
        found: list[tuple[int, int, str]] = []
        if "sk-" in text and self.keys:
            for match in KEY_PATTERN.finditer(text):
                for key in self.keys:
                    at = match.group(0).find(key)
                    if at != -1:
                        found.append((match.start() + at, match.start() + at + len(key), key))
        if self.hex and hex_secrets:
            for match in _HEX_RUN.finditer(text):
                run = match.group(0).lower()
                for i in range(len(run) - 63):
                    if run[i : i + 64] in self.hex:
                        found.append((match.start() + i, match.start() + i + 64, run[i : i + 64]))
        for secret in self.other:
            at = text.find(secret)
            if at != -1:
                found.append((at, at + len(secret), secret))
        return found


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Only from the start of a hex run: otherwise every 32-digit UUID in a ledger file is re-tried at each
# of its positions, which made scanning a million-row SQLite file take half a minute.
_HEX_RUN = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64,}")
_registry = _Registry()
_scanned: dict[Path, tuple[int, int, int]] = {}  # file -> (mtime, size, secrets known) when found clean


def register_secret(*secrets: str) -> None:
    """A key a test builds at run time (a literal in tests/ is found without this)."""
    _registry.add(*secrets)


def known_secrets() -> frozenset[str]:
    return frozenset(_registry.all())


def _shorten(secret: str) -> str:
    return secret[:6] + "…" if len(secret) > 6 else "…"


def find_secrets(
    text: str, where: str, secrets: Iterable[str] | None = None, *, hex_secrets: bool = True
) -> list[Leak]:
    """Every occurrence of a known secret (or of ``secrets`` only) in ``text``."""
    registry = _registry
    if secrets is not None:
        registry = _Registry()
        registry.add(*secrets)
    leaks = []
    for start, end, secret in registry.find(text, hex_secrets=hex_secrets):
        context = text[max(0, start - 60) : end + 60].replace(secret, "<SECRET>")
        leaks.append(Leak(where, _shorten(secret), context.replace("\n", " ")))
    return leaks


def _windows(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        tail = b""
        while True:
            block = handle.read(64 << 20)
            if not block:
                return
            yield tail + block
            tail = block[-512:]  # a key split across two reads is still found


def scan_path(root: Path, secrets: Iterable[str] | None = None, *, allow: Iterable[Path] = ()) -> list[Leak]:
    """Raw bytes of every file under ``root`` (or ``root`` itself): ledgers, spool, exports, logs."""
    if not root.exists():
        return []
    allowed = {p.resolve() for p in allow}
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    leaks = []
    for path in files:
        if path.suffix in _SKIP_SUFFIXES or path.resolve() in allowed:
            continue
        try:
            info = path.stat()
            # A file unchanged since it was last searched for the same secrets is not read again.
            stamp = (info.st_mtime_ns, info.st_size, _registry.size())
            if secrets is None and _scanned.get(path) == stamp:
                continue
            hex_secrets = info.st_size <= _HEX_SCAN_LIMIT
            for window in _windows(path):
                # latin-1 maps every byte to one character: the key shapes match as in the bytes.
                found = find_secrets(window.decode("latin-1"), f"file {path}", secrets, hex_secrets=hex_secrets)
                if found:
                    leaks.append(found[0])
                    break
            else:
                if secrets is None:
                    _scanned[path] = stamp
        except OSError:
            continue  # removed while we looked (a spool file being claimed)
    return leaks


def _postgres_conninfo(url: str) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    info: dict[str, Any] = {"dbname": parsed.database, "connect_timeout": 5}
    for key, value in (("host", parsed.host), ("port", parsed.port), ("user", parsed.username), ("password", parsed.password)):
        if value is not None:
            info[key] = value
    return info


def scan_postgres(url: str, secrets: Iterable[str] | None = None) -> list[Leak]:
    """Every row of every table in the database at ``url``; rows with ``sk-`` in them are checked in full.

    (Fingerprint secrets are not looked for here: nothing writes them near a table, and a
    search for every one of them in every row would be slow. The SQLite files are read raw.)
    """
    if secrets is None and not _registry.keys:
        return []
    import psycopg
    from psycopg import sql

    leaks: list[Leak] = []
    info = _postgres_conninfo(url)
    try:
        conn = psycopg.connect(**info, autocommit=True)
    except psycopg.Error:
        return []  # already gone (the test dropped it) or cut off on purpose
    with conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        for schema, table in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} AS t WHERE strpos(t::text, 'sk-') > 0").format(
                sql.Identifier(schema), sql.Identifier(table)
            )
            for (row,) in conn.execute(query).fetchall():
                leaks += find_secrets(row, f"table {schema}.{table} of database {info['dbname']}", secrets)
    return leaks


def _scan_sqlite_url(url: str) -> list[Leak]:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":
        return []
    path = Path(database)
    leaks: list[Leak] = []
    for suffix in ("", "-wal", "-journal"):
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            leaks += scan_path(candidate)
    return leaks


def _scan_database_url(url: str) -> list[Leak]:
    if url.startswith("postgresql"):
        return scan_postgres(url)
    if url.startswith("sqlite"):
        return _scan_sqlite_url(url)
    return []


# -- logs -------------------------------------------------------------------------------------


class _LeakHandler(logging.Handler):
    def __init__(self, guard: _Guard) -> None:
        super().__init__(logging.DEBUG)
        self.guard = guard

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            if record.stack_info:
                text += "\n" + record.stack_info
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not ours to judge
            return
        leaks = find_secrets(text, f"log record {record.name} ({record.levelname})")
        if leaks:
            self.guard.add(leaks)


# -- the plugin -------------------------------------------------------------------------------


class _Guard:
    def __init__(self) -> None:
        self.current: str | None = None
        self.by_test: dict[str, list[Leak]] = {}
        self.session: list[Leak] = []
        self.lock = threading.Lock()
        self.handler = _LeakHandler(self)
        self.dsmeter_level: int | None = None
        self.runner_invoke: Any = None

    def add(self, leaks: list[Leak]) -> None:
        with self.lock:
            if self.current is None:
                self.session.extend(leaks)
            else:
                self.by_test.setdefault(self.current, []).extend(leaks)

    def take(self, nodeid: str) -> list[Leak]:
        with self.lock:
            return self.by_test.pop(nodeid, [])


_guard = _Guard()


def _literal_keys() -> set[str]:
    """Every ``sk-…`` literal in the files under tests/ (this module's own pattern aside)."""
    keys: set[str] = set()
    for path in TESTS_DIR.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".json", ".jsonl", ".toml", ".txt", ".sse"):
            try:
                keys.update(KEY_PATTERN.findall(path.read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
    return keys


def pytest_configure(config: pytest.Config) -> None:
    register_secret(*_literal_keys())
    logging.getLogger().addHandler(_guard.handler)
    dsmeter = logging.getLogger("dsmeter")
    _guard.dsmeter_level = dsmeter.level
    if dsmeter.getEffectiveLevel() > logging.DEBUG:
        dsmeter.setLevel(logging.DEBUG)  # see every record our code writes, not only warnings
    _wrap_cli_runner()


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger().removeHandler(_guard.handler)
    if _guard.dsmeter_level is not None:
        logging.getLogger("dsmeter").setLevel(_guard.dsmeter_level)
    if _guard.runner_invoke is not None:
        from click.testing import CliRunner

        CliRunner.invoke = _guard.runner_invoke  # type: ignore[method-assign]


def _wrap_cli_runner() -> None:
    # Observe (never change) what commands print: reports and exports reach tests through here.
    try:
        from click.testing import CliRunner
    except ImportError:
        return
    original = CliRunner.invoke
    _guard.runner_invoke = original

    def invoke(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        command = " ".join(str(a) for a in (args[1] if len(args) > 1 else kwargs.get("args") or []))[:80]
        text = result.output
        try:
            text += result.stderr
        except ValueError:  # older click: stderr mixed into output
            pass
        _guard.add(find_secrets(text, f"output of `dsmeter {command}`"))
        if result.exc_info and result.exc_info[1] is not None and not isinstance(result.exc_info[1], SystemExit):
            _guard.add(find_secrets("".join(traceback.format_exception(*result.exc_info)), "a command's exception"))
        return result

    CliRunner.invoke = invoke  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _guard.current = nodeid


def _basetemp(config: pytest.Config) -> Path | None:
    factory = getattr(config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)  # None until a test asked for a temporary path
    return Path(basetemp).resolve() if basetemp is not None else None


def _fixture_artifacts(item: pytest.Item) -> list[Leak]:
    """The test's databases (by URL) and its temporary directories (the data home, tmp_path)."""
    leaks: list[Leak] = []
    basetemp = _basetemp(item.config)
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, str) and value.startswith(("postgresql", "sqlite")):
            leaks += _scan_database_url(value)
        elif isinstance(value, Path) and basetemp is not None and value.is_dir() and value.resolve().is_relative_to(basetemp):
            fingerprint_files = list(value.rglob(FINGERPRINT_FILE))
            leaks += scan_path(value, allow=fingerprint_files)
            # From now on the test's fingerprint secrets count as secrets everywhere but their own file.
            register_secret(*(p.read_text(errors="replace").strip() for p in fingerprint_files))
    return leaks


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # Before the fixtures' own teardown: the test's databases still exist here.
    try:
        found = _fixture_artifacts(item)
    except Exception as error:  # noqa: BLE001 - a scan failure must not hide the test's own result
        found = [Leak("the secrets scan itself", "-", f"{type(error).__name__}: {error}")]
    result = yield
    found = list(dict.fromkeys(found + _guard.take(item.nodeid)))
    if found:
        _guard.session.extend(found)
        lines = "\n".join(f"  {leak}" for leak in found[:20])
        pytest.fail(f"an API key the tests use leaked ({len(found)} place(s)):\n{lines}", pytrace=False)
    return result


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    texts = [content for _, content in report.sections]
    if report.failed and report.longreprtext:
        texts.append(report.longreprtext)
    for text in texts:
        leaks = find_secrets(text, f"captured output of {report.nodeid} ({report.when})")
        if leaks:
            with _guard.lock:
                _guard.session.extend(leaks)
    if report.when == "teardown":
        _guard.current = None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    basetemp = _basetemp(session.config)
    if basetemp is not None:
        # Keys, and every fingerprint secret, anywhere but in a fingerprint secret's own file.
        fingerprints = {p: p.read_text(errors="replace").strip() for p in basetemp.rglob(FINGERPRINT_FILE)}
        register_secret(*fingerprints.values())
        _guard.session.extend(scan_path(basetemp, allow=fingerprints))
    with _guard.lock:
        leftovers = [leak for leaks in _guard.by_test.values() for leak in leaks]
        _guard.by_test.clear()
    _guard.session.extend(leftovers)
    if _guard.session and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    unique = list(dict.fromkeys(_guard.session))
    keys = len(_registry.keys) + len(_registry.other)
    if not unique:
        terminalreporter.write_line(
            f"secrets guard: {keys} API key(s) and {len(_registry.hex)} fingerprint secret(s) checked; "
            "none found in tables, logs, outputs or files"
        )
        return
    terminalreporter.section("secrets guard: API keys leaked", red=True)
    for leak in unique[:50]:
        terminalreporter.write_line(str(leak))
