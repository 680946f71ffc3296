"""The daily rollup equals the raw ledger: after random writes, late arrivals, reprices, races and repairs."""

from __future__ import annotations

import random
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from click.testing import CliRunner

from collector import queries
from collector.cli import main
from collector.pricing import default_pricer
from collector.queries import Filters
from collector.record import UsageRecord
from collector.reporting_schema import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_DAILY,
    ROLLUP_KEY_COLUMNS,
    ROLLUP_MONEY_COLUMNS,
    ROLLUP_STATE,
)
from collector.rollups import RollupHook, attach, compare, rebuild, rollup_sums
from collector.spool import SpoolFile, replay_spool
from collector.store import LedgerStore, alembic_config
from collector.writer import LedgerWriter

T0 = datetime(2026, 10, 1, tzinfo=timezone.utc)  # deepseek-flash / v4-pro have prices here
DAYS = 12
ALL_DIMS = ["day", "model", "status", "currency", "key", "tariff", "tag_set"]


def _random_records(rng: random.Random, n: int, *, days: int = DAYS) -> list[UsageRecord]:
    """Calls of every shape the ledger holds: priced and unpriced, errors without tokens, odd tags."""
    tag_choices: list[dict[str, str]] = [
        {},
        {"team": "search"},
        {"team": "search", "env": "prod"},
        {"env": "prod", "team": "search"},  # the same set, keys in another order
        {"team": "ads", "feature": "autocomplete"},
        {"team": "ads", "k" * 130: "cut to 100 characters"},  # key longer than call_tags keeps
        {"team": "infra", "note": "NUL \x00 inside"},
    ]
    records = []
    for _ in range(n):
        status = rng.choice(["completed"] * 6 + ["error", "cancelled", "disconnected", "timeout"])
        model = rng.choice(["deepseek-flash", "deepseek-v4-pro", "no-such-model", None])
        started = T0 + timedelta(seconds=rng.randrange(days * 86400))
        if status == "error" and rng.random() < 0.5:
            tokens: dict[str, Any] = dict.fromkeys(
                ("prompt_tokens", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens", "completion_tokens",
                 "reasoning_tokens"))
        else:
            hit, miss, out = rng.randrange(0, 40_000), rng.randrange(0, 9_000), rng.randrange(0, 4_000)
            tokens = {"prompt_tokens": hit + miss, "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": miss,
                      "completion_tokens": out, "reasoning_tokens": rng.choice([None, out // 2])}
        records.append(UsageRecord(
            started_at=started,
            finished_at=started + timedelta(seconds=3),
            requested_model=rng.choice(["deepseek-flash", "deepseek-reasoner", None]) if model is None else model,
            model=model,
            status=status,
            usage_estimated=status in ("cancelled", "disconnected", "timeout"),
            key_fingerprint=rng.choice([None, "fp-aaaa", "fp-bbbb"]),
            tags=dict(rng.choice(tag_choices)),
            **tokens,
        ))
    return records


def _assert_agree(store: LedgerStore, since: date | None = None, until: date | None = None) -> None:
    drifts = compare(store, since, until)
    assert drifts == [], drifts[:3]
    filters = Filters(
        since=None if since is None else datetime.combine(since, datetime.min.time(), timezone.utc),
        until=None if until is None else datetime.combine(until, datetime.min.time(), timezone.utc),
    )
    for dims in (ALL_DIMS, ["tag:team", "model"], ["day", "tag:env"], []):
        rolled = queries.aggregate(store.engine, filters, dims, source="rollup")
        raw = queries.aggregate(store.engine, filters, dims, source="ledger")
        assert rolled.to_dict("records") == raw.to_dict("records"), dims


def _rollup_calls(store: LedgerStore) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.coalesce(sa.func.sum(ROLLUP_DAILY.c.calls), 0))).scalar_one())


def test_random_writes_through_the_writer_keep_the_rollup_equal_to_the_raw_ledger(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    assert queries.rollup_complete(store.engine)  # an empty ledger starts with a complete rollup
    records = _random_records(random.Random(6), 600)
    with LedgerWriter(db_url, pricer=default_pricer(), batch_size=97) as writer:
        hook = attach(writer, db_url)
        for record in records:
            writer.submit(record)
        assert writer.flush(60)
    assert hook.pending == 0
    assert _rollup_calls(store) == len(records)
    _assert_agree(store)
    # Money and counts are not trivially zero: the check above compared real sums.
    totals = queries.totals(store.engine, Filters(), source="rollup")
    assert totals.cost["USD"].total > 0 and totals.unpriced_calls > 0 and totals.estimated_calls > 0
    store.close()


def test_late_arrivals_replayed_from_the_spool_are_added_once(db_url: str, tmp_path: Path) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    rng = random.Random(7)
    live, late = _random_records(rng, 300), _random_records(rng, 200)
    hook = RollupHook(store)
    hook(store.insert_new(live))
    spool = SpoolFile(tmp_path)
    spool.append([default_pricer()(r) for r in late])  # a writer spooled them during an outage, then exited
    spool.close()
    hook(store.insert_new(late[:50]))  # some made it in before the outage: replay must not add them twice
    result = replay_spool(store, tmp_path, on_written=hook)
    assert (result.rows, result.inserted, result.duplicates) == (200, 150, 50)
    assert _rollup_calls(store) == 500
    _assert_agree(store)
    store.close()


def test_every_writer_keeps_the_rollup_without_being_told(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    records = _random_records(random.Random(14), 300)
    with LedgerWriter(db_url) as writer:
        assert attach(writer) is attach(writer)  # the writer's own hook, never a second one
        for record in records:
            writer.submit(record)
        assert writer.flush(60)
    assert _rollup_calls(store) == 300
    _assert_agree(store)
    store.close()


def test_dsmeter_spool_replay_rolls_up_what_it_writes(sqlite_url: str) -> None:
    from collector.spool import default_spool_dir

    store = LedgerStore(sqlite_url)
    store.migrate()
    spool = SpoolFile(default_spool_dir(sqlite_url))
    spool.append(_random_records(random.Random(15), 80))
    spool.close()
    result = CliRunner().invoke(main, ["spool", "replay", "--db", sqlite_url])
    assert result.exit_code == 0 and "inserted: 80" in result.output
    assert _rollup_calls(store) == 80
    _assert_agree(store)
    store.close()


def test_a_rebuild_racing_a_writer_between_its_commit_and_its_hook_counts_each_call_once(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    records = _random_records(random.Random(8), 200)
    added = store.insert_new(records)  # the writer committed ...
    rebuild(store)  # ... a rebuild read the raw ledger, these calls included ...
    RollupHook(store)(added)  # ... and only then did the writer's hook run
    assert _rollup_calls(store) == 200
    _assert_agree(store)
    store.close()


def test_rebuild_replaces_only_the_days_asked_and_is_idempotent(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    records = _random_records(random.Random(9), 400)
    store.insert(records)  # no hook: the rollup misses them all
    assert compare(store)
    first, last = T0.date() + timedelta(days=3), T0.date() + timedelta(days=5)
    for _ in range(2):
        result = rebuild(store, first, last)
        assert result.days == 2
    _assert_agree(store, first, last)
    in_days = sum(1 for r in records if first <= r.started_at.date() < last)
    assert _rollup_calls(store) == in_days
    assert compare(store, None, first)  # other days were left alone
    rebuild(store)
    _assert_agree(store)
    store.close()


def test_a_refused_rollup_update_waits_and_goes_in_with_the_next_batch(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    rng = random.Random(10)
    first, second = _random_records(rng, 100), _random_records(rng, 100)
    hook = RollupHook(store)
    with store.engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE rollup_daily RENAME TO rollup_daily_away"))
    hook(store.insert_new(first))
    assert hook.pending > 0
    with store.engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE rollup_daily_away RENAME TO rollup_daily"))
    hook(store.insert_new(second))
    assert hook.pending == 0
    assert _rollup_calls(store) == 200
    _assert_agree(store)
    store.close()


def test_a_batch_and_its_rollup_sums_commit_together(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    records = _random_records(random.Random(15), 150)
    hook = RollupHook(store)
    assert len(store.insert_new(records[:100], companion=hook)) == 100
    assert hook.pending == 0 and _rollup_calls(store) == 100  # no second transaction needed

    class FailsAfterStaging(RollupHook):
        def stage(self, connection: Any, rows: list[dict[str, Any]]) -> None:
            super().stage(connection, rows)
            raise RuntimeError("the batch fails after its sums were staged")

    failing = FailsAfterStaging(store)
    with pytest.raises(RuntimeError):
        store.insert_new(records[100:], companion=failing)
    # Rolled back together: neither the calls nor their sums, and nothing waits to be added.
    assert failing.pending == 0 and _rollup_calls(store) == 100
    assert len(store.insert_new(records, companion=hook)) == 50
    assert _rollup_calls(store) == 150
    _assert_agree(store)
    store.close()


def test_a_rollup_refused_inside_the_batch_still_lets_the_calls_commit(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    rng = random.Random(16)
    first, second = _random_records(rng, 100), _random_records(rng, 100)
    hook = RollupHook(store)
    with store.engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE rollup_daily RENAME TO rollup_daily_away"))
    assert len(store.insert_new(first, companion=hook)) == 100  # only the savepoint rolled back
    assert hook.pending > 0
    with store.engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE rollup_daily_away RENAME TO rollup_daily"))
    assert len(store.insert_new(second, companion=hook)) == 100
    assert hook.pending == 0
    assert _rollup_calls(store) == 200
    _assert_agree(store)
    store.close()


def test_a_batch_landing_on_a_day_just_rebuilt_counts_each_call_once(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    rng = random.Random(17)
    before, batch = _random_records(rng, 200), _random_records(rng, 200)
    store.insert(before)  # calls the rollup has not seen yet ...
    rebuild(store)  # ... a rebuild counts them and stamps every day ...
    hook = RollupHook(store)
    store.insert_new(batch, companion=hook)  # ... and a batch lands on those days at once
    hook.flush()  # PostgreSQL leaves re-deriving a day to a transaction under the exclusive lock
    assert hook.pending == 0
    assert _rollup_calls(store) == 400
    _assert_agree(store)
    store.close()


def test_a_reprice_changes_the_rollup_exactly_as_the_raw_ledger(db_url: str, tmp_path: Path) -> None:
    from collector.pricebook import load_book
    from collector.repricing import reprice

    store = LedgerStore(db_url)
    store.migrate()
    records = _random_records(random.Random(11), 400)
    with LedgerWriter(db_url, pricer=default_pricer()) as writer:
        attach(writer, db_url)
        for record in records:
            writer.submit(record)
        assert writer.flush(60)
    before = queries.spend_totals(store.engine, Filters(), source="rollup")
    book = tmp_path / "prices.toml"
    book.write_text(
        '[book]\nname = "corrected"\ncurrency = "USD"\nper_tokens = 1_000_000\nprice_at = "started_at"\n\n'
        '[[tariff]]\nmodel = "deepseek-flash"\nfrom = 2026-01-01T00:00:00Z\n'
        'prices.standard.USD = { hit = 0.01, miss = 1, output = 2 }\nsource = "test"\n'
    )
    result = reprice(store, load_book(str(book)), T0 + timedelta(days=2, hours=5), T0 + timedelta(days=7, hours=3))
    assert result.written > 0 and result.rollup_days
    after = queries.spend_totals(store.engine, Filters(), source="rollup")
    assert after != before
    _assert_agree(store)
    store.close()


def test_rollup_check_finds_drift_and_rollup_repairs_it(sqlite_url: str) -> None:
    store = LedgerStore(sqlite_url)
    store.migrate()
    store.insert(_random_records(random.Random(12), 120))  # written without the hook
    runner = CliRunner()
    checked = runner.invoke(main, ["rollup", "--check", "--db", sqlite_url])
    assert checked.exit_code == 4, checked.output
    assert "differ" in checked.output
    rebuilt = runner.invoke(main, ["rollup", "--db", sqlite_url])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "reports read the rollup" in rebuilt.output
    again = runner.invoke(main, ["rollup", "--check", "--db", sqlite_url])
    assert (again.exit_code, again.output.strip()) == (0, "the rollup equals the raw ledger")
    bad = runner.invoke(main, ["rollup", "--since", "2026-13-01", "--db", sqlite_url])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    store.close()


def test_a_ledger_upgraded_with_calls_reads_raw_until_the_rollup_is_built(db_url: str) -> None:
    from alembic.script import ScriptDirectory

    before_rollups = ScriptDirectory.from_config(alembic_config(db_url)).get_revision("0003").down_revision
    command.upgrade(alembic_config(db_url), str(before_rollups))
    store = LedgerStore(db_url, migrate=False)
    records = _random_records(random.Random(13), 150)
    with store.engine.begin() as connection:  # rows written by a dsmeter from before the rollup existed
        from collector.models import CALL_TAGS, CALLS, row_from_record, tag_rows_from_record

        connection.execute(CALLS.insert(), [row_from_record(r) for r in records])
        connection.execute(CALL_TAGS.insert(), [t for r in records for t in tag_rows_from_record(r)])
    store.migrate()
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(ROLLUP_STATE.c.complete)).scalar_one() is False
    whole_days = Filters(since=T0, until=T0 + timedelta(days=DAYS))
    assert not queries.uses_rollup(store.engine, whole_days)
    assert queries.totals(store.engine, whole_days).calls == 150  # raw answers meanwhile
    rebuild(store)
    assert queries.uses_rollup(store.engine, whole_days)
    assert queries.totals(store.engine, whole_days).source == "rollup"
    _assert_agree(store)
    store.close()


def test_rollup_sums_fit_records_as_the_ledger_stores_them() -> None:
    record = UsageRecord(started_at=datetime(2026, 10, 3, 23, 59, 59, tzinfo=timezone(timedelta(hours=-5))),
                         model="m" * 300, status="completed", prompt_tokens=10, prompt_cache_hit_tokens=4,
                         prompt_cache_miss_tokens=6, completion_tokens=5, tags={"b": "2", "a": "1"},
                         currency="USD", cost=Decimal("0.5"), cost_cache_hit=Decimal("0.1"),
                         cost_cache_miss=Decimal("0.2"), cost_output=Decimal("0.2"), request_id=uuid.uuid4())
    sums, tag_sets = rollup_sums([record, record.replace(request_id=uuid.uuid4(), tags={"a": "1", "b": "2"})])
    [(key, value)] = sums.items()
    assert key[0] == date(2026, 10, 4)  # the UTC day, not the local one
    assert key[1] == "m" * 200  # cut to the column, as stored
    assert value["calls"] == 2 and value["cost"] == Decimal("1.0") and value["prompt_cache_hit_tokens"] == 8
    assert list(tag_sets.values()) == [{"a": "1", "b": "2"}]


def _same_group(n: int) -> list[UsageRecord]:
    """``n`` calls that all fall in one rollup row: same day, model, status, key, tags and tariff."""
    return [UsageRecord(started_at=T0 + timedelta(seconds=i), finished_at=T0 + timedelta(seconds=i + 2),
                        requested_model="deepseek-flash", model="deepseek-flash", status="completed",
                        prompt_tokens=100, prompt_cache_hit_tokens=64, prompt_cache_miss_tokens=36,
                        completion_tokens=10, key_fingerprint="fp-aaaa", tags={"team": "search"})
            for i in range(n)]


@pytest.mark.postgres
def test_writers_adding_to_the_same_rollup_row_at_once_never_wait_for_each_other(postgres_url: str) -> None:
    store = LedgerStore(postgres_url)
    store.migrate()
    with store.engine.begin() as connection:  # a wait on another writer's row lock fails fast instead of hanging
        connection.execute(sa.text(f'ALTER DATABASE "{store.engine.url.database}" SET lock_timeout = \'3s\''))
    store.engine.dispose()
    from collector.models import call_row

    early = RollupHook(store)
    with store.engine.connect() as open_batch:
        rows = [call_row(r) for r in _same_group(5)]
        early.prepare(open_batch, rows)  # what LedgerStore.insert_new does before the batch's transaction
        open_batch.begin()
        # One writer's batch has added its sums to the day's row and has not committed yet ...
        early.stage(open_batch, rows)
        # ... while another writer commits a batch whose calls fall in the same row.
        late = RollupHook(store)
        assert len(store.insert_new(_same_group(7), companion=late)) == 7
        assert late.pending == 0  # its sums went in with its calls: it did not wait out the open batch
        open_batch.rollback()
        early.settle(committed=False)
    assert _rollup_calls(store) == 7
    _assert_agree(store)
    store.close()


def test_downgrading_below_rollup_shards_folds_each_keys_shards_into_one_row_with_their_sums(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.migrate()
    store.insert(_random_records(random.Random(18), 300))
    rebuild(store)
    names = ROLLUP_COUNT_COLUMNS + ROLLUP_MONEY_COLUMNS
    keys, measures = ", ".join(ROLLUP_KEY_COLUMNS), ", ".join(names)
    with store.engine.begin() as connection:  # each key's sums split over two shards, as two writers leave them
        connection.execute(sa.text(
            f"INSERT INTO rollup_daily ({keys}, {measures}, shard) "
            f"SELECT {keys}, {', '.join(f'{m} / 2' for m in names)}, 7 FROM rollup_daily"))
        connection.execute(sa.text(
            f"UPDATE rollup_daily SET {', '.join(f'{m} = {m} - {m} / 2' for m in names)} WHERE shard = 0"))
    _assert_agree(store)
    count_rows = sa.text(
        f"SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT {keys} FROM rollup_daily) AS k) FROM rollup_daily")
    with store.engine.connect() as connection:
        rows, distinct = connection.execute(count_rows).one()
    assert rows == 2 * distinct

    command.downgrade(alembic_config(db_url), "0005")
    with store.engine.connect() as connection:
        assert tuple(connection.execute(count_rows).one()) == (distinct, distinct)
    _assert_agree(store)  # one row per key now, holding both shards' sums
    command.upgrade(alembic_config(db_url), "head")
    _assert_agree(store)
    store.close()
