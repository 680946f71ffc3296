"""The one record shape that travels from the metering path to the ledger and out again.

A ``UsageRecord`` is one call: what was asked, what came back, the tokens the provider
billed (or our estimate, flagged), timings, attribution and, once priced, the cost.
Unknown counts are ``None``, never 0: a 0 would silently under-bill.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

__all__ = ["Status", "Endpoint", "UsageRecord", "utcnow", "new_request_id"]


class Status(str, enum.Enum):
    """How a call ended. Every outcome is a row; this says which."""

    COMPLETED = "completed"  # the stream (or body) arrived whole
    ERROR = "error"  # HTTP >= 400 before the stream, or an error object / broken data in it
    DISCONNECTED = "disconnected"  # the stream ended without usage or [DONE]
    CANCELLED = "cancelled"  # the caller closed the stream early
    TIMEOUT = "timeout"  # the upstream went silent longer than the gap timeout

    def __str__(self) -> str:
        return self.value


class Endpoint(str, enum.Enum):
    CHAT_COMPLETIONS = "chat.completions"
    ANTHROPIC_MESSAGES = "anthropic.messages"

    def __str__(self) -> str:
        return self.value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _RandomPool(threading.local):
    """``os.urandom`` read 4 KiB at a time, handed out in slices: one system call per 400 ids.

    A system call per id was one more place where the proxy's event loop gave up the GIL
    and the CPU on its hot path. The bytes are the kernel's CSPRNG output either way; each
    thread has its own pool, and a forked child empties its copy (the ids stay unique).
    """

    def __init__(self) -> None:
        self.data = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        at = self.at
        if at + n > len(self.data):
            self.data, at = os.urandom(4096), 0
        self.at = at + n
        return self.data[at : at + n]


_pool = _RandomPool()
os.register_at_fork(after_in_child=lambda: setattr(_pool, "data", b""))


def _random_bytes(n: int) -> bytes:
    return _pool.take(n)


def new_request_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered ids land at the right-hand edge of the ledger's primary key and of
    ``call_tags``' index, where random uuid4s touched a random B-tree leaf per insert and
    made writes slower as the ledger grew. 74 random bits keep ids unguessable and unique
    across processes and machines.
    """
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(_random_bytes(10), "big")  # 80 bits, 74 used
    value = (millis & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & (2**62 - 1)
    return uuid.UUID(int=value)


@dataclass(slots=True)
class UsageRecord:
    started_at: datetime
    requested_model: str | None = None
    request_id: uuid.UUID = field(default_factory=new_request_id)  # ours; provider ids are not unique
    provider_request_id: str | None = None
    endpoint: str = Endpoint.CHAT_COMPLETIONS.value
    upstream: str | None = None  # scheme://host[:port] of the upstream, never credentials
    finished_at: datetime | None = None
    model: str | None = None  # the model the response says served it
    stream: bool = True
    thinking: bool | None = None
    status: str = Status.COMPLETED.value
    http_status: int | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None

    # Tokens exactly as the provider bills them (DeepSeek's own fields win).
    prompt_tokens: int | None = None
    prompt_cache_hit_tokens: int | None = None
    prompt_cache_miss_tokens: int | None = None
    completion_tokens: int | None = None  # includes reasoning tokens
    reasoning_tokens: int | None = None
    usage_estimated: bool = False
    usage_raw: dict[str, Any] | None = None

    chunk_count: int = 0
    tool_call_count: int = 0
    ttft_ms: float | None = None  # first delta of any kind (reasoning included)
    first_content_ms: float | None = None  # first answer (content) token
    duration_ms: float | None = None

    key_fingerprint: str | None = None  # keyed HMAC of the API key, never the key
    user: str | None = None  # the request body's `user` field
    tags: dict[str, str] = field(default_factory=dict)

    # Filled by the price book at write time; None means "not priced" (unknown model), never $0.
    currency: str | None = None
    cost: Decimal | None = None
    cost_cache_hit: Decimal | None = None
    cost_cache_miss: Decimal | None = None
    cost_output: Decimal | None = None
    tariff_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("started_at", "finished_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"UsageRecord.{name} must be timezone-aware (UTC), got {value!r}")

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    def replace(self, **changes: Any) -> UsageRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values: UUID and datetimes as strings, Decimal as string."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, uuid.UUID):
                value = str(value)
            elif isinstance(value, datetime):
                value = value.astimezone(timezone.utc).isoformat()
            elif isinstance(value, Decimal):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        """Inverse of ``to_dict``; ignores keys it does not know (forward-compatible spool files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["request_id"] = uuid.UUID(str(kwargs["request_id"]))
        for name in ("started_at", "finished_at"):
            if kwargs.get(name) is not None:
                kwargs[name] = datetime.fromisoformat(kwargs[name])
        for name in ("cost", "cost_cache_hit", "cost_cache_miss", "cost_output"):
            if kwargs.get(name) is not None:
                kwargs[name] = Decimal(kwargs[name])
        return cls(**kwargs)
