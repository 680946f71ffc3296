"""What the simulator answers: a pure, seeded plan of reasoning, answer text and tool calls.

The plan depends only on its inputs, so the same request to a simulator with the same
seed always produces the same tokens. Every piece of the plan is exactly one token of
:mod:`collector.simulator_tokens`, so a stream that sends one piece per chunk sends one
token per chunk, and ``completion_tokens`` is simply the number of pieces (tool-call
names count as their tokens, arguments as one token per fragment).

Lengths, unless overridden: 48-320 reasoning tokens in thinking mode, 24-240 answer
tokens. ``output_tokens`` overrides the answer (``content``) length and
``reasoning_tokens`` the reasoning length; ``max_tokens`` caps their sum (reasoning
first, as DeepSeek counts chain-of-thought against ``max_tokens``) and turns the
finish reason into ``length``.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from collector.simulator_tokens import tokenize

__all__ = ["Answer", "PlanRequest", "ToolCall", "ToolSpec", "plan_answer", "seeded_rng"]

DEFAULT_REASONING_RANGE = (48, 320)
DEFAULT_CONTENT_RANGE = (24, 240)

_ANSWER_WORDS = (
    "the cost of each call depends on the tokens billed by the model and cache hits are cheap "
    "while output tokens cost more so keep the system prompt stable to reuse the prefix cache "
    "a stream sends one token per chunk and the last chunk carries usage for the whole request "
    "budgets per team help finance see where spend goes every day of the month"
).split()
_REASONING_WORDS = (
    "we need to check what the user asks first then count tokens and compare prices maybe "
    "the answer is simple but verify the numbers again wait consider cache hits and misses "
    "so the total is the sum of input and output let me think about peak hours too"
).split()
_PLACES = ("San Francisco", "Tokyo", "Paris", "Hangzhou", "Berlin", "Lagos")
_ID_ALPHABET = string.ascii_letters + string.digits


def seeded_rng(*parts: bytes | str | int) -> random.Random:
    """A ``random.Random`` seeded by a stable hash of ``parts`` (not Python's salted ``hash``)."""
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8")
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return random.Random(int.from_bytes(hasher.digest(), "big"))


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PlanRequest:
    thinking: bool
    tools: tuple[ToolSpec, ...] = ()
    call_tool: bool = False  # tools offered, last turn is the user's, tool choice allows it
    forced_tool: str | None = None
    max_tokens: int | None = None
    output_tokens: int | None = None
    reasoning_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    name_tokens: int
    argument_pieces: tuple[str, ...]

    @property
    def arguments(self) -> str:
        return "".join(self.argument_pieces)

    @property
    def tokens(self) -> int:
        return self.name_tokens + len(self.argument_pieces)


@dataclass(frozen=True, slots=True)
class Answer:
    reasoning: tuple[str, ...]
    content: tuple[str, ...]
    tool_call: ToolCall | None
    finish_reason: str  # "stop" | "length" | "tool_calls"

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def content_text(self) -> str:
        return "".join(self.content)

    @property
    def completion_tokens(self) -> int:
        return len(self.reasoning) + len(self.content) + (self.tool_call.tokens if self.tool_call else 0)


def _prose(rng: random.Random, words: Sequence[str], n_tokens: int) -> tuple[str, ...]:
    tokens: list[str] = []
    while len(tokens) < n_tokens:
        chosen = rng.choices(words, k=rng.randint(6, 14))
        sentence = " ".join([chosen[0].capitalize(), *chosen[1:]]) + rng.choice((".", ".", ".", ",", "?"))
        tokens.extend(tokenize(sentence if not tokens else " " + sentence))
    return tuple(tokens[:n_tokens])


def _example_value(schema: Any, name: str, rng: random.Random, depth: int = 0) -> Any:
    if not isinstance(schema, Mapping):
        return rng.choice(_ANSWER_WORDS)
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return rng.randint(1, 1000) / 10
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [] if depth > 3 else [_example_value(schema.get("items"), name, rng, depth + 1)]
    if kind == "object" or "properties" in schema:
        return {} if depth > 3 else _example_object(schema, rng, depth + 1)
    lowered = name.lower()
    if any(hint in lowered for hint in ("location", "city", "place", "where")):
        return rng.choice(_PLACES)
    return " ".join(rng.choices(_ANSWER_WORDS, k=rng.randint(1, 3)))


def _example_object(schema: Mapping[str, Any], rng: random.Random, depth: int = 0) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    required = schema.get("required")
    names = [n for n in properties if n in required] if isinstance(required, list) else list(properties)
    return {n: _example_value(properties[n], n, rng, depth) for n in names or list(properties)[:1]}


def _tool_call(request: PlanRequest, rng: random.Random) -> ToolCall:
    by_name = {tool.name: tool for tool in request.tools}
    tool = by_name.get(request.forced_tool or "") or rng.choice(request.tools)
    arguments = json.dumps(_example_object(tool.parameters, rng), ensure_ascii=False)
    call_id = "call_00_" + "".join(rng.choices(_ID_ALPHABET, k=24))
    return ToolCall(call_id, tool.name, len(tokenize(tool.name)), tuple(tokenize(arguments)))


def plan_answer(request: PlanRequest, rng: random.Random) -> Answer:
    """The answer to one request. Draws from ``rng`` in a fixed order, so it is reproducible."""
    n_reasoning = 0
    if request.thinking:
        if request.reasoning_tokens is None:
            n_reasoning = rng.randint(*DEFAULT_REASONING_RANGE)
        else:
            n_reasoning = request.reasoning_tokens
    n_content = request.output_tokens
    if n_content is None:
        n_content = rng.randint(*DEFAULT_CONTENT_RANGE)
    reasoning = _prose(rng, _REASONING_WORDS, n_reasoning)
    tool_call = _tool_call(request, rng) if request.call_tool and request.tools else None
    content = () if tool_call else _prose(rng, _ANSWER_WORDS, n_content)
    finish_reason = "tool_calls" if tool_call else "stop"

    budget = request.max_tokens
    if budget is not None:
        wanted = len(reasoning) + len(content) + (tool_call.tokens if tool_call else 0)
        if wanted > budget:
            finish_reason = "length"
            reasoning = reasoning[:budget]
            left = budget - len(reasoning)
            content = content[:left]
            if tool_call is not None:
                # A truncated call keeps its header only if the name fit; its arguments stay cut.
                if left < tool_call.name_tokens:
                    tool_call = None
                else:
                    pieces = tool_call.argument_pieces[: left - tool_call.name_tokens]
                    tool_call = ToolCall(tool_call.id, tool_call.name, tool_call.name_tokens, pieces)
    return Answer(reasoning, content, tool_call, finish_reason)
