"""Pricing: the guide's figures to the cent, every period boundary to the second, time-of-use, and exact money.

Expected figures are computed here from the published per-1M prices (api-facts section 4 and
the streaming guide), never by calling the code under test.
"""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.pricebook import load_book, shipped_book
from collector.pricing import BookPricer, Quote, Unpriced, price_record, quote
from collector.record import UsageRecord

UTC = timezone.utc
MILLION = Decimal(1_000_000)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _cost(tokens: int, per_million: str) -> Decimal:
    return Decimal(tokens) * Decimal(per_million) / MILLION


def _quote(model: str, at: datetime, hit: int, miss: int, out: int, **kwargs: object) -> Quote:
    result = quote(shipped_book(), model, at, cache_hit_tokens=hit, cache_miss_tokens=miss, output_tokens=out,
                   **kwargs)  # type: ignore[arg-type]
    assert isinstance(result, Quote), result
    return result


# -- the streaming guide's worked example ------------------------------------------------------

# 1,000,000 calls x (2,000 cached + 200 uncached prompt tokens, 300 output tokens)
HIT, MISS, OUT = 2_000 * 1_000_000, 200 * 1_000_000, 300 * 1_000_000


def test_worked_example_on_flash_is_the_guides_168_dollars_to_the_cent() -> None:
    q = _quote("deepseek-v4-flash", _at("2026-04-25T00:00:00Z"), HIT, MISS, OUT, list_prices=True)
    assert (q.cache_hit, q.cache_miss, q.output) == (Decimal("56.00"), Decimal("28.00"), Decimal("84.00"))
    assert q.total == Decimal("168.00")
    assert q.tariff_id == "deepseek-v4-flash@2026-04-24/standard"


def test_worked_example_on_pro_at_list_prices_is_the_guides_1682_dollars() -> None:
    q = _quote("deepseek-v4-pro", _at("2026-04-25T00:00:00Z"), HIT, MISS, OUT, list_prices=True)
    expected = _cost(HIT, "0.145") + _cost(MISS, "1.74") + _cost(OUT, "3.48")
    assert expected == Decimal("1682.00")
    assert q.total == expected and q.promotion is None and q.list_prices


def test_without_list_prices_pro_is_billed_at_the_launch_promotion() -> None:
    q = _quote("deepseek-v4-pro", _at("2026-04-25T00:00:00Z"), HIT, MISS, OUT)
    assert q.total == _cost(HIT, "0.03625") + _cost(MISS, "0.435") + _cost(OUT, "0.87") == Decimal("420.50")
    assert q.promotion is not None and "75% off" in q.promotion


def test_a_day_later_after_the_cache_hit_cut_the_same_workload_costs_less() -> None:
    before = _at("2026-04-26T12:14:59Z")
    after = _at("2026-04-26T12:15:00Z")
    flash_before = _quote("deepseek-v4-flash", before, HIT, MISS, OUT, list_prices=True).total
    flash_after = _quote("deepseek-v4-flash", after, HIT, MISS, OUT, list_prices=True).total
    pro_after = _quote("deepseek-v4-pro", after, HIT, MISS, OUT, list_prices=True).total
    # The cache-hit price is cut to a tenth: $0.028 -> $0.0028 (flash), list $0.145 -> $0.0145 (pro).
    assert flash_before == Decimal("168.00")
    assert flash_after == _cost(HIT, "0.0028") + _cost(MISS, "0.14") + _cost(OUT, "0.28") == Decimal("117.60")
    assert pro_after == _cost(HIT, "0.0145") + _cost(MISS, "1.74") + _cost(OUT, "3.48") == Decimal("1421.00")


# -- every period boundary of the shipped book, one second either side -------------------------

# (model, instant, tariff id or None for unpriced, USD per 1M: hit, miss, output)
BOUNDARIES: list[tuple[str, str, str | None, tuple[str, str, str] | None]] = [
    ("deepseek-chat", "2024-04-30T23:59:59Z", None, None),
    ("deepseek-chat", "2024-05-01T00:00:00Z", "deepseek-chat@2024-05-01/standard", ("0.14", "0.14", "0.28")),
    ("deepseek-chat", "2024-08-01T23:59:59Z", "deepseek-chat@2024-05-01/standard", ("0.14", "0.14", "0.28")),
    ("deepseek-chat", "2024-08-02T00:00:00Z", "deepseek-chat@2024-08-02/standard", ("0.014", "0.14", "0.28")),
    ("deepseek-chat", "2024-12-25T23:59:59Z", "deepseek-chat@2024-08-02/standard", ("0.014", "0.14", "0.28")),
    ("deepseek-chat", "2024-12-26T00:00:00Z", "deepseek-chat@2024-12-26/standard", ("0.014", "0.14", "0.28")),
    ("deepseek-chat", "2025-02-08T15:59:59Z", "deepseek-chat@2024-12-26/standard", ("0.014", "0.14", "0.28")),
    ("deepseek-chat", "2025-02-08T16:00:00Z", "deepseek-chat@2025-02-08/standard", ("0.07", "0.27", "1.10")),
    ("deepseek-chat", "2025-02-26T16:29:59Z", "deepseek-chat@2025-02-08/standard", ("0.07", "0.27", "1.10")),
    ("deepseek-chat", "2025-02-26T16:30:00Z", "deepseek-chat@2025-02-26/discount", ("0.035", "0.135", "0.55")),
    ("deepseek-chat", "2025-09-05T15:59:59Z", "deepseek-chat@2025-02-26/standard", ("0.07", "0.27", "1.10")),
    ("deepseek-chat", "2025-09-05T16:00:00Z", "deepseek-chat@2025-09-05/standard", ("0.07", "0.56", "1.68")),
    ("deepseek-chat", "2025-09-28T23:59:59Z", "deepseek-chat@2025-09-05/standard", ("0.07", "0.56", "1.68")),
    ("deepseek-chat", "2025-09-29T00:00:00Z", "deepseek-chat@2025-09-29/standard", ("0.028", "0.28", "0.42")),
    ("deepseek-chat", "2026-04-23T23:59:59Z", "deepseek-chat@2025-09-29/standard", ("0.028", "0.28", "0.42")),
    ("deepseek-chat", "2026-04-24T00:00:00Z", "deepseek-chat>deepseek-v4-flash@2026-04-24/standard",
     ("0.028", "0.14", "0.28")),
    ("deepseek-chat", "2026-07-24T15:59:59Z", "deepseek-chat>deepseek-v4-flash@2026-04-26/standard",
     ("0.0028", "0.14", "0.28")),
    ("deepseek-chat", "2026-07-24T16:00:00Z", None, None),
    ("deepseek-coder", "2024-09-04T23:59:59Z", "deepseek-coder@2024-08-02/standard", ("0.014", "0.14", "0.28")),
    ("deepseek-coder", "2024-09-05T00:00:00Z", "deepseek-coder>deepseek-chat@2024-08-02/standard",
     ("0.014", "0.14", "0.28")),
    ("deepseek-coder", "2024-12-25T23:59:59Z", "deepseek-coder>deepseek-chat@2024-08-02/standard",
     ("0.014", "0.14", "0.28")),
    ("deepseek-coder", "2024-12-26T00:00:00Z", None, None),
    ("deepseek-reasoner", "2025-01-19T23:59:59Z", None, None),
    ("deepseek-reasoner", "2025-01-20T00:00:00Z", "deepseek-reasoner@2025-01-20/standard", ("0.14", "0.55", "2.19")),
    ("deepseek-reasoner", "2025-02-26T16:29:59Z", "deepseek-reasoner@2025-01-20/standard", ("0.14", "0.55", "2.19")),
    ("deepseek-reasoner", "2025-02-26T16:30:00Z", "deepseek-reasoner@2025-02-26/discount", ("0.035", "0.135", "0.55")),
    ("deepseek-reasoner", "2025-09-05T15:59:59Z", "deepseek-reasoner@2025-02-26/standard", ("0.14", "0.55", "2.19")),
    ("deepseek-reasoner", "2025-09-05T16:00:00Z", "deepseek-reasoner@2025-09-05/standard", ("0.07", "0.56", "1.68")),
    ("deepseek-reasoner", "2025-09-28T23:59:59Z", "deepseek-reasoner@2025-09-05/standard", ("0.07", "0.56", "1.68")),
    ("deepseek-reasoner", "2025-09-29T00:00:00Z", "deepseek-reasoner@2025-09-29/standard", ("0.028", "0.28", "0.42")),
    ("deepseek-reasoner", "2026-04-24T00:00:00Z", "deepseek-reasoner>deepseek-v4-flash@2026-04-24/standard",
     ("0.028", "0.14", "0.28")),
    ("deepseek-reasoner", "2026-07-24T16:00:00Z", None, None),
    ("deepseek-v4-flash", "2026-04-23T23:59:59Z", None, None),
    ("deepseek-v4-flash", "2026-04-24T00:00:00Z", "deepseek-v4-flash@2026-04-24/standard", ("0.028", "0.14", "0.28")),
    ("deepseek-v4-flash", "2026-04-26T12:14:59Z", "deepseek-v4-flash@2026-04-24/standard", ("0.028", "0.14", "0.28")),
    ("deepseek-v4-flash", "2026-04-26T12:15:00Z", "deepseek-v4-flash@2026-04-26/standard", ("0.0028", "0.14", "0.28")),
    ("deepseek-v4-flash", "2026-08-16T15:59:59Z", "deepseek-v4-flash@2026-04-26/standard", ("0.0028", "0.14", "0.28")),
    # 16:00 UTC on 16 Aug is 00:00 on Monday 17 Aug in Beijing: off-peak.
    ("deepseek-v4-flash", "2026-08-16T16:00:00Z", "deepseek-v4-flash@2026-08-16/off-peak", ("0.007", "0.22", "0.66")),
    ("deepseek-v4-flash", "2026-08-22T23:59:59Z", "deepseek-v4-flash@2026-08-16/off-peak", ("0.007", "0.22", "0.66")),
    ("deepseek-v4-flash", "2026-08-23T00:00:00Z", "deepseek-v4-flash@2026-08-23/off-peak", ("0.007", "0.22", "0.66")),
    ("deepseek-v4-flash", "2026-09-09T23:59:59Z", "deepseek-v4-flash@2026-08-23/off-peak", ("0.007", "0.22", "0.66")),
    ("deepseek-v4-flash", "2026-09-10T00:00:00Z", "deepseek-v4-flash>deepseek-flash@2026-09-10/off-peak",
     ("0.003", "0.15", "0.60")),
    ("deepseek-v4-pro", "2026-04-23T23:59:59Z", None, None),
    ("deepseek-v4-pro", "2026-04-24T00:00:00Z", "deepseek-v4-pro@2026-04-24/standard", ("0.03625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-04-26T12:14:59Z", "deepseek-v4-pro@2026-04-24/standard", ("0.03625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-04-26T12:15:00Z", "deepseek-v4-pro@2026-04-26/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-05-05T15:59:59Z", "deepseek-v4-pro@2026-04-26/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-05-05T16:00:00Z", "deepseek-v4-pro@2026-05-05/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-05-21T23:59:59Z", "deepseek-v4-pro@2026-05-05/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-05-22T00:00:00Z", "deepseek-v4-pro@2026-05-22/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-08-16T15:59:59Z", "deepseek-v4-pro@2026-05-22/standard", ("0.003625", "0.435", "0.87")),
    ("deepseek-v4-pro", "2026-08-16T16:00:00Z", "deepseek-v4-pro@2026-08-16/off-peak", ("0.022", "0.66", "1.98")),
    ("deepseek-v4-pro", "2026-08-22T23:59:59Z", "deepseek-v4-pro@2026-08-16/off-peak", ("0.022", "0.66", "1.98")),
    ("deepseek-v4-pro", "2026-08-23T00:00:00Z", "deepseek-v4-pro@2026-08-23/off-peak", ("0.022", "0.66", "1.98")),
    ("deepseek-v4-pro", "2026-09-09T23:59:59Z", "deepseek-v4-pro@2026-08-23/off-peak", ("0.022", "0.66", "1.98")),
    ("deepseek-v4-pro", "2026-09-10T00:00:00Z", "deepseek-v4-pro@2026-09-10/off-peak", ("0.022", "0.66", "1.98")),
    ("deepseek-flash", "2026-09-09T23:59:59Z", None, None),
    ("deepseek-flash", "2026-09-10T00:00:00Z", "deepseek-flash@2026-09-10/off-peak", ("0.003", "0.15", "0.60")),
]


@pytest.mark.parametrize(("model", "instant", "tariff_id", "rates"), BOUNDARIES,
                         ids=[f"{m}@{i}" for m, i, _, _ in BOUNDARIES])
def test_each_side_of_every_period_boundary(model: str, instant: str, tariff_id: str | None,
                                            rates: tuple[str, str, str] | None) -> None:
    result = quote(shipped_book(), model, _at(instant), cache_hit_tokens=1_000_000, cache_miss_tokens=1_000_000,
                   output_tokens=1_000_000)
    if tariff_id is None:
        assert isinstance(result, Unpriced) and result.tariff_id == "unpriced:no-tariff"
        return
    assert rates is not None and isinstance(result, Quote)
    assert result.tariff_id == tariff_id
    assert (result.cache_hit, result.cache_miss, result.output) == tuple(Decimal(r) for r in rates)


# -- time of use ------------------------------------------------------------------------------


def _period(model: str, instant: str) -> str:
    q = _quote(model, _at(instant), 1, 1, 1)
    return q.period


@pytest.mark.parametrize(
    ("instant", "period"),
    [
        ("2025-03-03T16:29:59Z", "standard"),
        ("2025-03-03T16:30:00Z", "discount"),
        ("2025-03-03T23:59:59Z", "discount"),
        ("2025-03-04T00:00:00Z", "discount"),  # after midnight UTC, still the window that began the evening before
        ("2025-03-04T00:29:59Z", "discount"),
        ("2025-03-04T00:30:00Z", "standard"),
    ],
)
def test_the_2025_nightly_window_crosses_midnight_utc(instant: str, period: str) -> None:
    assert _period("deepseek-chat", instant) == period
    assert _period("deepseek-reasoner", instant) == period


@pytest.mark.parametrize(
    ("instant", "period"),
    [  # Monday 14 Sep 2026; Beijing is UTC+8: peak 09-12 and 14-18 Beijing = 01-04 and 06-10 UTC
        ("2026-09-14T00:59:59Z", "off-peak"),
        ("2026-09-14T01:00:00Z", "peak"),
        ("2026-09-14T03:59:59Z", "peak"),
        ("2026-09-14T04:00:00Z", "off-peak"),
        ("2026-09-14T05:59:59Z", "off-peak"),
        ("2026-09-14T06:00:00Z", "peak"),
        ("2026-09-14T09:59:59Z", "peak"),
        ("2026-09-14T10:00:00Z", "off-peak"),
    ],
)
def test_peak_hours_are_beijing_wall_clock_hours(instant: str, period: str) -> None:
    assert _period("deepseek-flash", instant) == period


def test_a_weekday_peak_hour_is_off_peak_on_a_saturday_and_on_a_public_holiday() -> None:
    weekday = _quote("deepseek-flash", _at("2026-09-30T02:00:00Z"), 0, 1_000_000, 0)  # Wednesday 10:00 Beijing
    saturday = _quote("deepseek-flash", _at("2026-09-12T02:00:00Z"), 0, 1_000_000, 0)  # Saturday 10:00 Beijing
    holiday = _quote("deepseek-flash", _at("2026-10-01T02:00:00Z"), 0, 1_000_000, 0)  # Thursday, National Day
    assert weekday.period == "peak" and weekday.cache_miss == Decimal("0.30")
    assert saturday.period == "off-peak" and saturday.cache_miss == Decimal("0.15")
    assert holiday.period == "off-peak" and holiday.cache_miss == Decimal("0.15")
    assert holiday.tariff_id == "deepseek-flash@2026-09-10/off-peak"


def test_holidays_are_judged_on_the_beijing_date_not_the_utc_date() -> None:
    # 2026-09-30 17:00 UTC is already 1 October (National Day) in Beijing; 01:00 Beijing is off-peak anyway,
    # so take the first peak hour of 8 October (a working Thursday) against 7 October (still a holiday).
    assert _period("deepseek-flash", "2026-10-07T01:00:00Z") == "off-peak"
    assert _period("deepseek-flash", "2026-10-08T01:00:00Z") == "peak"


def test_weekends_were_peak_in_the_first_week_of_peak_pricing() -> None:
    assert _period("deepseek-v4-flash", "2026-08-22T02:00:00Z") == "peak"  # Saturday, before the exemption
    assert _period("deepseek-v4-flash", "2026-08-29T02:00:00Z") == "off-peak"  # Saturday, after it


def test_adjusted_working_saturday_stays_off_peak_in_the_shipped_book_but_a_team_can_bill_it(tmp_path: Path) -> None:
    saturday_worked = "2026-10-10T02:00:00Z"  # an adjusted working day (调休上班)
    assert _period("deepseek-flash", saturday_worked) == "off-peak"
    path = tmp_path / "team.toml"
    path.write_text(textwrap.dedent("""\
        [book]
        extends = "dsmeter"

        [schedule.beijing-peak-workdays]
        time_zone = "Asia/Shanghai"
        default = "off-peak"
        holidays = "cn-public-holidays"
        source = "our reading: adjusted working days are billed as weekdays"
        windows = [
          { period = "peak", days = "workdays", from = "09:00", to = "12:00" },
          { period = "peak", days = "workdays", from = "14:00", to = "18:00" },
        ]
        """), encoding="utf-8")
    team = load_book(path)
    result = quote(team, "deepseek-flash", _at(saturday_worked), cache_hit_tokens=0, cache_miss_tokens=1,
                   output_tokens=0)
    assert isinstance(result, Quote) and result.period == "peak"


# -- records: which model, which time, what is unknown -----------------------------------------


def _record(**overrides: object) -> UsageRecord:
    values: dict[str, object] = dict(
        started_at=_at("2025-03-03T12:00:00Z"), requested_model="deepseek-reasoner", model="deepseek-chat",
        prompt_tokens=1_500_000, prompt_cache_hit_tokens=1_000_000, prompt_cache_miss_tokens=500_000,
        completion_tokens=2_000_000, reasoning_tokens=1_500_000,
    )
    values.update(overrides)
    return UsageRecord(**values)  # type: ignore[arg-type]


def test_a_record_is_priced_by_the_model_the_response_names() -> None:
    priced = price_record(_record(), shipped_book())
    # deepseek-chat's standard prices then, not deepseek-reasoner's
    assert priced.cost_cache_hit == _cost(1_000_000, "0.07")
    assert priced.cost_cache_miss == _cost(500_000, "0.27")
    assert priced.cost_output == _cost(2_000_000, "1.10")  # reasoning tokens are inside completion_tokens
    assert priced.cost == priced.cost_cache_hit + priced.cost_cache_miss + priced.cost_output
    assert (priced.currency, priced.tariff_id) == ("USD", "deepseek-chat@2025-02-26/standard")


def test_the_requested_model_prices_a_call_whose_response_named_none_or_an_unknown_model() -> None:
    for response_model in (None, "DeepSeek-V3-0324-internal"):
        priced = price_record(_record(model=response_model), shipped_book())
        assert priced.tariff_id == "deepseek-reasoner@2025-02-26/standard"
        assert priced.cost_output == _cost(2_000_000, "2.19")


def test_an_unknown_model_is_unpriced_never_zero() -> None:
    priced = price_record(_record(model="mystery", requested_model="mystery"), shipped_book())
    assert priced.cost is None and priced.cost_cache_hit is None and priced.cost_output is None
    assert priced.currency is None and priced.tariff_id == "unpriced:no-tariff"


def test_a_call_without_any_token_counts_has_no_price_at_all() -> None:
    priced = price_record(_record(prompt_tokens=None, prompt_cache_hit_tokens=None, prompt_cache_miss_tokens=None,
                                  completion_tokens=None, reasoning_tokens=None), shipped_book())
    assert (priced.cost, priced.currency, priced.tariff_id) == (None, None, None)


def test_an_unknown_cache_split_is_priced_as_all_misses_and_flagged() -> None:
    priced = price_record(_record(prompt_cache_hit_tokens=None, prompt_cache_miss_tokens=None), shipped_book())
    assert priced.cost_cache_hit is None  # unknown, not 0
    assert priced.cost_cache_miss == _cost(1_500_000, "0.27")
    assert priced.cost_output is not None and priced.cost == priced.cost_cache_miss + priced.cost_output
    assert priced.tariff_id == "deepseek-chat@2025-02-26/standard#all-miss"


def test_a_known_half_of_the_split_and_the_prompt_give_the_other_half_exactly() -> None:
    priced = price_record(_record(prompt_cache_miss_tokens=None), shipped_book())
    assert priced.cost_cache_miss == _cost(500_000, "0.27") and not priced.tariff_id.endswith("#all-miss")  # type: ignore[union-attr]


def test_a_record_missing_its_completion_count_is_unpriced_as_incomplete() -> None:
    priced = price_record(_record(completion_tokens=None), shipped_book())
    assert priced.cost is None and priced.tariff_id == "unpriced:incomplete-usage"


def test_the_period_is_picked_by_the_start_unless_the_book_says_finish(tmp_path: Path) -> None:
    record = _record(started_at=_at("2025-03-03T16:29:00Z"), finished_at=_at("2025-03-03T16:31:00Z"))
    assert price_record(record, shipped_book()).tariff_id == "deepseek-chat@2025-02-26/standard"
    shipped = (Path(__file__).resolve().parent.parent / "collector" / "prices.toml").read_text(encoding="utf-8")
    path = tmp_path / "by-finish.toml"
    path.write_text(shipped.replace('price_at = "started_at"', 'price_at = "finished_at"'), encoding="utf-8")
    by_finish = load_book(path)
    assert by_finish.price_at == "finished_at"
    assert price_record(record, by_finish).tariff_id == "deepseek-chat@2025-02-26/discount"
    unfinished = record.replace(finished_at=None)
    assert price_record(unfinished, by_finish).tariff_id == "deepseek-chat@2025-02-26/standard"


def test_a_book_in_cny_prices_rows_in_cny_and_leaves_periods_without_cny_unpriced() -> None:
    cny = price_record(_record(), shipped_book(), currency="CNY")
    assert cny.currency == "CNY" and cny.cost_output == _cost(2_000_000, "8")
    later = price_record(_record(started_at=_at("2025-10-10T00:00:00Z")), shipped_book(), currency="CNY")
    assert later.cost is None and later.tariff_id == "unpriced:no-tariff"  # no CNY figures were published then


def test_the_default_pricer_keeps_a_price_set_upstream_and_prices_the_rest() -> None:
    pricer = BookPricer(book=shipped_book())
    already = _record(currency="USD", cost=Decimal("1.5"), tariff_id="contract-7")
    assert pricer(already) is already
    assert pricer(_record()).tariff_id == "deepseek-chat@2025-02-26/standard"


def test_a_broken_book_leaves_rows_unpriced_with_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[book]\ncurrency = 12\n", encoding="utf-8")
    pricer = BookPricer(str(path))
    with caplog.at_level("ERROR", logger="dsmeter.pricing"):
        first, second = pricer(_record()), pricer(_record())
    assert first.cost is None and first.tariff_id == "unpriced:book-error" and second.tariff_id == "unpriced:book-error"
    assert caplog.text.count("price book cannot be used") == 1  # said once, not per call


# -- properties -------------------------------------------------------------------------------

INSTANTS = [
    ("deepseek-chat", "2024-06-01T00:00:00Z"), ("deepseek-chat", "2025-03-03T17:00:00Z"),
    ("deepseek-reasoner", "2025-03-03T12:00:00Z"), ("deepseek-v4-pro", "2026-04-25T00:00:00Z"),
    ("deepseek-v4-pro", "2026-06-01T00:00:00Z"), ("deepseek-v4-flash", "2026-08-17T02:00:00Z"),
    ("deepseek-flash", "2026-09-14T02:00:00Z"), ("deepseek-flash", "2026-10-01T02:00:00Z"),
    ("deepseek-v4-pro", "2026-11-23T03:00:00Z"),
]
counts = st.integers(min_value=0, max_value=10**9)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(INSTANTS), counts, counts, counts, st.integers(min_value=0, max_value=1000),
       st.booleans(), st.sampled_from(["USD", "CNY"]))
def test_cost_is_linear_exact_never_negative_and_its_parts_sum_to_the_total(
    case: tuple[str, str], hit: int, miss: int, out: int, k: int, list_prices: bool, currency: str,
) -> None:
    model, instant = case
    at = _at(instant)
    one = quote(shipped_book(), model, at, cache_hit_tokens=hit, cache_miss_tokens=miss, output_tokens=out,
                currency=currency, list_prices=list_prices)
    many = quote(shipped_book(), model, at, cache_hit_tokens=k * hit, cache_miss_tokens=k * miss,
                 output_tokens=k * out, currency=currency, list_prices=list_prices)
    if isinstance(one, Unpriced):
        assert isinstance(many, Unpriced)
        return
    assert isinstance(many, Quote) and one.cache_hit is not None and many.cache_hit is not None
    parts = (one.cache_hit, one.cache_miss, one.output)
    assert all(isinstance(p, Decimal) and p >= 0 for p in parts)
    assert one.total == sum(parts)
    assert (many.cache_hit, many.cache_miss, many.output) == tuple(k * p for p in parts)
    # exact: the ledger keeps 10^-12, and every cost is a whole number of those units
    for part in parts:
        assert (part * 10**12) == (part * 10**12).to_integral_value()
    rates = one.tariff.rates(one.period, currency, list_prices=list_prices)
    assert rates is not None
    assert Fraction(one.total) == (Fraction(hit) * Fraction(rates.hit) + Fraction(miss) * Fraction(rates.miss)
                                   + Fraction(out) * Fraction(rates.output)) / 1_000_000


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)),
       st.sampled_from(["deepseek-chat", "deepseek-reasoner", "deepseek-v4-flash", "deepseek-v4-pro",
                        "deepseek-flash", "deepseek-coder"]))
def test_any_instant_from_2024_to_2027_prices_positively_or_is_unpriced_never_zero(at: datetime, model: str) -> None:
    result = quote(shipped_book(), model, at, cache_hit_tokens=7, cache_miss_tokens=11, output_tokens=13)
    if isinstance(result, Quote):
        assert result.total > 0 and result.tariff.covers(at)
        assert result.period in result.tariff.periods
    else:
        assert isinstance(result, Unpriced) and result.reason == "no-tariff"


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(2025, 2, 27), max_value=datetime(2025, 9, 5), timezones=st.just(UTC)))
def test_the_2025_discount_is_exactly_the_utc_times_from_16_30_to_00_30(at: datetime) -> None:
    # api-facts: "a collector needs time >= 16:30 OR time < 00:30"
    minutes = at.hour * 60 + at.minute
    expected = "discount" if minutes >= 16 * 60 + 30 or minutes < 30 else "standard"
    assert _quote("deepseek-chat", at, 1, 1, 1).period == expected


@settings(max_examples=500, deadline=None)
@given(st.datetimes(min_value=datetime(2026, 8, 23), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)))
def test_peak_is_exactly_beijing_weekday_hours_outside_public_holidays(at: datetime) -> None:
    from zoneinfo import ZoneInfo

    beijing = at.astimezone(ZoneInfo("Asia/Shanghai"))
    holidays = shipped_book().calendars["cn-public-holidays"].holidays
    hour = beijing.hour
    peak = beijing.weekday() < 5 and beijing.date() not in holidays and (9 <= hour < 12 or 14 <= hour < 18)
    model = "deepseek-flash" if at >= _at("2026-09-10T00:00:00Z") else "deepseek-v4-flash"
    assert _quote(model, at, 1, 1, 1).period == ("peak" if peak else "off-peak")
