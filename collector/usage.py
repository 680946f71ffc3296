"""Turn a provider's ``usage`` object into the token counts we bill (pure, no I/O).

DeepSeek bills three buckets: prompt tokens that hit the context cache, prompt tokens
that miss it, and output tokens (reasoning included, at the same price). Its usage
object names the first two ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``;
other OpenAI-compatible APIs report ``prompt_tokens_details.cached_tokens`` instead.
DeepSeek sends both, and in one capture they disagree (neurouter reasoner stream:
hit=1, cached_tokens=0): the provider's own billing fields win.

Unknown stays ``None``, never 0: a 0 would silently under-bill.

Number rules: a count must be a non-negative integer. ``bool`` is refused (``True`` is an
``int`` in Python but never a token count). A float with an integral value (``3.0``) is
accepted as that integer, because some JSON encoders write every number as a float and
the value is unambiguous; ``3.5``, NaN, infinities, strings and negatives are refused.
A count above ``MAX_TOKEN_COUNT`` is refused too: no call bills anywhere near it, and the
ledger's 64-bit columns (and the cost in pico-units) could not hold what a broken upstream
might send, so the row would be refused by the database and the call lost from the ledger.
Refused means ``InvalidUsage``: the caller records the call with estimated tokens and
says why, rather than billing nonsense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "InvalidUsage",
    "Tokens",
    "normalise_usage",
    "normalise_anthropic_usage",
    "normalise_responses_usage",
]


# A thousand times DeepSeek's 1M-token context: still far inside a 64-bit column once priced.
MAX_TOKEN_COUNT = 10**9


class InvalidUsage(ValueError):
    """A usage object with a negative, non-integer or self-contradicting count."""


@dataclass(slots=True, frozen=True)
class Tokens:
    prompt_tokens: int | None
    prompt_cache_hit_tokens: int | None
    prompt_cache_miss_tokens: int | None
    completion_tokens: int | None  # includes reasoning tokens
    reasoning_tokens: int | None


def _count(container: Mapping[str, Any], key: str, where: str = "usage") -> int | None:
    value = container.get(key)
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidUsage(f"{where}.{key} must be a token count, got {value!r}")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        count = int(value)
    else:
        raise InvalidUsage(f"{where}.{key} must be a whole number, got {value!r:.40}")
    if count < 0:
        raise InvalidUsage(f"{where}.{key} must not be negative, got {count}")
    if count > MAX_TOKEN_COUNT:
        raise InvalidUsage(f"{where}.{key} is implausibly large (over {MAX_TOKEN_COUNT}), got {count!r:.40}")
    return count


def _details(usage: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    details = usage.get(key)
    if details is None:
        return {}
    if not isinstance(details, Mapping):
        raise InvalidUsage(f"usage.{key} must be an object, got {type(details).__name__}")
    return details


def _require_mapping(usage: object) -> Mapping[str, Any]:
    if not isinstance(usage, Mapping):
        raise InvalidUsage(f"usage must be an object, got {type(usage).__name__}")
    return usage


def _check_reasoning(completion: int | None, reasoning: int | None) -> None:
    if completion is not None and reasoning is not None and reasoning > completion:
        raise InvalidUsage(f"reasoning_tokens ({reasoning}) exceed completion_tokens ({completion})")


def normalise_usage(usage: Mapping[str, Any]) -> Tokens:
    """An OpenAI-format (``/chat/completions``) usage object, DeepSeek's or anyone's.

    ``total_tokens`` is not checked or used: nothing is billed on it.
    """
    usage = _require_mapping(usage)
    prompt = _count(usage, "prompt_tokens")
    completion = _count(usage, "completion_tokens")
    hit = _count(usage, "prompt_cache_hit_tokens")
    miss = _count(usage, "prompt_cache_miss_tokens")
    prompt_details = _details(usage, "prompt_tokens_details")
    reasoning = _count(_details(usage, "completion_tokens_details"), "reasoning_tokens", "usage.completion_tokens_details")

    if hit is None and miss is None:
        # Not DeepSeek's billing fields: fall back to the OpenAI-style cached count.
        cached = _count(prompt_details, "cached_tokens", "usage.prompt_tokens_details")
        if cached is not None:
            if prompt is not None and cached > prompt:
                raise InvalidUsage(f"cached_tokens ({cached}) exceed prompt_tokens ({prompt})")
            hit = cached
            miss = prompt - cached if prompt is not None else None
    elif hit is None or miss is None:
        # One of DeepSeek's pair is missing: the other follows from the documented
        # identity prompt_tokens = hit + miss, when prompt_tokens is known.
        known = hit if hit is not None else miss
        assert known is not None
        if prompt is not None:
            if known > prompt:
                raise InvalidUsage(f"cache tokens ({known}) exceed prompt_tokens ({prompt})")
            if hit is None:
                hit = prompt - known
            else:
                miss = prompt - known

    if hit is not None and miss is not None:
        if prompt is None:
            prompt = hit + miss
        elif hit + miss != prompt:
            raise InvalidUsage(
                f"prompt_cache_hit_tokens ({hit}) + prompt_cache_miss_tokens ({miss}) != prompt_tokens ({prompt})"
            )
    _check_reasoning(completion, reasoning)
    return Tokens(prompt, hit, miss, completion, reasoning)


def normalise_anthropic_usage(usage: Mapping[str, Any]) -> Tokens:
    """A usage object from the Anthropic-format surface (``/anthropic/v1/messages``).

    ASSUMPTION (unverified, see deepseek-api-facts.md section 5: no raw DeepSeek capture
    of this surface was found): we apply Anthropic's own rule, under which
    ``input_tokens`` counts only the uncached input, and cache reads and cache writes
    are reported beside it. So prompt = input + cache_read + cache_creation; the cache
    hit is ``cache_read_input_tokens``; and since DeepSeek has no cache-write charge, a
    cache-creation token is billed as an ordinary miss. If DeepSeek turns out to count
    cache reads inside ``input_tokens``, prompt and miss here are too high by the hit.

    Without ``cache_read_input_tokens`` the split is unknown (some reports say DeepSeek
    does not expose it on this surface): hit and miss stay ``None``, and prompt is
    ``input_tokens`` plus any cache creation. This surface reports no reasoning breakdown: ``reasoning_tokens`` is
    ``None``.
    """
    usage = _require_mapping(usage)
    input_tokens = _count(usage, "input_tokens")
    cache_read = _count(usage, "cache_read_input_tokens")
    cache_creation = _count(usage, "cache_creation_input_tokens")
    output = _count(usage, "output_tokens")

    hit = cache_read
    miss: int | None = None
    prompt: int | None = None
    if input_tokens is not None:
        prompt = input_tokens + (cache_read or 0) + (cache_creation or 0)
        if cache_read is not None:
            miss = input_tokens + (cache_creation or 0)
    return Tokens(prompt, hit, miss, output, None)


def normalise_responses_usage(usage: Mapping[str, Any]) -> Tokens:
    """A usage object from the Responses API (DeepSeek's ``/responses``, OpenAI's shape).

    There ``input_tokens`` includes the cached part, which is
    ``input_tokens_details.cached_tokens``; ``output_tokens`` includes
    ``output_tokens_details.reasoning_tokens``.
    """
    usage = _require_mapping(usage)
    prompt = _count(usage, "input_tokens")
    completion = _count(usage, "output_tokens")
    cached = _count(_details(usage, "input_tokens_details"), "cached_tokens", "usage.input_tokens_details")
    reasoning = _count(_details(usage, "output_tokens_details"), "reasoning_tokens", "usage.output_tokens_details")
    hit = miss = None
    if cached is not None:
        if prompt is not None and cached > prompt:
            raise InvalidUsage(f"cached_tokens ({cached}) exceed input_tokens ({prompt})")
        hit = cached
        miss = prompt - cached if prompt is not None else None
    _check_reasoning(completion, reasoning)
    return Tokens(prompt, hit, miss, completion, reasoning)
