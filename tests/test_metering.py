"""The metering core on its own: request preparation, byte forwarding and the record each outcome makes.

Streams come from the real captures in shared/fixtures (replayed in chunks of various sizes);
the HTTP layers that drive the core are tested against the simulator elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from collector.metering import CallMeter, InvalidTags, Outcome, parse_tags, prepare_request
from collector.record import Status

CHAT = "/chat/completions"


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _jsonl_stream(path: Path, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return "".join(f"data: {line}{nl}{nl}" for line in lines).encode() + f"data: [DONE]{nl}{nl}".encode()


def _final_usage(path: Path) -> dict[str, Any]:
    usages = [json.loads(line).get("usage") for line in path.read_text().splitlines() if line.strip()]
    found = [u for u in usages if u]
    assert found, f"{path.name} has no usage"
    return found[-1]


def _run(
    body: bytes,
    stream: bytes,
    *,
    split: int,
    status: int = 200,
    content_type: str = "text/event-stream; charset=utf-8",
    outcome: Outcome = "eof",
    api_key: str | None = None,
) -> tuple[bytes, CallMeter]:
    meter = CallMeter(prepare_request("POST", CHAT, body), api_key=api_key)
    meter.response_started(status, content_type)
    out = bytearray()
    for i in range(0, len(stream), split):
        out += meter.feed(stream[i : i + split])
    if outcome == "eof":
        out += meter.feed_eof()
    meter.finish(outcome)
    return bytes(out), meter


# -- prepare_request -------------------------------------------------------------------------


def test_streamed_chat_request_gets_include_usage_injected_and_keeps_other_fields() -> None:
    call = prepare_request("POST", "/v1/chat/completions", _body(stream=True, temperature=0.3, stream_options={"x": 1}))
    sent = json.loads(call.body)
    assert sent["stream_options"] == {"x": 1, "include_usage": True}
    assert sent["temperature"] == 0.3 and sent["stream"] is True
    assert call.include_usage_injected and call.metered and call.stream
    assert call.requested_model == "deepseek-v4-flash"


def test_injecting_include_usage_keeps_every_byte_the_client_sent() -> None:
    # The client's own formatting (spaces, escapes, number forms) must survive: only the
    # stream_options member is added, in front, and the body is not serialised again.
    original = b'  {"model": "deepseek-v4-flash", "stream": true, "temperature": 1E-1,\n "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}]}'
    call = prepare_request("POST", CHAT, original)
    assert call.include_usage_injected
    assert call.body == b'  {"stream_options":{"include_usage":true},' + original[3:]
    assert json.loads(call.body) == {**json.loads(original), "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", CHAT, _body(stream=False)),
        ("POST", CHAT, _body(stream=True, stream_options={"include_usage": True})),
        ("POST", "/models", b""),
        ("GET", CHAT, b""),
    ],
)
def test_requests_that_need_no_change_are_forwarded_byte_for_byte(method: str, path: str, body: bytes) -> None:
    call = prepare_request(method, path, body)
    assert call.body is body
    assert not call.include_usage_injected


def test_only_chat_completions_and_anthropic_messages_are_metered() -> None:
    assert prepare_request("POST", "/chat/completions", _body()).metered
    assert prepare_request("POST", "/anthropic/v1/messages", _body()).metered
    assert not prepare_request("POST", "/v1/embeddings", _body()).metered
    assert not prepare_request("GET", "/user/balance", b"").metered


def test_a_body_that_is_not_json_is_still_metered_unchanged() -> None:
    call = prepare_request("POST", CHAT, b"{not json")
    assert call.metered and call.body == b"{not json" and call.requested_model is None


def test_thinking_mode_is_read_from_the_request() -> None:
    assert prepare_request("POST", CHAT, _body(thinking={"type": "enabled"})).thinking is True
    assert prepare_request("POST", CHAT, _body(thinking={"type": "disabled"})).thinking is False
    assert prepare_request("POST", CHAT, _body(reasoning_effort="high")).thinking is True
    assert prepare_request("POST", CHAT, _body()).thinking is None


# -- tags ------------------------------------------------------------------------------------


def test_tags_header_parses_key_value_pairs() -> None:
    assert parse_tags("team=search, feature=autocomplete") == {"team": "search", "feature": "autocomplete"}
    assert parse_tags("") == {}


@pytest.mark.parametrize(
    "value",
    ["team", "=x", "team=a\r\nX-Evil: 1", "t" * 65 + "=x", "k=" + "v" * 129, ",".join(f"k{i}=v" for i in range(17))],
)
def test_tags_header_rejects_malformed_injected_or_unbounded_values(value: str) -> None:
    with pytest.raises(InvalidTags):
        parse_tags(value)


# -- streams from real captures --------------------------------------------------------------

JSONL_FIXTURES = [
    "vercel-ai_v32_deepseek-text.chunks.jsonl",
    "vercel-ai_v32_deepseek-reasoning.chunks.jsonl",
    "vercel-ai_v32_deepseek-tool-call.chunks.jsonl",
    "vercel-ai_v4flash_deepseek-text.chunks.jsonl",
    "vercel-ai_v4flash_deepseek-reasoning.chunks.jsonl",
    "vercel-ai_v4flash_deepseek-tool-call.chunks.jsonl",
    "vercel-ai_v4flash_issue-19789-live-usage_SANITIZED.chunks.jsonl",
]


@pytest.mark.parametrize("name", JSONL_FIXTURES)
@pytest.mark.parametrize("split", [1, 37, 1 << 20])
@pytest.mark.parametrize("crlf", [False, True])
def test_deepseek_streams_pass_through_unchanged_and_record_the_billed_usage(
    fixtures_dir: Path, name: str, split: int, crlf: bool
) -> None:
    stream = _jsonl_stream(fixtures_dir / name, crlf)
    out, meter = _run(_body(stream=True), stream, split=split)
    assert out == stream  # DeepSeek puts usage on a content chunk: nothing to cut
    usage = _final_usage(fixtures_dir / name)
    rec = meter.record
    assert rec is not None and rec.status == Status.COMPLETED.value
    assert rec.prompt_cache_hit_tokens == usage["prompt_cache_hit_tokens"]
    assert rec.prompt_cache_miss_tokens == usage["prompt_cache_miss_tokens"]
    assert rec.completion_tokens == usage["completion_tokens"]
    assert rec.reasoning_tokens == (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    assert rec.usage_estimated is False and rec.usage_raw == usage
    assert rec.chunk_count == len([ln for ln in (fixtures_dir / name).read_text().splitlines() if ln.strip()])


def test_raw_sse_capture_with_reasoning_records_exact_usage(fixtures_dir: Path) -> None:
    raw = (fixtures_dir / "pydantic-ai_reasoner_thinking_stream_2025-07-10.raw.sse").read_bytes()
    out, meter = _run(_body(model="deepseek-reasoner", stream=True), raw, split=64)
    assert out == raw
    rec = meter.record
    assert rec is not None and rec.status == "completed" and rec.model == "deepseek-reasoner"
    assert rec.reasoning_tokens and rec.completion_tokens and rec.reasoning_tokens <= rec.completion_tokens
    assert rec.thinking is True
    assert rec.ttft_ms is not None and rec.first_content_ms is not None


def _openai_style_stream(crlf: bool = False) -> tuple[bytes, bytes]:
    """A stream whose usage comes on a separate empty-choices chunk; returns (stream, usage event bytes)."""
    nl = "\r\n" if crlf else "\n"
    chunks = [
        {"id": "c1", "model": "gpt-x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "model": "gpt-x", "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
        {"id": "c1", "model": "gpt-x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    usage = {
        "id": "c1",
        "model": "gpt-x",
        "choices": [],
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22,
                  "prompt_tokens_details": {"cached_tokens": 16}},
    }
    head = "".join(f"data: {json.dumps(c)}{nl}{nl}" for c in chunks)
    usage_event = f"data: {json.dumps(usage)}{nl}{nl}"
    return (head + f": keep-alive{nl}{nl}" + usage_event + f"data: [DONE]{nl}{nl}").encode(), usage_event.encode()


@pytest.mark.parametrize("split", [1, 2, 5, 64, 1 << 20])
@pytest.mark.parametrize("crlf", [False, True])
def test_injected_usage_only_chunk_is_metered_but_cut_from_what_the_caller_sees(split: int, crlf: bool) -> None:
    stream, usage_event = _openai_style_stream(crlf)
    out, meter = _run(_body(stream=True), stream, split=split)
    assert out == stream.replace(usage_event, b"")
    rec = meter.record
    assert rec is not None and rec.status == "completed" and not rec.usage_estimated
    assert (rec.prompt_cache_hit_tokens, rec.prompt_cache_miss_tokens, rec.completion_tokens) == (16, 4, 2)


def test_usage_only_chunk_reaches_a_caller_who_asked_for_usage() -> None:
    stream, _ = _openai_style_stream()
    out, meter = _run(_body(stream=True, stream_options={"include_usage": True}), stream, split=7)
    assert out == stream
    assert meter.record is not None and meter.record.completion_tokens == 2


def test_keep_alive_comment_is_forwarded_before_the_first_chunk_arrives() -> None:
    meter = CallMeter(prepare_request("POST", CHAT, _body(stream=True)))
    meter.response_started(200, "text/event-stream")
    assert meter.feed(b": keep-alive\n\n") == b": keep-alive\n\n"
    assert meter.feed(b"data: {\"choices\":[]") == b""  # an incomplete event waits for its end
    assert meter.feed(b"}\n\n") == b"data: {\"choices\":[]}\n\n"


# -- outcomes --------------------------------------------------------------------------------


def _cut(stream: bytes, fraction: float) -> bytes:
    return stream[: int(len(stream) * fraction)]


def test_stream_ending_without_usage_or_done_is_disconnected_with_estimated_tokens(fixtures_dir: Path) -> None:
    stream = _jsonl_stream(fixtures_dir / "vercel-ai_v4flash_deepseek-text.chunks.jsonl")
    _, meter = _run(_body(stream=True), _cut(stream, 0.5), split=100)
    rec = meter.record
    assert rec is not None and rec.status == Status.DISCONNECTED.value
    assert rec.usage_estimated is True
    assert rec.prompt_tokens and rec.prompt_tokens > 0 and rec.completion_tokens and rec.completion_tokens > 0
    assert rec.prompt_cache_hit_tokens is None and rec.prompt_cache_miss_tokens is None  # unknown, not 0


def test_caller_closing_early_is_cancelled_but_closing_after_done_is_completed(fixtures_dir: Path) -> None:
    stream = _jsonl_stream(fixtures_dir / "vercel-ai_v4flash_deepseek-text.chunks.jsonl")
    _, early = _run(_body(stream=True), _cut(stream, 0.3), split=100, outcome="cancelled")
    assert early.record is not None and early.record.status == Status.CANCELLED.value and early.record.usage_estimated
    _, after = _run(_body(stream=True), stream, split=100, outcome="cancelled")
    assert after.record is not None and after.record.status == Status.COMPLETED.value
    assert not after.record.usage_estimated


def test_http_error_before_the_stream_is_an_error_row_with_type_and_scrubbed_message() -> None:
    key = "sk-live-abcdef0123456789"
    body = json.dumps({"error": {"message": f"Authentication Fails, Your api key: {key} is invalid",
                                 "type": "authentication_error", "code": "invalid_request_error"}}).encode()
    _, meter = _run(_body(stream=True), body, split=1 << 20, status=401, content_type="application/json", api_key=key)
    rec = meter.record
    assert rec is not None and rec.status == "error" and rec.http_status == 401
    assert rec.error_type == "authentication_error"
    assert rec.error_message and key not in rec.error_message and "Authentication Fails" in rec.error_message
    assert rec.prompt_tokens is None and rec.completion_tokens is None and not rec.usage_estimated


def test_in_stream_error_object_makes_an_error_row() -> None:
    stream = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: {"error":{"message":"boom","type":"server_error"}}\n\n'
    _, meter = _run(_body(stream=True), stream, split=9)
    rec = meter.record
    assert rec is not None and rec.status == "error" and rec.error_type == "server_error" and rec.error_message == "boom"


def test_malformed_chunk_is_flagged_and_usage_after_it_still_counts(fixtures_dir: Path) -> None:
    good = _jsonl_stream(fixtures_dir / "vercel-ai_v4flash_deepseek-text.chunks.jsonl")
    stream = b'data: {"choices":[{"delta":{"content":"x"\n\n' + good
    _, meter = _run(_body(stream=True), stream, split=50)
    rec = meter.record
    assert rec is not None and rec.status == "completed" and rec.error_type == "malformed_chunk"
    assert rec.completion_tokens == _final_usage(fixtures_dir / "vercel-ai_v4flash_deepseek-text.chunks.jsonl")["completion_tokens"]


def test_usage_with_negative_counts_is_flagged_and_estimated() -> None:
    stream = (b'data: {"choices":[{"index":0,"delta":{"content":"hello"},"finish_reason":"stop"}],'
              b'"usage":{"prompt_tokens":-5,"completion_tokens":1,"total_tokens":-4}}\n\ndata: [DONE]\n\n')
    _, meter = _run(_body(stream=True), stream, split=1 << 20)
    rec = meter.record
    assert rec is not None and rec.error_type == "invalid_usage" and rec.usage_estimated
    assert rec.usage_raw is not None and rec.usage_raw["prompt_tokens"] == -5
    assert rec.prompt_tokens is not None and rec.prompt_tokens > 0


@pytest.mark.parametrize("name", ["vercel-ai_v4flash_deepseek-text.nonstream.json", "neurouter_reasoner_nonstream.json"])
def test_non_streamed_body_after_keep_alive_blank_lines_records_exact_usage(fixtures_dir: Path, name: str) -> None:
    raw = (fixtures_dir / name).read_text()
    payload = json.loads(raw)
    body = payload.get("body", payload) if isinstance(payload.get("body"), dict) else payload
    wire = b"\n\n\n" + json.dumps(body).encode()
    _, meter = _run(_body(stream=False), wire, split=10, content_type="application/json")
    rec = meter.record
    assert rec is not None and rec.status == "completed", rec
    assert rec.prompt_cache_hit_tokens == body["usage"]["prompt_cache_hit_tokens"]
    assert rec.completion_tokens == body["usage"]["completion_tokens"]
    assert rec.model == body["model"] and rec.provider_request_id == body["id"]


def test_a_line_longer_than_the_limit_ends_metering_as_an_error_but_bytes_still_flow() -> None:
    meter = CallMeter(prepare_request("POST", CHAT, _body(stream=True)))
    meter._decoder = type(meter._decoder)(max_line_bytes=1024)  # a small limit for the test
    meter.response_started(200, "text/event-stream")
    huge = b"data: " + b"x" * 5000 + b"\n\n"
    out = meter.feed(huge) + meter.feed_eof()
    assert out == huge
    rec = meter.finish("eof")
    assert rec.status == "error" and rec.error_type == "line_too_long"


def test_finish_is_idempotent() -> None:
    meter = CallMeter(prepare_request("POST", CHAT, _body(stream=True)))
    first = meter.finish("cancelled")
    assert meter.finish("eof") is first
