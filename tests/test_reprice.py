"""Rows priced when written, and ``dsmeter reprice`` after a correction: audited, range-bound, idempotent.

Rows go through the real ``LedgerWriter`` into SQLite and PostgreSQL (``db_url``). Expected
money is worked out here from the published per-1M prices.
"""

from __future__ import annotations

import getpass
import json
import textwrap
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from click.testing import CliRunner, Result

from collector.cli import main
from collector.models import CALLS
from collector.pricing import BookPricer
from collector.queries import reprice_audit_rows
from collector.record import UsageRecord
from collector.store import LedgerStore
from collector.writer import LedgerWriter

UTC = timezone.utc
M = Decimal(1_000_000)
HIT, MISS, OUT = 1000, 500, 200  # tokens of every call below

# deepseek-flash (V4.1), USD per 1M (hit, miss, output), as published from 2026-09-10
PEAK = (Decimal("0.006"), Decimal("0.30"), Decimal("1.20"))
OFF_PEAK = (Decimal("0.003"), Decimal("0.15"), Decimal("0.60"))


def _cost(rates: tuple[Decimal, Decimal, Decimal]) -> Decimal:
    return (HIT * rates[0] + MISS * rates[1] + OUT * rates[2]) / M


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _call(at: str, model: str = "deepseek-v4-flash") -> UsageRecord:
    return UsageRecord(started_at=_at(at), finished_at=_at(at), requested_model=model, model=model,
                       prompt_tokens=HIT + MISS, prompt_cache_hit_tokens=HIT, prompt_cache_miss_tokens=MISS,
                       completion_tokens=OUT, reasoning_tokens=None)


# Monday-Thursday 12-15 October 2026 (working days): 02:00 UTC is 10:00 Beijing (peak), 12:00 UTC is off-peak.
CALLS_AT = [f"2026-10-{day}T{hour}:00:00Z" for day in (12, 13, 14, 15) for hour in ("02", "12")]


def _wrong_book(tmp_path: Path) -> Path:
    """A team book with a typo: flash output at 12.00 / 6.00 instead of 1.20 / 0.60."""
    path = tmp_path / "typo.toml"
    path.write_text(textwrap.dedent("""\
        [book]
        extends = "dsmeter"

        [[tariff]]
        model = "deepseek-flash"
        from = 2026-09-10T00:00:00Z
        schedule = "beijing-peak-workdays"
        prices.peak.USD = { hit = 0.006, miss = 0.30, output = 12.00 }
        prices.off-peak.USD = { hit = 0.003, miss = 0.15, output = 6.00 }
        source = "typed from the pricing page (with a typo)"
        """), encoding="utf-8")
    return path


def _write(db_url: str, records: list[UsageRecord], pricer: BookPricer | None = None) -> None:
    with LedgerWriter(db_url, pricer=pricer, flush_interval=0.01) as writer:
        for record in records:
            writer.submit(record)
        assert writer.flush(30)


def _prices(db_url: str) -> dict[str, tuple[object, ...]]:
    """Each call's (cost, cost_output, tariff_id, currency), keyed by its start as 2026-10-12T02:00:00Z."""
    store = LedgerStore(db_url, migrate=False)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(sa.select(CALLS.c.started_at, CALLS.c.cost, CALLS.c.cost_output,
                                                CALLS.c.tariff_id, CALLS.c.currency)).all()
    finally:
        store.close()
    return {row[0].strftime("%Y-%m-%dT%H:%M:%SZ"): tuple(row[1:]) for row in rows}


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_the_writer_prices_every_row_and_export_carries_the_cost_columns(db_url: str) -> None:
    _write(db_url, [_call(at) for at in CALLS_AT[:2]] + [_call("2026-10-12T03:00:00Z", model="mystery-model")])
    result = _run("export", "--db", db_url, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    rows = {row["started_at"]: row for row in map(json.loads, result.stdout.splitlines())}
    peak = rows["2026-10-12T02:00:00+00:00"]
    assert Decimal(peak["cost_usd"]) == Decimal(peak["cost"]) == _cost(PEAK)
    assert (Decimal(peak["cost_cache_hit"]), Decimal(peak["cost_cache_miss"]), Decimal(peak["cost_output"])) == (
        HIT * PEAK[0] / M, MISS * PEAK[1] / M, OUT * PEAK[2] / M)
    assert peak["tariff_id"] == "deepseek-v4-flash>deepseek-flash@2026-09-10/peak" and peak["currency"] == "USD"
    assert Decimal(rows["2026-10-12T12:00:00+00:00"]["cost"]) == _cost(OFF_PEAK)
    unknown = rows["2026-10-12T03:00:00+00:00"]
    assert unknown["cost"] is None and unknown["cost_usd"] is None and unknown["tariff_id"] == "unpriced:no-tariff"


def test_reprice_corrects_the_range_only_with_an_audit_entry_per_call(db_url: str, tmp_path: Path) -> None:
    _write(db_url, [_call(at) for at in CALLS_AT], pricer=BookPricer(str(_wrong_book(tmp_path))))
    wrong_peak = (HIT * PEAK[0] + MISS * PEAK[1] + OUT * Decimal("12.00")) / M
    wrong_off = (HIT * OFF_PEAK[0] + MISS * OFF_PEAK[1] + OUT * Decimal("6.00")) / M
    before = _prices(db_url)
    assert before["2026-10-13T02:00:00Z"][0] == wrong_peak

    result = _run("reprice", "--db", db_url, "--since", "2026-10-13", "--until", "2026-10-14")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 calls in range, 4 with a new price" in out
    assert f"total USD: old ${2 * (wrong_peak + wrong_off):,.6f}  new ${2 * (_cost(PEAK) + _cost(OFF_PEAK)):,.6f}" in out
    assert out.count(" -> ") == 8  # each changed call: old tariff -> new tariff, old cost -> new cost
    assert f"{wrong_peak.normalize():f} USD -> {_cost(PEAK).normalize():f} USD" in out
    assert "deepseek-v4-flash>deepseek-flash@2026-09-10/peak -> deepseek-v4-flash>deepseek-flash@2026-09-10/peak" in out

    after = _prices(db_url)
    for at in CALLS_AT:
        day = at[:10]
        rates = PEAK if "T02" in at else OFF_PEAK
        if day in ("2026-10-13", "2026-10-14"):
            assert after[at][0] == _cost(rates), at
            assert after[at][1] == OUT * rates[2] / M
        else:
            assert after[at] == before[at], f"{at} is outside the range and must not change"

    audit = reprice_audit_rows(LedgerStore(db_url, migrate=False).engine)
    assert len(audit) == 4 and len({row["run_id"] for row in audit}) == 1
    for row in audit:
        assert row["os_user"] == getpass.getuser()
        assert row["price_book"].startswith("dsmeter shipped book (sha256 ")
        assert row["old_cost"] in (wrong_peak, wrong_off) and row["new_cost"] in (_cost(PEAK), _cost(OFF_PEAK))
        assert row["old_tariff_id"] == row["new_tariff_id"]  # same entry id: the correction was to its prices
        assert row["repriced_at"].tzinfo is not None


def test_a_second_reprice_changes_nothing(db_url: str, tmp_path: Path) -> None:
    _write(db_url, [_call(at) for at in CALLS_AT], pricer=BookPricer(str(_wrong_book(tmp_path))))
    first = _run("reprice", "--db", db_url, "--since", "2026-10-12")
    assert first.exit_code == 0, first.output
    snapshot = _prices(db_url)
    second = _run("reprice", "--db", db_url, "--since", "2026-10-12")
    assert second.exit_code == 0, second.output
    assert "8 calls in range, 0 with a new price" in second.stdout
    assert _prices(db_url) == snapshot
    assert len(reprice_audit_rows(LedgerStore(db_url, migrate=False).engine)) == 8  # from the first run only


def test_dry_run_shows_the_changes_and_writes_nothing(db_url: str, tmp_path: Path) -> None:
    _write(db_url, [_call(at) for at in CALLS_AT], pricer=BookPricer(str(_wrong_book(tmp_path))))
    before = _prices(db_url)
    result = _run("reprice", "--db", db_url, "--since", "2026-10-12", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: reprice" in result.stdout and "8 calls in range, 8 with a new price" in result.stdout
    assert "dry run: nothing written" in result.stdout
    assert _prices(db_url) == before
    assert reprice_audit_rows(LedgerStore(db_url, migrate=False).engine) == []


def test_calls_unpriced_when_written_are_priced_once_the_book_knows_their_model(db_url: str, tmp_path: Path) -> None:
    _write(db_url, [_call("2026-10-12T02:00:00Z", model="our-finetune")])
    assert _prices(db_url)["2026-10-12T02:00:00Z"][0] is None
    book = tmp_path / "finetune.toml"
    book.write_text(textwrap.dedent("""\
        [book]
        extends = "dsmeter"

        [[tariff]]
        model = "our-finetune"
        from = 2026-10-01T00:00:00Z
        prices.standard.USD = { hit = 0.01, miss = 0.5, output = 2 }
        source = "hosting contract 2026-10"
        """), encoding="utf-8")
    result = _run("reprice", "--db", db_url, "--since", "2026-10-01", "--prices", str(book))
    assert result.exit_code == 0, result.output
    assert "unpriced calls: old 1  new 0" in result.stdout
    cost, _, tariff, currency = _prices(db_url)["2026-10-12T02:00:00Z"]
    assert cost == (HIT * Decimal("0.01") + MISS * Decimal("0.5") + OUT * Decimal("2")) / M
    assert (tariff, currency) == ("our-finetune@2026-10-01/standard", "USD")
    audit = reprice_audit_rows(LedgerStore(db_url, migrate=False).engine)
    assert audit[0]["old_cost"] is None and audit[0]["old_tariff_id"] == "unpriced:no-tariff"
    assert audit[0]["price_book"].startswith(f"{book} over the dsmeter shipped book")


def test_reprice_refuses_an_empty_range_and_a_broken_book_with_exit_code_2(sqlite_url: str, tmp_path: Path) -> None:
    empty = _run("reprice", "--db", sqlite_url, "--since", "2026-10-14", "--until", "2026-10-12")
    assert empty.exit_code == 2 and "is not before --until" in empty.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[[tariff]]\nmodel = 1\n", encoding="utf-8")
    result = _run("reprice", "--db", sqlite_url, "--since", "2026-10-12", "--prices", str(broken))
    assert result.exit_code == 2 and f"{broken}:1: tariff #1 (1)" in result.stderr


def test_the_reporting_rollup_agrees_with_the_calls_after_a_reprice(db_url: str, tmp_path: Path) -> None:
    from collector import rollups

    with LedgerWriter(db_url, pricer=BookPricer(str(_wrong_book(tmp_path))), flush_interval=0.01) as writer:
        rollups.attach(writer, db_url)
        for at in CALLS_AT:
            writer.submit(_call(at))
        assert writer.flush(30)
    store = LedgerStore(db_url)
    try:
        assert rollups.compare(store) == []  # the hook kept the rollup at the typo's prices
        result = _run("reprice", "--db", db_url, "--since", "2026-10-13", "--until", "2026-10-14")
        assert result.exit_code == 0, result.output
        assert "reporting rollup re-derived for 2 day(s)" in result.stdout
        assert rollups.compare(store) == []
    finally:
        store.close()
