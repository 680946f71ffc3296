"""``dsmeter prune --before DATE``: raw calls go only once the daily rollup holds their days.

Every test runs on SQLite and, with ``DSMETER_TEST_POSTGRES_URL``, on PostgreSQL, where
``calls`` is partitioned by month (migration 0004) and whole months are dropped.
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from collector.cli import main
from collector.models import CALL_TAGS, CALLS
from collector.partitions import is_partitioned, partitions
from collector.prune import EXIT_NOT_ROLLED_UP, NotRolledUp, prune, pruned_before
from collector.queries import Filters, totals
from collector.record import UsageRecord
from collector.retention_schema import LEDGER_PRUNES
from collector.rollups import rebuild
from collector.store import LedgerStore

TODAY = date(2026, 11, 23)


def _record(started: datetime, n: int, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        started_at=started, requested_model="deepseek-v4-flash", model="deepseek-v4-flash", status="completed",
        prompt_tokens=100 + n, prompt_cache_hit_tokens=64, prompt_cache_miss_tokens=36 + n, completion_tokens=10 + n,
        currency="USD", cost=Decimal("0.000001") * (n + 1), cost_cache_hit=Decimal(0), cost_cache_miss=Decimal(0),
        cost_output=Decimal("0.000001") * (n + 1), tags={"team": f"t{n % 3}"},
    )
    return dataclasses.replace(base, **changes)


def _seed(store: LedgerStore) -> list[UsageRecord]:
    """Calls on the 5th, 15th and 25th of July to October 2026 (UTC), four a day, each with a tag."""
    records: list[UsageRecord] = []
    for month in (7, 8, 9, 10):
        for day in (5, 15, 25):
            for hour in (0, 6, 12, 23):
                started = datetime(2026, month, day, hour, 30, tzinfo=timezone.utc)
                records.append(_record(started, len(records)))
    assert store.insert(records) == len(records)
    # On PostgreSQL these past months had no partition yet (the ledger was created "today"), so the
    # rows wait in the DEFAULT partition; the next process start (migrate) gives each month its own.
    store.migrate()
    return records


def _count(store: LedgerStore, table: sa.Table, where: Any = None) -> int:
    statement = sa.select(sa.func.count()).select_from(table)
    if where is not None:
        statement = statement.where(where)
    with store.engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def _day_range(since: date, until: date) -> Filters:
    return Filters(since=datetime.combine(since, datetime.min.time(), timezone.utc),
                   until=datetime.combine(until, datetime.min.time(), timezone.utc))


@pytest.fixture
def store(db_url: str) -> Any:
    ledger = LedgerStore(db_url)
    yield ledger
    ledger.close()


def test_prune_refuses_while_the_rollup_is_not_built_and_removes_nothing(store: LedgerStore) -> None:
    records = _seed(store)
    with pytest.raises(NotRolledUp) as refused:
        prune(store, date(2026, 9, 1), today=TODAY)
    assert refused.value.days[0] == date(2026, 7, 5) and refused.value.days[-1] == date(2026, 8, 25)
    assert "dsmeter rollup --since 2026-07-05 --until 2026-08-25" in str(refused.value)
    assert _count(store, CALLS) == len(records) and _count(store, CALL_TAGS) == len(records)


def test_prune_refuses_when_a_late_call_reached_a_day_after_it_was_rolled_up(store: LedgerStore) -> None:
    _seed(store)
    rebuild(store)
    late = _record(datetime(2026, 8, 15, 9, 0, tzinfo=timezone.utc), 999)
    store.insert([late])  # straight into the ledger: no writer, so no rollup hook counted it
    with pytest.raises(NotRolledUp) as refused:
        prune(store, date(2026, 9, 1), today=TODAY)
    assert refused.value.days == [date(2026, 8, 15)]
    assert _count(store, CALLS, CALLS.c.request_id == late.request_id) == 1


def test_prune_removes_exactly_the_calls_before_the_date_and_reports_still_show_their_days(store: LedgerStore) -> None:
    records = _seed(store)
    rebuild(store)
    pruned_range = _day_range(date(2026, 7, 1), date(2026, 9, 1))
    before_prune = totals(store.engine, pruned_range)
    assert before_prune.source == "rollup" and before_prune.calls == 24

    plan = prune(store, date(2026, 9, 1), today=TODAY)

    cutoff = datetime(2026, 9, 1, tzinfo=timezone.utc)
    kept = [r for r in records if r.started_at >= cutoff]
    assert plan.calls == len(records) - len(kept) == 24
    assert _count(store, CALLS) == len(kept)
    with store.engine.connect() as connection:
        ids = set(connection.execute(sa.select(CALLS.c.request_id)).scalars())
        tag_ids = set(connection.execute(sa.select(CALL_TAGS.c.request_id)).scalars())
        logged = connection.execute(sa.select(LEDGER_PRUNES)).mappings().one()
        assert pruned_before(connection) == cutoff
    assert ids == tag_ids == {r.request_id for r in kept}  # no orphaned tags, none of the kept lost
    assert (logged["calls"], logged["pruned_before"]) == (24, cutoff)
    after_prune = totals(store.engine, pruned_range)
    assert (after_prune.calls, after_prune.cost, after_prune.tokens) == (
        before_prune.calls, before_prune.cost, before_prune.tokens
    )
    if store.dialect == "postgresql":
        assert plan.partitions == ["calls_y2026m07", "calls_y2026m08"]
        with store.engine.connect() as connection:
            assert not {"calls_y2026m07", "calls_y2026m08"} & {p.name for p in partitions(connection)}
            assert logged["partitions"] == 2


def test_a_date_inside_a_month_drops_the_months_before_and_deletes_the_rest_row_by_row(store: LedgerStore) -> None:
    records = _seed(store)
    rebuild(store)
    plan = prune(store, date(2026, 8, 16), today=TODAY)
    cutoff = datetime(2026, 8, 16, tzinfo=timezone.utc)
    assert plan.calls == sum(r.started_at < cutoff for r in records) == 20
    with store.engine.connect() as connection:
        oldest = connection.execute(sa.select(sa.func.min(CALLS.c.started_at))).scalar_one()
    assert oldest == datetime(2026, 8, 25, 0, 30, tzinfo=timezone.utc)
    assert _count(store, CALL_TAGS) == _count(store, CALLS) == len(records) - 20
    if store.dialect == "postgresql":
        assert plan.partitions == ["calls_y2026m07"]  # August is cut in the middle: kept, rows deleted


def test_pruning_twice_checks_only_what_is_left(store: LedgerStore) -> None:
    _seed(store)
    rebuild(store)
    assert prune(store, date(2026, 8, 1), today=TODAY).calls == 12
    # The rollup still holds July, the raw ledger no longer does: that is not a reason to refuse.
    assert prune(store, date(2026, 10, 1), today=TODAY).calls == 24
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(LEDGER_PRUNES)).scalar_one() == 2


def test_a_dry_run_says_what_would_go_and_removes_nothing(store: LedgerStore) -> None:
    records = _seed(store)
    rebuild(store)
    plan = prune(store, date(2026, 9, 1), dry_run=True, today=TODAY)
    assert plan.dry_run and plan.calls == 24
    assert _count(store, CALLS) == len(records)
    assert _count(store, LEDGER_PRUNES) == 0


def test_a_cut_off_in_the_future_is_refused(store: LedgerStore) -> None:
    with pytest.raises(Exception, match="in the future"):
        prune(store, TODAY + timedelta(days=1), today=TODAY)


# -- the command -------------------------------------------------------------------------------


def test_cli_refusal_is_one_line_and_exit_code_4(store: LedgerStore, db_url: str) -> None:
    _seed(store)
    result = CliRunner().invoke(main, ["prune", "--db", db_url, "--before", "2026-09-01", "--yes"])
    assert result.exit_code == EXIT_NOT_ROLLED_UP == 4
    assert result.stderr.count("\n") == 1 and "not fully rolled up" in result.stderr
    assert "Traceback" not in result.output


def test_cli_prunes_with_yes_and_says_what_it_removed(store: LedgerStore, db_url: str) -> None:
    records = _seed(store)
    rebuild(store)
    result = CliRunner().invoke(main, ["prune", "--db", db_url, "--before", "2026-09-01", "--yes"])
    assert result.exit_code == 0, result.output
    assert "removed 24 call(s) that started before 2026-09-01 00:00 UTC" in result.stdout
    assert _count(store, CALLS) == len(records) - 24


def test_cli_asks_first_and_a_no_removes_nothing(store: LedgerStore, db_url: str) -> None:
    records = _seed(store)
    rebuild(store)
    result = CliRunner().invoke(main, ["prune", "--db", db_url, "--before", "2026-09-01"], input="n\n")
    assert result.exit_code == 1
    assert "would remove 24 call(s)" in result.stdout
    assert _count(store, CALLS) == len(records)


@pytest.mark.parametrize(("argument", "message"), [("2026-13-01", "expected a UTC day"), ("2999-01-01", "in the future")])
def test_cli_bad_dates_are_usage_errors(db_url: str, argument: str, message: str) -> None:
    result = CliRunner().invoke(main, ["prune", "--db", db_url, "--before", argument, "--yes"])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_postgresql_ledgers_are_partitioned_and_sqlite_ones_are_not(store: LedgerStore) -> None:
    store.ensure_schema()
    with store.engine.connect() as connection:
        assert is_partitioned(connection) == (store.dialect == "postgresql")
