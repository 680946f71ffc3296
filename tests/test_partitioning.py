"""PostgreSQL: ``calls`` partitioned by month (migration 0004), and several processes writing one ledger.

Every test here needs a PostgreSQL server (``DSMETER_TEST_POSTGRES_URL``); SQLite is not
partitioned (``tests/test_prune.py`` runs retention on both).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from datetime import date, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from collector.models import CALL_TAGS, CALLS
from collector.partitions import (
    DEFAULT_PARTITION,
    MONTHS_AHEAD,
    add_months,
    ensure_partitions,
    include_object,
    is_partitioned,
    month_start,
    partition_name,
    partitions,
)
from collector.record import UsageRecord, utcnow
from collector.rollups import compare
from collector.store import LedgerStore, alembic_config, head_revision

def _record(started: datetime, **changes: Any) -> UsageRecord:
    return UsageRecord(started_at=started, requested_model="deepseek-v4-flash", model="deepseek-v4-flash",
                       completion_tokens=7, tags={"team": "search", "env": "prod"}, **changes)


def _partition_of(store: LedgerStore, record: UsageRecord) -> str:
    with store.engine.connect() as connection:
        return str(connection.execute(
            sa.text("SELECT tableoid::regclass::text FROM calls WHERE request_id = :id"), {"id": record.request_id}
        ).scalar_one())


def _month(offset: int) -> datetime:
    month = add_months(month_start(utcnow()), offset)
    return datetime(month.year, month.month, 10, 12, 0, tzinfo=timezone.utc)


@pytest.mark.postgres
def test_a_new_ledger_has_this_month_and_the_next_ones_and_rows_land_in_their_month(postgres_url: str) -> None:
    store = LedgerStore(postgres_url)
    now, soon, far = _record(_month(0)), _record(_month(MONTHS_AHEAD)), _record(_month(MONTHS_AHEAD + 9))
    assert store.insert([now, soon, far]) == 3
    assert _partition_of(store, now) == partition_name(month_start(_month(0)))
    assert _partition_of(store, soon) == partition_name(month_start(_month(MONTHS_AHEAD)))
    assert _partition_of(store, far) == DEFAULT_PARTITION  # no month made for it yet: never refused
    with store.engine.connect() as connection:
        assert is_partitioned(connection)
        assert [p.name for p in partitions(connection)] == [
            partition_name(add_months(month_start(_month(0)), k)) for k in range(MONTHS_AHEAD + 1)
        ]
    command.check(alembic_config(postgres_url))  # partitions and the absent tags FK are not drift
    store.close()


@pytest.mark.postgres
def test_ensure_partitions_makes_a_month_for_waiting_rows_and_moves_them_with_their_tags(postgres_url: str) -> None:
    store = LedgerStore(postgres_url)
    late = _record(_month(MONTHS_AHEAD + 9))
    store.insert([late])
    with store.engine.begin() as connection:
        created = ensure_partitions(connection, utcnow().date())
    assert created == [partition_name(month_start(_month(MONTHS_AHEAD + 9)))]
    assert _partition_of(store, late) == created[0]
    with store.engine.connect() as connection:
        tags = connection.execute(sa.select(CALL_TAGS.c.key).where(CALL_TAGS.c.request_id == late.request_id))
        assert sorted(tags.scalars()) == ["env", "team"]
        assert connection.execute(sa.text(f"SELECT count(*) FROM {DEFAULT_PARTITION}")).scalar_one() == 0
    with store.engine.begin() as connection:
        assert ensure_partitions(connection, utcnow().date()) == []  # idempotent
    store.close()


@pytest.mark.postgres
def test_upgrading_a_ledger_with_calls_partitions_them_by_month_and_keeps_every_row_and_tag(postgres_url: str) -> None:
    command.upgrade(alembic_config(postgres_url), "0003")
    old = LedgerStore(postgres_url, migrate=False)
    records = [_record(datetime(2025, month, 3, hour, 15, tzinfo=timezone.utc)) for month in (1, 2, 7) for hour in (0, 23)]
    assert old.insert(records) == 6
    old.close()

    store = LedgerStore(postgres_url)
    assert store.migrate() == head_revision()
    with store.engine.connect() as connection:
        names = {p.name for p in partitions(connection)}
        assert {"calls_y2025m01", "calls_y2025m02", "calls_y2025m07"} <= names
        assert "calls_y2025m03" not in names  # months without calls get none
        assert connection.execute(sa.select(sa.func.count()).select_from(CALL_TAGS)).scalar_one() == 12
    for record in records:
        assert _partition_of(store, record) == f"calls_y2025m{record.started_at.month:02d}"
    # A retried insert is still a no-op, and deleting a call still deletes its tags (by trigger).
    assert store.insert(records) == 0
    with store.engine.begin() as connection:
        connection.execute(CALLS.delete().where(CALLS.c.request_id == records[0].request_id))
    with store.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(CALL_TAGS)).scalar_one() == 10
    command.check(alembic_config(postgres_url))
    store.close()


@pytest.mark.postgres
def test_downgrading_to_0003_gives_back_one_table_with_every_row_and_the_foreign_key(postgres_url: str) -> None:
    store = LedgerStore(postgres_url)
    records = [_record(_month(k)) for k in (-14, 0, MONTHS_AHEAD + 5)]
    store.insert(records)
    store.close()
    command.downgrade(alembic_config(postgres_url), "0003")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT relkind FROM pg_class WHERE oid = 'calls'::regclass")).scalar() == "r"
            ids = set(connection.execute(sa.text("SELECT request_id FROM calls")).scalars())
            assert ids == {r.request_id for r in records}
        (fk,) = sa.inspect(engine).get_foreign_keys("call_tags")
        assert (fk["name"], fk["referred_table"], fk["options"].get("ondelete")) == (
            "fk_call_tags_request_id_calls", "calls", "CASCADE"
        )
        assert not {t for t in sa.inspect(engine).get_table_names() if t.startswith("calls_")}
    finally:
        engine.dispose()
    command.upgrade(alembic_config(postgres_url), "head")
    command.check(alembic_config(postgres_url))


_WRITER = textwrap.dedent(
    """
    import sys, uuid
    from datetime import datetime, timedelta, timezone
    from collector.record import UsageRecord
    from collector.writer import LedgerWriter

    url, worker, own, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ns = uuid.UUID("6d2f0c1e-6b8e-4c55-9a6e-0f2b1de3c9a1")

    def record(name, i):
        # Spread over 14 months, so rows go to many partitions and the DEFAULT one.
        started = base + timedelta(days=(i * 7) % 420, seconds=i)
        return UsageRecord(started_at=started, request_id=uuid.uuid5(ns, name), model="deepseek-v4-flash",
                           completion_tokens=i % 50, tags={"worker": str(worker), "kind": "own"})

    writer = LedgerWriter(url, batch_size=40, flush_interval=0.005)
    mine = [record(f"w{worker}-{i}", i) for i in range(own)]
    # The same calls from every worker: what a retried or replayed call looks like.
    same = [record(f"shared-{i}", i) for i in range(shared)]
    for i in range(max(own, shared)):
        if i < own:
            writer.submit(mine[i])
        if i < shared:
            same_record = same[i]
            same_record.tags = {"worker": "any", "kind": "shared"}
            writer.submit(same_record)
    assert writer.close(120), "the writer did not drain"
    print("ok")
    """
)


@pytest.mark.postgres
def test_several_writer_processes_share_one_postgresql_without_losing_or_doubling_a_row(postgres_url: str) -> None:
    store = LedgerStore(postgres_url)
    store.migrate()  # as `dsmeter db upgrade` would before the workers start
    workers, own, shared = 3, 400, 150
    processes = [
        subprocess.Popen([sys.executable, "-c", _WRITER, postgres_url, str(w), str(own), str(shared)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(workers)
    ]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.strip() == "ok", err
    expected = workers * own + shared
    with store.engine.connect() as connection:
        total, distinct = connection.execute(sa.text("SELECT count(*), count(DISTINCT request_id) FROM calls")).one()
        tags = connection.execute(sa.text("SELECT count(*), count(DISTINCT (request_id, key)) FROM call_tags")).one()
        spread = connection.execute(sa.text("SELECT count(DISTINCT tableoid) FROM calls")).scalar_one()
        orphans = connection.execute(sa.text(
            "SELECT count(*) FROM call_tags t WHERE NOT EXISTS (SELECT 1 FROM calls c WHERE c.request_id = t.request_id)"
        )).scalar_one()
    assert (total, distinct) == (expected, expected)
    assert tuple(tags) == (2 * expected, 2 * expected) and orphans == 0
    assert spread > 3  # the rows really went to several partitions
    # Each writer kept the daily rollup current as it wrote: it agrees with the raw ledger exactly,
    # so no call was counted twice although every worker wrote the shared ones.
    assert compare(store, date(2025, 12, 1), date(2027, 6, 1)) == []
    store.close()


@pytest.mark.parametrize(
    ("on_postgresql", "type_", "name", "reflected", "included"),
    [
        (True, "table", "calls_y2026m03", True, False),
        (True, "table", DEFAULT_PARTITION, True, False),
        (True, "table", "calls", True, True),
        (True, "table", "calls_y2026m03_backup", True, True),
        (True, "foreign_key_constraint", "fk_call_tags_request_id_calls", False, False),
        (False, "foreign_key_constraint", "fk_call_tags_request_id_calls", False, True),
        (True, "foreign_key_constraint", "fk_other", False, True),
    ],
)
def test_alembic_leaves_out_only_what_partitioning_changes_on_purpose(
    on_postgresql: bool, type_: str, name: str, reflected: bool, included: bool
) -> None:
    dialect = "postgresql" if on_postgresql else "sqlite"
    assert include_object(dialect, object(), name, type_, reflected, None) is included


def test_month_arithmetic_crosses_years() -> None:
    assert add_months(date(2026, 11, 1), 3) == date(2027, 2, 1)
    assert add_months(date(2026, 1, 1), -1) == date(2025, 12, 1)
    assert partition_name(date(2027, 2, 1)) == "calls_y2027m02"
    assert month_start(datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc) + timedelta(minutes=1)) == date(2027, 1, 1)
