"""The proxy's metrics on their own: counting records, bounded labels, text format, summing workers."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from collector.proxy_metrics import MetricsExchange, ProxyMetrics, merge_snapshots, render
from collector.record import UsageRecord

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)
_SAMPLE = re.compile(r'^([a-z_]+)(\{[^}]*\})? (\S+)$')


def _record(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = dict(
        started_at=T0,
        requested_model="deepseek-chat",
        model="deepseek-v4-flash",
        status="completed",
        prompt_cache_hit_tokens=100,
        prompt_cache_miss_tokens=20,
        completion_tokens=30,
        reasoning_tokens=10,
        ttft_ms=120.0,
        duration_ms=900.0,
    )
    base.update(fields)
    return UsageRecord(**base)


def _samples(text: str) -> dict[str, str]:
    """``name{labels}`` -> value, checking every non-comment line is a well-formed sample."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ ", line), line
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        out[(match.group(1) + (match.group(2) or ""))] = match.group(3)
    return out


def test_a_record_counts_its_request_tokens_by_bucket_and_ttft() -> None:
    metrics = ProxyMetrics()
    metrics.observe(_record())
    metrics.observe(_record(prompt_cache_hit_tokens=0, completion_tokens=5, reasoning_tokens=None, ttft_ms=3000.0))
    samples = _samples(render(metrics.snapshot()))
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="completed"}'] == "2"
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="prompt_cache_hit"}'] == "100"
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="prompt_cache_miss"}'] == "40"
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="completion"}'] == "35"
    assert samples['dsmeter_proxy_tokens_total{model="deepseek-v4-flash",bucket="reasoning"}'] == "10"
    # 0.12 s falls in le=0.25 and above; 3 s only from le=5 on.
    assert samples['dsmeter_proxy_ttft_seconds_bucket{model="deepseek-v4-flash",le="0.1"}'] == "0"
    assert samples['dsmeter_proxy_ttft_seconds_bucket{model="deepseek-v4-flash",le="0.25"}'] == "1"
    assert samples['dsmeter_proxy_ttft_seconds_bucket{model="deepseek-v4-flash",le="2.0"}'] == "1"
    assert samples['dsmeter_proxy_ttft_seconds_bucket{model="deepseek-v4-flash",le="5.0"}'] == "2"
    assert samples['dsmeter_proxy_ttft_seconds_bucket{model="deepseek-v4-flash",le="+Inf"}'] == "2"
    assert samples['dsmeter_proxy_ttft_seconds_count{model="deepseek-v4-flash"}'] == "2"
    assert float(samples['dsmeter_proxy_ttft_seconds_sum{model="deepseek-v4-flash"}']) == 3.12


def test_estimated_usage_is_counted_apart_from_billed_tokens() -> None:
    metrics = ProxyMetrics()
    metrics.observe(_record(status="disconnected", usage_estimated=True, prompt_cache_hit_tokens=None,
                            prompt_cache_miss_tokens=None, prompt_tokens=50, completion_tokens=7, reasoning_tokens=None))
    samples = _samples(render(metrics.snapshot()))
    assert samples['dsmeter_proxy_estimated_tokens_total{model="deepseek-v4-flash",bucket="completion"}'] == "7"
    assert not any(k.startswith("dsmeter_proxy_tokens_total{") for k in samples)
    assert samples['dsmeter_proxy_errors_total{model="deepseek-v4-flash",status="disconnected"}'] == "1"


def test_cancelled_calls_are_requests_but_not_errors() -> None:
    metrics = ProxyMetrics()
    metrics.observe(_record(status="cancelled"))
    samples = _samples(render(metrics.snapshot()))
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="cancelled"}'] == "1"
    assert not any(k.startswith("dsmeter_proxy_errors_total{") for k in samples)


def test_cost_of_written_calls_is_summed_exactly_per_currency_and_unpriced_calls_are_counted_apart() -> None:
    metrics = ProxyMetrics()
    metrics.observe(_record(cost=Decimal("1"), currency="USD"))  # ending is not writing: no cost yet
    assert "dsmeter_proxy_cost_total{" not in render(metrics.snapshot())
    metrics.written([_record(cost=Decimal("0.000000028"), currency="USD") for _ in range(3)])
    metrics.written([_record(model="mystery-model")])
    samples = _samples(render(metrics.snapshot()))
    assert samples['dsmeter_proxy_cost_total{model="deepseek-v4-flash",currency="USD"}'] == "0.000000084"
    assert samples['dsmeter_proxy_unpriced_requests_total{model="mystery-model",status="completed"}'] == "1"


def test_model_label_cardinality_is_bounded_and_label_values_are_escaped() -> None:
    metrics = ProxyMetrics(max_models=3)
    for i in range(10):
        metrics.observe(_record(model=None, requested_model=f'm{i}"\n\\'))
    samples = _samples(render(metrics.snapshot()))
    models = {k for k in samples if k.startswith("dsmeter_proxy_requests_total{")}
    assert len(models) == 4  # three names, then "other"
    assert samples['dsmeter_proxy_requests_total{model="other",status="completed"}'] == "7"
    assert 'dsmeter_proxy_requests_total{model="m0\\"\\n\\\\",status="completed"}' in samples


def test_merged_snapshots_sum_counters_histograms_and_live_workers() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    a.observe(_record())
    b.observe(_record())
    b.observe(_record(status="error", ttft_ms=None))
    a.in_flight, b.in_flight = 2, 1
    merged = merge_snapshots([a.snapshot(), b.snapshot(), ProxyMetrics().snapshot(exiting=True)])
    samples = _samples(render(merged))
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="completed"}'] == "2"
    assert samples['dsmeter_proxy_requests_total{model="deepseek-v4-flash",status="error"}'] == "1"
    assert samples['dsmeter_proxy_ttft_seconds_count{model="deepseek-v4-flash"}'] == "2"
    assert samples["dsmeter_proxy_in_flight_requests"] == "3"
    assert samples["dsmeter_proxy_workers"] == "2"  # the exited worker's counters stay, it is not live


def test_exchange_reads_the_other_workers_snapshots_not_its_own(tmp_path: Path) -> None:
    one, two = MetricsExchange(tmp_path, "1"), MetricsExchange(tmp_path, "2")
    metrics = ProxyMetrics()
    metrics.observe(_record())
    one.publish(metrics.snapshot())
    two.publish(ProxyMetrics().snapshot())
    assert len(two.others()) == 1 and two.others()[0] == metrics.snapshot()
    assert len(one.others()) == 1
    (tmp_path / "worker-3.json").write_text("{half a fi")
    assert len(one.others()) == 1  # a torn file is skipped, not an error
