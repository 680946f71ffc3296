"""Shared fixtures: an isolated data directory for every test, and real databases.

Storage tests take the ``db_url`` fixture, which runs them against SQLite and, when
``DSMETER_TEST_POSTGRES_URL`` is set, against PostgreSQL too: each test gets a fresh
database of its own (so parallel runs never share state), dropped afterwards.
If the variable is set but the server cannot be reached, the run fails loudly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy_support import StartProxy, proxy_starter

# No API key the tests use may reach a table, log, output or file the suite produces (tests/secrets_guard.py).
pytest_plugins = ["secrets_guard"]

POSTGRES_ENV = "DSMETER_TEST_POSTGRES_URL"
FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepseek"


def pytest_configure(config: pytest.Config) -> None:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        return
    import sqlalchemy as sa

    from collector.config import normalise_database_url

    try:
        engine = sa.create_engine(normalise_database_url(url))
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as error:  # fail loudly: CI must never silently skip PostgreSQL
        raise pytest.UsageError(f"{POSTGRES_ENV} is set but PostgreSQL is unreachable: {error}") from None


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory and no ambient database URL."""
    home = tmp_path_factory.mktemp("dsmeter-home")
    monkeypatch.setenv("DSMETER_HOME", str(home))
    monkeypatch.delenv("DSMETER_DATABASE_URL", raising=False)
    monkeypatch.delenv("DSMETER_PRICES", raising=False)
    return home


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (the repo expects ../shared beside it)")
    return FIXTURES


def _postgres_admin_url() -> str | None:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        return None
    from collector.config import normalise_database_url

    return normalise_database_url(url)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A brand-new, empty PostgreSQL database for this test only."""
    admin_url = _postgres_admin_url()
    if admin_url is None:
        pytest.skip(f"{POSTGRES_ENV} not set")
    yield from _fresh_postgres_database(admin_url)


def _fresh_postgres_database(admin_url: str) -> Iterator[str]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"dsmeter_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database URL: SQLite always, PostgreSQL when the suite is pointed at one."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    admin_url = _postgres_admin_url()
    if admin_url is None:
        pytest.skip(f"{POSTGRES_ENV} not set")
    yield from _fresh_postgres_database(admin_url)


@pytest.fixture
def start_proxy() -> Iterator[StartProxy]:
    """``start(upstream, **ProxyConfig options) -> (ProxyThread, RecordSink)``; every proxy started is stopped after."""
    yield from proxy_starter()
