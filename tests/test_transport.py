"""The official openai SDK streaming through ``metered_client`` against the simulator on loopback.

For every kind of call the caller must see exactly what an unmetered call sees (two
simulators with the same seed serve the same bytes), and the record must carry exactly
the usage the upstream billed (the simulator's own log of what it served).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

import collector
from collector.record import Status, UsageRecord
from collector.simulator import Simulator

KEY = "sk-test-transport-0123456789abcdef"
MESSAGES = [
    {"role": "system", "content": "You are terse. " * 50},
    {"role": "user", "content": "Say something about caching."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
          "properties": {"city": {"type": "string"}}}}}]

SCENARIOS: dict[str, dict[str, Any]] = {
    "plain": {},
    "thinking": {"reasoning_effort": "high", "extra_body": {"thinking": {"type": "enabled"}}},
    "tools": {"tools": TOOLS},
    "asked_for_usage": {"stream_options": {"include_usage": True}},
    "openai_style_usage_chunk": {"extra_headers": {"X-Simulator-Style": "openai"}},
    "crlf_framing": {"extra_headers": {"X-Simulator-Framing": "crlf"}},
    "keep_alive_while_queued": {"extra_headers": {"X-Simulator-Queue-Ms": "120"}},
    "split_writes": {"extra_headers": {"X-Simulator-Chunk-Bytes": "7"}},
    "legacy_model_name": {"model": "deepseek-reasoner"},
    "pro": {"model": "deepseek-v4-pro"},
}


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def __call__(self, record: UsageRecord) -> None:
        self.records.append(record)

    def one(self) -> UsageRecord:
        assert len(self.records) == 1, self.records
        return self.records[0]


@pytest.fixture
def sims() -> Iterator[tuple[Simulator, Simulator]]:
    fixed = lambda: 1_786_000_000.0  # noqa: E731 - both servers stamp the same `created`
    with Simulator(seed=7, clock=fixed) as plain, Simulator(seed=7, clock=fixed) as metered:
        yield plain, metered


def _sdk(base_url: str, http_client: httpx.Client | None = None) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=base_url, http_client=http_client, max_retries=0)


def _stream_chunks(client: openai.OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True, **kwargs}
    with client.chat.completions.create(**args) as stream:
        return [chunk.model_dump() for chunk in stream]


def _assert_exact(record: UsageRecord, served: Any) -> None:
    usage = served.usage
    assert usage is not None
    assert record.status == Status.COMPLETED.value, record
    assert record.usage_estimated is False
    assert record.prompt_cache_hit_tokens == usage["prompt_cache_hit_tokens"]
    assert record.prompt_cache_miss_tokens == usage["prompt_cache_miss_tokens"]
    assert record.prompt_tokens == usage["prompt_tokens"]
    assert record.completion_tokens == usage["completion_tokens"]
    assert record.reasoning_tokens == (usage.get("completion_tokens_details") or {}).get("reasoning_tokens")
    assert record.model == served.response_model
    assert record.provider_request_id == served.request_id


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sdk_stream_through_metered_client_is_unchanged_and_recorded_exactly(
    sims: tuple[Simulator, Simulator], scenario: str
) -> None:
    plain_sim, metered_sim = sims
    kwargs = dict(SCENARIOS[scenario])
    # Twice each: the second call of a repeated prompt earns cache hits, which must be split right.
    expected = [_stream_chunks(_sdk(plain_sim.base_url + "/v1"), **kwargs) for _ in range(2)]
    sink = ListSink()
    client = _sdk(metered_sim.base_url + "/v1", collector.metered_client(sink=sink, tags={"team": "t1"}))
    got = [_stream_chunks(client, **kwargs) for _ in range(2)]
    assert got == expected
    assert len(sink.records) == 2
    served = metered_sim.calls
    for record, call in zip(sink.records, served, strict=True):
        _assert_exact(record, call)
        assert record.tags == {"team": "t1"}
        assert record.requested_model == kwargs.get("model", "deepseek-v4-flash")
    if scenario != "openai_style_usage_chunk":
        assert sink.records[1].prompt_cache_hit_tokens, "a repeated prompt prefix should hit the cache"


def test_non_streamed_call_is_metered_from_the_json_body(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    client = _sdk(sim.base_url, collector.metered_client(sink=sink))
    response = client.chat.completions.create(
        model="deepseek-v4-flash", messages=MESSAGES, extra_headers={"X-Simulator-Queue-Ms": "100"}
    )
    assert response.choices[0].message.content
    record = sink.one()
    _assert_exact(record, sim.calls[0])
    assert record.stream is False


@pytest.mark.parametrize(("fault", "status", "error"), [("429", 429, openai.RateLimitError),
                                                        ("500", 500, openai.InternalServerError),
                                                        ("402", 402, openai.APIStatusError)])
def test_http_error_before_the_stream_is_one_error_row(
    sims: tuple[Simulator, Simulator], fault: str, status: int, error: type[Exception]
) -> None:
    _, sim = sims
    sink = ListSink()
    client = _sdk(sim.base_url, collector.metered_client(sink=sink))
    with pytest.raises(error):
        _stream_chunks(client, extra_headers={"X-Simulator-Fault": fault})
    record = sink.one()
    assert record.status == "error" and record.http_status == status
    assert record.error_type and record.error_message
    assert record.prompt_tokens is None and record.completion_tokens is None


def test_disconnect_mid_stream_is_a_disconnected_row_with_estimated_tokens(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    client = _sdk(sim.base_url, collector.metered_client(sink=sink))
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        _stream_chunks(client, extra_headers={"X-Simulator-Fault": "disconnect", "X-Simulator-Fault-After": "5"})
    record = sink.one()
    assert record.status == Status.DISCONNECTED.value
    assert record.usage_estimated is True and record.completion_tokens and record.prompt_tokens
    assert record.prompt_cache_hit_tokens is None  # unknown stays unknown


def test_caller_closing_early_is_cancelled_and_the_upstream_sees_the_close(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    client = _sdk(sim.base_url, collector.metered_client(sink=sink))
    stream = client.chat.completions.create(
        model="deepseek-v4-flash", messages=MESSAGES, stream=True,
        extra_headers={"X-Simulator-Output-Tokens": "400", "X-Simulator-Chunk-Delay-Ms": "5"},
    )
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    record = sink.one()
    assert record.status == Status.CANCELLED.value and record.usage_estimated
    sim.wait_for_calls(1, timeout=5)
    deadline = time.monotonic() + 5
    while sim.calls[0].client_closed_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sim.calls[0].client_closed_at is not None


def test_gap_timeout_is_a_timeout_row(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    http = collector.metered_client(sink=sink, timeout=httpx.Timeout(5.0, read=0.3))
    client = _sdk(sim.base_url, http)
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        _stream_chunks(client, extra_headers={"X-Simulator-Fault": "stall", "X-Simulator-Fault-After": "3"})
    record = sink.one()
    assert record.status == Status.TIMEOUT.value and record.usage_estimated


def test_api_key_never_reaches_the_record_but_its_fingerprint_does(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    _stream_chunks(_sdk(sim.base_url, collector.metered_client(sink=sink)))
    with pytest.raises(openai.AuthenticationError):
        _stream_chunks(openai.OpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0,
                                     http_client=collector.metered_client(sink=sink)),
                       extra_headers={"Authorization": ""})
    for record in sink.records:
        assert KEY not in repr(record.to_dict())
    assert sink.records[0].key_fingerprint and sink.records[0].key_fingerprint.startswith("kf_")


def test_per_request_tags_header_is_merged_and_not_forwarded(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    client = _sdk(sim.base_url, collector.metered_client(sink=sink, tags={"team": "search"}))
    _stream_chunks(client, extra_headers={"X-Dsmeter-Tags": "feature=autocomplete"})
    assert sink.one().tags == {"team": "search", "feature": "autocomplete"}
    assert "x-dsmeter-tags" not in {k.lower() for k in sim.calls[0].headers}


def test_requests_other_than_chat_completions_pass_through_unmetered(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()
    models = _sdk(sim.base_url, collector.metered_client(sink=sink)).models.list()
    assert [m.id for m in models.data]
    assert sink.records == []


# -- asyncio ---------------------------------------------------------------------------------


async def _astream_chunks(client: openai.AsyncOpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"model": "deepseek-v4-flash", "messages": MESSAGES, "stream": True, **kwargs}
    stream = await client.chat.completions.create(**args)
    return [chunk.model_dump() async for chunk in stream]


@pytest.mark.parametrize("scenario", ["plain", "thinking", "tools", "openai_style_usage_chunk", "crlf_framing"])
def test_async_sdk_stream_is_unchanged_and_recorded_exactly(sims: tuple[Simulator, Simulator], scenario: str) -> None:
    plain_sim, metered_sim = sims
    kwargs = dict(SCENARIOS[scenario])
    sink = ListSink()

    async def run() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        plain = openai.AsyncOpenAI(api_key=KEY, base_url=plain_sim.base_url, max_retries=0)
        metered = openai.AsyncOpenAI(api_key=KEY, base_url=metered_sim.base_url, max_retries=0,
                                     http_client=collector.async_metered_client(sink=sink))
        return await _astream_chunks(plain, **kwargs), await _astream_chunks(metered, **kwargs)

    expected, got = asyncio.run(run())
    assert got == expected
    _assert_exact(sink.one(), metered_sim.calls[0])


def test_async_disconnect_and_cancel_are_rows(sims: tuple[Simulator, Simulator]) -> None:
    _, sim = sims
    sink = ListSink()

    async def run() -> None:
        client = openai.AsyncOpenAI(api_key=KEY, base_url=sim.base_url, max_retries=0,
                                    http_client=collector.async_metered_client(sink=sink))
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            await _astream_chunks(client, extra_headers={"X-Simulator-Fault": "disconnect"})
        stream = await client.chat.completions.create(
            model="deepseek-v4-flash", messages=MESSAGES, stream=True,
            extra_headers={"X-Simulator-Output-Tokens": "300"})
        async for _ in stream:
            break
        await stream.close()

    asyncio.run(run())
    assert [r.status for r in sink.records] == ["disconnected", "cancelled"]


# -- into the real ledger --------------------------------------------------------------------


def test_metered_calls_land_in_the_ledger_once_each(db_url: str) -> None:
    from collector.queries import iter_export_rows
    from collector.store import LedgerStore
    from collector.writer import default_writer

    with Simulator(seed=3) as sim:
        client = _sdk(sim.base_url, collector.metered_client(db=db_url, tags={"team": "ledger"}))
        for _ in range(3):
            _stream_chunks(client)
        with pytest.raises(openai.RateLimitError):
            _stream_chunks(client, extra_headers={"X-Simulator-Fault": "429"})
        assert default_writer(db_url).flush(timeout=30)
        served = list(sim.calls)
    store = LedgerStore(db_url)
    rows = list(iter_export_rows(store.engine, None, None))
    store.close()
    assert len(rows) == 4
    completed = [r for r in rows if r["status"] == "completed"]
    assert sorted(r["completion_tokens"] for r in completed) == sorted(
        c.usage["completion_tokens"] for c in served if c.usage)
    assert sum(r["prompt_cache_hit_tokens"] for r in completed) == sum(
        c.usage["prompt_cache_hit_tokens"] for c in served if c.usage)
    assert [r["status"] for r in rows].count("error") == 1
