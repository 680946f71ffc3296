"""Stream accumulators: every capture folded chunk by chunk agrees with a plain reading of it.

The expectations come from ``naive_fold``, which reads the chunk payloads straight out of
the fixture files with ``json.loads`` (no SSE decoder, no accumulator code), and from the
non-streamed twin recordings of the same requests where the fixtures have one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector.accumulator import MALFORMED_KEEP, AnthropicStreamAccumulator, StreamAccumulator
from collector.sse import SSEDecoder
from collector.usage import normalise_anthropic_usage
from fixture_streams import FixtureStream, load_streams, nonstream_twin

CHAT = [s for s in load_streams(("lf",)) if s.is_chat]
RESPONSES = [s for s in load_streams(("lf",)) if not s.is_chat]
STEP = 0.25  # seconds between replayed events
T0 = 1000.0


def payloads(stream: FixtureStream) -> list[str]:
    """The JSON payloads of a capture, read without the SSE decoder."""
    text = stream.body.decode("utf-8")
    found = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert (found[-1] == "[DONE]") == stream.is_chat  # the Responses API sends no [DONE]
    return found[:-1] if stream.is_chat else found


def replay(stream: FixtureStream) -> StreamAccumulator:
    """Through the real decoder, as metering does: event i arrives at T0 + (i + 1) * STEP."""
    acc = StreamAccumulator(T0)
    decoder = SSEDecoder()
    for i, event in enumerate(decoder.feed(stream.body) + decoder.flush()):
        acc.add_data(event.data, T0 + (i + 1) * STEP)
    return acc


def naive_fold(stream: FixtureStream) -> dict[str, Any]:
    chunks = [json.loads(p) for p in payloads(stream)]
    content = reasoning = ""
    finish = None
    usage = None
    tools: dict[int, dict[str, str]] = {}
    first_token = first_content = None
    for i, chunk in enumerate(chunks):
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            for fragment in delta.get("tool_calls") or []:
                call = tools.setdefault(fragment["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] = call["id"] or fragment.get("id", "")
                call["name"] += fragment.get("function", {}).get("name") or ""
                call["arguments"] += fragment.get("function", {}).get("arguments") or ""
            if first_token is None and (delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")):
                first_token = i
            if first_content is None and delta.get("content"):
                first_content = i
    return {
        "id": chunks[0]["id"],
        "model": chunks[0]["model"],
        "content": content,
        "reasoning": reasoning,
        "finish": finish,
        "usage": usage,
        "tools": [tools[k] for k in sorted(tools)],
        "chunks": len(chunks),
        "first_token": first_token,
        "first_content": first_content,
    }


def _ids(streams: list[FixtureStream]) -> list[str]:
    return [s.name for s in streams]


# -- every captured chat stream ----------------------------------------------------------------


@pytest.mark.parametrize("stream", CHAT, ids=_ids(CHAT))
def test_capture_accumulates_to_what_its_chunks_say(stream: FixtureStream) -> None:
    acc = replay(stream)
    want = naive_fold(stream)
    assert (acc.id, acc.model, acc.role) == (want["id"], want["model"], "assistant")
    assert acc.content == want["content"]
    assert acc.reasoning_content == want["reasoning"]
    assert acc.finish_reason == want["finish"]
    assert acc.usage == want["usage"] and acc.usage is not None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in acc.tool_calls] == [
        (t["id"], t["name"], t["arguments"]) for t in want["tools"]
    ]
    assert acc.chunk_count == want["chunks"]
    assert acc.malformed_chunks == 0 and acc.error is None and acc.done


@pytest.mark.parametrize("stream", CHAT, ids=_ids(CHAT))
def test_capture_timings_mark_the_first_token_and_the_first_answer_token(stream: FixtureStream) -> None:
    acc = replay(stream)
    want = naive_fold(stream)
    assert acc.ttft_ms() == pytest.approx((want["first_token"] + 1) * STEP * 1000)
    if want["first_content"] is None:
        assert acc.first_content_ms() is None  # tool calls only: no answer text ever came
    else:
        assert acc.first_content_ms() == pytest.approx((want["first_content"] + 1) * STEP * 1000)
    if want["reasoning"]:
        assert acc.first_content_ms() is None or acc.first_content_ms() > acc.ttft_ms()  # type: ignore[operator]
    assert acc.last_at == pytest.approx(T0 + (want["chunks"] + 1) * STEP)  # the [DONE] event


@pytest.mark.parametrize("stream", [s for s in CHAT if nonstream_twin(s.name)], ids=_ids([s for s in CHAT if nonstream_twin(s.name)]))
def test_capture_agrees_with_its_non_streamed_twin(stream: FixtureStream) -> None:
    acc = replay(stream)
    twin = nonstream_twin(stream.name)
    assert twin is not None
    (choice,) = twin["choices"]
    assert acc.model == twin["model"]
    assert acc.finish_reason == choice["finish_reason"]
    twin_calls = choice["message"].get("tool_calls") or []
    assert [c["function"]["name"] for c in acc.tool_calls] == [c["function"]["name"] for c in twin_calls]
    for ours, theirs in zip(acc.tool_calls, twin_calls):
        assert ours["type"] == theirs["type"] == "function"
        assert json.loads(ours["function"]["arguments"]).keys() == json.loads(theirs["function"]["arguments"]).keys()
    assert bool(acc.reasoning_content) == bool(choice["message"].get("reasoning_content"))
    billed = {"prompt_tokens", "completion_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens"}
    assert acc.usage is not None and billed <= acc.usage.keys() and billed <= twin["usage"].keys()


def test_neurouter_tool_call_stream_matches_its_twin_word_for_word() -> None:
    (stream,) = [s for s in CHAT if s.name == "neurouter_chat_stream_tool_calls.sse"]
    acc = replay(stream)
    message = nonstream_twin(stream.name)["choices"][0]["message"]  # type: ignore[index]
    assert acc.content == message["content"] == "I'll check the current weather in Tokyo for you."
    assert json.loads(acc.tool_calls[0]["function"]["arguments"]) == json.loads(message["tool_calls"][0]["function"]["arguments"])


@pytest.mark.parametrize("stream", [s for s in CHAT if "tool" in s.name], ids=_ids([s for s in CHAT if "tool" in s.name]))
def test_streamed_tool_call_arguments_parse_as_json(stream: FixtureStream) -> None:
    (call,) = replay(stream).tool_calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_usage_on_a_chunk_that_also_carries_content_is_taken() -> None:
    """vercel/ai issue 19789: DeepSeek's usage rode on a chunk with delta content."""
    (stream,) = [s for s in CHAT if "issue-19789" in s.name]
    acc = replay(stream)
    assert acc.content == "sanitized"
    assert acc.finish_reason == "length"
    assert acc.usage is not None and acc.usage["completion_tokens"] == 4


def test_usage_on_an_openai_style_chunk_with_empty_choices_is_taken() -> None:
    (stream,) = [s for s in CHAT if s.name == "vercel-ai_v4flash_deepseek-text.chunks.jsonl"]
    chunks = [json.loads(p) for p in payloads(stream)]
    usage = chunks[-1]["usage"]
    chunks[-1]["usage"] = None
    chunks.append({"id": chunks[0]["id"], "object": "chat.completion.chunk", "model": chunks[0]["model"], "choices": [], "usage": usage})
    acc = StreamAccumulator(0.0)
    for i, chunk in enumerate(chunks):
        acc.add_data(json.dumps(chunk), float(i))
    assert acc.usage == usage
    assert acc.finish_reason == "stop"  # the empty choices list does not erase it
    assert acc.content == naive_fold(stream)["content"]


def test_the_last_non_null_usage_wins_and_a_later_null_does_not_erase_it() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_chunk({"choices": [], "usage": {"completion_tokens": 1}}, 1.0)
    acc.add_chunk({"choices": [], "usage": {"completion_tokens": 7}}, 2.0)
    acc.add_chunk({"choices": [], "usage": None}, 3.0)
    assert acc.usage == {"completion_tokens": 7}


def test_responses_api_events_are_not_mistaken_for_chat_chunks() -> None:
    for stream in RESPONSES:
        acc = replay(stream)
        assert acc.chunk_count == len(payloads(stream)) and not acc.done
        assert (acc.content, acc.usage, acc.tool_calls, acc.malformed_chunks) == ("", None, [], 0)


# -- made-up streams for what the captures do not show ----------------------------------------


def test_malformed_json_is_counted_not_raised() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_data('{"choices":[{"index":0,"delta":{"content":"a"}}]}', 1.0)
    acc.add_data('{"choices":[{"index":0,"delta":{"content":', 2.0)
    acc.add_data("[1, 2]", 3.0)  # JSON, but not a chunk
    acc.add_data("x" * 1000, 4.0)
    acc.add_data('{"choices":[{"index":0,"delta":{"content":"b"}}]}', 5.0)
    assert acc.content == "ab"
    assert (acc.malformed_chunks, acc.chunk_count) == (3, 2)
    assert acc.last_malformed == "x" * MALFORMED_KEEP
    assert acc.last_at == 5.0


def test_in_stream_error_object_is_kept() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_data('{"id":"a","choices":[{"index":0,"delta":{"content":"par"}}]}', 1.0)
    acc.add_data('{"error":{"message":"Server overloaded","type":"server_error","code":null}}', 2.0)
    assert acc.error == {"message": "Server overloaded", "type": "server_error", "code": None}
    assert acc.content == "par" and acc.usage is None and acc.finish_reason is None


def test_done_sentinel_marks_the_end_and_is_not_malformed() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_data("[DONE]", 1.0)
    assert acc.done and acc.malformed_chunks == 0 and acc.chunk_count == 0


def test_role_only_and_empty_content_chunks_are_not_the_first_token() -> None:
    acc = StreamAccumulator(10.0)
    acc.add_chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}, 10.5)
    acc.add_chunk({"choices": [{"index": 0, "delta": {"content": None, "reasoning_content": ""}}]}, 10.7)
    assert acc.ttft_ms() is None and acc.role == "assistant"
    acc.add_chunk({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}, 11.0)
    acc.add_chunk({"choices": [{"index": 0, "delta": {"content": "A"}}]}, 12.0)
    assert acc.ttft_ms() == pytest.approx(1000.0)
    assert acc.first_content_ms() == pytest.approx(2000.0)


def test_parallel_tool_calls_interleaved_are_merged_by_index() -> None:
    acc = StreamAccumulator(0.0)
    frags: list[list[dict[str, Any]]] = [
        [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}],
        [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz"'}}],
        [{"index": 0, "function": {"arguments": '{"city": "Par'}}],
        [{"index": 1, "function": {"arguments": ': "UTC"}'}}, {"index": 0, "function": {"arguments": 'is"}'}}],
    ]
    for i, tool_calls in enumerate(frags):
        acc.add_chunk({"choices": [{"index": 0, "delta": {"tool_calls": tool_calls}}]}, float(i))
    acc.add_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, 9.0)
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in acc.tool_calls] == [
        ("call_a", "get_weather", {"city": "Paris"}),
        ("call_b", "get_time", {"tz": "UTC"}),
    ]
    assert acc.first_content_at is None and acc.first_token_at == 0.0


def test_a_long_tool_call_folded_from_templates_keeps_every_escaped_fragment_in_order() -> None:
    # Thousands of fragments, escaped ones among them, through the template path (data= lets
    # later chunks skip parsing): the arguments read back are the exact concatenation.
    acc = StreamAccumulator(0.0)
    head = {"index": 0, "id": "c1", "type": "function", "function": {"name": "write_file", "arguments": ""}}
    acc.add_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]}, 0.0)
    fragments = ['{"text": "', *[f'line {i}\\n\\"q\\" ' if i % 3 == 0 else f"w{i} " for i in range(3000)], '"}']
    for i, fragment in enumerate(fragments, start=1):
        chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}}]}
        data = json.dumps(chunk, separators=(",", ":"))
        if not acc.fold_event(f"data: {data}\n\n".encode(), lambda: float(i)):
            acc.add_chunk(json.loads(data), float(i), data)
    assert acc.chunk_count == len(fragments) + 1
    [call] = acc.tool_calls
    assert call["function"]["arguments"] == "".join(fragments)
    assert json.loads(call["function"]["arguments"])["text"].startswith('line 0\n"q" w1 ')


def test_tool_call_fragments_without_index_continue_the_latest_call() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_chunk({"choices": [{"delta": {"tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{"}}]}}]}, 1.0)
    acc.add_chunk({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "}"}}]}}]}, 2.0)
    acc.add_chunk({"choices": [{"delta": {"tool_calls": [{"id": "c2", "function": {"name": "g", "arguments": "[]"}}]}}]}, 3.0)
    assert [(c["id"], c["function"]["arguments"]) for c in acc.tool_calls] == [("c1", "{}"), ("c2", "[]")]


def test_several_choices_keep_choice_zero_text_and_every_tool_call() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_chunk({"choices": [{"index": 1, "delta": {"content": "other"}, "finish_reason": "length"}]}, 1.0)
    acc.add_chunk({"choices": [{"index": 0, "delta": {"content": "mine"}}]}, 2.0)
    acc.add_chunk(
        {"choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "t1", "function": {"name": "x", "arguments": "{}"}}]}}]},
        3.0,
    )
    assert acc.finish_reason == "length"  # only choice 1 has finished so far
    acc.add_chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, 4.0)
    assert acc.content == "mine"
    assert acc.finish_reason == "stop"
    assert [c["id"] for c in acc.tool_calls] == ["t1"]
    assert acc.first_content_ms() == pytest.approx(1000.0)  # choice 1's text was the first token out


def test_garbage_shapes_inside_a_chunk_are_ignored() -> None:
    acc = StreamAccumulator(0.0)
    acc.add_chunk({"id": 5, "model": None, "choices": "nope", "usage": "none"}, 1.0)
    acc.add_chunk({"choices": [None, {"index": True, "delta": "x"}, {"delta": {"tool_calls": [None, 3]}}]}, 2.0)
    assert (acc.id, acc.model, acc.usage, acc.content, acc.tool_calls, acc.chunk_count) == (None, None, None, "", [], 2)


# -- the Anthropic-format surface --------------------------------------------------------------

# Written after the example stream in Anthropic's Messages streaming documentation (no
# capture of DeepSeek's /anthropic surface exists; see deepseek-api-facts.md section 5).
ANTHROPIC_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_01","type":"message","role":"assistant","content":[],"model":"deepseek-v4-flash","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":0,"cache_read_input_tokens":128,"output_tokens":2}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"User wants weather."}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Let me check "}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"the weather."}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\": \\"San Fra"}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"ncisco\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""


def replay_anthropic(body: bytes, with_event_lines: bool = True) -> AnthropicStreamAccumulator:
    acc = AnthropicStreamAccumulator(0.0)
    decoder = SSEDecoder()
    for i, event in enumerate(decoder.feed(body) + decoder.flush()):
        acc.add_event(event.event if with_event_lines else "message", event.data, (i + 1) * 0.1)
    return acc


@pytest.mark.parametrize("with_event_lines", [True, False], ids=["event-lines", "type-field-only"])
def test_anthropic_stream_accumulates_text_thinking_and_tool_input(with_event_lines: bool) -> None:
    acc = replay_anthropic(ANTHROPIC_STREAM, with_event_lines)
    assert (acc.id, acc.model, acc.role) == ("msg_01", "deepseek-v4-flash", "assistant")
    assert acc.content == "Let me check the weather."
    assert acc.reasoning_content == "User wants weather."
    (call,) = acc.tool_calls
    assert (call["id"], call["type"], call["function"]["name"]) == ("toolu_01", "function", "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"location": "San Francisco"}
    assert acc.finish_reason == "tool_use"
    assert acc.done and acc.error is None and acc.malformed_chunks == 0
    assert acc.chunk_count == 16  # every event but the ping
    assert acc.ttft_ms() == pytest.approx(400.0)  # the thinking delta, 4th event
    assert acc.first_content_ms() == pytest.approx(800.0)  # the first text delta, 8th event


def test_anthropic_usage_merges_message_start_with_the_cumulative_message_delta() -> None:
    acc = replay_anthropic(ANTHROPIC_STREAM)
    assert acc.usage == {
        "input_tokens": 472,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 128,
        "output_tokens": 89,  # message_delta's cumulative count overwrites message_start's 2
    }
    tokens = normalise_anthropic_usage(acc.usage)
    assert (tokens.prompt_tokens, tokens.prompt_cache_hit_tokens, tokens.completion_tokens) == (600, 128, 89)


def test_anthropic_message_delta_repeating_input_fields_overwrites_only_what_it_carries() -> None:
    acc = AnthropicStreamAccumulator(0.0)
    acc.add_event("message_start", '{"type":"message_start","message":{"id":"m","usage":{"input_tokens":10,"output_tokens":1}}}', 1.0)
    acc.add_event("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":12,"cache_read_input_tokens":null,"output_tokens":30}}', 2.0)
    acc.add_event("message_delta", '{"type":"message_delta","delta":{},"usage":{"output_tokens":31}}', 3.0)
    assert acc.usage == {"input_tokens": 12, "output_tokens": 31}
    assert acc.finish_reason == "end_turn"


def test_anthropic_usage_only_in_message_delta_is_still_found() -> None:
    acc = AnthropicStreamAccumulator(0.0)
    acc.add_event("message_start", '{"type":"message_start","message":{"id":"m"}}', 1.0)
    acc.add_event("message_delta", '{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":5}}', 2.0)
    assert acc.usage == {"output_tokens": 5}


def test_anthropic_error_event_is_kept_and_malformed_data_counted() -> None:
    acc = AnthropicStreamAccumulator(0.0)
    acc.add_event("content_block_delta", "{oops", 1.0)
    acc.add_event("error", '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', 2.0)
    assert acc.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert acc.malformed_chunks == 1 and acc.last_malformed == "{oops"
    assert not acc.done and acc.usage is None


def test_anthropic_stream_cut_before_message_delta_has_start_usage_only() -> None:
    cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")]
    acc = replay_anthropic(cut)
    assert acc.usage is not None and acc.usage["output_tokens"] == 2
    assert acc.finish_reason is None and not acc.done


def test_public_surface_is_the_two_accumulators() -> None:
    import collector.accumulator as module

    assert sorted(module.__all__) == ["AnthropicStreamAccumulator", "MALFORMED_KEEP", "StreamAccumulator"]
    assert all(hasattr(module, name) for name in module.__all__)
