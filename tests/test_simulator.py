"""The bundled simulator against real HTTP over loopback (httpx and the official openai SDK).

The simulator is the upstream every other test, the demo and the benchmarks trust, so
these tests hold it to the real API: chunk shapes are compared key by key with the
captures in shared/fixtures/deepseek, and every fault is checked on the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner

from collector.cli import main as cli_main
from collector.simulator import SIMULATOR_KEY, Outcome, Simulator
from collector.simulator_tokens import CACHE_UNIT, count_tokens, render_prompt, tokenize

KEY = "sk-test-simulator-0123456789"
OTHER_KEY = "sk-test-simulator-other-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SYSTEM = "You are a terse assistant for a cost dashboard. " * 30
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does caching save?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location", "days"],
        },
    },
}


_HTTP: list[httpx.Client] = []


@pytest.fixture(autouse=True, scope="module")
def _shared_http_client() -> Iterator[None]:
    # One client for the module: building an httpx.Client (its TLS context) costs ~20 ms.
    with httpx.Client(timeout=10) as client:
        _HTTP.append(client)
        yield
        _HTTP.clear()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(seed=0) as simulator:
        yield simulator


def _chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": stream, **extra}


def _post(sim: Simulator, body: Any, headers: dict[str, str] | None = None, path: str = "/chat/completions",
          auth: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {**(AUTH if auth is None else auth), "Content-Type": "application/json", **(headers or {})}
    return _HTTP[0].post(sim.base_url + path, content=content, headers=all_headers)


def _data(raw: bytes) -> list[str]:
    """The data field of every event, in order (LF framing)."""
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def _chunks(raw: bytes) -> list[dict[str, Any]]:
    data = _data(raw)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _shape(value: Any) -> Any:
    """Key order and value types, the values themselves left out."""
    if isinstance(value, dict):
        return [(k, _shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__


def _created(raw: bytes) -> int:
    """The ``created`` stamp of a stream, so a twin simulator can serve the same bytes."""
    return int(json.loads(_data(raw.replace(b"\r\n", b"\n"))[0])["created"])


def _capture(fixtures_dir: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (fixtures_dir / name).read_text().splitlines() if line.strip()]


def _first(chunks: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(c for c in chunks if c["choices"] and c["choices"][0]["delta"].get(key))


# -- the wire shape, against the captures ---------------------------------------------------------


def test_text_stream_with_include_usage_has_the_capture_shape_chunk_by_chunk(sim: Simulator, fixtures_dir: Path) -> None:
    response = _post(sim, _chat(stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    ours = _chunks(response.content)
    theirs = _capture(fixtures_dir, "vercel-ai_v4flash_deepseek-text.chunks.jsonl")
    assert _shape(ours[0]) == _shape(theirs[0])
    assert ours[0]["choices"][0]["delta"] == theirs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _shape(ours[1]) == _shape(theirs[1])
    assert _shape(ours[-1]) == _shape(theirs[-1])
    assert all(c["usage"] is None for c in ours[:-1])
    last = ours[-1]
    assert last["choices"][0]["delta"] == {"content": ""} and last["choices"][0]["finish_reason"] == "stop"
    assert UUID.match(last["id"]) and re.fullmatch(r"[0-9a-f]{32}", last["system_fingerprint"])
    assert {c["id"] for c in ours} == {last["id"]}
    assert response.content.endswith(b'}\n\ndata: [DONE]\n\n') and b"\r" not in response.content


def test_without_include_usage_only_the_last_chunk_has_a_usage_key_like_neurouter(
    sim: Simulator, fixtures_dir: Path
) -> None:
    ours = _chunks(_post(sim, _chat(tools=[WEATHER_TOOL])).content)
    theirs = _chunks((fixtures_dir / "neurouter_chat_stream_tool_calls.sse").read_bytes())
    assert all("usage" not in c for c in ours[:-1])
    assert ours[-1]["usage"]["prompt_tokens"] > 0
    assert _shape(ours[0]) == _shape(theirs[0])
    assert _shape(_first(ours, "tool_calls")) == _shape(_first(theirs, "tool_calls"))
    assert _shape(ours[-2]) == _shape(theirs[-2])  # an argument fragment
    assert _shape(ours[-1]) == _shape(theirs[-1])


def test_thinking_streams_reasoning_then_content_and_counts_reasoning_tokens(sim: Simulator, fixtures_dir: Path) -> None:
    body = _chat(thinking={"type": "enabled"}, stream_options={"include_usage": True})
    ours = _chunks(_post(sim, body).content)
    theirs = _capture(fixtures_dir, "vercel-ai_v4flash_deepseek-reasoning.chunks.jsonl")
    assert ours[0]["choices"][0]["delta"] == theirs[0]["choices"][0]["delta"]
    assert _shape(_first(ours, "reasoning_content")) == _shape(_first(theirs, "reasoning_content"))
    assert _shape(_first(ours, "content")) == _shape(_first(theirs, "content"))
    assert _shape(ours[-1]) == _shape(theirs[-1])
    deltas = [c["choices"][0]["delta"] for c in ours[1:-1]]
    kinds = ["r" if d.get("reasoning_content") else "c" for d in deltas]
    assert kinds == sorted(kinds, reverse=True) and "r" in kinds and "c" in kinds  # all reasoning, then all content
    usage = ours[-1]["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == kinds.count("r")
    assert usage["completion_tokens"] == len(deltas)  # one token per chunk, reasoning included
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("model", "extra", "response_model", "thinking"),
    [
        ("deepseek-chat", {}, "deepseek-v4-flash", False),
        ("deepseek-reasoner", {}, "deepseek-v4-flash", True),
        ("deepseek-v4-pro", {"reasoning_effort": "high"}, "deepseek-v4-pro", True),
        ("deepseek-flash", {}, "deepseek-flash", False),
    ],
)
def test_model_names_map_like_the_api_and_thinking_follows_the_request(
    sim: Simulator, model: str, extra: dict[str, Any], response_model: str, thinking: bool
) -> None:
    response = _post(sim, {"model": model, "messages": MESSAGES, **extra})
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == response_model
    message = body["choices"][0]["message"]
    assert ("reasoning_content" in message) is thinking
    assert ("completion_tokens_details" in body["usage"]) is thinking
    served = sim.calls[-1]
    assert (served.requested_model, served.response_model, served.thinking) == (model, response_model, thinking)


def test_non_streamed_body_has_the_capture_shape_and_the_same_usage_as_the_stream(
    sim: Simulator, fixtures_dir: Path
) -> None:
    body = _post(sim, _chat(stream=False)).json()
    theirs = json.loads((fixtures_dir / "vercel-ai_v4flash_deepseek-text.nonstream.json").read_text())
    assert _shape(body) == _shape(theirs)
    streamed = _chunks(_post(sim, _chat(), auth={"Authorization": f"Bearer {OTHER_KEY}"}).content)
    assert body["choices"][0]["message"]["content"] == "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed)
    assert body["usage"] == streamed[-1]["usage"]  # a fresh key: no cache hit on either


def test_openai_sdk_reads_reasoning_and_usage_from_a_thinking_stream(sim: Simulator) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0)
    stream = client.chat.completions.create(
        model="deepseek-v4-flash", messages=MESSAGES, stream=True, reasoning_effort="high",  # type: ignore[arg-type]
        extra_body={"thinking": {"type": "enabled"}}, extra_headers={"X-Simulator-Reasoning-Tokens": "7",
                                                                     "X-Simulator-Output-Tokens": "5"},
    )
    chunks = list(stream)
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert count_tokens(reasoning) == 7 and count_tokens(content) == 5
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 7


# -- tool calls, lengths --------------------------------------------------------------------------


def test_streamed_tool_call_fragments_reassemble_into_the_arguments_the_schema_asks_for(sim: Simulator) -> None:
    chunks = _chunks(_post(sim, _chat(tools=[WEATHER_TOOL])).content)
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    head = calls[0]
    assert head["id"].startswith("call_00_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(tc) == {"index", "function"} and tc["index"] == 0 for tc in calls[1:])
    arguments = json.loads("".join(tc["function"]["arguments"] for tc in calls))
    assert set(arguments) == {"location", "days"} and isinstance(arguments["days"], int)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == len(tokenize("get_weather")) + len(calls) - 1


def test_sdk_non_streamed_tool_call_and_no_call_once_the_tool_answered(sim: Simulator) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0)
    first = client.chat.completions.create(model="deepseek-v4-flash", messages=MESSAGES, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments)  # type: ignore[union-attr]
    history = [*MESSAGES, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    second = client.chat.completions.create(model="deepseek-v4-flash", messages=history, tools=[WEATHER_TOOL])  # type: ignore[arg-type, list-item]
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.content


def test_max_tokens_cuts_reasoning_and_answer_and_finishes_with_length(sim: Simulator) -> None:
    chunks = _chunks(_post(sim, _chat(model="deepseek-reasoner", max_tokens=9),
                           {"X-Simulator-Reasoning-Tokens": "6", "X-Simulator-Output-Tokens": "50"}).content)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 9 and usage["completion_tokens_details"]["reasoning_tokens"] == 6


def test_output_length_is_deterministic_per_conversation_and_overridable(sim: Simulator) -> None:
    a = _post(sim, _chat(stream=False)).json()
    b = _post(sim, _chat(stream=False)).json()
    other = _post(sim, {**_chat(stream=False), "messages": [{"role": "user", "content": "Something else"}]}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["choices"][0]["message"]["content"] != other["choices"][0]["message"]["content"]
    fixed = _post(sim, _chat(stream=False), {"X-Simulator-Output-Tokens": "13"}).json()
    assert fixed["usage"]["completion_tokens"] == 13 == count_tokens(fixed["choices"][0]["message"]["content"])


# -- the context cache ----------------------------------------------------------------------------


def test_tokenizer_is_lossless_and_about_four_characters_a_token() -> None:
    text = "Hello, world!\n\n  naïve 東京 cache_hit=0.0028\t"
    assert "".join(tokenize(text)) == text
    assert tokenize("Hello, world") == ["Hell", "o", ",", " worl", "d"]
    assert count_tokens("x" * 400) == 100


def test_cache_hits_grow_in_64_token_steps_as_the_shared_prefix_grows(sim: Simulator) -> None:
    def usage(messages: list[dict[str, str]], key: str = KEY) -> dict[str, Any]:
        body = _post(sim, {"model": "deepseek-v4-flash", "messages": messages}, auth={"Authorization": f"Bearer {key}"}).json()
        return body["usage"]  # type: ignore[no-any-return]

    system = {"role": "system", "content": SYSTEM}
    first = usage([system, {"role": "user", "content": "one"}])
    assert first["prompt_cache_hit_tokens"] == 0 and first["prompt_cache_miss_tokens"] == first["prompt_tokens"]
    shared = len(render_prompt([("system", SYSTEM)])) - 1  # the system turn, without the closing <|assistant|>
    second = usage([system, {"role": "user", "content": "two"}])
    assert second["prompt_cache_hit_tokens"] == shared // CACHE_UNIT * CACHE_UNIT > 0
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_cache_hit_tokens"]
    assert second["prompt_cache_hit_tokens"] + second["prompt_cache_miss_tokens"] == second["prompt_tokens"]
    # A conversation that goes on shares everything before the new turn: more hits, still whole blocks.
    long_turn = {"role": "user", "content": "and a longer question about cache pricing " * 10}
    usage([system, long_turn])
    third = usage([system, long_turn, {"role": "assistant", "content": "ok"}])
    assert third["prompt_cache_hit_tokens"] > second["prompt_cache_hit_tokens"]
    assert third["prompt_cache_hit_tokens"] % CACHE_UNIT == 0
    assert usage([system, {"role": "user", "content": "two"}], key=OTHER_KEY)["prompt_cache_hit_tokens"] == 0
    sim.reset()
    assert usage([system, {"role": "user", "content": "two"}])["prompt_cache_hit_tokens"] == 0


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"}])
def test_missing_or_empty_bearer_key_is_deepseeks_401(sim: Simulator, auth: dict[str, str]) -> None:
    response = _post(sim, _chat(), auth=auth)
    assert response.status_code == 401
    assert response.json() == {"error": {"message": "Authentication Fails, Your api key: ****xxxx is invalid",
                                         "type": "authentication_error", "param": None, "code": "invalid_request_error"}}
    assert sim.wait_for_calls(1, finished=True)[0].outcome == Outcome.ERROR


def test_unknown_model_and_bad_json_are_400s_in_deepseeks_envelope(sim: Simulator, fixtures_dir: Path) -> None:
    response = _post(sim, {**_chat(), "model": "gpt-4o"})
    assert response.status_code == 400
    assert response.json() == json.loads((fixtures_dir / "neurouter_error_model_not_exist.json").read_text())
    broken = _post(sim, b'{"model": "deepseek-v4-flash", ')
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert error["message"].startswith("Invalid Format") and error["type"] == "invalid_request_error"
    bad_header = _post(sim, _chat(), {"X-Simulator-Fault": "explode"})
    assert bad_header.status_code == 400 and "X-Simulator-Fault" in bad_header.json()["error"]["message"]
    assert [c.usage for c in sim.calls] == [None, None, None]


@pytest.mark.parametrize(("status", "message"), [(402, "Insufficient Balance"), (422, "Invalid Parameters"),
                                                 (429, "concurrency limit"), (500, "Server Error"),
                                                 (503, "Server Overloaded")])
def test_status_faults_answer_before_the_stream_with_the_error_envelope(sim: Simulator, status: int, message: str) -> None:
    response = _post(sim, _chat(), {"X-Simulator-Fault": str(status)})
    assert response.status_code == status and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]
    served = sim.wait_for_calls(1, finished=True)[0]
    assert (served.status, served.outcome, served.fault, served.usage, served.billed_usage) == (
        status, Outcome.ERROR, str(status), None, None)


def test_disconnect_cuts_the_connection_after_n_chunks_without_usage_or_done(sim: Simulator) -> None:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", sim.base_url + "/chat/completions", json=_chat(stream_options={"include_usage": True}),
                          headers={**AUTH, "X-Simulator-Fault": "disconnect", "X-Simulator-Fault-After": "4"}) as response:
            for piece in response.iter_raw():
                received += piece
    data = _data(received)
    assert len(data) == 4 and "[DONE]" not in data and all(json.loads(d)["usage"] is None for d in data)
    served = sim.wait_for_calls(1, finished=True)[0]
    assert served.outcome == Outcome.DISCONNECTED and served.chunks_sent == 4 and served.usage is None
    assert served.billed_usage is not None and served.billed_usage["completion_tokens"] == 3  # the role chunk has none
    assert served.client_closed_at is None


def test_disconnect_never_reaches_the_usage_chunk_even_when_asked_to_cut_later(sim: Simulator) -> None:
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("POST", sim.base_url + "/chat/completions", json=_chat(),
                          headers={**AUTH, "X-Simulator-Fault": "disconnect", "X-Simulator-Fault-After": "100000",
                                   "X-Simulator-Output-Tokens": "3"}) as response:
            for piece in response.iter_raw():
                received += piece
    assert len(_data(received)) == 4 and b"usage" not in received  # role + 3 tokens, never the last chunk


def test_stall_keeps_the_connection_open_and_silent_until_the_client_gives_up(sim: Simulator) -> None:
    received = []
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout):
            with client.stream("POST", sim.base_url + "/chat/completions", json=_chat(),
                               headers={**AUTH, "X-Simulator-Fault": "stall", "X-Simulator-Fault-After": "3"}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        received.append(line)
    assert len(received) == 3
    served = sim.wait_for_calls(1, finished=True, timeout=5)[0]
    assert served.outcome == Outcome.STALLED and served.chunks_sent == 3
    assert served.client_closed_at is not None and served.client_closed_at >= served.started_at


def test_a_stalled_stream_is_visible_in_flight_and_cut_when_the_simulator_stops() -> None:
    sim = Simulator(seed=0).start()
    try:
        with httpx.Client(timeout=5) as client:
            with client.stream("POST", sim.base_url + "/chat/completions", json=_chat(),
                               headers={**AUTH, "X-Simulator-Fault": "stall", "X-Simulator-Fault-After": "2"}) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                deadline = time.monotonic() + 5
                while sim.calls[0].outcome != Outcome.STALLED and time.monotonic() < deadline:
                    time.sleep(0.005)
                in_flight = sim.calls[0]
                assert in_flight.outcome == Outcome.STALLED and in_flight.finished_at is None and sim.in_flight == 1
                sim.stop()
                with pytest.raises(httpx.RemoteProtocolError):
                    list(lines)
    finally:
        sim.stop()
    assert sim.calls[0].outcome == Outcome.STALLED and sim.calls[0].finished_at is not None


def test_malformed_fault_sends_one_broken_chunk_and_carries_on_to_usage(sim: Simulator) -> None:
    response = _post(sim, _chat(), {"X-Simulator-Fault": "malformed", "X-Simulator-Fault-After": "3"})
    data = _data(response.content)
    broken = []
    for index, item in enumerate(data[:-1]):
        try:
            json.loads(item)
        except ValueError:
            broken.append(index)
    assert broken == [3] and data[-1] == "[DONE]" and "usage" in json.loads(data[-2])
    assert sim.wait_for_calls(1, finished=True)[0].outcome == Outcome.COMPLETED


def test_error_event_replaces_the_rest_of_the_stream(sim: Simulator) -> None:
    response = _post(sim, _chat(), {"X-Simulator-Fault": "error-event", "X-Simulator-Fault-After": "2"})
    data = _data(response.content)
    assert len(data) == 3 and "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    served = sim.wait_for_calls(1, finished=True)[0]
    assert served.outcome == Outcome.ERROR and served.usage is None and served.finish_reason is None


# -- pacing and framing ---------------------------------------------------------------------------


def test_queue_ms_sends_keep_alive_comments_before_the_first_chunk(sim: Simulator) -> None:
    raw = _post(sim, _chat(), {"X-Simulator-Queue-Ms": "120"}).content
    head, _, rest = raw.partition(b"data: ")
    assert head == b": keep-alive\n\n" * 3  # one per started 50 ms, however the machine is loaded
    assert b"keep-alive" not in rest
    assert sim.wait_for_calls(1, finished=True)[0].keepalives_sent == 3


def test_non_streamed_queue_ms_sends_blank_lines_before_the_json_body(sim: Simulator) -> None:
    response = _post(sim, _chat(stream=False), {"X-Simulator-Queue-Ms": "100"})
    blank, body = re.match(rb"(\n*)(.*)", response.content, re.S).groups()  # type: ignore[union-attr]
    assert blank and body.startswith(b"{")
    assert json.loads(body)["usage"]["prompt_tokens"] > 0
    assert openai.OpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0).chat.completions.create(
        model="deepseek-v4-flash", messages=MESSAGES, extra_headers={"X-Simulator-Queue-Ms": "60"}).usage


def test_crlf_framing_ends_every_line_with_crlf(sim: Simulator) -> None:
    raw = _post(sim, _chat(), {"X-Simulator-Framing": "crlf", "X-Simulator-Queue-Ms": "1"}).content
    assert raw.count(b"\n") == raw.count(b"\r\n") > 0
    assert raw.startswith(b": keep-alive\r\n\r\ndata: {") and raw.endswith(b"data: [DONE]\r\n\r\n")
    with Simulator(seed=0, created=_created(raw)) as twin:
        lf = _post(twin, _chat()).content
    assert raw.replace(b"\r\n", b"\n").replace(b": keep-alive\n\n", b"") == lf


def test_openai_style_puts_usage_on_a_separate_empty_choices_chunk_only_when_asked(sim: Simulator) -> None:
    style = {"X-Simulator-Style": "openai"}
    asked = _chunks(_post(sim, _chat(stream_options={"include_usage": True}), style).content)
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] > 0
    assert asked[-2]["choices"][0]["finish_reason"] == "stop" and asked[-2]["usage"] is None
    assert all(c["usage"] is None for c in asked[:-1])
    silent = _chunks(_post(sim, _chat(), style).content)
    assert all("usage" not in c for c in silent) and silent[-1]["choices"][0]["finish_reason"] == "stop"
    assert sim.calls[-1].usage is None and sim.calls[-1].billed_usage is not None


def test_chunk_bytes_splits_the_writes_without_changing_the_bytes(sim: Simulator) -> None:
    whole = _post(sim, _chat()).content
    pieces: list[bytes] = []
    with Simulator(seed=0, created=_created(whole)) as twin, httpx.stream(
        "POST", twin.base_url + "/chat/completions", json=_chat(),
                      headers={**AUTH, "X-Simulator-Chunk-Bytes": "7"}) as response:
        pieces.extend(response.iter_raw())
    assert b"".join(pieces) == whole
    assert max(len(p) for p in pieces) <= 7 and len(pieces) >= len(whole) // 7


# -- Anthropic format -----------------------------------------------------------------------------


def _anthropic(model: str = "claude-sonnet-4-5", stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 1024, "stream": stream, "system": SYSTEM,
            "messages": [{"role": "user", "content": "What does caching save?"}], **extra}


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line)
        if lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_anthropic_stream_sends_the_standard_events_with_cumulative_usage(sim: Simulator) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    first = _events(_post(sim, _anthropic(thinking={"type": "enabled", "budget_tokens": 1024}),
                          path="/anthropic/v1/messages", auth=headers).content)
    names = [name for name, _ in first]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    starts = [data["content_block"]["type"] for name, data in first if name == "content_block_start"]
    assert starts == ["thinking", "text"]
    message = first[0][1]["message"]
    assert message["model"] == "deepseek-v4-flash" and message["usage"]["output_tokens"] == 0
    deltas = [data["delta"] for name, data in first if name == "content_block_delta"]
    assert first[-2][1]["usage"]["output_tokens"] == len(deltas)
    assert first[-2][1]["delta"]["stop_reason"] == "end_turn"
    second = _events(_post(sim, _anthropic(), path="/anthropic/v1/messages", auth=headers).content)
    usage = second[0][1]["message"]["usage"]
    assert usage["cache_read_input_tokens"] > 0 and usage["cache_read_input_tokens"] % CACHE_UNIT == 0
    assert sim.calls[-1].usage == {**usage, "output_tokens": second[-2][1]["usage"]["output_tokens"]}
    assert sim.calls[-1].endpoint == "anthropic.messages"


def test_anthropic_models_map_opus_to_pro_and_refuse_non_claude_names(sim: Simulator) -> None:
    body = _post(sim, _anthropic("claude-opus-4-1", stream=False), path="/anthropic/v1/messages").json()
    assert body["model"] == "deepseek-v4-pro" and body["type"] == "message" and body["stop_reason"] == "end_turn"
    assert body["content"][0]["type"] == "text" and body["usage"]["output_tokens"] > 0
    refused = _post(sim, _anthropic("gpt-4o"), path="/anthropic/v1/messages")
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    unauthenticated = _post(sim, _anthropic(), path="/anthropic/v1/messages", auth={})
    assert unauthenticated.status_code == 401 and unauthenticated.json()["error"]["type"] == "authentication_error"


def test_anthropic_status_faults_use_anthropics_error_envelope(sim: Simulator) -> None:
    response = _post(sim, _anthropic(), {"X-Simulator-Fault": "429"}, path="/anthropic/v1/messages")
    assert response.status_code == 429
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "rate_limit_error"


def test_anthropic_tool_use_streams_input_json_that_parses(sim: Simulator) -> None:
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["function"]["parameters"]}  # type: ignore[index]
    events = _events(_post(sim, _anthropic(tools=[tool]), path="/anthropic/v1/messages").content)
    partial = "".join(d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"
                      and d["delta"]["type"] == "input_json_delta")
    assert set(json.loads(partial)) == {"location", "days"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


# -- cancellation, the log ------------------------------------------------------------------------


def test_client_closing_mid_stream_is_noticed_and_recorded(sim: Simulator) -> None:
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", sim.base_url + "/chat/completions", json=_chat(),
                           headers={**AUTH, "X-Simulator-Output-Tokens": "2000", "X-Simulator-Chunk-Delay-Ms": "5"}) as response:
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    # Before the break: dropping the iterator already closes the connection.
                    closed_at = time.monotonic()
                    break
    served = sim.wait_for_calls(1, finished=True, timeout=5)[0]
    assert served.outcome == Outcome.CLIENT_CLOSED
    assert served.client_closed_at is not None and served.client_closed_at >= closed_at
    assert served.usage is None and 0 < served.chunks_sent < 2002
    assert served.billed_usage is not None and served.billed_usage["completion_tokens"] < 2000


def test_log_keeps_what_was_served_but_never_the_key(sim: Simulator) -> None:
    _post(sim, _chat(stream_options={"include_usage": True}), {"X-Custom": "kept"})
    served = sim.wait_for_calls(1, finished=True)[0]
    assert KEY not in repr(served) and "authorization" not in {k.lower() for k in served.headers}
    assert served.headers["X-Custom"] == "kept" and len(served.key_hash or "") == 12
    assert (served.path, served.endpoint, served.stream, served.include_usage, served.status) == (
        "/chat/completions", "chat.completions", True, True, 200)
    assert served.usage == served.billed_usage and served.finish_reason == "stop"
    assert served.started_at <= served.finished_at  # type: ignore[operator]
    with pytest.raises(TimeoutError):
        sim.wait_for_calls(2, timeout=0.05)
    sim.reset()
    assert sim.calls == []


def test_log_limit_keeps_the_most_recent_calls_but_counts_them_all() -> None:
    with Simulator(seed=0, log_limit=2) as sim:
        for content in ("one", "two", "three"):
            _post(sim, {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": content}]})
        kept = sim.wait_for_calls(3, finished=True)
    assert len(kept) == 2 and all(c.outcome == Outcome.COMPLETED for c in kept)
    assert kept[0].started_at < kept[1].started_at


def test_same_seed_serves_identical_bytes_and_another_seed_does_not() -> None:
    def session(seed: int) -> list[bytes]:
        with Simulator(seed=seed, created=1_786_782_776) as sim:
            return [
                _post(sim, _chat(stream_options={"include_usage": True})).content,
                _post(sim, _chat(thinking={"type": "enabled"}, tools=[WEATHER_TOOL])).content,
                _post(sim, _chat(stream=False)).content,
                _post(sim, _anthropic(), path="/anthropic/v1/messages").content,
            ]

    first = session(5)
    assert session(5) == first
    assert all(a != b for a, b in zip(session(6), first, strict=True))


def test_fault_rate_draws_a_seeded_mix_of_faults() -> None:
    def outcomes() -> list[str | None]:
        with Simulator(seed=1, fault_rate=1.0) as sim:
            for _ in range(24):
                try:
                    _post(sim, _chat(), {"X-Simulator-Output-Tokens": "4"})
                except httpx.RemoteProtocolError:
                    pass
            return [c.fault for c in sim.wait_for_calls(24, finished=True)]

    drawn = outcomes()
    assert drawn == outcomes()
    assert set(drawn) == {"429", "503", "disconnect"}
    with Simulator(seed=1, fault_rate=0.0) as calm:
        assert _post(calm, _chat()).status_code == 200 and calm.wait_for_calls(1, finished=True)[0].fault is None


def test_models_are_listed_on_both_paths_and_extra_routes_can_be_added() -> None:
    async def ping(request: web.Request) -> web.Response:
        sim = request.app[SIMULATOR_KEY]
        return web.json_response({"seed": sim.seed, "key": sim.api_key_hash(request)})

    sim = Simulator(seed=9)
    sim.add_route("GET", "/ping", ping)
    with sim:
        for path in ("/models", "/v1/models"):
            listed = httpx.get(sim.base_url + path, headers=AUTH).json()
            assert {m["id"] for m in listed["data"]} >= {"deepseek-v4-flash", "deepseek-v4-pro", "deepseek-flash"}
        assert httpx.get(sim.base_url + "/models").status_code == 401
        assert httpx.get(sim.base_url + "/ping", headers=AUTH).json() == {
            "seed": 9, "key": hashlib.sha256(KEY.encode()).hexdigest()[:12]}
        assert httpx.get(sim.base_url + "/ping").json() == {"seed": 9, "key": None}
    with pytest.raises(RuntimeError):
        with Simulator() as running:
            running.add_route("GET", "/late", ping)


def test_many_concurrent_streams_all_complete_with_their_own_usage(sim: Simulator) -> None:
    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as client:
            async def one(i: int) -> dict[str, Any]:
                body = _chat(messages=[{"role": "user", "content": f"question {i}"}])
                response = await client.post(sim.base_url + "/chat/completions", json=body,
                                             headers={**AUTH, "X-Simulator-Chunk-Delay-Ms": "1", "X-Simulator-Output-Tokens": "30"})
                return _chunks(response.content)[-1]

            return await asyncio.gather(*(one(i) for i in range(100)))

    lasts = asyncio.run(run())
    served = {c.request_id: c for c in sim.wait_for_calls(100, finished=True)}
    assert len(served) == 100
    for last in lasts:
        assert served[last["id"]].usage == last["usage"] and served[last["id"]].outcome == Outcome.COMPLETED


# -- dsmeter simulate -------------------------------------------------------------------------------


def test_simulate_command_prints_its_url_serves_and_stops_cleanly_on_sigint() -> None:
    process = subprocess.Popen([sys.executable, "-m", "collector.cli", "simulate", "--port", "0", "--seed", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        url = re.search(r"http://127\.0\.0\.1:(\d+)", process.stdout.readline())
        assert url and url.group(1) != "0"
        response = httpx.post(url.group(0) + "/v1/chat/completions", json=_chat(stream=False), headers=AUTH, timeout=10)
        assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] > 0
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr


def test_simulate_on_a_busy_port_is_a_one_line_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli_main, ["simulate", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("dsmeter: error: cannot listen on 127.0.0.1:") and "Traceback" not in result.output
