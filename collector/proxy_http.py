"""The proxy's HTTP rules, apart from any server: where a request may go, and which headers cross.

Pure functions over strings and header pairs, so the safety rules (no open relay, no
hop-by-hop leakage, the tags header never reaching the upstream) are tested on their own:

- ``Upstream`` is the one place a request can be sent. The request contributes only an
  origin-form path and query (``/chat/completions?x=1``); an absolute-form target
  (``GET http://elsewhere/``), an authority or ``*`` target, or a path with dot segments is
  refused, so nothing a client sends can choose the host or climb out of the base path.
- ``request_headers`` / ``response_headers`` drop the hop-by-hop headers of RFC 9110 §7.6.1
  (and any the ``Connection`` header names), ``Host`` (the upstream's own is used) and the
  ``X-Dsmeter-Tags`` header, which is ours and is not forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from collector.errors import UsageError
from collector.metering import TAGS_HEADER

__all__ = [
    "HOP_BY_HOP",
    "BadTarget",
    "Upstream",
    "parse_upstream",
    "checked_target",
    "first_header",
    "request_headers",
    "response_headers",
]

Headers = Iterable[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded either way besides the hop-by-hop set: the framing is recomputed per hop,
# the upstream's Host is its own, and our tags header is for us.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", TAGS_HEADER}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}

_CONTROL = re.compile(r"[\x00-\x20\x7f\\]")


class BadTarget(ValueError):
    """A request target the proxy will not forward (the message is safe to show the client)."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """The configured upstream: ``scheme://host[:port][/base/path]``."""

    scheme: str
    host: str  # as it goes in a URL (IPv6 in brackets)
    port: int | None
    base_path: str  # "" or "/prefix" without a trailing slash

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``: what the ledger's ``upstream`` column records."""
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port is not None else "")

    def path_for(self, target: str) -> str:
        """The request target sent upstream for one that passed ``checked_target`` (encoded, as received)."""
        return self.base_path + target

    def url_for(self, target: str) -> str:
        """The upstream URL the request goes to: the origin and ``path_for(target)``."""
        return self.origin + self.path_for(target)


def parse_upstream(url: str) -> Upstream:
    """Validate ``--upstream``: an http(s) URL with a host, no credentials, query or fragment."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise UsageError(f"--upstream {url!r} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise UsageError(f"--upstream must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise UsageError(f"--upstream {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        # A credential in a URL ends up in logs and rows; the client's own key is what goes upstream.
        raise UsageError("--upstream must not contain credentials; clients send their own API key")
    if parts.query or parts.fragment:
        raise UsageError(f"--upstream {url!r} must not have a query or fragment")
    base_path = parts.path.rstrip("/")
    if any(segment in (".", "..") for segment in base_path.split("/")):
        raise UsageError(f"--upstream {url!r} must not contain dot segments")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return Upstream(scheme=parts.scheme, host=host, port=port, base_path=base_path)


def checked_target(raw_target: str) -> str:
    """The origin-form target (path and query, still encoded) to append to the upstream URL.

    Raises ``BadTarget`` for anything that could name another host or escape the base path.
    """
    if not raw_target.startswith("/"):
        # Absolute-form (a forward-proxy request), authority-form (CONNECT) or asterisk-form.
        raise BadTarget("only origin-form request targets (/path) are accepted: this is not a forward proxy")
    if _CONTROL.search(raw_target):
        raise BadTarget("the request target contains a control character, space or backslash")
    path, _, _query = raw_target.partition("?")
    if "#" in raw_target:
        raise BadTarget("the request target must not contain a fragment")
    # Decode repeatedly: %2e%2e and %252e%252e must not become ".." at the upstream or a hop behind it.
    decoded = path
    for _ in range(3):
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    if any(segment in (".", "..") for segment in decoded.replace("\\", "/").split("/")):
        raise BadTarget("the request path must not contain '.' or '..' segments")
    return raw_target


def first_header(headers: Headers, name: str) -> str | None:
    """The first value of header ``name`` in raw header pairs (names compared case-insensitively)."""
    lowered = name.lower()
    for key, value in headers:
        if key.lower() == lowered:
            return value
    return None


def _connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(token.strip().lower() for token in value.split(",") if token.strip())
    return tokens


def request_headers(headers: Headers, *, metered: bool) -> list[tuple[str, str]]:
    """Headers to send upstream. A metered call asks for an uncompressed body, because our copy is parsed."""
    pairs = list(headers)
    drop = _REQUEST_DROP | _connection_tokens(pairs)
    if metered:
        drop = drop | {"accept-encoding"}
    out = [(name, value) for name, value in pairs if name.lower() not in drop]
    if metered:
        out.append(("Accept-Encoding", "identity"))
    return out


def response_headers(headers: Headers, *, keep_length: bool) -> list[tuple[str, str]]:
    """Headers to send the client. ``keep_length`` when the body goes through byte for byte."""
    pairs = list(headers)
    drop = _RESPONSE_DROP | _connection_tokens(pairs)
    out = [(name, value) for name, value in pairs if name.lower() not in drop]
    if keep_length:
        out.extend((name, value) for name, value in pairs if name.lower() == "content-length")
    return out
