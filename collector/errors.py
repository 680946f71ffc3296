"""Errors a user can act on. The CLI prints ``str(error)`` on one line and exits with ``exit_code``."""

from __future__ import annotations

__all__ = ["DsmeterError", "UsageError", "DatabaseUnavailable", "EXIT_USAGE", "EXIT_DATABASE"]

EXIT_USAGE = 2  # bad input: a flag, a file, a date
EXIT_DATABASE = 3  # the database cannot be reached or migrated


class DsmeterError(Exception):
    exit_code: int = 1


class UsageError(DsmeterError):
    """Bad input from the user (arguments, files). Exit code 2."""

    exit_code = EXIT_USAGE


class DatabaseUnavailable(DsmeterError):
    exit_code = EXIT_DATABASE
