"""Where things live: the database URL and the local data directory.

Resolution order for the database, the same for every command and client:
explicit ``--db`` / ``db=`` argument, then ``DSMETER_DATABASE_URL``, then an embedded
SQLite file in the user's data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "database_url", "normalise_database_url", "redact_url"]

ENV_DATABASE_URL = "DSMETER_DATABASE_URL"
ENV_HOME = "DSMETER_HOME"


def data_dir() -> Path:
    """The per-user directory for the default ledger, the spool and the fingerprint secret."""
    explicit = os.environ.get(ENV_HOME)
    if explicit:
        path = Path(explicit)
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "dsmeter"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def normalise_database_url(url: str) -> str:
    """Accept the URLs people paste (``postgres://``, ``postgresql://``) and pick the installed driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def database_url(explicit: str | None = None) -> str:
    url = explicit or os.environ.get(ENV_DATABASE_URL)
    if not url:
        url = f"sqlite:///{data_dir() / 'ledger.db'}"
    return normalise_database_url(url)


def redact_url(url: str) -> str:
    """A database URL safe to print: the password is replaced."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"
