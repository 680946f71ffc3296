"""``dsmeter estimate``: the guide's worked example to the cent, formats, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result

from collector.cli import main

GUIDE_ARGS = ["estimate", "--calls", "1000000", "--cached-prompt-tokens", "2000", "--uncached-prompt-tokens", "200",
              "--output-tokens", "300"]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_the_guides_worked_example_to_the_cent_with_the_ratio() -> None:
    result = _run(*GUIDE_ARGS, "--at", "2026-04-25", "--list-prices")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    flash = next(line for line in lines if line.startswith("deepseek-v4-flash "))
    pro = next(line for line in lines if line.startswith("deepseek-v4-pro "))
    assert flash.split() == ["deepseek-v4-flash", "$56.00", "$28.00", "$84.00", "$168.00", "1.00x"]
    assert pro.split() == ["deepseek-v4-pro", "$290.00", "$348.00", "$1,044.00", "$1,682.00", "10.01x"]
    assert "deepseek-v4-flash: $56.00 + $28.00 + $84.00 = $168.00" in lines
    assert "list prices (promotions ignored)" in result.stdout
    assert result.stderr == ""


def test_without_list_prices_it_shows_what_was_billed_and_which_promotion_applied() -> None:
    result = _run(*GUIDE_ARGS, "--at", "2026-04-25")
    assert result.exit_code == 0, result.output
    assert "deepseek-v4-pro: $72.50 + $87.00 + $261.00 = $420.50" in result.stdout
    assert ("promotion applied: V4-Pro launch promotion: 75% off list prices, valid until 2026-05-05 15:59 UTC "
            "(at list prices: $1,682.00)") in result.stdout


def test_json_carries_exact_money_and_the_tariff_ids() -> None:
    result = _run(*GUIDE_ARGS, "--at", "2026-04-27", "--list-prices", "--format", "json", "--model", "deepseek-v4-flash",
                  "--model", "deepseek-v4-pro")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    models = {m["model"]: m for m in document["models"]}
    assert [m["model"] for m in document["models"]] == ["deepseek-v4-flash", "deepseek-v4-pro"]
    # after the 2026-04-26 12:15 cache-hit cut: 2,000M x $0.0028 + 200M x $0.14 + 300M x $0.28
    assert (models["deepseek-v4-flash"]["cache_hit"], models["deepseek-v4-flash"]["total"]) == ("5.6", "117.6")
    assert models["deepseek-v4-pro"]["total"] == "1421"
    assert models["deepseek-v4-pro"]["periods"] == [
        {"period": "standard", "share": "1", "tariff_id": "deepseek-v4-pro@2026-04-26/standard"}]
    assert document["workload"]["calls"] == "1000000" and document["list_prices"] is True


def test_csv_has_one_row_per_model() -> None:
    result = _run(*GUIDE_ARGS, "--at", "2026-11-23T03:00:00Z", "--format", "csv", "--peak-share", "1")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["model"] for r in rows] == ["deepseek-flash", "deepseek-v4-pro"]
    flash = rows[0]
    # all calls at peak: 2,000M x $0.006 + 200M x $0.30 + 300M x $1.20
    assert (flash["cache_hit"], flash["cache_miss"], flash["output"], flash["total"]) == ("12", "60", "360", "432")
    assert flash["tariff_ids"] == "deepseek-flash@2026-09-10/off-peak deepseek-flash@2026-09-10/peak"


def test_reasoning_tokens_are_billed_as_output_for_thinking_calls() -> None:
    plain = json.loads(_run(*GUIDE_ARGS, "--at", "2026-05-01", "--format", "json").stdout)
    thinking = json.loads(_run(*GUIDE_ARGS, "--at", "2026-05-01", "--format", "json", "--reasoning-tokens", "700").stdout)
    flash_plain = next(m for m in plain["models"] if m["model"] == "deepseek-v4-flash")
    flash_thinking = next(m for m in thinking["models"] if m["model"] == "deepseek-v4-flash")
    assert flash_plain["output"] == "84"  # 300M x $0.28
    assert flash_thinking["output"] == "280"  # (300 + 700) x 1M x $0.28


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calls", "-1"], "--calls must not be negative"),
        (["--calls", "many"], "--calls 'many' is not a number"),
        (["--calls", "10", "--output-tokens", "-3"], "--output-tokens must not be negative"),
        (["--calls", "10", "--model", "deepseek-v9"], "unknown model 'deepseek-v9'"),
        (["--calls", "10", "--at", "2023-12-31"], "no tariff at 2023-12-31 00:00 UTC: the price book starts at"),
        (["--calls", "10", "--at", "yesterday-ish"], "--at 'yesterday-ish': expected a date YYYY-MM-DD"),
        (["--calls", "10", "--peak-share", "1.5"], "--peak-share must be from 0 to 1"),
        (["--output-tokens", "10"], "--calls is required"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(args: list[str], message: str) -> None:
    result = _run("estimate", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dsmeter: error: ")
    assert message in result.stderr


def test_a_broken_prices_file_is_a_usage_error_naming_the_problem(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "bad.toml"
    path.write_text("[book]\nprice_at = \"whenever\"\n", encoding="utf-8")
    result = _run(*GUIDE_ARGS, "--prices", str(path))
    assert result.exit_code == 2
    assert f"{path}:2: [book]: price_at must be one of started_at, finished_at" in result.stderr


def test_the_installed_command_prints_the_worked_example() -> None:
    proc = subprocess.run([sys.executable, "-m", "collector.cli", *GUIDE_ARGS, "--at", "2026-04-25", "--list-prices"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "$1,682.00" in proc.stdout and "$168.00" in proc.stdout and "10.01x" in proc.stdout
