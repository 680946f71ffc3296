"""Hostile and broken streams against the metering core (issue 7, "hostile and broken streams").

The core (``SSEDecoder`` -> ``StreamAccumulator`` / ``AnthropicStreamAccumulator`` ->
``CallMeter``) is driven the way the transport and the proxy drive it: ``response_started``,
``feed`` per read, ``feed_eof``, ``finish``. What must hold, whatever the upstream sends:

* nothing raises out of ``feed`` / ``feed_eof`` / ``finish``, and every call is one record
  with one of the five statuses;
* the record and the forwarded bytes do not depend on where the reads were split (so a
  valid stream is counted the same way however the network delivers it);
* memory stays bounded: an endless line, an endless event, a decompression bomb each end
  metering as an ``error`` row while the bytes keep flowing to the caller;
* every real capture, re-chunked at random, gives the provider's exact usage;
* malformed JSON, an in-stream error object, a usage object with nonsense counts and an
  upstream that never ends are each a row with a status that says so.

Clock and monotonic time are fixed, so two runs of the same bytes give equal records
(``request_id`` aside, which is a fresh UUID by design).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import collector
from collector.metering import CallMeter, Outcome, PreparedCall, prepare_request
from collector.record import Status, UsageRecord
from collector.sse import SSEDecoder
from collector.store import LedgerStore
from collector.usage import InvalidUsage, normalise_usage
from fixture_streams import FixtureStream, load_streams

CHAT = "/chat/completions"
ANTHROPIC = "/anthropic/v1/messages"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
STATUSES = {s.value for s in Status}
STREAMS = load_streams()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- driving the core -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How a response is framed around its body."""

    path: str = CHAT
    asked_for_usage: bool = False  # False: the meter injects include_usage and may cut a usage-only chunk
    stream: bool = True
    status: int = 200
    content_type: str | None = "text/event-stream"
    encoding: str | None = None

    def __str__(self) -> str:
        return f"{self.path} usage={'asked' if self.asked_for_usage else 'injected'} {self.status} {self.content_type} {self.encoding}"


SHAPES = [
    Shape(),
    Shape(asked_for_usage=True),
    Shape(path=ANTHROPIC),
    Shape(content_type=None),
    Shape(content_type="application/json", stream=False),
    Shape(status=500, content_type="application/json"),
    Shape(status=429, content_type="text/event-stream"),
    Shape(encoding="gzip"),
    Shape(encoding="deflate", content_type="application/json", stream=False),
    Shape(encoding="br"),
]


def may_cut(shape: Shape) -> bool:
    """Whether the meter may hold back and cut bytes: only an uncompressed chat stream with injected usage."""
    sse = shape.content_type in (None, "text/event-stream") and shape.stream
    return shape.path == CHAT and sse and not shape.asked_for_usage and shape.status < 400 and not shape.encoding


def request_body(shape: Shape) -> bytes:
    body: dict[str, Any] = {
        "model": "deepseek-v4-flash",
        "messages": [{"role": "user", "content": "Tell me about prefix caching."}],
        "stream": shape.stream,
    }
    if shape.asked_for_usage:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def prepared(shape: Shape) -> PreparedCall:
    return prepare_request("POST", shape.path, request_body(shape))


def run(
    shape: Shape, pieces: Sequence[bytes], outcome: Outcome = "eof", max_line: int | None = None
) -> tuple[bytes, UsageRecord]:
    """Drive one call through the meter; return (bytes forwarded to the caller, the record)."""
    meter = CallMeter(prepared(shape), clock=lambda: T0, monotonic=lambda: 0.0)
    if max_line is not None:
        meter._decoder = SSEDecoder(max_line_bytes=max_line)  # a small limit so the test stays small
    meter.response_started(shape.status, shape.content_type, shape.encoding)
    out = bytearray()
    for piece in pieces:
        out += meter.feed(piece)
    if outcome == "eof":
        out += meter.feed_eof()
    record = meter.finish(outcome)
    assert meter.finish("eof") is record  # one call, one record
    return bytes(out), record


def comparable(record: UsageRecord) -> dict[str, Any]:
    values = record.to_dict()
    values.pop("request_id")  # a fresh UUID per call, by design
    return values


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def assert_sane(record: UsageRecord) -> None:
    assert record.status in STATUSES
    for name in ("prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens",
                 "completion_tokens", "reasoning_tokens"):
        value = getattr(record, name)
        assert value is None or (type(value) is int and value >= 0), (name, value)
    if record.status == Status.COMPLETED.value and not record.usage_estimated and record.usage_raw is not None:
        # Reported counts are exactly the provider's usage object, read by the one normaliser.
        expected = normalise_usage(record.usage_raw) if record.endpoint == "chat.completions" else None
        if expected is not None:
            assert (record.prompt_cache_hit_tokens, record.prompt_cache_miss_tokens, record.completion_tokens) == (
                expected.prompt_cache_hit_tokens, expected.prompt_cache_miss_tokens, expected.completion_tokens)


# -- strategies ---------------------------------------------------------------------------------

# Pieces that make random bytes look like SSE often enough to reach deep states.
_TOKENS = [
    b"data: ", b"data:", b"data", b"event: ", b"id: ", b"retry: 10", b": keep-alive", b"\n", b"\r", b"\r\n",
    b"\n\n", b"\r\n\r\n", b"{", b"}", b"[", b"]", b'"', b":", b",", b"[DONE]", b"\xef\xbb\xbf", b"\xff\xfe",
    b'"usage":', b'"choices":', b'"error":', b'"delta":', b'"content":"x"', b'"prompt_tokens":', b"-1",
    b"3.5", b"1e400", b"NaN", b"null", b"true", b'"id":"c"', b'"type":"message_start"', b'"message":',
    b"\x00", b"\xe2\x80\xa8",
]
hostile_bytes = st.lists(st.one_of(st.sampled_from(_TOKENS), st.binary(max_size=24)), max_size=120).map(b"".join)


def _count() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=0, max_value=5000),
        st.integers(min_value=-10, max_value=-1),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.sampled_from(["12", True, None, 2**70, 1.0e30, 7.0]),
    )


usage_objects = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": _count(),
        "completion_tokens": _count(),
        "prompt_cache_hit_tokens": _count(),
        "prompt_cache_miss_tokens": _count(),
        "total_tokens": _count(),
        "completion_tokens_details": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"reasoning_tokens": _count()})),
        "prompt_tokens_details": st.one_of(st.just("x"), st.fixed_dictionaries({}, optional={"cached_tokens": _count()})),
    },
)
_text = st.text(max_size=12)
deltas = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["assistant", "", None]),
        "content": st.one_of(st.none(), _text),
        "reasoning_content": st.one_of(st.none(), _text),
        "tool_calls": st.lists(
            st.fixed_dictionaries({}, optional={
                "index": st.one_of(st.integers(-1, 3), st.none(), st.just(True)),
                "id": st.one_of(st.none(), st.sampled_from(["call_1", "call_2"])),
                "function": st.fixed_dictionaries({}, optional={"name": _text, "arguments": _text}),
            }),
            max_size=3,
        ),
    },
)
choices = st.fixed_dictionaries(
    {},
    optional={
        "index": st.one_of(st.integers(0, 2), st.just("0"), st.none()),
        "delta": st.one_of(deltas, st.just("not a dict")),
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls", ""])),
    },
)
chat_chunks = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.sampled_from(["chatcmpl-1", ""]), st.text(max_size=8)),
        "model": st.sampled_from(["deepseek-v4-flash", "deepseek-reasoner", "", "m\x00x"]),
        "choices": st.one_of(st.lists(choices, max_size=2), st.just("nope")),
        "usage": st.one_of(st.none(), usage_objects, st.just([1, 2])),
        "error": st.one_of(st.none(), st.just({"message": "overloaded", "type": "server_error"}), st.just("boom"),
                           st.just({"code": 500})),
    },
)
anthropic_events = st.tuples(
    st.sampled_from(["message_start", "content_block_start", "content_block_delta", "message_delta",
                     "message_stop", "ping", "error", "message", "weird"]),
    st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["message_start", "content_block_delta", "message_delta", "error"]),
        "index": st.one_of(st.integers(-1, 2), st.just("0")),
        "message": st.fixed_dictionaries({}, optional={"id": _text, "model": _text, "usage": usage_objects}),
        "content_block": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["text", "tool_use", "thinking"]), "name": _text, "text": _text}),
        "delta": st.fixed_dictionaries({}, optional={
            "type": st.sampled_from(["text_delta", "thinking_delta", "input_json_delta"]),
            "text": _text, "thinking": _text, "partial_json": _text, "stop_reason": st.sampled_from(["end_turn", 3])}),
        "usage": usage_objects,
        "error": st.fixed_dictionaries({"type": st.just("overloaded_error"), "message": _text}),
    }),
)


@st.composite
def sse_streams(draw: st.DrawFn, anthropic: bool = False) -> bytes:
    """Event streams built from a grammar of real and broken SSE lines, any line ending."""
    lines: list[bytes] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["chunk", "chunk", "chunk", "done", "malformed", "comment", "field", "multi"]))
        if kind == "chunk":
            if anthropic:
                name, payload = draw(anthropic_events)
                lines.append(b"event: " + name.encode())
            else:
                payload = draw(chat_chunks)
            lines.append(b"data: " + json.dumps(payload).encode())
        elif kind == "done":
            lines.append(b"data: [DONE]")
        elif kind == "malformed":
            lines.append(b"data: " + draw(st.sampled_from([b'{"choices":[', b"[1,2]", b'"str"', b"", b"\xff{}"])))
        elif kind == "comment":
            lines.append(b": keep-alive")
        elif kind == "field":
            lines.append(draw(st.sampled_from([b"id: 7", b"retry: 1000", b"event: x", b"data", b"foo: bar"])))
        else:
            lines.extend([b'data: {"choices":', b'data: [{"delta":{"content":"split"}}]}'])  # one payload on two lines
        if draw(st.booleans()):
            lines.append(b"")  # the blank line that dispatches
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    body = ending.join(lines) + (ending if lines and draw(st.booleans()) else b"")
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    return body


def cuts_for(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, max(len(data), 1)), max_size=30)


# -- never an escape, never chunking-dependent ------------------------------------------------------


@FUZZ
@given(body=hostile_bytes, data=st.data(), shape=st.sampled_from(SHAPES),
       outcome=st.sampled_from(["eof", "cancelled", "timeout", "error"]))
def test_arbitrary_bytes_never_raise_and_always_make_one_sane_record(
    body: bytes, data: st.DataObject, shape: Shape, outcome: Outcome
) -> None:
    pieces = split(body, data.draw(cuts_for(body)))
    out, record = run(shape, pieces, outcome)
    assert_sane(record)
    if not may_cut(shape):
        assert out == body  # nothing is held back or cut: the caller gets the bytes as they came


@FUZZ
@given(body=hostile_bytes, data=st.data(), shape=st.sampled_from([s for s in SHAPES if s.encoding is None]))
def test_arbitrary_bytes_give_the_same_record_and_bytes_however_the_reads_are_split(
    body: bytes, data: st.DataObject, shape: Shape
) -> None:
    whole = run(shape, [body])
    pieces = split(body, data.draw(cuts_for(body)))
    out, record = run(shape, pieces)
    assert out == whole[0]
    assert comparable(record) == comparable(whole[1])
    assert list(run(shape, [bytes([b]) for b in body])[0]) == list(whole[0])


@FUZZ
@given(data=st.data(), shape=st.sampled_from([Shape(), Shape(asked_for_usage=True), Shape(content_type=None)]))
def test_fuzzed_chat_event_streams_are_sane_and_independent_of_read_splits(data: st.DataObject, shape: Shape) -> None:
    body = data.draw(sse_streams())
    whole_out, whole = run(shape, [body])
    out, record = run(shape, split(body, data.draw(cuts_for(body))))
    assert (out, comparable(record)) == (whole_out, comparable(whole))
    assert_sane(record)
    if shape.asked_for_usage:
        assert out == body
    else:
        assert len(out) <= len(body)  # at most a usage-only chunk is cut, nothing is added


@FUZZ
@given(data=st.data())
def test_fuzzed_anthropic_event_streams_are_sane_and_independent_of_read_splits(data: st.DataObject) -> None:
    shape = Shape(path=ANTHROPIC)
    body = data.draw(sse_streams(anthropic=True))
    whole_out, whole = run(shape, [body])
    out, record = run(shape, split(body, data.draw(cuts_for(body))))
    assert (out, comparable(record)) == (whole_out, comparable(whole))
    assert out == body  # nothing is ever cut from the Anthropic surface
    assert_sane(record)


# -- valid input: the real captures, re-chunked, count exactly ---------------------------------------


def _last_usage(stream: FixtureStream) -> dict[str, Any] | None:
    """The last non-null ``usage`` in a chat capture, read with a plain json pass over its data lines."""
    found = None
    for line in stream.body.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]"):
            payload = json.loads(line[5:])
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                found = payload["usage"]
    return found


CHAT_STREAMS = [s for s in STREAMS if s.is_chat]


@pytest.mark.parametrize("stream", STREAMS, ids=str)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_capture_rechunked_at_random_gives_an_identical_record(stream: FixtureStream, data: st.DataObject) -> None:
    shape = Shape(asked_for_usage=True)
    whole_out, whole = run(shape, [stream.body])
    out, record = run(shape, split(stream.body, data.draw(cuts_for(stream.body))))
    assert out == stream.body == whole_out
    assert comparable(record) == comparable(whole)


@pytest.mark.parametrize("stream", CHAT_STREAMS, ids=str)
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_every_chat_capture_records_the_providers_exact_usage_byte_by_byte(stream: FixtureStream, encoding: str | None) -> None:
    usage = _last_usage(stream)
    assert usage is not None, f"{stream} has no usage"
    wire = gzip.compress(stream.body) if encoding else stream.body
    out, record = run(Shape(encoding=encoding), [wire[i : i + 1] for i in range(len(wire))])
    assert out == wire
    tokens = normalise_usage(usage)
    assert record.status == Status.COMPLETED.value and record.usage_estimated is False
    assert record.usage_raw == usage and record.error_type is None
    assert (record.prompt_cache_hit_tokens, record.prompt_cache_miss_tokens, record.completion_tokens,
            record.reasoning_tokens) == (tokens.prompt_cache_hit_tokens, tokens.prompt_cache_miss_tokens,
                                          tokens.completion_tokens, tokens.reasoning_tokens)


def _mutate(body: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    data = bytearray(body)
    for op, at, blob in ops:
        at = at % (len(data) + 1)
        if op == "flip" and data:
            data[at % len(data)] ^= blob[0] if blob else 0xFF
        elif op == "insert":
            data[at:at] = blob
        elif op == "delete":
            del data[at : at + len(blob) + 1]
        elif op == "duplicate":
            data[at:at] = data[max(0, at - 40) : at]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]), st.integers(0, 1 << 20),
              st.one_of(st.sampled_from(_TOKENS), st.binary(min_size=1, max_size=6))),
    min_size=1, max_size=6,
)


@FUZZ
@given(stream=st.sampled_from(STREAMS), ops=mutations, data=st.data(),
       shape=st.sampled_from([Shape(), Shape(asked_for_usage=True), Shape(path=ANTHROPIC)]))
def test_mutated_captures_never_raise_and_are_independent_of_read_splits(
    stream: FixtureStream, ops: list[tuple[str, int, bytes]], data: st.DataObject, shape: Shape
) -> None:
    body = _mutate(stream.body, ops)
    whole_out, whole = run(shape, [body])
    out, record = run(shape, split(body, data.draw(cuts_for(body))))
    assert (out, comparable(record)) == (whole_out, comparable(whole))
    assert_sane(record)


# -- bounded memory ----------------------------------------------------------------------------------


def _peak_while_feeding(shape: Shape, pieces: Iterator[bytes]) -> tuple[int, int, int, UsageRecord]:
    """Feed a generated stream; return (bytes fed, bytes forwarded, peak traced bytes, record)."""
    meter = CallMeter(prepared(shape), clock=lambda: T0, monotonic=lambda: 0.0)
    meter.response_started(shape.status, shape.content_type, shape.encoding)
    fed = forwarded = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for piece in pieces:
            fed += len(piece)
            forwarded += len(meter.feed(piece))
        forwarded += len(meter.feed_eof())
        record = meter.finish("eof")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return fed, forwarded, peak, record


MB = 1 << 20
HOSTILE_BYTES = 50 * MB
MEMORY_BOUND = 16 * MB  # a few copies of the decoder's limits (1 MiB line, 4 MiB event), whatever the stream's size


def _repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


@pytest.mark.parametrize("shape", [Shape(), Shape(asked_for_usage=True)], ids=str)
def test_fifty_megabytes_without_a_newline_stay_bounded_and_end_as_a_line_too_long_row(shape: Shape) -> None:
    def body() -> Iterator[bytes]:
        yield b"data: "
        yield from _repeat(b"A" * 65536, HOSTILE_BYTES)

    fed, forwarded, peak, record = _peak_while_feeding(shape, body())
    assert fed > HOSTILE_BYTES - MB and forwarded == fed  # every byte still reaches the caller
    assert peak < MEMORY_BOUND, f"peak {peak / MB:.1f} MiB"
    assert record.status == Status.ERROR.value and record.error_type == "line_too_long"
    assert record.error_message and "exceeds the limit" in record.error_message


@pytest.mark.parametrize("shape", [Shape(), Shape(asked_for_usage=True)], ids=str)
def test_an_event_that_never_ends_stays_bounded_and_still_reaches_the_caller(shape: Shape) -> None:
    # Short data lines and never the blank line that ends the event: each line is within the
    # line limit, so only a limit on the whole event keeps the decoder (and the bytes held back
    # while a usage-only chunk might have to be cut) from growing with the stream.
    line = b'data: {"choices":[{"delta":{"content":"' + b"x" * 1000 + b'"}}]}\n'
    fed, forwarded, peak, record = _peak_while_feeding(shape, _repeat(line * 16, 30 * MB))
    assert forwarded == fed
    assert peak < MEMORY_BOUND, f"peak {peak / MB:.1f} MiB"
    assert record.status == Status.ERROR.value and record.error_type == "line_too_long"


def test_a_gzip_bomb_is_inflated_in_bounded_pieces() -> None:
    # 200 MB of one line compresses to ~200 kB: inflating a read whole would need the 200 MB.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = compressor.compress(b"data: " + b"x" * (200 * MB)) + compressor.flush()
    fed, forwarded, peak, record = _peak_while_feeding(Shape(encoding="gzip"), iter(split(bomb, range(0, len(bomb), 65536))))
    assert forwarded == fed == len(bomb)
    assert peak < MEMORY_BOUND, f"peak {peak / MB:.1f} MiB"
    assert record.status == Status.ERROR.value and record.error_type == "line_too_long"


def test_a_compressed_non_streamed_body_past_the_size_limit_is_not_inflated_whole() -> None:
    bomb = gzip.compress(b"{" + b" " * (100 * MB) + b"}", 9)
    shape = Shape(content_type="application/json", stream=False, encoding="gzip")
    fed, forwarded, peak, record = _peak_while_feeding(shape, iter(split(bomb, range(0, len(bomb), 65536))))
    assert forwarded == fed
    assert peak < 40 * MB, f"peak {peak / MB:.1f} MiB"  # the body limit is 32 MiB
    assert record.status == Status.ERROR.value and record.error_type == "body_too_large"


# -- each broken case is a row with a clear status -------------------------------------------------


def _sse(*payloads: Any, done: bool = True) -> bytes:
    parts = [b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads]
    return b"".join(parts) + (b"data: [DONE]\n\n" if done else b"")


def _content(text: str, **extra: Any) -> dict[str, Any]:
    return {"id": "c1", "model": "deepseek-v4-flash", "choices": [{"index": 0, "delta": {"content": text}}], **extra}


GOOD_USAGE = {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35,
              "prompt_cache_hit_tokens": 24, "prompt_cache_miss_tokens": 6}


def test_malformed_json_chunk_with_usage_after_it_is_completed_flagged_and_exact() -> None:
    _, record = run(Shape(), [_sse(_content("a"), b'{"choices":[{"delta":', _content("b", usage=GOOD_USAGE))])
    assert record.status == Status.COMPLETED.value and record.error_type == "malformed_chunk"
    assert "1 chunk(s) were not valid JSON" in (record.error_message or "")
    assert (record.prompt_cache_hit_tokens, record.completion_tokens, record.usage_estimated) == (24, 5, False)


def test_malformed_json_chunk_and_no_usage_is_disconnected_flagged_and_estimated() -> None:
    _, record = run(Shape(), [_sse(_content("hello there"), b"{not json", done=False)])
    assert record.status == Status.DISCONNECTED.value and record.error_type == "malformed_chunk"
    assert record.usage_estimated and record.completion_tokens and record.prompt_tokens


@pytest.mark.parametrize(
    ("error", "error_type", "message"),
    [
        ({"message": "Server overloaded", "type": "server_error", "code": "overloaded"}, "server_error", "Server overloaded"),
        ({"code": "rate_limited"}, "rate_limited", None),
        ({"message": "no type"}, "stream_error", "no type"),
        ("plain string", "stream_error", "plain string"),
    ],
)
def test_in_stream_error_object_is_an_error_row_even_after_content(
    error: Any, error_type: str, message: str | None
) -> None:
    _, record = run(Shape(), [_sse(_content("partial"), {"error": error}, done=False)])
    assert record.status == Status.ERROR.value
    assert record.error_type == error_type and record.error_message == message
    assert record.usage_estimated and record.completion_tokens  # what was generated is still estimated


def test_anthropic_in_stream_error_event_is_an_error_row() -> None:
    body = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m1","model":"deepseek-v4-flash",'
            b'"usage":{"input_tokens":12,"output_tokens":1}}}\n\n'
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n')
    _, record = run(Shape(path=ANTHROPIC), [body])
    assert record.status == Status.ERROR.value and record.error_type == "overloaded_error"
    assert record.error_message == "Overloaded"


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_cache_miss_tokens": -6},
        {"completion_tokens": -1},
        {"completion_tokens": 5.5},
        {"completion_tokens": "5"},
        {"completion_tokens": True},
        {"completion_tokens": float("nan")},
        {"completion_tokens": float("inf")},
        {"completion_tokens_details": {"reasoning_tokens": -2}},
        {"completion_tokens": 10**30},
        {"prompt_cache_hit_tokens": 10**400},
    ],
    ids=lambda bad: json.dumps(bad),
)
def test_usage_with_negative_non_integer_or_absurd_counts_is_flagged_and_estimated(bad: dict[str, Any]) -> None:
    usage = {**GOOD_USAGE, **bad}
    _, record = run(Shape(), [_sse(_content("a fine answer", usage=usage))])
    assert record.status == Status.COMPLETED.value  # the call itself ended whole
    assert record.error_type == "invalid_usage" and record.error_message
    assert record.usage_estimated is True
    assert record.usage_raw is not None and set(record.usage_raw) == set(usage)
    assert record.prompt_tokens and record.completion_tokens  # estimated, never 0 or nonsense
    assert record.completion_tokens < 1000


def test_absurd_usage_counts_are_refused_because_the_ledger_could_not_hold_them() -> None:
    # Regression: 10**19 tokens passed the normaliser, then the ledger refused the row (64-bit
    # columns), so the call never reached the ledger at all. Now it is an invalid_usage row.
    with pytest.raises(InvalidUsage):
        normalise_usage({**GOOD_USAGE, "prompt_cache_miss_tokens": 10**19, "prompt_tokens": 10**19 + 24})


def test_a_stream_cut_by_a_timeout_is_a_timeout_row_with_estimated_tokens() -> None:
    body = _sse({"id": "c1", "model": "deepseek-reasoner", "choices": [{"index": 0, "delta": {"reasoning_content": "Let me think"}}]},
                _content("The answer"), done=False)
    _, record = run(Shape(), [body], outcome="timeout")
    assert record.status == Status.TIMEOUT.value and record.usage_estimated
    assert record.reasoning_tokens and record.completion_tokens and record.completion_tokens > record.reasoning_tokens
    assert record.ttft_ms is not None and record.model == "deepseek-reasoner"


def _bad_checksum(gz: bytes) -> bytes:
    return gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:])  # the CRC32 and length trailer


@pytest.mark.parametrize(
    "encoding_body",
    [("gzip", b"this is not gzip"), ("deflate", b"\x78\x9c garbage"), ("gzip", _bad_checksum(gzip.compress(_sse(_content("ok")))))],
    ids=["gzip-garbage", "deflate-garbage", "gzip-bad-checksum"],
)
@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
def test_a_body_that_does_not_decompress_is_an_error_row_and_still_reaches_the_caller(
    encoding_body: tuple[str, bytes], content_type: str
) -> None:
    # Regression: zlib.error escaped CallMeter.feed for a body whose content-encoding lied.
    encoding, body = encoding_body
    shape = Shape(encoding=encoding, content_type=content_type, stream=content_type == "text/event-stream")
    out, record = run(shape, split(body, [3, 7]))
    assert out == body
    assert record.status == Status.ERROR.value and record.error_type == "bad_content_encoding"


def test_a_compressed_stream_is_forwarded_untouched_even_when_a_usage_chunk_would_be_cut() -> None:
    # Regression: with an injected include_usage, the meter cut the usage-only chunk at offsets
    # of the *decompressed* stream out of the *compressed* bytes, corrupting what the caller got.
    plain = _sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]},
                 {"id": "c", "choices": [], "usage": GOOD_USAGE})
    wire = gzip.compress(plain)
    out, record = run(Shape(encoding="gzip"), split(wire, range(0, len(wire), 7)))
    assert out == wire and gzip.decompress(out) == plain
    assert record.status == Status.COMPLETED.value and record.completion_tokens == 5


@pytest.mark.parametrize("path", [CHAT, ANTHROPIC])
def test_deeply_nested_json_in_a_chunk_is_malformed_not_a_recursion_error(path: str) -> None:
    # Regression: json.loads raises RecursionError (not ValueError) on deep nesting, and it escaped feed().
    _, record = run(Shape(path=path), [_sse(b"[" * 200_000, done=False)])
    assert record.status in (Status.DISCONNECTED.value, Status.ERROR.value)
    assert record.error_type == "malformed_chunk"


def test_deeply_nested_request_or_response_body_does_not_escape() -> None:
    call = prepare_request("POST", CHAT, b"[" * 200_000)
    assert call.metered and call.requested_model is None
    _, record = run(Shape(content_type="application/json", stream=False), [b"[" * 200_000])
    assert record.status == Status.ERROR.value and record.error_type == "malformed_body"


# -- hostile values still become ledger rows ---------------------------------------------------------


def test_hostile_stream_values_always_land_in_the_ledger(db_url: str) -> None:
    """Whatever the upstream put in its strings and counts, the ledger takes the row (no refusal)."""
    store = LedgerStore(db_url)
    try:
        # Regression: a NUL character in the provider id, model or usage made PostgreSQL refuse the row.
        hostile = _sse({"id": "a\x00b", "model": "m\x00", "choices": [{"index": 0, "delta": {"content": "x\x00"},
                        "finish_reason": "st\x00p"}], "usage": {**GOOD_USAGE, "note\x00": "\x00"}},
                       {"error": {"type": "t\x00", "message": "m\x00"}})
        records = [run(Shape(), [hostile])[1]]

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data(), shape=st.sampled_from([Shape(), Shape(path=ANTHROPIC), Shape(status=400, content_type="application/json")]))
        def collect(data: st.DataObject, shape: Shape) -> None:
            body = data.draw(st.one_of(sse_streams(anthropic=shape.path == ANTHROPIC), hostile_bytes))
            records.append(run(shape, [body])[1])

        collect()
        added, refused = store.insert_isolating(records)
        assert refused == []
        assert len(added) == len(records)
    finally:
        store.close()


# -- an upstream that never ends, over real HTTP -------------------------------------------------------


class _EndlessUpstream:
    """A loopback HTTP server that sends a couple of chunks, then either goes silent or sends only keep-alives."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            conn.sendall(_sse({"id": "c9", "model": "deepseek-v4-flash", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                              _content("Once upon a time"), done=False))
            while not self._stop.wait(0.05):
                if self.mode == "keep-alive":
                    try:
                        conn.sendall(b": keep-alive\n\n")
                    except OSError:
                        return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accept.join(2)
        for thread in self._threads:
            thread.join(2)


@pytest.fixture
def endless() -> Iterator[Any]:
    servers: list[_EndlessUpstream] = []

    def start(mode: str) -> _EndlessUpstream:
        servers.append(_EndlessUpstream(mode))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _chat(client: httpx.Client, url: str, seconds: float | None = None) -> None:
    body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "a story"}], "stream": True}
    with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        deadline = None if seconds is None else time.monotonic() + seconds
        for _ in response.iter_raw():
            if deadline is not None and time.monotonic() > deadline:
                break  # the caller gives up on a stream that never ends


def test_an_upstream_that_goes_silent_is_a_timeout_row(endless: Any) -> None:
    server = endless("silent")
    records: list[UsageRecord] = []
    with collector.metered_client(sink=records.append, timeout=httpx.Timeout(5.0, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            _chat(client, server.url)
    assert len(records) == 1
    record = records[0]
    assert record.status == Status.TIMEOUT.value and record.error_type == "UpstreamTimeout"
    assert record.usage_estimated and record.completion_tokens and record.ttft_ms is not None


def test_an_upstream_that_only_sends_keep_alives_forever_is_a_cancelled_row_when_the_caller_gives_up(endless: Any) -> None:
    server = endless("keep-alive")
    records: list[UsageRecord] = []
    with collector.metered_client(sink=records.append, timeout=httpx.Timeout(5.0, read=0.5)) as client:
        _chat(client, server.url, seconds=1.0)  # keep-alives keep every read under the read timeout
    assert len(records) == 1
    record = records[0]
    assert record.status == Status.CANCELLED.value and record.usage_estimated
    assert record.completion_tokens and record.chunk_count == 2
