"""``dsmeter replay``: recorded traffic re-priced as another model, as of another time, or shifted off-peak.

Rows go through the real ``LedgerWriter`` (priced by the shipped book) into SQLite and
PostgreSQL. Expected money is worked out here from the published per-1M prices.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from click.testing import CliRunner, Result

from collector.cli import main
from collector.record import UsageRecord
from collector.writer import LedgerWriter

M = Decimal(1_000_000)
HIT, MISS, OUT = 3000, 700, 400

FLASH_PEAK = (Decimal("0.006"), Decimal("0.30"), Decimal("1.20"))
FLASH_OFF = (Decimal("0.003"), Decimal("0.15"), Decimal("0.60"))
PRO_PEAK = (Decimal("0.044"), Decimal("1.32"), Decimal("3.96"))
PRO_OFF = (Decimal("0.022"), Decimal("0.66"), Decimal("1.98"))


def _cost(rates: tuple[Decimal, Decimal, Decimal]) -> Decimal:
    return (HIT * rates[0] + MISS * rates[1] + OUT * rates[2]) / M


def _call(at: str, model: str = "deepseek-v4-flash") -> UsageRecord:
    moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
    return UsageRecord(started_at=moment, finished_at=moment, requested_model=model, model=model,
                       prompt_tokens=HIT + MISS, prompt_cache_hit_tokens=HIT, prompt_cache_miss_tokens=MISS,
                       completion_tokens=OUT)


# Monday 12 and Tuesday 13 October 2026: 02:00 UTC is peak (10:00 Beijing), 12:00 UTC off-peak.
TRAFFIC = ["2026-10-12T02:00:00Z", "2026-10-12T12:00:00Z", "2026-10-13T02:00:00Z", "2026-10-13T12:00:00Z"]


def _seed(db_url: str, extra: list[UsageRecord] | None = None) -> None:
    with LedgerWriter(db_url, flush_interval=0.01) as writer:
        for record in [_call(at) for at in TRAFFIC] + (extra or []):
            writer.submit(record)
        assert writer.flush(30)


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _replay_json(db_url: str, *args: str) -> dict:  # type: ignore[type-arg]
    result = _run("replay", "--db", db_url, "--since", "2026-10-12", "--until", "2026-10-13", "--format", "json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_last_weeks_traffic_on_pro_per_day_and_in_total(db_url: str) -> None:
    _seed(db_url)
    document = _replay_json(db_url, "--as-model", "deepseek-v4-pro")
    actual_day = _cost(FLASH_PEAK) + _cost(FLASH_OFF)
    projected_day = _cost(PRO_PEAK) + _cost(PRO_OFF)
    assert [d["day"] for d in document["days"]] == ["2026-10-12", "2026-10-13"]
    for day in document["days"]:
        assert day["calls"] == 2
        assert Decimal(day["actual_cost"]) == actual_day
        assert Decimal(day["projected_cost"]) == projected_day
        assert Decimal(day["difference"]) == projected_day - actual_day
    total = document["total"]
    assert (Decimal(total["actual_cost"]), Decimal(total["projected_cost"])) == (2 * actual_day, 2 * projected_day)
    assert document["scenario"]["as_model"] == "deepseek-v4-pro"


def test_moving_the_peak_calls_off_peak(db_url: str) -> None:
    _seed(db_url)
    everything = _replay_json(db_url, "--shift-off-peak", "1")
    assert Decimal(everything["total"]["projected_cost"]) == 4 * _cost(FLASH_OFF)
    half = _replay_json(db_url, "--shift-off-peak", "50%")
    expected = 2 * (_cost(FLASH_PEAK) / 2 + _cost(FLASH_OFF) / 2) + 2 * _cost(FLASH_OFF)
    assert Decimal(half["total"]["projected_cost"]) == expected


def test_as_of_prices_with_the_tariff_in_force_then(db_url: str) -> None:
    _seed(db_url)
    flat = _replay_json(db_url, "--as-of", "2026-05-01", "--as-model", "deepseek-v4-flash")
    per_call = (HIT * Decimal("0.0028") + MISS * Decimal("0.14") + OUT * Decimal("0.28")) / M
    assert Decimal(flat["total"]["projected_cost"]) == 4 * per_call
    promo = _replay_json(db_url, "--as-of", "2026-04-25", "--as-model", "deepseek-v4-pro")
    per_call = (HIT * Decimal("0.03625") + MISS * Decimal("0.435") + OUT * Decimal("0.87")) / M  # billed: the promotion
    assert Decimal(promo["total"]["projected_cost"]) == 4 * per_call


def test_replay_writes_nothing(db_url: str) -> None:
    _seed(db_url)
    before = _run("export", "--db", db_url).stdout
    assert _run("replay", "--db", db_url, "--since", "2026-10-12", "--until", "2026-10-13", "--as-model",
                "deepseek-v4-pro").exit_code == 0
    assert _run("export", "--db", db_url).stdout == before


def test_the_table_shows_each_day_the_total_and_unpriced_calls_apart(db_url: str) -> None:
    _seed(db_url, extra=[_call("2026-10-13T05:00:00Z", model="mystery-model")])
    result = _run("replay", "--db", db_url, "--since", "2026-10-12", "--until", "2026-10-13", "--as-model",
                  "deepseek-v4-pro")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("replay of calls started 2026-10-12 00:00 UTC to 2026-10-14 00:00 UTC")
    total = next(line for line in lines if line.startswith("total"))
    assert total.split()[1] == "5"
    assert "unpriced calls (not in the totals): actual 1, projected 0" in result.stdout


def test_csv_rows_per_day_then_total(db_url: str) -> None:
    _seed(db_url)
    result = _run("replay", "--db", db_url, "--since", "2026-10-12", "--until", "2026-10-13", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["day"] for r in rows] == ["2026-10-12", "2026-10-13", "total"]
    # same model, same tariff: projected equals what was billed
    assert all(Decimal(r["difference"]) == 0 for r in rows)


def test_bad_input_is_a_one_line_error(sqlite_url: str, tmp_path: Path) -> None:
    _seed(sqlite_url)
    unknown = _run("replay", "--db", sqlite_url, "--since", "2026-10-12", "--until", "2026-10-13", "--as-model", "gpt-5")
    assert unknown.exit_code == 2 and "unknown model 'gpt-5'" in unknown.stderr
    backwards = _run("replay", "--db", sqlite_url, "--since", "2026-10-13", "--until", "2026-10-11")
    assert backwards.exit_code == 2 and "is not before --until" in backwards.stderr
    share = _run("replay", "--db", sqlite_url, "--since", "2026-10-12", "--until", "2026-10-13", "--shift-off-peak", "2")
    assert share.exit_code == 2 and "--shift-off-peak must be from 0 to 1" in share.stderr
    missing = _run("replay", "--db", f"sqlite:///{tmp_path / 'none.db'}", "--since", "2026-10-12", "--until", "2026-10-13")
    assert missing.exit_code == 3 and "no ledger at" in missing.stderr
