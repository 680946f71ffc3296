"""Ledger rows for the dashboard's tests and benchmark: realistic, seeded, and quick to make.

``synthetic_records`` builds ``UsageRecord``s the way the metering path would leave them
(models, thinking, statuses with their error classes, tags, key fingerprints, timings,
cost split by bucket), priced with a fixed table here so the tests do not depend on the
price book's data. The tests write them through the real ``LedgerWriter``; the benchmark
writes a million of them with ``LedgerStore.insert`` in large batches (no HTTP).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal

from collector.record import UsageRecord

__all__ = ["RATES", "synthetic_records", "seed_through_writer"]

# USD per 1M tokens: (cache hit, cache miss, output); the V4 launch list prices.
RATES: dict[str, tuple[Decimal, Decimal, Decimal]] = {
    "deepseek-v4-flash": (Decimal("0.028"), Decimal("0.14"), Decimal("0.28")),
    "deepseek-v4-pro": (Decimal("0.145"), Decimal("1.74"), Decimal("3.48")),
}
_MILLION = Decimal(1_000_000)
_TEAMS = (("search", "autocomplete"), ("support", "chat-agent"), ("analytics", "report-writer"), ("platform", "digest"))
_FAULTS = (
    ("completed", None, None, None, 0.90),
    ("error", 429, "rate_limit_error", None, 0.03),
    ("error", 402, "insufficient_balance", None, 0.01),
    ("error", 503, "server_overloaded", None, 0.02),
    ("disconnected", 200, "UpstreamDisconnected", None, 0.02),
    ("cancelled", 200, None, None, 0.02),
)


def synthetic_records(
    n: int, *, seed: int, start: datetime, end: datetime, unpriced_share: float = 0.0
) -> Iterator[UsageRecord]:
    """``n`` calls spread uniformly over ``[start, end)``, deterministic for a seed."""
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    weights = [f[4] for f in _FAULTS]
    for _ in range(n):
        at = start + timedelta(seconds=rng.random() * span)
        model = "deepseek-v4-pro" if rng.random() < 0.2 else "deepseek-v4-flash"
        thinking = rng.random() < 0.35
        team, feature = rng.choice(_TEAMS)
        status, http_status, error_type, _, _ = rng.choices(_FAULTS, weights=weights)[0]
        record = UsageRecord(
            started_at=at,
            requested_model=model,
            model=model,
            provider_request_id=f"p-{rng.getrandbits(48):012x}",
            upstream="http://127.0.0.1:9",
            thinking=thinking,
            status=status,
            http_status=http_status,
            error_type=error_type,
            key_fingerprint=f"fp-{team}",
            user=f"u-{rng.randint(1, 6)}",
            tags={"team": team, "feature": feature},
            chunk_count=rng.randint(1, 200),
        )
        if status == "error":
            record.error_message = f"{http_status} from upstream"
            record.finished_at = at + timedelta(milliseconds=rng.uniform(20, 200))
            record.duration_ms = (record.finished_at - at).total_seconds() * 1000
            yield record
            continue
        hit = rng.choice((0, 1024, 2048, 4096))
        miss = rng.randint(20, 1500)
        out = rng.randint(10, 1200)
        reasoning = rng.randint(0, out) if thinking else None
        ttft = rng.uniform(150, 900) * (2.5 if thinking else 1.0)
        duration = ttft + out * rng.uniform(8, 25)
        record.prompt_cache_hit_tokens = hit
        record.prompt_cache_miss_tokens = miss
        record.prompt_tokens = hit + miss
        record.completion_tokens = out
        record.reasoning_tokens = reasoning
        record.usage_estimated = status != "completed"
        record.ttft_ms = round(ttft, 3)
        record.first_content_ms = round(ttft * 1.1, 3)
        record.duration_ms = round(duration, 3)
        record.finished_at = at + timedelta(milliseconds=duration)
        record.finish_reason = (
            rng.choice(("stop", "stop", "stop", "length", "tool_calls")) if status == "completed" else None
        )
        if unpriced_share and rng.random() < unpriced_share:
            yield record
            continue
        r_hit, r_miss, r_out = RATES[model]
        record.currency = "USD"
        record.cost_cache_hit = hit * r_hit / _MILLION
        record.cost_cache_miss = miss * r_miss / _MILLION
        record.cost_output = out * r_out / _MILLION
        record.cost = record.cost_cache_hit + record.cost_cache_miss + record.cost_output
        record.tariff_id = f"{model}@2026-04-24"
        yield record


def seed_through_writer(url: str, records: list[UsageRecord]) -> None:
    """Write ``records`` through the real ``LedgerWriter`` (which also keeps the daily rollup current)."""
    from collector.writer import LedgerWriter

    with LedgerWriter(url) as writer:
        for record in records:
            writer.submit(record)
        if not writer.flush():
            raise RuntimeError("the writer did not flush the seeded calls")
