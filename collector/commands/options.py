"""Options shared by every subcommand, so ``--db`` means the same everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

db_option: Callable[[F], F] = click.option(
    "--db",
    "db",
    metavar="URL",
    default=None,
    help="SQLAlchemy URL of the ledger. Default: $DSMETER_DATABASE_URL, else an embedded SQLite file.",
)
