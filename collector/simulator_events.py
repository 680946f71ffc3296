"""What a simulator surface hands the server: stream events to frame, or a rejection to send."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Event", "Rejection"]


@dataclass(slots=True)  # not frozen: a frozen init costs a setattr call per field, per chunk
class Event:
    """One server-sent event before framing.

    ``tokens`` is how many completion tokens the event carries (so a cut stream knows
    what it delivered); ``usage`` marks the event that carries the final usage, which a
    ``disconnect`` fault must never reach; ``chunk`` is False for the ``[DONE]`` sentinel.
    """

    data: str
    name: str | None = None
    tokens: int = 0
    usage: bool = False
    chunk: bool = True


class Rejection(Exception):
    """An HTTP error answer decided before any byte of the response was sent."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body

    @property
    def payload(self) -> bytes:
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
