"""Attribute calls to API keys without ever storing a key.

A key's fingerprint is an HMAC-SHA256 of the key under a local secret, so the same key
always maps to the same fingerprint on this installation, but a fingerprint (in a row, a
report or a metric label) cannot be turned back into the key nor checked against a guessed
key by anyone without the secret. The secret is created once with owner-only permissions
and never printed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path

from collector.config import data_dir

__all__ = ["key_fingerprint", "api_key_from_headers", "fingerprint_secret"]

ENV_SECRET = "DSMETER_FINGERPRINT_SECRET"
SECRET_FILE = "fingerprint.key"

_lock = threading.Lock()
# Keyed by the environment that decides the data directory, so the hot path (one lookup per
# metered call) costs a dict lookup, not a mkdir and a file read; tests that move
# DSMETER_HOME still get the secret of the directory they point at.
_cached: dict[tuple[str | None, str | None], bytes] = {}


def _location_key() -> tuple[str | None, str | None]:
    return os.environ.get("DSMETER_HOME"), os.environ.get("XDG_DATA_HOME")


def fingerprint_secret() -> bytes:
    """The local HMAC secret: ``DSMETER_FINGERPRINT_SECRET`` (shared by a fleet of proxies), else a file."""
    explicit = os.environ.get(ENV_SECRET)
    if explicit:
        return explicit.encode()
    location = _location_key()
    cached = _cached.get(location)
    if cached is not None:
        return cached
    with _lock:
        if location in _cached:
            return _cached[location]
        path = data_dir() / SECRET_FILE
        try:
            value = path.read_bytes().strip()
        except FileNotFoundError:
            value = _create_secret(path)
        if not value:
            raise RuntimeError(f"fingerprint secret file {path} is empty; delete it to create a new one")
        _cached[location] = value
        return value


def _create_secret(path: Path) -> bytes:
    """Write a new secret to ``path``, or return the one another process got there first with.

    The secret is written whole to a file of our own, then published with ``link``, which
    refuses to replace an existing file: so ``path`` never exists half-written (workers
    starting at once read it while one of them creates it), and when two processes race,
    both end up with the one secret that was linked first.
    """
    value = secrets.token_hex(32).encode()
    staging = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(value + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staging, path)
        except FileExistsError:
            return path.read_bytes().strip()
        return value
    finally:
        staging.unlink(missing_ok=True)


def key_fingerprint(api_key: str, secret: bytes | None = None) -> str:
    digest = hmac.new(secret or fingerprint_secret(), api_key.encode(), hashlib.sha256).hexdigest()
    return "kf_" + digest[:16]


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key a request carries: ``Authorization: Bearer …`` (OpenAI style) or ``x-api-key`` (Anthropic)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = lowered.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        key = auth[7:].strip()
        if key:
            return key
    key = lowered.get("x-api-key", "").strip()
    return key or None
