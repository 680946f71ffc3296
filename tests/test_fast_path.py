"""The metering fast path reads ordinary chunks without ``json.loads``; it must never change a result.

Three layers skip work for the usual chunk (see ``collector.chunk_template``):

* ``StreamAccumulator.add_templated``: a payload shaped like a chunk already parsed, but for
  its one token string, is folded from that string;
* ``StreamAccumulator.fold_event``: a read that is exactly one such event, arriving while
  the decoder holds nothing, is folded from its bytes and never reaches the decoder;
* ``SSEDecoder._data_events``: one-line ``data:`` events are cut with one ``find`` each.

Every test here compares the fast result with the plain one: an accumulator that parses
every chunk (``learn=False``), the same bytes read in other splits, or ``json.loads``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.accumulator import StreamAccumulator
from collector.chunk_template import ChunkTemplate, json_string, learn_template
from collector.metering import CallMeter, prepare_request
from collector.record import UsageRecord
from collector.sse import SSEDecoder
from fixture_streams import FixtureStream, load_streams

CHAT_STREAMS = [s for s in load_streams() if s.is_chat]
T0 = 100.0
STARTED = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
STEP = 0.125
REQUEST = json.dumps({"model": "deepseek-v4-flash", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def snapshot(acc: StreamAccumulator) -> dict[str, Any]:
    """Everything an accumulator exposes."""
    assert acc.tool_call_count == len(acc.tool_calls)  # counted without joining the arguments
    return {
        "id": acc.id,
        "model": acc.model,
        "role": acc.role,
        "finish_reason": acc.finish_reason,
        "usage": acc.usage,
        "chunk_count": acc.chunk_count,
        "malformed": (acc.malformed_chunks, acc.last_malformed),
        "error": acc.error,
        "done": acc.done,
        "times": (acc.first_token_at, acc.first_content_at, acc.last_at),
        "content": acc.content,
        "reasoning": acc.reasoning_content,
        "tool_calls": acc.tool_calls,
    }


def fold(payloads: Iterable[str], *, learn: bool) -> tuple[StreamAccumulator, int]:
    """Payload i arrives at T0 + i * STEP; returns the accumulator and how many payloads skipped json.loads."""
    acc = StreamAccumulator(T0, learn=learn)
    skipped = 0
    for i, data in enumerate(payloads):
        if learn and data != "[DONE]" and acc.add_templated(data, T0 + i * STEP):
            skipped += 1
            continue
        acc.add_data(data, T0 + i * STEP)
    return acc, skipped


def payloads_of(body: bytes) -> list[str]:
    decoder = SSEDecoder()
    return [e.data for e in decoder.feed(body) + decoder.flush()]


def meter(body: bytes, reads: Iterable[bytes], *, asked_for_usage: bool = False) -> tuple[UsageRecord, bytes]:
    fields: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked_for_usage else {}
    call = prepare_request("POST", "/chat/completions", json.dumps({**json.loads(REQUEST), **fields}).encode())
    m = CallMeter(call, clock=lambda: STARTED, monotonic=lambda: 0.0)
    m.response_started(200, "text/event-stream")
    out = b"".join(m.feed(read) for read in reads) + m.feed_eof()
    return m.finish("eof"), out


def comparable(record: UsageRecord) -> dict[str, Any]:
    fields = dataclasses.asdict(record)
    fields.pop("request_id")  # a fresh UUID per call, by design
    return fields


def event_reads(body: bytes) -> list[bytes]:
    """One read per event, as a live stream arrives (the framing of the LF captures)."""
    parts = body.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


# -- the captures ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", CHAT_STREAMS, ids=str)
def test_every_capture_folds_the_same_with_and_without_templates(stream: FixtureStream) -> None:
    payloads = payloads_of(stream.body)
    fast, skipped = fold(payloads, learn=True)
    plain, _ = fold(payloads, learn=False)
    assert snapshot(fast) == snapshot(plain)
    if len(payloads) >= 20:
        # The fast path is not inert: most chunks of a real stream skip json.loads.
        assert skipped >= len(payloads) // 2, (skipped, len(payloads))


@pytest.mark.parametrize("stream", [s for s in CHAT_STREAMS if s.framing == "lf"], ids=str)
def test_a_capture_read_one_event_at_a_time_meters_as_it_does_read_whole_or_byte_by_byte(stream: FixtureStream) -> None:
    body = stream.body
    by_event, out_event = meter(body, event_reads(body))
    whole, out_whole = meter(body, [body])
    by_byte, out_byte = meter(body, [body[i : i + 1] for i in range(len(body))])
    assert comparable(by_event) == comparable(whole) == comparable(by_byte)
    assert out_event == out_whole == out_byte == body
    plain, _ = fold(payloads_of(body), learn=False)
    assert by_event.chunk_count == plain.chunk_count and by_event.finish_reason == plain.finish_reason
    assert by_event.usage_raw == plain.usage and by_event.model == plain.model


@pytest.mark.parametrize("stream", [s for s in CHAT_STREAMS if s.framing == "lf"], ids=str)
def test_a_capture_cut_short_estimates_the_same_tokens_from_fast_and_parsed_text(stream: FixtureStream) -> None:
    events = event_reads(stream.body)
    cut = events[: max(2, len(events) * 2 // 3)]  # usage and [DONE] never arrive
    body = b"".join(cut)
    by_event, _ = meter(body, cut)
    by_byte, _ = meter(body, [body[i : i + 1] for i in range(len(body))])
    assert comparable(by_event) == comparable(by_byte)
    plain, _ = fold(payloads_of(body), learn=False)
    if plain.usage is None:  # (one capture reports live usage on early chunks)
        assert by_event.usage_estimated and by_event.status == "disconnected"
        assert by_event.completion_tokens and by_event.completion_tokens > 0


# -- what a template accepts -------------------------------------------------------------------

CHUNK = {
    "id": "c-1",
    "object": "chat.completion.chunk",
    "created": 1786782801,
    "model": "deepseek-v4-flash",
    "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}],
    "usage": None,
}


def chunk_text(content: str, *, ascii_only: bool = False, **delta: Any) -> str:
    chunk = json.loads(json.dumps(CHUNK))
    chunk["choices"][0]["delta"] = {"content": content, **delta}
    return json.dumps(chunk, ensure_ascii=ascii_only, separators=(",", ":"))


def template_of(text: str) -> ChunkTemplate:
    template = learn_template(text, json.loads(text))
    assert template is not None
    return template


def test_usage_written_inside_content_is_content_not_usage() -> None:
    template = template_of(chunk_text("Hello"))
    tricky = chunk_text('"usage":{"completion_tokens":99},"x":"')
    body = template.match(tricky)
    assert body is not None and json_string(body) == '"usage":{"completion_tokens":99},"x":"'
    acc, skipped = fold([chunk_text("Hello"), tricky], learn=True)
    assert skipped == 1 and acc.usage is None and acc.content.endswith('"x":"')


def test_a_raw_injection_that_changes_the_json_structure_is_never_matched() -> None:
    template = template_of(chunk_text("Hello"))
    # Unescaped: the "content" string ends early and a second choice follows.
    injected = template.prefix + 'a"}},{"index":1,"delta":{"content":"b' + template.suffix
    assert [c["delta"]["content"] for c in json.loads(injected)["choices"]] == ["a", "b"]
    assert template.match(injected) is None
    fast, _ = fold([chunk_text("Hello"), injected], learn=True)
    plain, _ = fold([chunk_text("Hello"), injected], learn=False)
    assert snapshot(fast) == snapshot(plain) and fast.content == "Helloa"


@pytest.mark.parametrize(
    "body",
    ['a"b', "a\\", "a\\x", "a\\u12", "a\\u12zz", "tab\there", "new\nline", "nul\x00", 'end\\\\"'],
)
def test_a_hole_that_is_not_a_complete_json_string_body_is_refused(body: str) -> None:
    template = template_of(chunk_text("Hello"))
    text = template.prefix + body + template.suffix
    assert template.match(text) is None
    assert template.event_body(b"data: " + text.encode() + b"\n\n") is None


def test_a_text_shorter_than_prefix_and_suffix_together_is_refused() -> None:
    template = ChunkTemplate('{"a":"', '":"x"}', "content", True)
    text = '{"a":"x"}'  # starts with the prefix and ends with the suffix, but they overlap
    assert text.startswith(template.prefix) and text.endswith(template.suffix)
    assert template.match(text) is None
    assert template.event_body(b"data: " + text.encode() + b"\n\n") is None


@pytest.mark.parametrize(
    "chunk",
    [
        {**CHUNK, "usage": {"completion_tokens": 1}},
        {**CHUNK, "error": {"message": "boom"}},
        {**CHUNK, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "b"}}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"content": "a", "reasoning_content": "b"}}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"content": None}}]},
        {**CHUNK, "choices": []},
        {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": "{"}}]}}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}] * 2}}]},
        {**CHUNK, "choices": [{"index": 0, "delta": {"content": "a", "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]},
    ],
    ids=["usage", "error", "finish", "two-choices", "two-tokens", "no-token", "no-choices", "tool-name",
         "tool-no-index", "two-fragments", "content-and-tool"],
)
def test_chunks_that_mean_more_than_one_token_make_no_template(chunk: dict[str, Any]) -> None:
    assert learn_template(json.dumps(chunk), chunk) is None


def test_a_duplicated_key_puts_the_hole_where_json_loads_reads_the_value() -> None:
    text = '{"choices":[{"index":0,"delta":{"content":"x","content":"x"}}]}'
    template = template_of(text)
    assert template.match('{"choices":[{"index":0,"delta":{"content":"x","content":"later"}}]}') == "later"
    assert template.match('{"choices":[{"index":0,"delta":{"content":"earlier","content":"x"}}]}') is None


def test_tool_call_argument_fragments_fold_into_the_same_call() -> None:
    def fragment(arguments: str, **extra: Any) -> str:
        chunk = {**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, **extra, "function": {"arguments": arguments}}]}}]}
        return json.dumps(chunk)

    start = json.dumps({**CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]})
    payloads = [start, fragment('{"'), fragment("city"), fragment('": "Tōkyō \\u6771"'), fragment("}"), fragment("")]
    fast, skipped = fold(payloads, learn=True)
    plain, _ = fold(payloads, learn=False)
    assert snapshot(fast) == snapshot(plain) and skipped >= 4
    assert json.loads(fast.tool_calls[0]["function"]["arguments"]) == {"city": "Tōkyō 東"}


def test_escaped_text_is_decoded_when_read_and_split_surrogates_match_the_parsed_reading() -> None:
    payloads = [chunk_text("a"), chunk_text("line\nbreak \"quoted\" \\ \u4e2d", ascii_only=True),
                '{"id":"c-1","object":"chat.completion.chunk","created":1786782801,"model":"deepseek-v4-flash",'
                '"choices":[{"index":0,"delta":{"content":"\\ud83d"},"logprobs":null,"finish_reason":null}],"usage":null}',
                '{"id":"c-1","object":"chat.completion.chunk","created":1786782801,"model":"deepseek-v4-flash",'
                '"choices":[{"index":0,"delta":{"content":"\\ude00"},"logprobs":null,"finish_reason":null}],"usage":null}']
    fast, skipped = fold(payloads, learn=True)
    plain, _ = fold(payloads, learn=False)
    assert skipped == 3 and fast.content == plain.content
    assert fast.content.startswith('aline\nbreak "quoted" \\ \u4e2d')


def test_a_stream_whose_every_chunk_differs_outside_the_token_stops_learning_and_stays_right() -> None:
    payloads = []
    for i in range(200):
        chunk = json.loads(chunk_text(f"w{i} "))
        chunk["created"] = 1786782801 + i  # nothing repeats byte for byte
        payloads.append(json.dumps(chunk))
    fast, skipped = fold(payloads, learn=True)
    plain, _ = fold(payloads, learn=False)
    assert snapshot(fast) == snapshot(plain) and skipped == 0


def test_usage_on_a_chunk_shaped_like_the_others_is_still_read() -> None:
    """DeepSeek puts usage on the last content chunk: the same envelope but "usage" not null."""
    first, second = chunk_text("a"), chunk_text("b")
    with_usage = json.loads(chunk_text("c"))
    with_usage["usage"] = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    fast, skipped = fold([first, second, json.dumps(with_usage, separators=(",", ":"))], learn=True)
    assert skipped == 1 and fast.usage == with_usage["usage"] and fast.content == "abc"


# -- the wire-level path --------------------------------------------------------------------------


def test_an_event_framed_with_crlf_or_without_the_space_or_two_events_in_a_read_goes_the_ordinary_way() -> None:
    text = chunk_text("b")
    template = template_of(chunk_text("a"))
    assert template.event_body(b"data: " + text.encode() + b"\n\n") == b"b"
    assert template.event_body(b"data: " + text.encode() + b"\r\n\r\n") is None
    assert template.event_body(b"data:" + text.encode() + b"\n\n") is None
    assert template.event_body((b"data: " + text.encode() + b"\n\n") * 2) is None
    assert template.event_body(b"data: " + text.encode() + b"\n") is None


def test_invalid_utf8_inside_a_token_is_replaced_as_the_decoder_replaces_it() -> None:
    first = b"data: " + chunk_text("a").encode() + b"\n\n"
    bad = b"data: " + chunk_text("b\x01").encode().replace(b"\\u0001", b"\xe4\xbd") + b"\n\n"
    fast, _ = meter(first + bad, [first, bad])
    slow, _ = meter(first + bad, [first + bad[:7], bad[7:]])
    assert comparable(fast) == comparable(slow)
    wire = StreamAccumulator(0.0)
    wire.add_data(chunk_text("a"), 0.0)
    assert wire.fold_event(bad, lambda: 1.0)
    plain = StreamAccumulator(0.0, learn=False)
    plain.add_data(chunk_text("a"), 0.0)
    plain.add_data(bad[len(b"data: ") : -2].decode("utf-8", "replace"), 1.0)
    assert wire.content == plain.content == "ab\ufffd"


def test_a_character_split_between_two_folded_reads_is_replaced_per_read_as_the_decoder_replaces_it() -> None:
    # Bodies are kept as raw bytes and decoded when read: each on its own, never joined first
    # (joined, the two halves of "中" would decode to the character itself).
    first = b"data: " + chunk_text("a").encode() + b"\n\n"
    halves = [b"data: " + chunk_text(f"<{i}>").encode().replace(f"<{i}>".encode(), half) + b"\n\n"
              for i, half in enumerate(["x中".encode()[:3], "中y".encode()[1:]])]
    wire = StreamAccumulator(0.0)
    wire.add_data(chunk_text("a"), 0.0)
    assert all(wire.fold_event(event, lambda: 1.0) for event in halves)
    plain = StreamAccumulator(0.0, learn=False)
    for event in [first, *halves]:
        plain.add_data(event[len(b"data: ") : -2].decode("utf-8", "replace"), 1.0)
    assert wire.content == plain.content == "ax\ufffd\ufffd\ufffdy"


def _fast_path_armed_only_when_safe(m: CallMeter) -> None:
    # The invariant feed's fast path relies on: armed only while a whole event read next would
    # decode the same whatever came before it (see CallMeter._arm_fast_path).
    if m._fast is not None:
        assert m._decoder.between_events and not m._pending and m._cut_lf_at is None


@pytest.mark.parametrize(
    "held",
    [b"data: x\n", b'data: {"n"', b": keep-alive\r", b"id: 7\n", b"event: delta\n", b"data: " + b"y" * 40],
    ids=["open-block", "partial-line", "cr", "id-line", "event-line", "long-partial"],
)
@pytest.mark.parametrize("asked_for_usage", [False, True])
def test_a_whole_event_read_while_the_decoder_holds_bytes_is_decoded_not_folded(held: bytes, asked_for_usage: bool) -> None:
    # A read that is exactly one event shaped like the last one, arriving after a read that
    # left a line or block open, belongs with those bytes: folding it on its own would count
    # it as a chunk of its own (for an open block it is not even valid JSON then).
    events = [b"data: " + chunk_text(t).encode() + b"\n\n" for t in ("a", "b", "c", "d")]
    reads = [events[0], events[1], held, events[2], events[3], b"data: [DONE]\n\n"]
    body = b"".join(reads)
    fields: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked_for_usage else {}
    call = prepare_request("POST", "/chat/completions", json.dumps({**json.loads(REQUEST), **fields}).encode())
    m = CallMeter(call, clock=lambda: STARTED, monotonic=lambda: 0.0)
    m.response_started(200, "text/event-stream")
    out = b""
    for read in reads:
        out += m.feed(read)
        _fast_path_armed_only_when_safe(m)
    out += m.feed_eof()
    whole, out_whole = meter(body, [body], asked_for_usage=asked_for_usage)
    assert comparable(m.finish("eof")) == comparable(whole)
    assert out == out_whole
    plain, _ = fold(payloads_of(body), learn=False)
    assert m._acc.content == plain.content and m._acc.chunk_count == plain.chunk_count


def test_reads_of_one_event_each_skip_the_decoder_after_the_first() -> None:
    # The other half of the invariant: the fast path is not disarmed for good by a read the
    # decoder took (here the first, which settles the BOM and teaches the template).
    events = [b"data: " + chunk_text(f"w{i} ").encode() + b"\n\n" for i in range(50)] + [b"data: [DONE]\n\n"]
    decoded: list[bytes] = []

    class Recording(SSEDecoder):
        __slots__ = ()

        def feed(self, chunk: bytes) -> list[Any]:
            decoded.append(chunk)
            return super().feed(chunk)

    m = CallMeter(prepare_request("POST", "/chat/completions", REQUEST.encode()), clock=lambda: STARTED,
                  monotonic=lambda: 0.0)
    m._decoder = Recording()
    m.response_started(200, "text/event-stream")
    out = b"".join(m.feed(read) for read in events) + m.feed_eof()
    assert out == b"".join(events)
    assert decoded == [events[0], events[-1]]
    record = m.finish("eof")
    assert record.chunk_count == 50 and m._acc.content == "".join(f"w{i} " for i in range(50))


# -- generated streams ---------------------------------------------------------------------------

# Pieces of JSON and SSE syntax, escapes, line breaks, non-ASCII: strings that trip naive scanners.
TRICKY = st.lists(
    st.sampled_from(['"', "\\", "\n", "\r", "\t", "\x00", "\u2028", "é", "中", "😀", "a", " ", "{", "}", ":", ",",
                     '"usage":{', '"finish_reason":"stop"', "null", "\\u00e9", "data: ", "\ud83d"]),
    max_size=8,
).map("".join)


@st.composite
def delta(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["content", "content", "reasoning", "tool", "empty", "finish"]))
    if kind == "content":
        return {"delta": {"content": draw(TRICKY)}}
    if kind == "reasoning":
        return {"delta": {"content": None, "reasoning_content": draw(TRICKY)}}
    if kind == "tool":
        return {"delta": {"tool_calls": [{"index": draw(st.integers(0, 1)), "function": {"arguments": draw(TRICKY)}}]}}
    if kind == "empty":
        return {"delta": {"content": ""}}
    return {"delta": {}, "finish_reason": draw(st.sampled_from(["stop", "length"]))}


@st.composite
def stream_payloads(draw: st.DrawFn) -> list[str]:
    envelope_id = draw(st.sampled_from(["c-1", 'c"q', "c\\u00e9", "c,usage"]))
    ascii_only = draw(st.booleans())
    payloads = []
    for part in draw(st.lists(delta(), min_size=1, max_size=25)):
        chunk = {"id": envelope_id, "object": "chat.completion.chunk", "created": 7, "model": "m",
                 "choices": [{"index": 0, **part, "logprobs": None, "finish_reason": part.get("finish_reason")}],
                 "usage": None}
        payloads.append(json.dumps(chunk, ensure_ascii=ascii_only, separators=(",", ":")))
        if draw(st.integers(0, 9)) == 0:  # now and then, a raw (unescaped) injection into the last chunk
            raw = draw(TRICKY)
            template = learn_template(payloads[-1], json.loads(payloads[-1]))
            if template is not None:
                payloads.append(template.prefix + raw + template.suffix)
    if draw(st.booleans()):
        payloads.append(json.dumps({"id": envelope_id, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))
    return payloads + ["[DONE]"]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(stream_payloads())
def test_generated_streams_fold_the_same_with_and_without_templates(payloads: list[str]) -> None:
    fast, _ = fold(payloads, learn=True)
    plain, _ = fold(payloads, learn=False)
    assert snapshot(fast) == snapshot(plain)


@FUZZ
@given(stream_payloads(), st.booleans(), st.integers(1, 64))
def test_generated_streams_meter_the_same_read_per_event_and_in_arbitrary_reads(
    payloads: list[str], asked_for_usage: bool, size: int
) -> None:
    # surrogatepass: a raw lone surrogate becomes bytes that are not UTF-8, which both paths must replace alike
    events = [b"data: " + p.encode("utf-8", "surrogatepass") + b"\n\n" for p in payloads if "\n" not in p and "\r" not in p]
    body = b"".join(events)
    by_event, out_event = meter(body, events, asked_for_usage=asked_for_usage)
    by_size, out_size = meter(body, [body[i : i + size] for i in range(0, len(body), size)], asked_for_usage=asked_for_usage)
    assert comparable(by_event) == comparable(by_size)
    assert out_event == out_size
