"""``dsmeter demo`` records every planned call through the real metering path, and says what it recorded."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from click.testing import CliRunner

from collector.cli import main
from collector.queries import iter_export_rows
from collector.store import LedgerStore
from collector.workload import plan_calls



def test_demo_records_one_row_per_planned_call_with_every_kind_of_outcome(sqlite_url: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--db", sqlite_url, "--days", "2", "--calls-per-day", "150",
                                       "--seed", "3", "--no-dashboard"])
    assert result.exit_code == 0, result.output
    store = LedgerStore(sqlite_url)
    rows = list(iter_export_rows(store.engine, None, None))
    store.close()
    assert len(rows) == 300
    statuses = {row["status"] for row in rows}
    assert {"completed", "error", "disconnected"} <= statuses
    assert {row["requested_model"] for row in rows} == {"deepseek-v4-flash", "deepseek-v4-pro"}
    assert any(row["reasoning_tokens"] for row in rows) and any(row["prompt_cache_hit_tokens"] for row in rows)
    completed = [row for row in rows if row["status"] == "completed"]
    assert all(not row["usage_estimated"] for row in completed)
    assert f"Recorded {len(rows):,} calls" in result.output
    # The next commands name the ledger just recorded, not the default one.
    assert f"Next: dsmeter dashboard --db '{sqlite_url}'" in result.output


def test_demo_plan_is_seeded() -> None:
    end = datetime(2026, 11, 1, tzinfo=timezone.utc)
    window = {"start": end - timedelta(days=7), "end": end}

    def plan(seed: int) -> list[tuple[object, ...]]:
        return [(c.at, c.scenario.name, c.fault, c.cancel_after_chunks) for c in plan_calls(200, seed=seed, **window)]

    assert plan(9) == plan(9)
    assert plan(9) != plan(10)
    assert all(window["start"] <= c[0] < end for c in plan(9))
