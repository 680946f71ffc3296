"""``dsmeter prices show|check``: the tariff in force with its source, and a broken book's problems, located."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from collector.cli import main


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_show_lists_the_tariffs_in_force_with_their_source_and_the_period_then() -> None:
    result = _run("prices", "show", "--at", "2026-10-01T02:00:00Z")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "deepseek-flash  [deepseek-flash@2026-09-10]  from 2026-09-10 00:00 UTC to open end" in out
    assert "deepseek-v4-pro  [deepseek-v4-pro@2026-09-10]" in out
    assert "source: official pricing page" in out
    assert "off-peak *  USD           0.003        0.15    0.60" in out  # National Day: off-peak at 10:00 Beijing
    assert "deepseek-v4-flash -> billed as deepseek-flash" in out
    assert "holidays (cn-public-holidays, 2026, 2027)" in out


def test_show_one_model_follows_its_alias_and_shows_list_prices_of_a_promotion() -> None:
    result = _run("prices", "show", "--at", "2026-04-25", "--model", "deepseek-v4-pro")
    assert result.exit_code == 0, result.output
    assert "promotion: V4-Pro launch promotion" in result.stdout
    assert "  list      USD           0.145        1.74    3.48" in result.stdout
    chat = _run("prices", "show", "--at", "2026-04-25", "--model", "deepseek-chat")
    assert "deepseek-chat -> billed as deepseek-v4-flash" in chat.stdout
    assert "deepseek-v4-flash  [deepseek-v4-flash@2026-04-24]" in chat.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-4"], "unknown model 'gpt-4'"),
        (["--model", "deepseek-chat", "--at", "2026-08-01"], "deepseek-chat has no USD tariff"),
        (["--at", "2020-01-01"], "no tariff is in force at 2020-01-01 00:00 UTC (the book starts at 2024-05-01"),
    ],
)
def test_show_without_a_tariff_is_a_one_line_error(args: list[str], message: str) -> None:
    result = _run("prices", "show", *args)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1


def test_check_passes_the_shipped_book() -> None:
    result = _run("prices", "check")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: dsmeter shipped book (sha256 ")
    assert "25 tariffs for 6 models, 5 aliases, 3 schedules, 1 calendars" in result.stdout


BROKEN = """\
[book]
name = "broken"

[schedule.tou]
time_zone = "Mars/Olympus"
default = "off-peak"
source = "contract"
windows = [{ period = "peak", from = "9:00", to = "12:00" }]

[[tariff]]
model = "m1"
from = 2026-01-01T00:00:00Z
prices.standard.USD = { hit = 0.1, miss = 1, output = 2 }
source = "contract"

[[tariff]]
model = "m1"
from = 2026-03-01T00:00:00Z
to = 2026-02-01T00:00:00Z
prices.standard.USD = { hit = 0.1, miss = 1 }
source = "contract"

[[alias]]
name = "x"
model = "y"
from = 2026-01-01T00:00:00Z
source = "notice"

[[alias]]
name = "y"
model = "x"
from = 2026-01-01T00:00:00Z
source = "notice"
"""


def test_check_names_every_problem_with_file_and_line_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN, encoding="utf-8")
    result = _run("prices", "check", str(path))
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert f"{path}:5: schedule tou: unknown time zone 'Mars/Olympus'" in lines
    assert f"{path}:8: schedule tou window #1: window from does not parse: '9:00' is not a time of day HH:MM" in lines
    assert (f"{path}:19: tariff #2 (m1@2026-03-01): to (2026-02-01 00:00:00 UTC) is not after from "
            "(2026-03-01 00:00:00 UTC)") in lines
    assert f"{path}:20: tariff #2 (m1@2026-03-01): prices.standard.USD: missing price 'output'" in lines
    assert f"{path}:23: alias (x -> y): alias loop: x -> y -> x (from 2026-01-01 00:00:00 UTC)" in lines
    assert lines[-1] == "dsmeter: 5 problems in the price book"


def test_check_reports_overlapping_periods(tmp_path: Path) -> None:
    path = tmp_path / "overlap.toml"
    path.write_text(textwrap.dedent("""\
        [[tariff]]
        model = "m1"
        from = 2026-01-01T00:00:00Z
        prices.standard.USD = { hit = 0.1, miss = 1, output = 2 }
        source = "contract"

        [[tariff]]
        model = "m1"
        from = 2026-06-01T00:00:00Z
        prices.standard.USD = { hit = 0.1, miss = 0.9, output = 1.8 }
        source = "new contract: but nobody closed the old one"
        """), encoding="utf-8")
    result = _run("prices", "check", str(path))
    assert result.exit_code == 1
    assert (f"{path}:7: tariff (m1@2026-06-01): overlaps tariff (m1@2026-01-01) at {path}:1 for m1 in USD: "
            "both apply from 2026-06-01 00:00:00 UTC to open end") in result.stderr


def test_check_uses_dsmeter_prices_when_no_file_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[book]\ncurrency = \"EURO\"\n", encoding="utf-8")
    monkeypatch.setenv("DSMETER_PRICES", str(path))
    result = _run("prices", "check")
    assert result.exit_code == 1 and f"{path}:2: [book]: currency must be a 3-letter ISO code" in result.stderr


def test_check_of_a_missing_file_exits_1_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "collector.cli", "prices", "check", str(tmp_path / "none.toml")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "cannot read the price book" in proc.stderr and "Traceback" not in proc.stderr
