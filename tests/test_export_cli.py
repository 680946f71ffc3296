"""``dsmeter export`` and ``dsmeter db``: exact values, UTC day boundaries, one-line errors, stdout apart."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

from collector.cli import main
from collector.queries import EXPORT_COLUMNS
from collector.record import UsageRecord
from collector.store import LedgerStore

UTC = timezone.utc


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _seed(url: str) -> list[UsageRecord]:
    records = [
        UsageRecord(  # last microsecond of 1 March
            started_at=_at("2026-03-01T23:59:59.999999+00:00"),
            requested_model="deepseek-chat",
            model="deepseek-chat",
            status="completed",
            finish_reason="stop",
            prompt_cache_hit_tokens=1000,
            prompt_cache_miss_tokens=200,
            completion_tokens=300,
            reasoning_tokens=None,
            ttft_ms=120.5,
            duration_ms=900.0,
            tags={"team": "search", "env": "prod"},
            currency="USD",
            cost=Decimal("0.000000002800"),
            cost_cache_hit=Decimal("0.000000002800"),
            tariff_id="chat/2025-09-05",
        ),
        UsageRecord(  # first instant of 2 March
            started_at=_at("2026-03-02T00:00:00+00:00"),
            requested_model="deepseek-reasoner",
            model="deepseek-reasoner",
            thinking=True,
            reasoning_tokens=512,
            completion_tokens=800,
            currency="CNY",
            cost=Decimal("1682.00"),
        ),
        UsageRecord(  # 2 March 18:00 UTC = 3 March 02:00 in Beijing
            started_at=_at("2026-03-03T02:00:00+08:00"),
            requested_model="deepseek-chat",
            status="disconnected",
            usage_estimated=True,
            error_type="disconnected",
        ),
        UsageRecord(started_at=_at("2026-03-03T00:00:00+00:00"), requested_model="deepseek-chat"),
    ]
    store = LedgerStore(url)
    store.insert(records)
    store.close()
    return records


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["export", *args])
    return result.exit_code, result.stdout, result.stderr


def test_jsonl_has_every_column_exact_values_and_nulls(db_url: str) -> None:
    records = _seed(db_url)
    code, out, err = _run("--db", db_url, "--format", "jsonl")
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["request_id"] for row in rows] == [str(r.request_id) for r in records[:2]] + [
        str(records[2].request_id),
        str(records[3].request_id),
    ]
    first, second = rows[0], rows[1]
    assert list(first) == list(EXPORT_COLUMNS)
    assert first["started_at"] == "2026-03-01T23:59:59.999999+00:00"
    assert first["cost_usd"] == "0.0000000028" and first["cost"] == "0.0000000028"
    assert first["cost_cache_miss"] is None and first["reasoning_tokens"] is None  # unknown stays null
    assert first["tags"] == {"team": "search", "env": "prod"}
    assert first["prompt_cache_hit_tokens"] == 1000 and first["ttft_ms"] == 120.5
    assert first["usage_estimated"] is False
    assert second["cost"] == "1682" and second["currency"] == "CNY"
    assert second["cost_usd"] is None  # not a USD price: never mixed into the USD column
    assert rows[2]["status"] == "disconnected" and rows[2]["usage_estimated"] is True


def test_csv_has_a_header_empty_cells_for_null_and_tags_as_json(db_url: str) -> None:
    _seed(db_url)
    code, out, err = _run("--db", db_url, "--format", "csv")
    assert (code, err) == (0, "")
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames or ()) == EXPORT_COLUMNS
    rows = list(reader)
    assert len(rows) == 4
    assert rows[0]["cost_usd"] == "0.0000000028"
    assert rows[0]["reasoning_tokens"] == "" and rows[0]["cost_cache_miss"] == ""
    assert json.loads(rows[0]["tags"]) == {"team": "search", "env": "prod"}
    assert rows[0]["usage_estimated"] == "false" and rows[1]["thinking"] == "true"
    assert rows[3]["tags"] == "{}"


@pytest.mark.parametrize(
    ("args", "expected_days"),
    [
        (["--since", "2026-03-02", "--until", "2026-03-02"], ["2026-03-02T00", "2026-03-02T18"]),
        (["--until", "2026-03-01"], ["2026-03-01T23"]),
        (["--since", "2026-03-03"], ["2026-03-03T00"]),
        # An ISO datetime with an offset: 2 March 08:00 in Beijing is midnight UTC; --until includes its instant.
        (
            ["--since", "2026-03-02T08:00:00+08:00", "--until", "2026-03-03T00:00:00Z"],
            ["2026-03-02T00", "2026-03-02T18", "2026-03-03T00"],
        ),
        (
            ["--since", "2026-03-01T23:59:59.999999"],
            ["2026-03-01T23", "2026-03-02T00", "2026-03-02T18", "2026-03-03T00"],
        ),
    ],
)
def test_since_and_until_cut_at_utc_boundaries(db_url: str, args: list[str], expected_days: list[str]) -> None:
    _seed(db_url)
    code, out, err = _run("--db", db_url, *args)
    assert (code, err) == (0, "")
    assert [json.loads(line)["started_at"][:13] for line in out.splitlines()] == expected_days


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--since", "2026-02-30"], "--since '2026-02-30': no such date"),
        (["--until", "yesterday"], "--until 'yesterday': expected a date YYYY-MM-DD or an ISO datetime"),
        (["--since", "2026-03-05", "--until", "2026-03-01"], "--since 2026-03-05 is not before --until 2026-03-01"),
    ],
)
def test_bad_dates_are_one_line_on_stderr_and_exit_2(sqlite_url: str, args: list[str], fragment: str) -> None:
    _seed(sqlite_url)
    code, out, err = _run("--db", sqlite_url, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("dsmeter: error: ") and fragment in err


def test_a_missing_ledger_is_a_clear_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "never.db"
    code, out, err = _run("--db", f"sqlite:///{path}")
    assert code == 3 and out == ""
    assert err == (
        f"dsmeter: error: no ledger at {path}: nothing has been recorded there yet"
        " (check --db or DSMETER_DATABASE_URL)\n"
    )
    assert not path.exists()


def test_an_empty_ledger_exports_only_the_csv_header(sqlite_url: str) -> None:
    assert CliRunner().invoke(main, ["db", "upgrade", "--db", sqlite_url]).exit_code == 0
    code, out, _ = _run("--db", sqlite_url, "--format", "csv")
    assert code == 0 and out == ",".join(EXPORT_COLUMNS) + "\n"
    assert _run("--db", sqlite_url)[1] == ""


def test_the_installed_command_exports_to_stdout_and_errs_to_stderr(sqlite_url: str) -> None:
    records = _seed(sqlite_url)
    dsmeter = Path(sys.executable).with_name("dsmeter")
    env = {k: v for k, v in os.environ.items() if k != "DSMETER_DATABASE_URL"}
    done = subprocess.run(
        [str(dsmeter), "export", "--format", "jsonl", "--db", sqlite_url, "--since", "2026-03-02"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert [json.loads(line)["request_id"] for line in done.stdout.splitlines()] == [
        str(records[1].request_id), str(records[2].request_id), str(records[3].request_id)
    ]
    bad = subprocess.run(
        [str(dsmeter), "export", "--db", sqlite_url, "--since", "March"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr


def test_export_reads_the_database_from_the_environment(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _seed(sqlite_url)
    monkeypatch.setenv("DSMETER_DATABASE_URL", sqlite_url)
    code, out, _ = _run()
    assert code == 0 and len(out.splitlines()) == 4


def test_db_upgrade_and_current_report_the_revision(db_url: str) -> None:
    runner = CliRunner()
    before = runner.invoke(main, ["db", "current", "--db", db_url])
    assert before.exit_code == 0 and "no ledger yet" in before.stdout
    from collector.store import head_revision

    upgraded = runner.invoke(main, ["db", "upgrade", "--db", db_url])
    assert upgraded.exit_code == 0 and upgraded.stdout.rstrip().endswith(f"schema at revision {head_revision()} (head)")
    after = runner.invoke(main, ["db", "current", "--db", db_url])
    assert after.stdout.rstrip().endswith(f": {head_revision()} (head)")


def test_db_upgrade_of_an_unreachable_database_is_exit_3_without_the_password() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = CliRunner().invoke(main, ["db", "upgrade", "--db", f"postgresql://meter:s3cret@127.0.0.1:{port}/x"])
    assert result.exit_code == 3 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "s3cret" not in result.stderr


def test_decimal_text_is_exact_and_never_scientific() -> None:
    from collector.commands.export import decimal_text

    assert decimal_text(Decimal("2.800E-9")) == "0.0000000028"
    assert decimal_text(Decimal("1682.000000000000")) == "1682"
    assert decimal_text(Decimal("1E+3")) == "1000"
    assert decimal_text(Decimal("-0.000000000000")) == "0"
    assert decimal_text(Decimal("12345678.123456789012")) == "12345678.123456789012"


def test_every_row_of_a_large_ledger_streams_out_in_order(sqlite_url: str) -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    records = [UsageRecord(started_at=start + timedelta(seconds=i % 997)) for i in range(3000)]
    store = LedgerStore(sqlite_url)
    store.insert(records)
    code, out, _ = _run("--db", sqlite_url)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3000
    keys = [(row["started_at"], row["request_id"]) for row in rows]
    assert keys == sorted(keys)
