"""Webhook notification: POST a report as JSON with a Slack-compatible ``text`` field.

A failed delivery (unreachable host, timeout, a non-2xx answer) is a ``RemoteError`` with
one line that names the host and what happened, exit code ``EXIT_REMOTE`` (6). The caller
has already written the report before notifying, so a broken webhook never loses it.
The URL's query string and any user info are left out of messages: webhook URLs carry
their secret there (Slack's ``/services/T../B../<token>`` path too, so only the host is named).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from collector.errors import DsmeterError, UsageError

__all__ = ["EXIT_REMOTE", "RemoteError", "NOTIFY_TIMEOUT_S", "check_webhook_url", "post_webhook"]

EXIT_REMOTE = 6  # a remote service (webhook, provider API) could not be reached or refused
NOTIFY_TIMEOUT_S = 10.0


class RemoteError(DsmeterError):
    """A remote endpoint failed; the local work (report, snapshot) is done and kept."""

    exit_code = EXIT_REMOTE


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else "?"


def check_webhook_url(url: str) -> str:
    """The URL if it is an absolute http(s) URL with a host; a ``UsageError`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("--notify needs an http:// or https:// URL with a host")
    return url


def post_webhook(
    url: str, payload: Mapping[str, Any], *, timeout: float = NOTIFY_TIMEOUT_S, client: httpx.Client | None = None
) -> int:
    """POST ``payload`` as JSON (UTF-8, sorted keys) to ``url``; returns the HTTP status (2xx)."""
    check_webhook_url(url)
    body = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "dsmeter"}
    own = client is None
    http = client if client is not None else httpx.Client(timeout=timeout, follow_redirects=False)
    try:
        response = http.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        raise RemoteError(f"webhook {_host(url)} did not answer within {timeout:g}s; the report was written") from None
    except httpx.HTTPError as error:
        reason = type(error).__name__
        raise RemoteError(f"webhook {_host(url)} is unreachable ({reason}); the report was written") from None
    finally:
        if own:
            http.close()
    if not 200 <= response.status_code < 300:
        raise RemoteError(f"webhook {_host(url)} answered HTTP {response.status_code}; the report was written")
    return response.status_code
