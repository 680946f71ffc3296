"""The metering proxy against the simulator on loopback, driven by the official openai SDK,
raw httpx, curl and Node's fetch.

Three simulators with the same seed serve the same bytes for the same calls: one is called
directly (what an unmetered client sees), one through ``collector.metered_client`` (the
record the httpx transport makes), one through the proxy. For every scenario the client of
the proxy must see what the direct client sees, and the proxy's record must be the
transport's record, field by field (ids, timestamps and timings apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

import collector
from collector.fingerprint import key_fingerprint
from collector.record import Status, UsageRecord
from collector.simulator import Simulator
from proxy_support import RecordSink, StartProxy

KEY = "sk-test-proxy-0123456789abcdef"
MESSAGES = [
    {"role": "system", "content": "You are terse. " * 50},
    {"role": "user", "content": "Say something about caching."},
]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
]
# Every stream shape the metered client handles.
SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {},
    "thinking": {"reasoning_effort": "high", "extra_body": {"thinking": {"type": "enabled"}}},
    "tools": {"tools": TOOLS},
    "asked_for_usage": {"stream_options": {"include_usage": True}},
    "openai_style_usage_chunk": {"extra_headers": {"X-Simulator-Style": "openai"}},
    "openai_style_usage_chunk_asked_for": {
        "stream_options": {"include_usage": True},
        "extra_headers": {"X-Simulator-Style": "openai"},
    },
    "crlf_framing": {"extra_headers": {"X-Simulator-Framing": "crlf"}},
    "keep_alive_while_queued": {"extra_headers": {"X-Simulator-Queue-Ms": "120"}},
    "split_writes": {"extra_headers": {"X-Simulator-Chunk-Bytes": "7"}},
    "legacy_model_name": {"model": "deepseek-reasoner"},
    "pro": {"model": "deepseek-v4-pro"},
    "error_event_mid_stream": {"extra_headers": {"X-Simulator-Fault": "error-event", "X-Simulator-Fault-After": "4"}},
}
FAILING: dict[str, dict[str, Any]] = {
    "http_429": {"extra_headers": {"X-Simulator-Fault": "429"}},
    "http_500": {"extra_headers": {"X-Simulator-Fault": "500"}},
    "http_503": {"extra_headers": {"X-Simulator-Fault": "503"}},
    "http_402": {"extra_headers": {"X-Simulator-Fault": "402"}},
    "http_401_bad_key": {"extra_headers": {"Authorization": "Bearer sk-wrong"}},
    "disconnect_mid_stream": {"extra_headers": {"X-Simulator-Fault": "disconnect", "X-Simulator-Fault-After": "5"}},
}
# Per-call fields that differ between any two calls; everything else must be equal.
VOLATILE = {"request_id", "started_at", "finished_at", "ttft_ms", "first_content_ms", "duration_ms", "upstream"}


async def _echo(request: web.Request) -> web.Response:
    """An extra simulator route that answers with the request as it arrived upstream."""
    return web.json_response({"host": request.host, "headers": [[k, v] for k, v in request.headers.items()],
                              "body": (await request.read()).decode()})


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]  # how the simulator logs the key it got


def _comparable(record: UsageRecord) -> dict[str, Any]:
    return {k: v for k, v in record.to_dict().items() if k not in VOLATILE}


@pytest.fixture
def sims() -> Iterator[tuple[Simulator, Simulator, Simulator]]:
    # A frozen `created`: chunks must not differ because a second ticked between two calls.
    def make() -> Simulator:
        sim = Simulator(seed=7, created=1_780_000_000)
        sim.add_route("GET", "/echo", _echo)
        sim.add_route("POST", "/echo", _echo)
        return sim

    with make() as direct, make() as via_client, make() as via_proxy:
        yield direct, via_client, via_proxy


def _sdk(base_url: str, http_client: httpx.Client | None = None, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=base_url, http_client=http_client, max_retries=0)


def _stream_chunks(client: openai.OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True, **kwargs}
    with client.chat.completions.create(**args) as stream:
        return [chunk.model_dump() for chunk in stream]


def _outcome(client: openai.OpenAI, **kwargs: Any) -> Any:
    """What the caller sees: the chunks, or the class and status of what was raised."""
    try:
        return _stream_chunks(client, **kwargs)
    except (openai.APIError, httpx.HTTPError, ValueError) as error:  # ValueError: the SDK's json.loads
        return (type(error).__name__, getattr(error, "status_code", None), getattr(error, "body", None))


def _raw(base_url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, the headers a client acts on, and the exact body bytes."""
    with httpx.Client(timeout=10) as client:
        response = client.post(base_url + path, json=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        kept = {k: response.headers[k] for k in ("content-type", "content-encoding") if k in response.headers}
        return response.status_code, kept, response.content


# -- every scenario: same bytes for the client, same row in the ledger ----------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS) + sorted(FAILING))
def test_sdk_through_proxy_sees_upstream_output_and_records_the_transport_row(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy, scenario: str
) -> None:
    direct_sim, client_sim, proxy_sim = sims
    kwargs = dict(SCENARIOS[scenario] if scenario in SCENARIOS else FAILING[scenario])
    proxy, proxy_sink = start_proxy(proxy_sim.base_url)
    client_sink = RecordSink()
    metered = _sdk(client_sim.base_url, collector.metered_client(sink=client_sink, tags={"team": "t1"}))
    through_proxy = _sdk(proxy.base_url, httpx.Client(headers={"X-Dsmeter-Tags": "team=t1"}))
    # Twice each: the second call of a repeated prompt earns cache hits, which must be split the same way.
    for _ in range(2):
        expected = _outcome(_sdk(direct_sim.base_url), **kwargs)
        assert _outcome(metered, **kwargs) == expected
        assert _outcome(through_proxy, **kwargs) == expected
    via_client, via_proxy = client_sink.records, proxy_sink.wait(2)
    assert len(via_client) == len(via_proxy) == 2
    for a, b in zip(via_client, via_proxy, strict=True):
        assert _comparable(b) == _comparable(a)
    assert via_proxy[0].upstream == proxy_sim.base_url.rstrip("/")
    if scenario in SCENARIOS and not scenario.endswith(("chunk", "mid_stream")):
        for record, served in zip(via_proxy, proxy_sim.calls, strict=True):
            assert record.status == Status.COMPLETED.value and not record.usage_estimated
            assert record.completion_tokens == served.usage["completion_tokens"]
            assert record.prompt_cache_hit_tokens == served.usage["prompt_cache_hit_tokens"]


@pytest.mark.parametrize(
    "scenario", ["plain", "thinking", "tools", "asked_for_usage", "crlf_framing", "keep_alive_while_queued",
                 "split_writes", "openai_style_usage_chunk_asked_for", "http_429", "http_401_bad_key"]
)
def test_client_receives_the_upstream_bytes_status_and_headers(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy, scenario: str
) -> None:
    direct_sim, _, proxy_sim = sims
    kwargs = dict(SCENARIOS[scenario] if scenario in SCENARIOS else FAILING[scenario])
    headers = kwargs.pop("extra_headers", {})
    # The caller asks for usage itself, so the proxy has nothing to add: it must be byte-transparent.
    body = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}, **kwargs.pop("extra_body", {}), **kwargs}
    proxy, _ = start_proxy(proxy_sim.base_url)
    got = _raw(proxy.base_url, "/chat/completions", body, headers)
    assert got == _raw(direct_sim.base_url, "/chat/completions", body, headers)
    assert got[2]


def test_without_asking_for_usage_the_client_sees_only_the_null_usage_fields_injection_adds(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    # The proxy asks the upstream for usage on the caller's behalf; DeepSeek then writes
    # "usage":null on every chunk before the last (as its API documents). That is the only change.
    direct_sim, _, proxy_sim = sims
    proxy, sink = start_proxy(proxy_sim.base_url)
    body = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}
    status, headers, got = _raw(proxy.base_url, "/chat/completions", body)
    expected = _raw(direct_sim.base_url, "/chat/completions", body)
    assert b',"usage":null}' in got and b',"usage":null}' not in expected[2]
    assert (status, headers, got.replace(b',"usage":null}', b"}")) == expected
    assert sink.wait(1)[0].completion_tokens == proxy_sim.calls[0].usage["completion_tokens"]


def test_malformed_chunk_makes_the_same_row_through_proxy_and_transport(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    # The SDK gives up at the broken chunk, so this one is read with plain httpx to the end.
    direct_sim, client_sim, proxy_sim = sims
    headers = {"X-Simulator-Fault": "malformed", "X-Simulator-Fault-After": "4"}
    body = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}
    proxy, proxy_sink = start_proxy(proxy_sim.base_url)
    client_sink = RecordSink()
    with collector.metered_client(sink=client_sink) as metered:
        via_client = metered.post(client_sim.base_url + "/chat/completions", json=body,
                                  headers={"Authorization": f"Bearer {KEY}", **headers}).content
    status, _, via_proxy = _raw(proxy.base_url, "/chat/completions", body, headers)
    assert status == 200 and via_proxy == via_client
    assert via_proxy.replace(b',"usage":null}', b"}") == _raw(direct_sim.base_url, "/chat/completions", body, headers)[2]
    record = proxy_sink.wait(1)[0]
    assert record.error_type == "malformed_chunk"
    assert _comparable(record) == _comparable(client_sink.records[0])


def test_injected_usage_chunk_is_cut_but_every_other_byte_arrives(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    direct_sim, _, proxy_sim = sims
    proxy, sink = start_proxy(proxy_sim.base_url)
    body = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}
    openai_style = {"X-Simulator-Style": "openai"}
    status, _, got = _raw(proxy.base_url, "/v1/chat/completions", body, openai_style)
    _, _, direct = _raw(direct_sim.base_url, "/v1/chat/completions", body, openai_style)
    assert status == 200
    events = [e for e in got.split(b"\n\n") if e]
    assert not any(b'"choices":[]' in e for e in events), "the caller did not ask for usage"
    assert events[-1] == b"data: [DONE]"
    assert [json.loads(e[6:])["choices"] for e in events[:-1]] == [
        json.loads(e[6:])["choices"] for e in direct.split(b"\n\n") if e and e != b"data: [DONE]"
    ]
    record = sink.wait(1)[0]
    assert record.usage_estimated is False and record.completion_tokens == proxy_sim.calls[0].usage["completion_tokens"]


def test_non_streamed_call_is_forwarded_and_metered_from_the_body(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    direct_sim, client_sim, proxy_sim = sims
    proxy, proxy_sink = start_proxy(proxy_sim.base_url)
    client_sink = RecordSink()
    args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "extra_headers": {"X-Simulator-Queue-Ms": "100"}}
    expected = _sdk(direct_sim.base_url).chat.completions.create(**args).model_dump()
    via_client = _sdk(client_sim.base_url, collector.metered_client(sink=client_sink)).chat.completions.create(**args)
    via_proxy = _sdk(proxy.base_url).chat.completions.create(**args)
    assert via_proxy.model_dump() == via_client.model_dump() == expected
    record = proxy_sink.wait(1)[0]
    assert record.stream is False and record.status == "completed"
    assert _comparable(record) == _comparable(client_sink.records[0])
    body = {"model": "deepseek-v4-flash", "messages": MESSAGES}
    status, headers, raw = _raw(proxy.base_url, "/chat/completions", body)
    assert (status, headers, raw) == _raw(direct_sim.base_url, "/chat/completions", body)


def test_gap_timeout_is_a_timeout_row_like_the_transports_and_the_stream_ends_cleanly(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, client_sim, proxy_sim = sims
    stall = {"extra_headers": {"X-Simulator-Fault": "stall", "X-Simulator-Fault-After": "3"}}
    client_sink = RecordSink()
    http = collector.metered_client(sink=client_sink, timeout=httpx.Timeout(5.0, read=0.3))
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        _stream_chunks(_sdk(client_sim.base_url, http), **stall)
    proxy, proxy_sink = start_proxy(proxy_sim.base_url, read_timeout=0.3)
    started = time.monotonic()
    chunks = _stream_chunks(_sdk(proxy.base_url), **stall)  # a clean end of the stream, no exception
    assert 0.3 <= time.monotonic() - started < 3.0
    assert len(chunks) == 3
    record = proxy_sink.wait(1)[0]
    assert record.status == Status.TIMEOUT.value and record.usage_estimated
    assert _comparable(record) == _comparable(client_sink.records[0])


def test_timeout_before_any_byte_is_a_504_and_a_timeout_row(start_proxy: StartProxy) -> None:
    # An upstream that takes the connection (the kernel's backlog does) and never answers.
    with socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        proxy, sink = start_proxy(f"http://127.0.0.1:{black_hole.getsockname()[1]}", read_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            _stream_chunks(_sdk(proxy.base_url))
        assert time.monotonic() - started < 3.0
    assert caught.value.status_code == 504
    record = sink.wait(1)[0]
    assert record.status == Status.TIMEOUT.value and record.http_status is None
    assert record.error_type == "UpstreamTimeout"


def test_thinking_calls_get_the_longer_gap_timeout(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url, read_timeout=0.1, thinking_read_timeout=5.0)
    slow = {"X-Simulator-Chunk-Delay-Ms": "250", "X-Simulator-Output-Tokens": "2", "X-Simulator-Reasoning-Tokens": "2"}
    chunks = _stream_chunks(_sdk(proxy.base_url), extra_headers=slow, **SCENARIOS["thinking"])
    assert chunks
    assert sink.wait(1)[0].status == Status.COMPLETED.value
    _stream_chunks(_sdk(proxy.base_url), extra_headers=slow)
    assert sink.wait(2)[1].status == Status.TIMEOUT.value


def test_unreachable_upstream_is_a_502_and_an_error_row(start_proxy: StartProxy) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proxy, sink = start_proxy(dead, connect_timeout=1.0)
    with pytest.raises(openai.APIStatusError) as caught:
        _stream_chunks(_sdk(proxy.base_url))
    assert caught.value.status_code == 502
    record = sink.wait(1)[0]
    assert record.status == Status.ERROR.value and record.error_type == "UpstreamUnreachable"
    assert KEY not in json.dumps(caught.value.body)


# -- asyncio SDK ---------------------------------------------------------------------------


async def _astream_chunks(client: openai.AsyncOpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True, **kwargs}
    stream = await client.chat.completions.create(**args)
    return [chunk.model_dump() async for chunk in stream]


@pytest.mark.parametrize("scenario", ["plain", "thinking", "tools", "openai_style_usage_chunk", "crlf_framing"])
def test_async_sdk_through_proxy_sees_upstream_output_and_records_the_transport_row(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy, scenario: str
) -> None:
    direct_sim, client_sim, proxy_sim = sims
    kwargs = dict(SCENARIOS[scenario])
    proxy, proxy_sink = start_proxy(proxy_sim.base_url)
    client_sink = RecordSink()

    async def run() -> tuple[Any, Any, Any]:
        direct = openai.AsyncOpenAI(api_key=KEY, base_url=direct_sim.base_url, max_retries=0)
        metered = openai.AsyncOpenAI(api_key=KEY, base_url=client_sim.base_url, max_retries=0,
                                     http_client=collector.async_metered_client(sink=client_sink))
        via_proxy = openai.AsyncOpenAI(api_key=KEY, base_url=proxy.base_url + "/v1", max_retries=0)
        return (await _astream_chunks(direct, **kwargs), await _astream_chunks(metered, **kwargs),
                await _astream_chunks(via_proxy, **kwargs))

    expected, via_client, got = asyncio.run(run())
    assert got == via_client == expected
    assert _comparable(proxy_sink.wait(1)[0]) == _comparable(client_sink.records[0])


def test_many_async_streams_at_once_each_get_their_own_exact_row(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)

    async def run() -> list[list[dict[str, Any]]]:
        client = openai.AsyncOpenAI(api_key=KEY, base_url=proxy.base_url, max_retries=0)
        return await asyncio.gather(*[
            _astream_chunks(client, messages=[{"role": "user", "content": f"question {i}"}],
                            extra_headers={"X-Simulator-Chunk-Delay-Ms": "2"})
            for i in range(40)
        ])

    results = asyncio.run(run())
    records = sink.wait(40)
    assert len(records) == 40 and all(r.status == "completed" for r in records)
    by_id = {c.request_id: c.usage for c in sim.calls}
    for record in records:
        assert record.completion_tokens == by_id[record.provider_request_id]["completion_tokens"]
    assert sum(len(r) for r in results) == sum(r.chunk_count for r in records)


# -- cancel ----------------------------------------------------------------------------------


def test_client_hanging_up_closes_the_upstream_within_100_ms_and_is_a_cancelled_row(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    client = _sdk(proxy.base_url)
    stream = client.chat.completions.create(
        model="deepseek-v4-flash", messages=MESSAGES, stream=True,
        extra_headers={"X-Simulator-Output-Tokens": "2000", "X-Simulator-Chunk-Delay-Ms": "5"},
    )
    received = 0
    for received, _chunk in enumerate(stream, start=1):
        if received == 5:
            break
    closed_at = time.monotonic()
    stream.close()
    client.close()  # the SDK's pool would otherwise keep the socket; a hang-up is a closed socket
    record = sink.wait(1)[0]
    assert record.status == Status.CANCELLED.value and record.usage_estimated
    assert record.chunk_count >= received
    deadline = time.monotonic() + 2
    while sim.calls[0].client_closed_at is None and time.monotonic() < deadline:
        time.sleep(0.002)
    upstream_closed = sim.calls[0].client_closed_at
    assert upstream_closed is not None, "the simulator never saw the proxy hang up"
    assert upstream_closed - closed_at < 0.100
    assert sim.calls[0].outcome == "client_closed"


# -- attribution -----------------------------------------------------------------------------


def test_tags_header_user_and_key_fingerprint_attribute_the_call_and_the_tags_header_stays_here(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url, tags={"env": "prod", "team": "default"})
    _stream_chunks(
        _sdk(proxy.base_url), user="u-42",
        extra_headers={"X-Dsmeter-Tags": "team=search,feature=autocomplete"},
    )
    record = sink.wait(1)[0]
    assert record.tags == {"env": "prod", "team": "search", "feature": "autocomplete"}
    assert record.user == "u-42"
    assert record.key_fingerprint == key_fingerprint(KEY)
    assert sim.calls[0].key_hash == _key_hash(KEY)  # the key went upstream
    with httpx.Client() as client:
        echoed = client.post(proxy.base_url + "/echo", content=b"{}", headers={
            "Authorization": f"Bearer {KEY}", "X-Dsmeter-Tags": "team=search", "Connection": "keep-alive, X-Hop",
            "X-Hop": "1", "X-Custom": "kept"}).json()
    seen = {k.lower(): v for k, v in echoed["headers"]}
    assert "x-dsmeter-tags" not in seen and "x-hop" not in seen
    assert seen["authorization"] == f"Bearer {KEY}" and seen["x-custom"] == "kept"


def test_malformed_tags_header_is_a_400_and_nothing_is_forwarded(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    with pytest.raises(openai.BadRequestError) as caught:
        _stream_chunks(_sdk(proxy.base_url), extra_headers={"X-Dsmeter-Tags": "no-equals-sign"})
    assert "X-Dsmeter-Tags" in caught.value.message
    assert sim.calls == [] and sink.records == []


def test_api_key_reaches_no_row_log_metric_or_error_page(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, sim = sims
    caplog.set_level(logging.DEBUG)
    proxy, sink = start_proxy(sim.base_url, read_timeout=0.3)
    client = _sdk(proxy.base_url)
    _stream_chunks(client)
    for headers in ({"X-Simulator-Fault": "500"}, {"X-Simulator-Fault": "disconnect"},
                    {"X-Simulator-Fault": "stall", "X-Simulator-Fault-After": "2"}, {"X-Dsmeter-Tags": "bad"}):
        _outcome(client, extra_headers=headers)
    pages = [
        _raw_request(proxy.base_url, f"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Length: {1 << 40}\r\nConnection: close\r\n\r\n".encode()),
        _raw_request(proxy.base_url, f"GET /v1/../x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Connection: close\r\n\r\n".encode()),
    ]
    with httpx.Client() as raw:
        pages += [raw.get(proxy.base_url + "/metrics").content, raw.get(proxy.base_url + "/healthz").content]
    assert pages[0].split(b" ", 2)[1] == b"413" and pages[1].split(b" ", 2)[1] == b"400"
    records = sink.wait(4)
    assert len(records) == 4
    for record in records:
        assert KEY not in json.dumps(record.to_dict(), default=str)
    for page in pages:
        assert KEY.encode() not in page
    assert KEY not in caplog.text


# -- limits and safety -----------------------------------------------------------------------


def test_body_over_the_limit_is_a_413_whether_announced_or_chunked(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url, max_body_bytes=4096)
    big = json.dumps({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    with httpx.Client() as client:
        announced = client.post(proxy.base_url + "/chat/completions", content=big)
        chunked = client.post(proxy.base_url + "/chat/completions", content=iter([big[:3000], big[3000:]]))
        small = client.post(proxy.base_url + "/chat/completions", json={"model": "deepseek-v4-flash", "messages": MESSAGES[1:]},
                            headers={"Authorization": f"Bearer {KEY}"})
    assert announced.status_code == chunked.status_code == 413
    assert announced.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200
    assert len(sim.calls) == 1
    assert [r.status for r in sink.wait(1)] == ["completed"]


def _raw_request(base_url: str, request: bytes) -> bytes:
    """Send bytes as they are; return the response (head and a Content-Length body)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        length = int(m.group(1)) if (m := re.search(r"content-length: *(\d+)", head)) else 0
        while len(data) < len(head) + 4 + length and (chunk := sock.recv(65536)):
            data += chunk
    return data


@pytest.mark.parametrize(
    "request_line",
    [
        "POST http://{evil}/chat/completions HTTP/1.1",
        "POST https://{evil}/chat/completions HTTP/1.1",
        "CONNECT {evil} HTTP/1.1",
        "POST /v1/../../chat/completions HTTP/1.1",
        "POST /v1/%2e%2e/chat/completions HTTP/1.1",
        "GET * HTTP/1.1",
    ],
)
def test_no_open_relay_absolute_and_traversal_targets_are_refused(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy, request_line: str
) -> None:
    _, evil, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    evil_host = evil.base_url.removeprefix("http://").rstrip("/")
    body = json.dumps({"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}).encode()
    request = (
        request_line.format(evil=evil_host).encode()
        + f"\r\nHost: {evil_host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    answer = _raw_request(proxy.base_url, request)
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert evil.calls == [] and sim.calls == [] and sink.records == []


def test_host_header_never_chooses_the_upstream(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, evil, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    evil_host = evil.base_url.removeprefix("http://").rstrip("/")
    sim_host = sim.base_url.removeprefix("http://").rstrip("/")
    with httpx.Client() as client:
        for headers in ({"Host": evil_host}, {"X-Forwarded-Host": evil_host, "Forwarded": f"host={evil_host}"}):
            response = client.post(proxy.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}", **headers},
                                   json={"model": "deepseek-v4-flash", "messages": MESSAGES[1:]})
            assert response.status_code == 200
            assert client.get(proxy.base_url + "/echo", headers=headers).json()["host"] == sim_host
    assert evil.calls == [] and len(sim.calls) == 2


# -- pass-through, metrics, health -----------------------------------------------------------


def test_other_paths_pass_through_unmetered(sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy) -> None:
    direct_sim, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    via_proxy = _sdk(proxy.base_url).models.list().model_dump()
    assert via_proxy == _sdk(direct_sim.base_url).models.list().model_dump()
    with httpx.Client() as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        for method, path in (("GET", "/v1/models"), ("GET", "/user/balance"), ("DELETE", "/files/f-1")):
            got = client.request(method, proxy.base_url + path, headers=auth)
            expected = client.request(method, direct_sim.base_url + path, headers=auth)
            assert (got.status_code, got.headers.get("content-type"), got.content) == (
                expected.status_code, expected.headers.get("content-type"), expected.content)
    assert sink.records == []


def test_metrics_count_requests_tokens_errors_and_ttft_with_bounded_labels(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    client = _sdk(proxy.base_url)
    for _ in range(3):
        _stream_chunks(client)
    _outcome(client, extra_headers={"X-Simulator-Fault": "429"})
    client.models.list()
    records = sink.wait(4)
    with httpx.Client() as raw:
        response = raw.get(proxy.base_url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
            labels = {part.split("=")[0] for part in name.partition("{")[2].rstrip("}").split(",") if part}
            assert labels <= {"model", "status", "bucket", "currency", "le"}
    served = [c.usage for c in sim.calls if c.usage]
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="completed"}'] == 3
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="error"}'] == 1
    assert samples['dsmeter_proxy_errors_total{model="deepseek-v4-flash",status="error"}'] == 1
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="completion"}'] == sum(
        u["completion_tokens"] for u in served)
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="prompt_cache_miss"}'] == sum(
        u["prompt_cache_miss_tokens"] for u in served)
    assert samples['dsmeter_proxy_ttft_seconds_count{model="deepseek-v4-flash"}'] == 3
    assert samples['dsmeter_proxy_passthrough_requests_total{status="200"}'] == 1
    assert sum(r.completion_tokens or 0 for r in records) == sum(u["completion_tokens"] for u in served)


def test_healthz_answers_and_says_draining_during_shutdown(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, _ = start_proxy(sim.base_url)
    with httpx.Client() as client:
        response = client.get(proxy.base_url + "/healthz")
        assert response.status_code == 200 and response.json()["status"] == "ok"
        assert client.post(proxy.base_url + "/healthz").status_code == 405


# -- shutdown --------------------------------------------------------------------------------


def test_shutdown_lets_streams_in_flight_finish_and_records_them(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url, drain_timeout=10.0)
    result: dict[str, Any] = {"chunks": []}
    streaming = threading.Event()

    def call() -> None:
        args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}
        headers = {"X-Simulator-Output-Tokens": "40", "X-Simulator-Chunk-Delay-Ms": "20"}
        with _sdk(proxy.base_url).chat.completions.create(**args, extra_headers=headers) as stream:
            for chunk in stream:
                result["chunks"].append(chunk.model_dump())
                streaming.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert streaming.wait(5)
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    time.sleep(0.1)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(proxy.base_url + "/healthz")
    caller.join(10)
    stopper.join(10)
    assert result["chunks"] and result["chunks"][-1]["choices"][0]["finish_reason"] == "stop"
    assert [r.status for r in sink.records] == ["completed"]


def test_shutdown_cancels_streams_still_running_after_the_drain_timeout_each_a_row(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    _, _, sim = sims
    proxy, sink = start_proxy(sim.base_url, drain_timeout=0.3)
    streaming = threading.Event()

    def call() -> None:
        args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True}
        headers = {"X-Simulator-Output-Tokens": "2000", "X-Simulator-Chunk-Delay-Ms": "10"}
        with contextlib.suppress(openai.APIError, httpx.HTTPError):
            with _sdk(proxy.base_url).chat.completions.create(**args, extra_headers=headers) as stream:
                for _ in stream:
                    streaming.set()

    caller = threading.Thread(target=call)
    caller.start()
    assert streaming.wait(5)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3.0
    caller.join(10)
    assert [r.status for r in sink.records] == ["cancelled"]
    assert sink.records[0].chunk_count > 0


# -- other clients ---------------------------------------------------------------------------


def test_anthropic_format_stream_is_forwarded_and_metered_from_its_usage_events(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    direct_sim, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    body = {"model": "claude-sonnet-4", "max_tokens": 512, "stream": True, "system": "You are terse. " * 50,
            "messages": [{"role": "user", "content": "Say something about caching."}]}
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    for _ in range(2):  # the second call hits the prompt cache
        with httpx.Client() as client:
            got = client.post(proxy.base_url + "/anthropic/v1/messages", json=body, headers=headers)
            expected = client.post(direct_sim.base_url + "/anthropic/v1/messages", json=body, headers=headers)
        assert got.status_code == 200 and got.content == expected.content
        assert b"event: message_start" in got.content
    records = sink.wait(2)
    assert [r.endpoint for r in records] == ["anthropic.messages"] * 2
    for record, served in zip(records, sim.calls, strict=True):
        assert record.status == "completed" and not record.usage_estimated
        assert record.completion_tokens == served.usage["output_tokens"]
        assert record.prompt_cache_hit_tokens == served.usage.get("cache_read_input_tokens", 0)
        assert record.key_fingerprint == key_fingerprint(KEY)
    assert records[1].prompt_cache_hit_tokens


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_through_the_proxy_byte_for_byte(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    direct_sim, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)
    body = json.dumps({"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True,
                       "stream_options": {"include_usage": True}})

    def curl(base_url: str) -> bytes:
        return subprocess.run(
            ["curl", "-sSN", "--fail-with-body", base_url + "/chat/completions", "-H", "Content-Type: application/json",
             "-H", f"Authorization: Bearer {KEY}", "-H", "X-Dsmeter-Tags: client=curl", "-d", body],
            capture_output=True, check=True, timeout=30,
        ).stdout

    assert curl(proxy.base_url) == curl(direct_sim.base_url)
    record = sink.wait(1)[0]
    assert record.status == "completed" and record.tags == {"client": "curl"}
    assert record.completion_tokens == sim.calls[0].usage["completion_tokens"]


_NODE_CLIENT = """
const [url, key] = process.argv.slice(1);
const res = await fetch(url + "/chat/completions", {
  method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer " + key},
  body: JSON.stringify({model: "deepseek-v4-flash", stream: true,
                        messages: [{role: "user", content: "Say something about caching."}]}),
});
let text = "";
const decoder = new TextDecoder();
for await (const part of res.body) text += decoder.decode(part, {stream: true});
const content = text.split("\\n").filter(l => l.startsWith("data: {"))
  .map(l => JSON.parse(l.slice(6)).choices[0]?.delta?.content ?? "").join("");
process.stdout.write(JSON.stringify({status: res.status, content}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_fetch_streams_through_the_proxy(
    sims: tuple[Simulator, Simulator, Simulator], start_proxy: StartProxy
) -> None:
    direct_sim, _, sim = sims
    proxy, sink = start_proxy(sim.base_url)

    def node(base_url: str) -> dict[str, Any]:
        out = subprocess.run(["node", "--input-type=module", "-e", _NODE_CLIENT, base_url, KEY],
                             capture_output=True, check=True, timeout=30, text=True).stdout
        return json.loads(out)

    got = node(proxy.base_url)
    assert got == node(direct_sim.base_url) and got["status"] == 200 and got["content"]
    record = sink.wait(1)[0]
    assert record.status == "completed" and record.completion_tokens == sim.calls[0].usage["completion_tokens"]
