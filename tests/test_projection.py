"""Projection: workloads priced per model, and recorded traffic re-priced under another model, time or share.

Expectations are worked out here from the published per-1M prices, not by the code under test.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.errors import UsageError
from collector.pricebook import shipped_book
from collector.projection import (
    PROJECTED_COLUMNS,
    TRAFFIC_COLUMNS,
    Workload,
    compare_by_day,
    default_peak_share,
    estimate,
    period_shares,
    reprice_traffic,
)

UTC = timezone.utc
M = Decimal(1_000_000)
GUIDE = Workload(calls=1_000_000, cached_prompt_tokens=2000, uncached_prompt_tokens=200, output_tokens=300)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _by_model(results: list) -> dict:  # type: ignore[type-arg]
    return {r.model: r for r in results}


def test_the_guides_worked_example_side_by_side_at_list_prices() -> None:
    results = _by_model(estimate(GUIDE, shipped_book(), None, _at("2026-04-25T00:00:00Z"), list_prices=True))
    assert set(results) == {"deepseek-v4-flash", "deepseek-v4-pro"}
    flash, pro = results["deepseek-v4-flash"], results["deepseek-v4-pro"]
    assert (flash.cache_hit, flash.cache_miss, flash.output, flash.total) == (56, 28, 84, 168)
    assert pro.total == Decimal("1682.00") and pro.promotion is None
    assert flash.tariff_ids == ("deepseek-v4-flash@2026-04-24/standard",)


def test_what_was_billed_names_the_promotion_and_keeps_the_list_total() -> None:
    pro = _by_model(estimate(GUIDE, shipped_book(), ["deepseek-v4-pro"], _at("2026-04-25T00:00:00Z")))["deepseek-v4-pro"]
    assert pro.total == 2_000 * M * Decimal("0.03625") / M + 200 * M * Decimal("0.435") / M + 300 * M * Decimal("0.87") / M
    assert pro.total == Decimal("420.50") and pro.list_total == Decimal("1682.00")
    assert pro.promotion is not None and "75%" in pro.promotion


def test_after_the_cache_hit_cut_the_same_workload_costs_the_lower_figure() -> None:
    results = _by_model(estimate(GUIDE, shipped_book(), None, _at("2026-04-27T00:00:00Z"), list_prices=True))
    hit, miss, out = 2_000 * M, 200 * M, 300 * M
    assert results["deepseek-v4-flash"].total == (hit * Decimal("0.0028") + miss * Decimal("0.14")
                                                  + out * Decimal("0.28")) / M == Decimal("117.60")
    assert results["deepseek-v4-pro"].total == (hit * Decimal("0.0145") + miss * Decimal("1.74")
                                                + out * Decimal("3.48")) / M == Decimal("1421.00")


def test_an_alias_is_priced_as_the_model_it_is_billed_as() -> None:
    chat = estimate(GUIDE, shipped_book(), ["deepseek-chat"], _at("2026-04-25T00:00:00Z"))[0]
    assert chat.via == "deepseek-chat" and chat.tariff.model == "deepseek-v4-flash" and chat.total == 168


def test_default_peak_share_is_the_share_of_the_weeks_hours_that_are_peak() -> None:
    book = shipped_book()
    workdays = book.resolve("deepseek-flash", _at("2026-11-23T00:00:00Z"))
    daily = book.resolve("deepseek-v4-flash", _at("2026-08-18T00:00:00Z"))
    flat = book.resolve("deepseek-v4-flash", _at("2026-05-01T00:00:00Z"))
    assert workdays is not None and daily is not None and flat is not None
    assert default_peak_share(workdays.tariff) == Fraction(5 * 7, 7 * 24)  # 7 peak hours on 5 days of 168
    assert default_peak_share(daily.tariff) == Fraction(7 * 7, 7 * 24)  # every day, the first week
    assert default_peak_share(flat.tariff) is None
    assert period_shares(workdays.tariff) == {"off-peak": Fraction(133, 168), "peak": Fraction(35, 168)}


def test_peak_share_weighs_peak_and_off_peak_prices() -> None:
    at = _at("2026-11-23T00:00:00Z")
    work = Workload(calls=1_000_000, cached_prompt_tokens=1000, uncached_prompt_tokens=100, output_tokens=200)
    calls = Decimal(1_000_000)

    def expected(share: Decimal) -> Decimal:
        peak = (1000 * Decimal("0.006") + 100 * Decimal("0.30") + 200 * Decimal("1.20")) * calls / M
        off = (1000 * Decimal("0.003") + 100 * Decimal("0.15") + 200 * Decimal("0.60")) * calls / M
        return share * peak + (1 - share) * off

    for share in (Decimal(0), Decimal("0.3"), Decimal(1)):
        result = estimate(Workload(**{**_fields(work), "peak_share": share}), shipped_book(), ["deepseek-flash"], at)[0]
        assert result.total == expected(share)
    default = estimate(work, shipped_book(), ["deepseek-flash"], at)[0]
    # 35/168 has no finite decimal: each part is rounded to 10^-12 and the parts still add up
    assert default.total == default.cache_hit + default.cache_miss + default.output
    assert abs(default.total - expected(Decimal(35) / Decimal(168))) < Decimal("1e-11")


def _fields(work: Workload) -> dict:  # type: ignore[type-arg]
    return {name: getattr(work, name) for name in Workload.__dataclass_fields__}


def test_reasoning_tokens_are_output_on_the_thinking_share_of_calls() -> None:
    at = _at("2026-05-01T00:00:00Z")  # flat prices: $0.28 output on v4-flash
    base = Workload(calls=1000, uncached_prompt_tokens=100, output_tokens=50)
    thinking = Workload(calls=1000, uncached_prompt_tokens=100, output_tokens=50, reasoning_tokens=400,
                        thinking_share=Decimal("0.25"))
    plain = estimate(base, shipped_book(), ["deepseek-v4-flash"], at)[0]
    mixed = estimate(thinking, shipped_book(), ["deepseek-v4-flash"], at)[0]
    assert mixed.output - plain.output == Decimal(1000) * 400 * Decimal("0.25") * Decimal("0.28") / M
    assert mixed.cache_miss == plain.cache_miss


def test_a_cache_hit_share_re_splits_the_prompt() -> None:
    at = _at("2026-05-01T00:00:00Z")
    work = Workload(calls=1000, cached_prompt_tokens=0, uncached_prompt_tokens=1000, cache_hit_share=Decimal("0.9"))
    result = estimate(work, shipped_book(), ["deepseek-v4-flash"], at)[0]
    assert result.cache_hit == 1000 * 900 * Decimal("0.0028") / M
    assert result.cache_miss == 1000 * 100 * Decimal("0.14") / M


@pytest.mark.parametrize(
    ("models", "at", "message"),
    [
        (["gpt-9"], "2026-04-25T00:00:00Z", "unknown model 'gpt-9'"),
        (["deepseek-chat"], "2026-09-01T00:00:00Z", "deepseek-chat has no USD tariff"),
        (None, "2023-06-01T00:00:00Z", "no tariff at 2023-06-01 00:00 UTC: the price book starts at 2024-05-01"),
    ],
)
def test_a_model_or_time_without_a_tariff_is_a_usage_error(models: list[str] | None, at: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        estimate(GUIDE, shipped_book(), models, _at(at))


@pytest.mark.parametrize(
    "kwargs",
    [{"calls": -1}, {"calls": 1, "output_tokens": -5}, {"calls": 1, "peak_share": Decimal("1.5")},
     {"calls": 1, "thinking_share": Decimal("-0.1")}],
)
def test_a_workload_refuses_negative_counts_and_shares_outside_0_to_1(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError):
        Workload(**kwargs)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**7), st.integers(0, 10**5), st.integers(0, 10**5), st.integers(0, 10**5),
       st.integers(2, 50), st.sampled_from(["2026-04-25T00:00:00Z", "2026-05-01T00:00:00Z", "2026-11-23T00:00:00Z"]))
def test_estimates_are_linear_in_calls_and_never_negative(calls: int, hit: int, miss: int, out: int, k: int,
                                                          at: str) -> None:
    one = Workload(calls=calls, cached_prompt_tokens=hit, uncached_prompt_tokens=miss, output_tokens=out,
                   peak_share=Decimal("0.2"))
    many = Workload(calls=calls * k, cached_prompt_tokens=hit, uncached_prompt_tokens=miss, output_tokens=out,
                    peak_share=Decimal("0.2"))
    for a, b in zip(estimate(one, shipped_book(), None, _at(at)), estimate(many, shipped_book(), None, _at(at))):
        assert a.total >= 0 and a.total == a.cache_hit + a.cache_miss + a.output
        assert b.total == k * a.total


# -- recorded traffic ---------------------------------------------------------------------------


def _traffic(rows: list[dict]) -> pd.DataFrame:  # type: ignore[type-arg]
    full = [{name: row.get(name) for name in TRAFFIC_COLUMNS} for row in rows]
    return pd.DataFrame(full, columns=list(TRAFFIC_COLUMNS))


def _call(at: str, model: str = "deepseek-flash", hit: int = 1_000_000, miss: int = 1_000_000, out: int = 1_000_000,
          cost: str | None = None, currency: str | None = "USD") -> dict:  # type: ignore[type-arg]
    return {"request_id": at, "started_at": pd.Timestamp(_at(at)), "finished_at": None, "model": model,
            "requested_model": model, "prompt_tokens": hit + miss, "prompt_cache_hit_tokens": hit,
            "prompt_cache_miss_tokens": miss, "completion_tokens": out,
            "currency": currency if cost is not None else None, "cost": Decimal(cost) if cost is not None else None}


def test_recorded_traffic_re_priced_as_another_model_at_each_calls_own_time() -> None:
    frame = _traffic([
        _call("2026-09-14T02:00:00Z", cost="1.506"),  # Monday 10:00 Beijing: peak 0.006 + 0.30 + 1.20
        _call("2026-09-12T02:00:00Z", cost="0.753"),  # Saturday: off-peak 0.003 + 0.15 + 0.60
    ])
    out = reprice_traffic(frame, shipped_book(), as_model="deepseek-v4-pro")
    assert list(out.columns) == [*TRAFFIC_COLUMNS, *PROJECTED_COLUMNS]
    assert out["projected_cost"].tolist() == [Decimal("0.044") + Decimal("1.32") + Decimal("3.96"),
                                              Decimal("0.022") + Decimal("0.66") + Decimal("1.98")]
    assert out["projected_tariff_id"].tolist() == ["deepseek-v4-pro@2026-09-10/peak", "deepseek-v4-pro@2026-09-10/off-peak"]
    summary = compare_by_day(out, "USD")
    assert summary.actual_cost == Decimal("2.259") and summary.projected_cost == Decimal("7.986")
    assert summary.days["day"].tolist() == [datetime(2026, 9, 12).date(), datetime(2026, 9, 14).date()]
    assert summary.difference == Decimal("7.986") - Decimal("2.259")


def test_as_of_uses_the_tariff_in_force_then_but_each_calls_own_hour() -> None:
    frame = _traffic([_call("2026-04-25T02:00:00Z", model="deepseek-v4-flash")])  # flat tariff then
    out = reprice_traffic(frame, shipped_book(), as_of=_at("2026-11-23T00:00:00Z"))
    # v4-flash is billed as deepseek-flash by November; 25 April 2026 was a Saturday, so off-peak
    assert out["projected_tariff_id"].tolist() == ["deepseek-v4-flash>deepseek-flash@2026-09-10/off-peak"]
    assert out["projected_cost"].tolist() == [Decimal("0.003") + Decimal("0.15") + Decimal("0.60")]


def test_shifting_peak_calls_off_peak_moves_that_share_to_off_peak_prices() -> None:
    frame = _traffic([_call("2026-09-14T02:00:00Z"), _call("2026-09-14T12:00:00Z")])  # peak, off-peak
    out = reprice_traffic(frame, shipped_book(), shift_off_peak=Decimal("0.4"))
    peak, off = Decimal("1.506"), Decimal("0.753")
    assert out["projected_cost"].tolist() == [Decimal("0.6") * peak + Decimal("0.4") * off, off]
    everything = reprice_traffic(frame, shipped_book(), shift_off_peak=1)
    assert everything["projected_cost"].tolist() == [off, off]


def test_calls_that_cannot_be_priced_stay_unknown_and_are_counted_apart() -> None:
    no_usage = _call("2026-09-14T03:00:00Z")
    no_usage.update(prompt_tokens=None, prompt_cache_hit_tokens=None, prompt_cache_miss_tokens=None,
                    completion_tokens=None)
    frame = _traffic([_call("2026-09-14T02:00:00Z", model="mystery", cost=None), no_usage])
    out = reprice_traffic(frame, shipped_book())
    assert out["projected_cost"].tolist() == [None, None]
    summary = compare_by_day(out, "USD")
    assert (summary.calls, summary.projected_unpriced_calls, summary.actual_unpriced_calls) == (2, 1, 1)
    assert summary.projected_cost == 0


def test_unknown_as_model_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown model 'deepseek-v9'"):
        reprice_traffic(_traffic([_call("2026-09-14T02:00:00Z")]), shipped_book(), as_model="deepseek-v9")
