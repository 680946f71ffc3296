"""A realistic mixed workload, driven through the real metering path.

Used by ``dsmeter demo`` (and by benchmarks): several teams and features, Flash and Pro,
thinking and not, tool calls, a shared system prompt that earns cache hits, a few
rate limits, server errors, disconnects and callers who hang up early. Planning is pure
and seeded; ``drive`` sends the planned calls through a metered httpx client to an
upstream (the bundled simulator in the demo), with a settable clock so a month of history
can be recorded in seconds.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx

from collector.record import utcnow

__all__ = ["Scenario", "PlannedCall", "SettableClock", "SCENARIOS", "plan_calls", "drive"]

_SYSTEM_PROMPTS = {
    "search": "You are the ranking assistant of an e-commerce search engine. " * 40,
    "support": "You are a patient customer-support agent for a bank. Follow the policy handbook. " * 60,
    "analytics": "You are a senior data analyst. Write precise, sourced reports. " * 30,
    "platform": "Summarise the document for an internal digest. " * 10,
}

_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_account",
            "description": "Look up a customer account",
            "parameters": {"type": "object", "properties": {"account_id": {"type": "string"}}},
        },
    }
]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    weight: float
    team: str
    feature: str
    model: str
    thinking: bool = False
    stream: bool = True
    tools: bool = False
    output_tokens: tuple[int, int] = (40, 300)
    user_words: tuple[int, int] = (5, 60)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("autocomplete", 0.40, "search", "autocomplete", "deepseek-v4-flash", output_tokens=(8, 40)),
    Scenario("support-agent", 0.22, "support", "chat-agent", "deepseek-v4-flash", thinking=True, tools=True),
    Scenario("support-chat", 0.12, "support", "chat", "deepseek-v4-flash", output_tokens=(60, 400)),
    Scenario("report-writer", 0.10, "analytics", "report-writer", "deepseek-v4-pro", thinking=True,
             output_tokens=(300, 1500)),
    Scenario("sql-helper", 0.06, "analytics", "sql-helper", "deepseek-v4-pro", output_tokens=(50, 250)),
    Scenario("digest", 0.10, "platform", "batch-digest", "deepseek-v4-flash", stream=False,
             output_tokens=(100, 300), user_words=(300, 1200)),
)

# Rare but real: what a month of production traffic looks like at the edges.
_FAULTS: tuple[tuple[str, float], ...] = (("429", 0.025), ("503", 0.008), ("disconnect", 0.015))
_CANCEL_SHARE = 0.02
_USERS = ("u-1042", "u-2211", "u-3307", "u-4410", "u-5123", "u-6001")
_WORDS = ("order", "refund", "price", "shipping", "account", "invoice", "delay", "search", "filter",
          "report", "revenue", "quarter", "region", "growth", "latency", "summary", "policy", "card")


class SettableClock:
    """A clock for backfills: returns the time last set, or the real time when none is set."""

    def __init__(self, at: datetime | None = None) -> None:
        self._at = at

    def set(self, at: datetime | None) -> None:
        if at is not None and at.tzinfo is None:
            raise ValueError("SettableClock needs a timezone-aware time")
        self._at = at

    def __call__(self) -> datetime:
        return self._at if self._at is not None else utcnow()


@dataclass(slots=True)
class PlannedCall:
    scenario: Scenario
    at: datetime
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    cancel_after_chunks: int | None = None  # the caller hangs up after this many chunks
    fault: str | None = None


def _pick(rng: random.Random, scenarios: Sequence[Scenario]) -> Scenario:
    return rng.choices(scenarios, weights=[s.weight for s in scenarios])[0]


def _user_message(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _timestamps(rng: random.Random, n: int, start: datetime, end: datetime) -> list[datetime]:
    """Office-hours-heavy arrival times (weekdays busier), sorted."""
    span = (end - start).total_seconds()
    out: list[datetime] = []
    while len(out) < n:
        at = start + timedelta(seconds=rng.random() * span)
        local_hour = (at.hour + 8) % 24  # the teams sit in UTC+8, like DeepSeek's peak hours
        weight = 1.0 if 9 <= local_hour < 19 else 0.25
        if at.weekday() >= 5:
            weight *= 0.3
        if rng.random() < weight:
            out.append(at)
    return sorted(out)


def plan_calls(
    n: int,
    *,
    seed: int = 0,
    start: datetime | None = None,
    end: datetime | None = None,
    scenarios: Sequence[Scenario] = SCENARIOS,
    faults: bool = True,
) -> list[PlannedCall]:
    """``n`` calls spread between ``start`` and ``end`` (default: the last hour), seeded."""
    rng = random.Random(seed)
    end = end or utcnow()
    start = start or end - timedelta(hours=1)
    calls: list[PlannedCall] = []
    for at in _timestamps(rng, n, start, end):
        scenario = _pick(rng, scenarios)
        messages = [
            {"role": "system", "content": _SYSTEM_PROMPTS[scenario.team]},
            {"role": "user", "content": _user_message(rng, *scenario.user_words)},
        ]
        body: dict[str, Any] = {"model": scenario.model, "messages": messages, "stream": scenario.stream,
                                "user": rng.choice(_USERS)}
        if scenario.thinking:
            body["thinking"] = {"type": "enabled"}
            body["reasoning_effort"] = "high"
        if scenario.tools:
            body["tools"] = _TOOLS
        output = rng.randint(*scenario.output_tokens)
        headers = {
            "X-Dsmeter-Tags": f"team={scenario.team},feature={scenario.feature}",
            "X-Simulator-Output-Tokens": str(output),
        }
        if scenario.thinking:
            headers["X-Simulator-Reasoning-Tokens"] = str(rng.randint(output // 2, output * 2))
        call = PlannedCall(scenario=scenario, at=at, body=body, headers=headers)
        if faults:
            roll = rng.random()
            for fault, share in _FAULTS:
                if roll < share:
                    call.fault = fault
                    headers["X-Simulator-Fault"] = fault
                    break
                roll -= share
            else:
                if scenario.stream and rng.random() < _CANCEL_SHARE:
                    call.cancel_after_chunks = rng.randint(2, 10)
        calls.append(call)
    return calls


def _api_key(team: str) -> str:
    # Each team has its own (fake) key, so chargeback by key fingerprint has something to show.
    return f"sk-demo-{team}-0000000000000000"


def drive(
    client: httpx.Client,
    base_url: str,
    calls: Iterable[PlannedCall],
    clock: SettableClock | None = None,
) -> Counter[str]:
    """Send every planned call through ``client`` (a metered client); return outcome counts."""
    outcomes: Counter[str] = Counter()
    url = base_url.rstrip("/") + "/chat/completions"
    for call in calls:
        if clock is not None:
            clock.set(call.at)
        headers = {"Authorization": f"Bearer {_api_key(call.scenario.team)}", **call.headers}
        try:
            with client.stream("POST", url, content=json.dumps(call.body), headers=headers) as response:
                if response.status_code >= 400:
                    response.read()
                    outcomes[f"http_{response.status_code}"] += 1
                    continue
                chunks = 0
                for _ in response.iter_raw():
                    chunks += 1
                    if call.cancel_after_chunks is not None and chunks >= call.cancel_after_chunks:
                        break
                outcomes["cancelled" if call.cancel_after_chunks is not None else "ok"] += 1
        except httpx.TransportError:
            outcomes["disconnected"] += 1
    if clock is not None:
        clock.set(None)
    return outcomes


def backfill_window(days: int, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last ``days`` whole days up to now, in UTC."""
    now = (now or utcnow()).astimezone(timezone.utc)
    return now - timedelta(days=days), now
