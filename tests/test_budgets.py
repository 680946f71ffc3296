"""Budgets: states at their exact boundaries, the exit codes a nightly job alerts on, and bad input."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from click.testing import CliRunner

from collector.budgets import (
    EXCEEDED,
    EXIT_BUDGET_EXCEEDED,
    EXIT_BUDGET_SOFT,
    OK,
    SOFT,
    BudgetSpec,
    exit_code_for,
    judge,
    parse_amount,
    parse_soft,
)
from collector.cli import main
from collector.errors import UsageError
from collector.pricing import default_pricer
from collector.record import UsageRecord
from collector.rollups import attach
from collector.store import LedgerStore
from collector.writer import LedgerWriter

PICO = Decimal("0.000000000001")
AS_OF = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _budget(monthly: str = "100", soft: str = "0.8") -> BudgetSpec:
    return BudgetSpec(id=1, scope={"team": "search"}, currency="USD", monthly=Decimal(monthly), soft=Decimal(soft))


@pytest.mark.parametrize(("spent", "forecast", "state"), [
    (Decimal("80") - PICO, Decimal("80") - PICO, OK),  # one pico-dollar under the soft threshold
    (Decimal("80"), Decimal("80"), SOFT),  # reaching the soft threshold counts
    (Decimal("100"), Decimal("100"), SOFT),  # spending the whole budget is not exceeding it
    (Decimal("100") + PICO, Decimal("100") + PICO, EXCEEDED),
    (Decimal("10"), Decimal("100"), OK),  # a forecast of exactly the budget is fine
    (Decimal("10"), Decimal("100") + PICO, SOFT),  # a forecast over it is a soft alert
    (Decimal("0"), Decimal("0"), OK),
])
def test_judge_at_the_exact_boundaries(spent: Decimal, forecast: Decimal, state: str) -> None:
    status = judge(_budget(), spent, forecast, AS_OF)
    assert status.state == state
    assert status.share == (spent / 100).quantize(Decimal("0.0001"))


def test_exit_code_is_the_worst_state() -> None:
    ok, soft, over = (judge(_budget(), Decimal(s), Decimal(s), AS_OF) for s in ("1", "90", "101"))
    assert [exit_code_for([]), exit_code_for([ok]), exit_code_for([ok, soft]), exit_code_for([soft, over, ok])] == [
        0, 0, EXIT_BUDGET_SOFT, EXIT_BUDGET_EXCEEDED]
    assert (EXIT_BUDGET_SOFT, EXIT_BUDGET_EXCEEDED) == (4, 5)


@pytest.mark.parametrize("text", ["-5", "0", "-0.01", "abc", "NaN", "Infinity", "1.0000001"])
def test_amounts_that_are_not_a_positive_budget_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_amount(text)


def test_soft_threshold_as_fraction_or_percentage() -> None:
    assert parse_soft("0.8") == parse_soft("80%") == Decimal("0.8")
    assert parse_soft("1") == Decimal(1)
    for bad in ("0", "1.01", "120%", "-0.5", "x"):
        with pytest.raises(UsageError):
            parse_soft(bad)


def _spend(url: str, calls: list[tuple[str, str, str]]) -> None:
    """Calls (ISO start, team, exact USD cost) through the real writer; their costs are kept as given."""
    LedgerStore(url).migrate()
    with LedgerWriter(url, pricer=default_pricer()) as writer:
        attach(writer, url)
        for started, team, cost in calls:
            amount = Decimal(cost)
            writer.submit(UsageRecord(
                started_at=datetime.fromisoformat(started), model="deepseek-flash", status="completed",
                prompt_tokens=10, prompt_cache_hit_tokens=0, prompt_cache_miss_tokens=10, completion_tokens=1,
                currency="USD", cost=amount, cost_cache_hit=Decimal(0), cost_cache_miss=amount, cost_output=Decimal(0),
                tariff_id="test", tags={"team": team}))
        assert writer.flush(30)


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(("cost", "code"), [
    ("79.999999999999", 0),
    ("80", EXIT_BUDGET_SOFT),
    ("100", EXIT_BUDGET_SOFT),
    ("100.000000000001", EXIT_BUDGET_EXCEEDED),
])
def test_check_exit_codes_at_the_boundaries_on_the_last_day_of_the_month(db_url: str, cost: str, code: int) -> None:
    # On 31 October nothing is left of the month: the forecast is the spend, only the spend decides.
    _spend(db_url, [("2026-10-31T12:00:00+00:00", "search", cost), ("2026-10-31T12:00:00+00:00", "ads", "500")])
    assert _cli("budget", "set", "--db", db_url, "--tag", "team=search", "--monthly", "100")[0] == 0
    exit_code, out, _ = _cli("budget", "check", "--db", db_url, "--date", "2026-10-31", "--format", "json")
    assert exit_code == code
    [row] = json.loads(out)["budgets"]
    assert (row["scope"], Decimal(row["spent"]), row["forecast"] == row["spent"]) == ({"team": "search"},
                                                                                    Decimal(cost), True)


@pytest.mark.parametrize(("monthly", "code"), [("70", 0), ("69.999999", EXIT_BUDGET_SOFT)])
def test_the_forecast_alone_crosses_the_soft_threshold(sqlite_url: str, monthly: str, code: int) -> None:
    # As of the end of 24 October: 35 spent on the 18th; run rate 35/7 = 5 a day; 7 days left: forecast 70.
    _spend(sqlite_url, [("2026-10-18T09:30:00+00:00", "search", "35")])
    _cli("budget", "set", "--db", sqlite_url, "--tag", "team=search", "--monthly", monthly, "--soft", "100%")
    exit_code, out, _ = _cli("budget", "check", "--db", sqlite_url, "--date", "2026-10-24", "--format", "json")
    [row] = json.loads(out)["budgets"]
    assert (Decimal(row["spent"]), Decimal(row["forecast"]), exit_code) == (Decimal(35), Decimal(70), code)


def test_set_list_update_remove(sqlite_url: str) -> None:
    _spend(sqlite_url, [("2026-10-05T12:00:00+00:00", "search", "1")])
    code, out, _ = _cli("budget", "set", "--db", sqlite_url, "--tag", "team=search", "--monthly", "500")
    assert (code, out) == (0, "created budget for team=search: 500 USD a month, soft threshold 0.8\n")
    code, out, _ = _cli("budget", "set", "--db", sqlite_url, "--tag", "team=search", "--monthly", "650.50",
                        "--soft", "90%")
    assert out.startswith("updated budget for team=search: 650.50 USD")
    assert _cli("budget", "set", "--db", sqlite_url, "--monthly", "2000", "--currency", "usd")[0] == 0
    code, out, _ = _cli("budget", "list", "--db", sqlite_url, "--format", "json")
    assert json.loads(out) == [  # ordered by the scope's canonical JSON: '{"team"...' before '{}'
        {"scope": {"team": "search"}, "currency": "USD", "monthly": "650.5", "soft": "0.9"},
        {"scope": {}, "currency": "USD", "monthly": "2000", "soft": "0.8"},
    ]
    assert _cli("budget", "remove", "--db", sqlite_url, "--tag", "team=search")[0] == 0
    code, _, err = _cli("budget", "remove", "--db", sqlite_url, "--tag", "team=search")
    assert code == 2 and "no USD budget for team=search" in err
    assert len(json.loads(_cli("budget", "list", "--db", sqlite_url, "--format", "json")[1])) == 1


@pytest.mark.parametrize(("args", "fragment"), [
    (["--tag", "team=search", "--monthly", "-500"], "positive"),
    (["--tag", "team=search", "--monthly", "0"], "positive"),
    (["--tag", "team=search", "--monthly", "five"], "not an amount"),
    (["--tag", "team=search", "--monthly", "5", "--soft", "1.5"], "soft threshold"),
    (["--tag", "team=search", "--monthly", "5", "--currency", "dollars"], "currency code"),
    (["--tag", "taem=search", "--monthly", "5"], "no call carries tag key 'taem'"),
    (["--tag", "team", "--monthly", "5"], "key=value"),
])
def test_bad_budgets_are_one_line_and_exit_2(sqlite_url: str, args: list[str], fragment: str) -> None:
    _spend(sqlite_url, [("2026-10-05T12:00:00+00:00", "search", "1")])
    code, _, err = _cli("budget", "set", "--db", sqlite_url, *args)
    assert code == 2 and fragment in err and err.count("\n") == 1, err
    assert json.loads(_cli("budget", "list", "--db", sqlite_url, "--format", "json")[1]) == []


def test_a_new_tag_key_needs_allow_new_tag(sqlite_url: str) -> None:
    _spend(sqlite_url, [("2026-10-05T12:00:00+00:00", "search", "1")])
    code, out, _ = _cli("budget", "set", "--db", sqlite_url, "--tag", "project=apollo", "--monthly", "50",
                        "--allow-new-tag")
    assert code == 0 and "project=apollo" in out


def test_report_shows_budgets_and_exits_with_their_code(sqlite_url: str) -> None:
    _spend(sqlite_url, [("2026-10-31T12:00:00+00:00", "search", "120")])
    _cli("budget", "set", "--db", sqlite_url, "--tag", "team=search", "--monthly", "100")
    code, out, _ = _cli("report", "--db", sqlite_url, "--date", "2026-10-31")
    assert code == EXIT_BUDGET_EXCEEDED
    assert "| team=search | 100.00 USD | 120.00 USD | 120.0% | 120.00 USD | 120.0% | exceeded |" in out
    assert _cli("report", "--db", sqlite_url, "--date", "2026-10-31", "--no-budgets")[0] == 0


def test_check_help_documents_the_exit_codes() -> None:
    code, out, _ = _cli("budget", "check", "--help")
    assert code == 0
    for line in ("0  every budget is ok", "4  a budget reached its soft threshold", "5  a budget is exceeded",
                 "2  bad input", "3  the database is unavailable", "6  the --notify webhook failed"):
        assert line in out


def test_check_with_an_unreachable_webhook_prints_then_exits_6(sqlite_url: str) -> None:
    _spend(sqlite_url, [("2026-10-31T12:00:00+00:00", "search", "120")])
    _cli("budget", "set", "--db", sqlite_url, "--tag", "team=search", "--monthly", "100")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = _cli("budget", "check", "--db", sqlite_url, "--date", "2026-10-31", "--notify",
                          f"http://127.0.0.1:{port}/hook")
    assert code == 6 and out.startswith("EXCEEDED  team=search") and "webhook" in err
