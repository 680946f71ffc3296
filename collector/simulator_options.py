"""Per-request knobs of the simulator, read from ``X-Simulator-*`` headers.

A client (a test, the proxy, the SDK via ``extra_headers``) asks for faults and pacing
one request at a time; server-wide defaults come from the ``Simulator`` constructor.

=============================  =====================================================
``X-Simulator-Fault``          ``402|422|429|500|503`` (that status before any byte of
                               the stream, with DeepSeek's error body), ``disconnect``
                               (cut the TCP connection after N chunks: no ``[DONE]``,
                               no usage), ``stall`` (stop after N chunks, keep the
                               connection open), ``malformed`` (one chunk of broken JSON
                               before chunk N, then carry on), ``error-event`` (an
                               in-stream error object after N chunks, then end)
``X-Simulator-Fault-After``    N for the faults above; default: half the chunks
``X-Simulator-Output-Tokens``  answer (``content``) tokens
``X-Simulator-Reasoning-Tokens``  reasoning tokens (thinking mode only)
``X-Simulator-Chunk-Delay-Ms``  delay between chunks (a non-streaming answer waits as
                               long as its stream would have taken)
``X-Simulator-Queue-Ms``       queueing before the first chunk: ``: keep-alive`` comments
                               every 50 ms (streaming) or blank lines (non-streaming)
``X-Simulator-Framing``        ``crlf`` for CRLF line ends (default ``lf``)
``X-Simulator-Style``          ``openai``: usage on a separate last chunk with empty
                               ``choices``, only with ``include_usage`` (default ``deepseek``)
``X-Simulator-Chunk-Bytes``    split every event's write into pieces of N bytes
=============================  =====================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "HEADER_CHUNK_BYTES",
    "HEADER_CHUNK_DELAY_MS",
    "HEADER_FAULT",
    "HEADER_FAULT_AFTER",
    "HEADER_FRAMING",
    "HEADER_OUTPUT_TOKENS",
    "HEADER_QUEUE_MS",
    "HEADER_REASONING_TOKENS",
    "HEADER_STYLE",
    "STATUS_FAULTS",
    "STREAM_FAULTS",
    "OptionError",
    "RequestOptions",
    "parse_options",
]

HEADER_FAULT = "X-Simulator-Fault"
HEADER_FAULT_AFTER = "X-Simulator-Fault-After"
HEADER_OUTPUT_TOKENS = "X-Simulator-Output-Tokens"
HEADER_REASONING_TOKENS = "X-Simulator-Reasoning-Tokens"
HEADER_CHUNK_DELAY_MS = "X-Simulator-Chunk-Delay-Ms"
HEADER_QUEUE_MS = "X-Simulator-Queue-Ms"
HEADER_FRAMING = "X-Simulator-Framing"
HEADER_STYLE = "X-Simulator-Style"
HEADER_CHUNK_BYTES = "X-Simulator-Chunk-Bytes"

STATUS_FAULTS = frozenset({402, 422, 429, 500, 503})
STREAM_FAULTS = frozenset({"disconnect", "stall", "malformed", "error-event"})

_MAX_TOKENS_OVERRIDE = 1_000_000
_MAX_DELAY_MS = 600_000.0


class OptionError(ValueError):
    """A malformed ``X-Simulator-*`` header; the message names the header."""


@dataclass(frozen=True, slots=True)
class RequestOptions:
    fault: str | int | None = None  # an HTTP status (int) or a stream fault name
    fault_after: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    chunk_delay_ms: float = 0.0
    queue_ms: float = 0.0
    crlf: bool = False
    openai_style: bool = False
    chunk_bytes: int | None = None


def _int(headers: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise OptionError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise OptionError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _float(headers: Mapping[str, str], name: str, default: float) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise OptionError(f"{name} must be a number of milliseconds, got {raw!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= _MAX_DELAY_MS:
        raise OptionError(f"{name} must be between 0 and {_MAX_DELAY_MS:g} ms, got {raw!r}")
    return value


def _choice(headers: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value not in allowed:
        raise OptionError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
    return value


def _fault(headers: Mapping[str, str]) -> str | int | None:
    raw = headers.get(HEADER_FAULT)
    if raw is None:
        return None
    value = raw.strip().lower()
    if value.isdigit() and int(value) in STATUS_FAULTS:
        return int(value)
    if value in STREAM_FAULTS:
        return value
    allowed = [str(s) for s in sorted(STATUS_FAULTS)] + sorted(STREAM_FAULTS)
    raise OptionError(f"{HEADER_FAULT} must be one of {', '.join(allowed)}, got {raw!r}")


def parse_options(headers: Mapping[str, str], *, default_chunk_delay_ms: float = 0.0) -> RequestOptions:
    """Read the knobs from request headers (``headers`` must look names up case-insensitively)."""
    return RequestOptions(
        fault=_fault(headers),
        fault_after=_int(headers, HEADER_FAULT_AFTER, 0, 10_000_000),
        output_tokens=_int(headers, HEADER_OUTPUT_TOKENS, 0, _MAX_TOKENS_OVERRIDE),
        reasoning_tokens=_int(headers, HEADER_REASONING_TOKENS, 0, _MAX_TOKENS_OVERRIDE),
        chunk_delay_ms=_float(headers, HEADER_CHUNK_DELAY_MS, default_chunk_delay_ms),
        queue_ms=_float(headers, HEADER_QUEUE_MS, 0.0),
        crlf=_choice(headers, HEADER_FRAMING, ("lf", "crlf")) == "crlf",
        openai_style=_choice(headers, HEADER_STYLE, ("deepseek", "openai")) == "openai",
        chunk_bytes=_int(headers, HEADER_CHUNK_BYTES, 1, 1 << 20),
    )
