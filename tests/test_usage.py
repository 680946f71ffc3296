"""Usage normalisation: every usage object in the captures, and the edge cases they do not show."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from collector.sse import SSEDecoder
from collector.usage import (
    InvalidUsage,
    Tokens,
    normalise_anthropic_usage,
    normalise_responses_usage,
    normalise_usage,
)
from fixture_streams import FIXTURES, load_streams


def _walk_usage(value: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "usage" and isinstance(inner, dict):
                yield where, inner
            else:
                yield from _walk_usage(inner, where)
    elif isinstance(value, list):
        for inner in value:
            yield from _walk_usage(inner, where)


def _all_usage_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every non-null ``usage`` object in every fixture: bodies, chunks and stream events."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(FIXTURES.glob("*.json")):
        found.extend(_walk_usage(json.loads(path.read_text(encoding="utf-8")), path.name))
    for stream in load_streams(("lf",)):
        decoder = SSEDecoder()
        for i, event in enumerate(decoder.feed(stream.body) + decoder.flush()):
            if event.data != "[DONE]":
                found.extend(_walk_usage(json.loads(event.data), f"{stream.name}#{i}"))
    return found


USAGE = _all_usage_objects()
CHAT_USAGE = [(w, u) for w, u in USAGE if "prompt_tokens" in u]
RESPONSES_USAGE = [(w, u) for w, u in USAGE if "input_tokens" in u]


def test_the_fixture_walk_finds_every_usage_object() -> None:
    # 14 bodies with usage (12 files, one holding 3 calls), 10 chat streams, 3 Responses streams + 1 excerpt.
    assert (len(CHAT_USAGE), len(RESPONSES_USAGE), len(USAGE)) == (24, 4, 28)


@pytest.mark.parametrize(("where", "usage"), CHAT_USAGE, ids=[w for w, _ in CHAT_USAGE])
def test_captured_chat_usage_normalises_to_the_billed_buckets(where: str, usage: dict[str, Any]) -> None:
    tokens = normalise_usage(usage)
    hit, miss, prompt, completion = (
        tokens.prompt_cache_hit_tokens,
        tokens.prompt_cache_miss_tokens,
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert hit is not None and miss is not None and prompt is not None and completion is not None
    assert hit + miss == prompt == usage["prompt_tokens"]
    assert hit == usage["prompt_cache_hit_tokens"]  # DeepSeek's billing field wins
    assert completion == usage["completion_tokens"]
    assert prompt + completion == usage["total_tokens"]
    details = usage.get("completion_tokens_details")
    if details is None:
        assert tokens.reasoning_tokens is None  # unknown, not 0
    else:
        assert tokens.reasoning_tokens is not None and tokens.reasoning_tokens == details["reasoning_tokens"]
        assert tokens.reasoning_tokens <= completion


@pytest.mark.parametrize(("where", "usage"), RESPONSES_USAGE, ids=[w for w, _ in RESPONSES_USAGE])
def test_captured_responses_api_usage_normalises_with_cached_inside_input(where: str, usage: dict[str, Any]) -> None:
    tokens = normalise_responses_usage(usage)
    cached = usage["input_tokens_details"]["cached_tokens"]
    assert (tokens.prompt_cache_hit_tokens, tokens.prompt_cache_miss_tokens) == (cached, usage["input_tokens"] - cached)
    assert tokens.prompt_tokens == usage["input_tokens"]
    assert tokens.completion_tokens == usage["output_tokens"] == usage["total_tokens"] - usage["input_tokens"]
    assert tokens.reasoning_tokens is not None and tokens.completion_tokens is not None
    assert tokens.reasoning_tokens <= tokens.completion_tokens


def test_billing_fields_win_where_cached_tokens_disagrees() -> None:
    """neurouter's reasoner stream: prompt_cache_hit_tokens=1 but cached_tokens=0."""
    (usage,) = [u for w, u in CHAT_USAGE if w.startswith("neurouter_reasoner_stream")]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert normalise_usage(usage) == Tokens(6, 1, 5, 169, 117)


# -- OpenAI-format edge cases ------------------------------------------------------------------


def test_cached_tokens_is_the_fallback_when_deepseek_fields_are_absent() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 40}}
    assert normalise_usage(usage) == Tokens(100, 40, 60, 5, None)


def test_without_any_cache_field_hit_and_miss_are_unknown_not_zero() -> None:
    assert normalise_usage({"prompt_tokens": 100, "completion_tokens": 5}) == Tokens(100, None, None, 5, None)


def test_null_details_objects_mean_unknown() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "prompt_tokens_details": None, "completion_tokens_details": None}
    assert normalise_usage(usage) == Tokens(9, None, None, 2, None)


def test_prompt_is_hit_plus_miss_when_prompt_tokens_is_absent() -> None:
    usage = {"prompt_cache_hit_tokens": 30, "prompt_cache_miss_tokens": 12, "completion_tokens": 1}
    assert normalise_usage(usage) == Tokens(42, 30, 12, 1, None)


def test_a_missing_half_of_the_cache_pair_follows_from_prompt_tokens() -> None:
    assert normalise_usage({"prompt_tokens": 50, "prompt_cache_hit_tokens": 20}) == Tokens(50, 20, 30, None, None)
    assert normalise_usage({"prompt_tokens": 50, "prompt_cache_miss_tokens": 20}) == Tokens(50, 30, 20, None, None)
    assert normalise_usage({"prompt_cache_hit_tokens": 20}) == Tokens(None, 20, None, None, None)


def test_reasoning_is_part_of_completion_not_extra() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 10, "completion_tokens_details": {"reasoning_tokens": 10}}
    assert normalise_usage(usage).completion_tokens == 10


def test_empty_usage_is_all_unknown() -> None:
    assert normalise_usage({}) == Tokens(None, None, None, None, None)


def test_total_tokens_is_not_checked_because_nothing_is_billed_on_it() -> None:
    assert normalise_usage({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 99}).prompt_tokens == 1


def test_integral_float_counts_are_accepted_as_integers() -> None:
    tokens = normalise_usage({"prompt_tokens": 3.0, "completion_tokens": 2})
    assert tokens.prompt_tokens == 3 and isinstance(tokens.prompt_tokens, int)


@pytest.mark.parametrize(
    "bad",
    [-1, True, False, 3.5, math.nan, math.inf, "3", [3], {"n": 3}],
    ids=["negative", "true", "false", "fraction", "nan", "inf", "string", "list", "object"],
)
def test_a_count_that_is_not_a_non_negative_integer_is_invalid(bad: object) -> None:
    with pytest.raises(InvalidUsage):
        normalise_usage({"prompt_tokens": bad, "completion_tokens": 1})
    with pytest.raises(InvalidUsage):
        normalise_usage({"prompt_tokens": 10, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": bad}})


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": 10, "prompt_cache_hit_tokens": 3, "prompt_cache_miss_tokens": 8},
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
        {"prompt_tokens": 10, "prompt_cache_hit_tokens": 11},
        {"completion_tokens": 5, "completion_tokens_details": {"reasoning_tokens": 6}},
    ],
    ids=["hit-plus-miss-not-prompt", "cached-over-prompt", "hit-over-prompt", "reasoning-over-completion"],
)
def test_self_contradicting_counts_are_invalid(usage: dict[str, Any]) -> None:
    with pytest.raises(InvalidUsage):
        normalise_usage(usage)


def test_non_object_usage_or_details_is_invalid() -> None:
    with pytest.raises(InvalidUsage):
        normalise_usage([1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidUsage):
        normalise_usage({"prompt_tokens": 1, "prompt_tokens_details": [0]})


def test_invalid_usage_is_a_value_error() -> None:
    assert issubclass(InvalidUsage, ValueError)


# -- the Anthropic-format surface (semantics assumed, see usage.py) ----------------------------


def test_anthropic_input_tokens_are_the_uncached_part_beside_cache_reads() -> None:
    usage = {"input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 128, "output_tokens": 89}
    assert normalise_anthropic_usage(usage) == Tokens(600, 128, 472, 89, None)


def test_anthropic_cache_creation_is_billed_as_a_miss() -> None:
    usage = {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 1}
    assert normalise_anthropic_usage(usage) == Tokens(35, 5, 30, 1, None)


def test_anthropic_without_cache_read_leaves_the_split_unknown() -> None:
    assert normalise_anthropic_usage({"input_tokens": 50, "output_tokens": 3}) == Tokens(50, None, None, 3, None)


def test_anthropic_output_only_usage_has_unknown_prompt() -> None:
    assert normalise_anthropic_usage({"output_tokens": 5}) == Tokens(None, None, None, 5, None)


def test_anthropic_invalid_counts_raise() -> None:
    with pytest.raises(InvalidUsage):
        normalise_anthropic_usage({"input_tokens": -3, "output_tokens": 1})
    with pytest.raises(InvalidUsage):
        normalise_anthropic_usage({"input_tokens": 3, "output_tokens": "1"})


def test_responses_usage_without_details_leaves_the_split_unknown() -> None:
    assert normalise_responses_usage({"input_tokens": 7, "output_tokens": 2}) == Tokens(7, None, None, 2, None)
    with pytest.raises(InvalidUsage):
        normalise_responses_usage({"input_tokens": 7, "input_tokens_details": {"cached_tokens": 8}})


def test_public_surface_is_the_normalisers_their_result_and_their_error() -> None:
    import collector.usage as module

    expected = ["InvalidUsage", "Tokens", "normalise_anthropic_usage", "normalise_responses_usage", "normalise_usage"]
    assert sorted(module.__all__) == expected
    assert all(hasattr(module, name) for name in module.__all__)
