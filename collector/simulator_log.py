"""The simulator's log of what it served: one :class:`ServedCall` per request, thread-safe.

A call is logged the moment it arrives, so a test can see it in flight (``finished_at``
is None, ``outcome`` is ``in_progress`` or ``stalled``) and wait for it to arrive or to
end. Readers always get frozen snapshots; the server thread alone mutates the live
state. The API key is never kept: only a short SHA-256 prefix of it, and the request
headers minus every credential header.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CREDENTIAL_HEADERS", "CallLog", "CallState", "Outcome", "ServedCall", "public_headers"]

CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization", "api-key", "cookie"})


class Outcome(str, enum.Enum):
    IN_PROGRESS = "in_progress"  # still being served
    COMPLETED = "completed"  # the whole answer went out
    DISCONNECTED = "disconnected"  # the simulator cut the connection (a fault, or it was stopping)
    STALLED = "stalled"  # the simulator stopped sending and held the connection open
    CLIENT_CLOSED = "client_closed"  # the client went away before the end
    ERROR = "error"  # an error status, or an error object in place of the rest of the answer

    def __str__(self) -> str:
        return self.value


def public_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers with every credential removed."""
    return {name: value for name, value in headers.items() if name.lower() not in CREDENTIAL_HEADERS}


@dataclass(frozen=True, slots=True)
class ServedCall:
    """One request as the simulator served it. Times are ``time.monotonic()`` seconds."""

    request_id: str | None  # the response's id; None when rejected before one was made
    path: str
    endpoint: str  # "chat.completions" | "anthropic.messages"
    headers: dict[str, str]  # as received, credentials removed
    requested_model: str | None
    response_model: str | None
    stream: bool
    include_usage: bool
    thinking: bool
    status: int  # HTTP status sent (0 while nothing was sent yet)
    outcome: Outcome
    fault: str | None  # the fault injected ("429", "disconnect", …), if any
    finish_reason: str | None  # as sent; None if the answer never got to its end
    usage: dict[str, Any] | None  # the usage object as it went on the wire; None if it never did
    billed_usage: dict[str, Any] | None  # what the provider bills: partial for a cut stream; None if nothing ran
    chunks_sent: int  # well-formed data events (not [DONE], keep-alives or a malformed event)
    keepalives_sent: int
    started_at: float
    finished_at: float | None  # None while in flight
    client_closed_at: float | None  # when the simulator noticed the client had gone
    key_hash: str | None  # first 12 hex digits of the key's SHA-256; never the key


class CallState:
    """The live record of one call, written only by the server's event loop."""

    def __init__(self, path: str, endpoint: str, headers: Mapping[str, str]) -> None:
        self.path = path
        self.endpoint = endpoint
        self.headers = public_headers(headers)
        self.started_at = time.monotonic()
        self.request_id: str | None = None
        self.requested_model: str | None = None
        self.response_model: str | None = None
        self.stream = False
        self.include_usage = False
        self.thinking = False
        self.status = 0
        self.outcome = Outcome.IN_PROGRESS
        self.fault: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.billed_usage: dict[str, Any] | None = None
        self.chunks_sent = 0
        self.keepalives_sent = 0
        self.finished_at: float | None = None
        self.client_closed_at: float | None = None
        self.key_hash: str | None = None
        self.final: ServedCall | None = None
        self.generation = 0  # which CallLog.clear() era it arrived in

    def snapshot(self) -> ServedCall:
        if self.final is not None:
            return self.final
        return ServedCall(
            request_id=self.request_id,
            path=self.path,
            endpoint=self.endpoint,
            headers=dict(self.headers),
            requested_model=self.requested_model,
            response_model=self.response_model,
            stream=self.stream,
            include_usage=self.include_usage,
            thinking=self.thinking,
            status=self.status,
            outcome=self.outcome,
            fault=self.fault,
            finish_reason=self.finish_reason,
            usage=self.usage,
            billed_usage=self.billed_usage,
            chunks_sent=self.chunks_sent,
            keepalives_sent=self.keepalives_sent,
            started_at=self.started_at,
            finished_at=self.finished_at,
            client_closed_at=self.client_closed_at,
            key_hash=self.key_hash,
        )


class CallLog:
    """Calls in arrival order. With ``limit``, only the most recent ``limit`` are kept."""

    def __init__(self, limit: int | None = None) -> None:
        self._states: deque[CallState] = deque(maxlen=limit)
        self._arrived = 0
        self._finished = 0
        self._in_flight = 0
        self._generation = 0
        self._changed = threading.Condition()

    def arrive(self, state: CallState) -> None:
        with self._changed:
            state.generation = self._generation
            self._states.append(state)
            self._arrived += 1
            self._in_flight += 1
            self._changed.notify_all()

    def finish(self, state: CallState) -> None:
        with self._changed:
            state.finished_at = time.monotonic()
            if state.outcome is Outcome.IN_PROGRESS:  # ended without saying how: it was cut
                state.outcome = Outcome.DISCONNECTED
            state.final = state.snapshot()
            if state.generation == self._generation:
                self._finished += 1
            self._in_flight -= 1
            self._changed.notify_all()

    def calls(self) -> list[ServedCall]:
        with self._changed:
            return [state.snapshot() for state in self._states]

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self._in_flight

    def wait(self, n: int, timeout: float, finished: bool) -> list[ServedCall]:
        def enough() -> bool:
            return (self._finished if finished else self._arrived) >= n

        with self._changed:
            if not self._changed.wait_for(enough, timeout=timeout):
                what = "finished" if finished else "arrived"
                count = self._finished if finished else self._arrived
                raise TimeoutError(f"{count} calls {what} at the simulator, not {n}, within {timeout} s")
            return [state.snapshot() for state in self._states]

    def clear(self) -> None:
        """Forget every call; calls still in flight keep running but no longer count."""
        with self._changed:
            self._states.clear()
            self._arrived = self._finished = 0
            self._generation += 1
            self._changed.notify_all()
