"""Reconciliation against the simulator's /user/balance: drift, top-ups as jumps, unmetered calls, errors."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from openai import OpenAI

import collector
from collector.cli import main
from collector.pricing import default_pricer
from collector.queries import Filters, spend_totals
from collector.reconcile import Snapshot, reconcile_windows
from collector.rollups import attach
from collector.simulator import Simulator
from collector.simulator_balance import Account
from collector.store import LedgerStore
from collector.writer import LedgerWriter

KEY = "sk-reconcile-test-key-5f1c0a"
CENT = Decimal("0.01")
# Dear prices, so one call costs about a dollar and a cent of rounding in the API's balance is small
# against it. The ledger's pricer and the simulator's billing both read this book ($DSMETER_PRICES).
BOOK = """
[book]
name = "reconcile test book"
currency = "USD"
per_tokens = 1_000_000
price_at = "started_at"

[[tariff]]
model = "deepseek-flash"
from = 2020-01-01T00:00:00Z
prices.standard.USD = { hit = 100, miss = 1000, output = 2000 }
source = "test"
"""
PROMPT = [{"role": "user", "content": " ".join(f"word{i}" for i in range(700))}]


@dataclass
class Rig:
    url: str
    sim: Simulator
    writer: LedgerWriter
    client: OpenAI

    def calls(self, n: int, *, metered: bool = True) -> None:
        before = len(self.sim.calls)
        for i in range(n):
            messages = [{"role": "user", "content": f"call {before + i}: " + PROMPT[0]["content"]}]
            if metered:
                self.client.chat.completions.create(model="deepseek-flash", messages=messages)  # type: ignore[arg-type]
            else:
                OpenAI(base_url=self.sim.base_url, api_key=KEY).chat.completions.create(
                    model="deepseek-flash", messages=messages)  # type: ignore[arg-type]
        self.sim.wait_for_calls(before + n, finished=True)
        assert self.writer.flush(30)

    def reconcile(self, *args: str) -> tuple[int, Any]:
        result = CliRunner().invoke(main, ["reconcile", "--db", self.url, "--upstream", self.sim.base_url,
                                           "--format", "json", *args])
        assert result.exit_code in (0, 4), result.output
        return result.exit_code, json.loads(result.stdout)


@pytest.fixture
def rig(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    book = tmp_path / "prices.toml"
    book.write_text(BOOK)
    monkeypatch.setenv("DSMETER_PRICES", str(book))
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    LedgerStore(db_url).migrate()
    with Simulator(seed=3) as sim, LedgerWriter(db_url, pricer=default_pricer()) as writer:
        attach(writer, db_url)
        http = collector.metered_client(sink=writer.submit)
        # openai 3.x annotates its own httpx fork but takes a plain httpx.Client.
        yield Rig(db_url, sim, writer, OpenAI(base_url=sim.base_url, api_key=KEY, http_client=http))  # type: ignore[arg-type]
        http.close()


def _ledger_spend(url: str, start: str, end: str) -> Decimal:
    store = LedgerStore(url)
    spent = spend_totals(store.engine, Filters(since=datetime.fromisoformat(start), until=datetime.fromisoformat(end)))
    store.close()
    return spent.get("USD", Decimal(0))


def test_balance_drop_matches_the_ledger_and_a_top_up_is_reported_exactly(rig: Rig) -> None:
    rig.sim.account = Account(granted="1000", topped_up="100")
    _, first = rig.reconcile()
    [usd] = first["currencies"]
    assert usd["windows"] == [] and first["balances"][0]["total"] == "1100"
    rig.calls(3)
    rig.sim.account.top_up("50")
    rig.calls(2)
    _, second = rig.reconcile()
    [usd] = second["currencies"]
    [window] = usd["windows"]
    assert (window["top_up"], window["exact_top_up"], usd["top_ups"]) == ("50", True, "50")
    billed = rig.sim.account.billed
    assert billed > 5  # about a dollar a call: the check below is not lost in the cents
    assert abs(Decimal(usd["provider_usage"]) - billed) <= CENT
    assert Decimal(usd["ledger_spend"]) == _ledger_spend(rig.url, window["start"], window["end"])
    assert abs(Decimal(usd["ledger_spend"]) - billed) < Decimal("0.000001")  # the ledger priced what was billed
    assert abs(Decimal(usd["drift"])) <= CENT and usd["unmeasured_windows"] == 0
    assert Decimal(window["balance_after"]) - Decimal(window["balance_before"]) < 50  # the top-up is no "income"


def test_with_no_granted_credit_a_top_up_is_a_jump_left_out_of_the_drift(rig: Rig) -> None:
    rig.sim.account = Account(granted="0", topped_up="20")
    rig.reconcile()
    rig.calls(2)
    rig.sim.account.top_up("100")
    rig.calls(1)
    _, jump = rig.reconcile()
    [usd] = jump["currencies"]
    [window] = usd["windows"]
    assert window["provider_usage"] is None and window["exact_top_up"] is False
    assert abs(Decimal(window["top_up"]) - 100) <= CENT  # rise + what the ledger spent inside the window
    assert usd["unmeasured_windows"] == 1 and usd["provider_usage"] == "0" and usd["drift_percent"] is None
    rig.calls(3)
    _, later = rig.reconcile("--since", jump["currencies"][0]["windows"][0]["start"])
    [usd] = later["currencies"]
    assert [w["provider_usage"] is None for w in usd["windows"]] == [True, False]
    assert abs(Decimal(usd["drift"])) <= CENT and Decimal(usd["provider_usage"]) > 2


def test_calls_the_meter_never_saw_show_as_negative_drift(rig: Rig) -> None:
    rig.sim.account = Account(granted="500", topped_up="0")
    rig.reconcile()
    rig.calls(3)
    billed_metered = rig.sim.account.billed
    rig.calls(1, metered=False)  # straight to the API, around the meter
    unmetered = rig.sim.account.billed - billed_metered
    code, result = rig.reconcile("--max-drift", "1")
    [usd] = result["currencies"]
    assert code == 4
    assert abs(Decimal(usd["drift"]) + unmetered) <= CENT
    assert Decimal(usd["drift_percent"]) < -10
    text = CliRunner().invoke(main, ["reconcile", "--db", rig.url, "--upstream", rig.sim.base_url])
    assert text.exit_code == 0 and "drift" in text.stdout and KEY not in text.output


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_key_is_exit_2_and_an_unreachable_api_is_exit_6(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    result = CliRunner().invoke(main, ["reconcile", "--db", sqlite_url])
    assert result.exit_code == 2 and "DEEPSEEK_API_KEY" in result.stderr and result.stderr.count("\n") == 1
    monkeypatch.setenv("MY_KEY", KEY)
    result = CliRunner().invoke(main, ["reconcile", "--db", sqlite_url, "--api-key-env", "MY_KEY",
                                       "--upstream", f"http://127.0.0.1:{_closed_port()}"])
    assert result.exit_code == 6 and "unreachable" in result.stderr and KEY not in result.output
    result = CliRunner().invoke(main, ["reconcile", "--db", sqlite_url, "--api-key-env", "MY_KEY",
                                       "--upstream", "ftp://example.com"])
    assert result.exit_code == 2


def test_a_refused_key_is_exit_6_without_the_key(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "Authentication Fails"}})

    from collector.notify import RemoteError
    from collector.reconcile import fetch_balance

    with pytest.raises(RemoteError) as raised:
        fetch_balance("https://api.deepseek.com", KEY, client=httpx.Client(transport=httpx.MockTransport(handler)))
    assert "401" in str(raised.value) and KEY not in str(raised.value)


def _snap(minutes: int, total: str, granted: str | None = None, topped: str | None = None) -> Snapshot:
    at = datetime(2026, 10, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes)
    return Snapshot(at, Decimal(total), None if granted is None else Decimal(granted),
                    None if topped is None else Decimal(topped))


def test_windows_without_the_granted_split_judge_by_the_total() -> None:
    points = [_snap(0, "100"), _snap(60, "90"), _snap(120, "185"), _snap(180, "180")]
    spend = {0: Decimal("10.004"), 60: Decimal("5"), 120: Decimal("5")}
    result = reconcile_windows("USD", points, lambda start, end: spend[int((start - points[0].taken_at).seconds / 60)])
    assert [w.provider_usage for w in result.windows] == [Decimal(10), None, Decimal(5)]
    assert result.windows[1].top_up == Decimal(100)  # rose 95 while the ledger spent 5
    assert (result.provider_usage, result.ledger_spend, result.drift) == (Decimal(15), Decimal("15.004"),
                                                                        Decimal("0.004"))
    assert result.drift_percent == Decimal("0.03")


def test_a_new_grant_is_a_jump_not_negative_usage() -> None:
    points = [_snap(0, "50", "0", "50"), _snap(60, "148", "100", "48")]
    [window] = reconcile_windows("USD", points, lambda start, end: Decimal(2)).windows
    assert window.provider_usage is None and window.top_up == Decimal(100)
