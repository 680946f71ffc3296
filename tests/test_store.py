"""LedgerStore: idempotent batched inserts, exact round trips, clear errors when the database is not there."""

from __future__ import annotations

import dataclasses
import enum
import socket
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.errors import DatabaseUnavailable, UsageError
from collector.models import (
    Call,
    CallTag,
    call_row,
    record_from_row,
    row_from_record,
    tag_pairs,
    tag_rows_from_record,
)
from collector.record import Endpoint, Status, UsageRecord
from collector.store import LedgerStore, database_identity, head_revision

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _record(i: int = 0, **changes: Any) -> UsageRecord:
    base = UsageRecord(
        started_at=T0 + timedelta(seconds=i),
        requested_model="deepseek-chat",
        model="deepseek-v4-flash",
        provider_request_id=f"chatcmpl-{i}",
        tags={"team": "search", "env": "prod"},
    )
    return dataclasses.replace(base, **changes)


def _full_record() -> UsageRecord:
    """A record with every field set to something other than its default."""
    return UsageRecord(
        started_at=T0,
        requested_model="deepseek-reasoner",
        provider_request_id="5f0c7c5a-0f5e-4a1e-9a7b-7f6a3b2c1d0e",
        endpoint="anthropic.messages",
        upstream="https://api.deepseek.com",
        finished_at=T0 + timedelta(seconds=3, microseconds=250),
        model="deepseek-v4-pro",
        stream=False,
        thinking=True,
        status=Status.DISCONNECTED.value,
        http_status=200,
        finish_reason="length",
        error_type="disconnected",
        error_message="stream ended without usage",
        prompt_tokens=1500,
        prompt_cache_hit_tokens=1000,
        prompt_cache_miss_tokens=500,
        completion_tokens=800,
        reasoning_tokens=600,
        usage_estimated=True,
        usage_raw={"prompt_tokens": 1500, "completion_tokens_details": {"reasoning_tokens": 600}},
        chunk_count=42,
        tool_call_count=2,
        ttft_ms=312.5,
        first_content_ms=2001.25,
        duration_ms=3000.0,
        key_fingerprint="kf_0123456789abcdef",
        user="user-17",
        tags={"team": "search", "feature": "rerank"},
        currency="CNY",
        cost=Decimal("0.0040060"),
        cost_cache_hit=Decimal("0.000020"),
        cost_cache_miss=Decimal("0.0010"),
        cost_output=Decimal("0.002986"),
        tariff_id="deepseek-v4-pro/2026-08-16/peak",
    )


def _count(store: LedgerStore, table: type[Call] | type[CallTag]) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_a_record_comes_back_field_for_field(db_url: str) -> None:
    store = LedgerStore(db_url)
    record = _full_record()
    assert store.insert([record]) == 1
    with store.session() as session:
        got = record_from_row(session.get_one(Call, record.request_id))
    assert got == record
    assert got.started_at.tzinfo is not None
    store.close()


def test_inserting_the_same_records_twice_stores_them_once_with_tags_once(db_url: str) -> None:
    store = LedgerStore(db_url)
    records = [_record(i) for i in range(50)]
    assert store.insert(records) == 50
    assert store.insert(records) == 0
    assert store.insert(records[:10] + [_record(99)]) == 1
    assert _count(store, Call) == 51
    assert _count(store, CallTag) == 51 * 2
    store.close()


def test_a_batch_repeating_a_record_counts_it_once(db_url: str) -> None:
    store = LedgerStore(db_url)
    record = _record()
    assert store.insert([record, record, dataclasses.replace(record)]) == 1
    assert _count(store, Call) == 1
    store.close()


def test_insert_new_returns_only_the_records_it_added(db_url: str) -> None:
    store = LedgerStore(db_url)
    old, new = _record(1), _record(2)
    store.insert([old])
    assert [r.request_id for r in store.insert_new([old, new])] == [new.request_id]
    store.close()


@pytest.mark.parametrize("other_commits", [True, False], ids=["other-commits", "other-rolls-back"])
def test_a_call_another_writer_is_committing_meanwhile_is_added_exactly_once(db_url: str, other_commits: bool) -> None:
    # The fast path (PostgreSQL: COPY; SQLite: a row count) meets a row another transaction
    # holds uncommitted: it waits for it, then adds the call only if that transaction did not.
    store = LedgerStore(db_url)
    store.ensure_schema()
    theirs, ours = _record(1), _record(2)
    other = store.engine.connect()
    other.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")
    transaction = other.begin()
    other.execute(sa.insert(Call), [row_from_record(theirs)])
    added: list[list[UsageRecord]] = []
    writer = threading.Thread(target=lambda: added.append(store.insert_new([theirs, ours])))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # waiting on the other transaction, not skipping past it
    transaction.commit() if other_commits else transaction.rollback()
    other.close()
    writer.join(30)
    expected = [ours] if other_commits else [theirs, ours]
    assert [r.request_id for r in added[0]] == [r.request_id for r in expected]
    assert _count(store, Call) == 2
    assert _count(store, CallTag) == 2 * len(expected)  # ours wrote tags only for the calls it added
    store.close()


def test_a_tag_row_left_without_its_call_does_not_keep_the_call_out(postgres_url: str) -> None:
    # On PostgreSQL call_tags has no foreign key (calls is partitioned), so a stray tag row can
    # exist; the COPY of the batch's tags then fails on it and the insert must fall back, not refuse.
    store = LedgerStore(postgres_url)
    store.ensure_schema()
    record = _record(1)
    with store.engine.begin() as connection:
        connection.execute(sa.insert(CallTag), [{"request_id": record.request_id, "key": "team", "value": "stray"}])
    assert store.insert_isolating([record]) == ([record], [])
    with store.session() as session:
        assert session.get(Call, record.request_id) is not None
        assert {key: value for key, value in session.execute(sa.select(CallTag.key, CallTag.value))} == {
            "team": "stray", "env": "prod"
        }
    store.close()


def test_provider_ids_repeated_across_calls_are_separate_rows(db_url: str) -> None:
    store = LedgerStore(db_url)
    records = [_record(i, provider_request_id="chatcmpl-same") for i in range(3)]
    assert store.insert(records) == 3
    with store.engine.connect() as connection:
        ids = connection.execute(sa.select(Call.provider_request_id)).scalars().all()
    assert ids == ["chatcmpl-same"] * 3
    store.close()


def test_the_first_write_migrates_a_new_database(db_url: str) -> None:
    store = LedgerStore(db_url)
    assert store.current_revision() is None
    assert store.insert([_record()]) == 1
    assert store.current_revision() == head_revision()
    store.close()


def _fit_reference(value: Any, limit: int | None) -> Any:
    """The fitting rule, spelled out plainly: text (an enum by its value), NUL marked, cut to the column."""
    if value is None:
        return None
    text = value.value if isinstance(value, enum.Enum) else value
    text = str(text).replace("\x00", "\ufffd")
    return text if limit is None else text[:limit]


_ODD = st.characters(codec="utf-8") | st.sampled_from("\x00\ufffd")
_ODD_TEXT = st.text(_ODD, max_size=12) | st.builds(lambda c, n: c * n, _ODD, st.integers(95, 1100))
_ODD_VALUE = st.none() | _ODD_TEXT | st.sampled_from([Status.ERROR, Endpoint.ANTHROPIC_MESSAGES]) | st.integers()


@given(
    strings=st.fixed_dictionaries(
        {name: _ODD_VALUE for name, column in Call.__table__.columns.items() if isinstance(column.type, sa.String)}
    ),
    tags=st.dictionaries(_ODD_TEXT | st.integers(), _ODD_TEXT | st.integers(), max_size=4),
)
@settings(max_examples=200, deadline=None)
def test_rows_are_fitted_by_the_plain_rule_whatever_the_strings(strings: dict[str, Any], tags: dict[Any, Any]) -> None:
    # call_row takes fast paths (C-level checks, tags kept as given when plain); the stored
    # row, its tags column and its call_tags rows must be what the plain rule gives.
    record = dataclasses.replace(_record(), **strings, tags=tags)
    limits = {name: column.type.length for name, column in Call.__table__.columns.items() if isinstance(column.type, sa.String)}
    row = call_row(record)
    for name, limit in limits.items():
        assert getattr(row, name) == _fit_reference(getattr(record, name), limit), name
    expected_tags = {_fit_reference(k, None): _fit_reference(v, None) for k, v in tags.items()}
    assert row.tags == expected_tags and row.tags is not tags
    expected_pairs: dict[str, str] = {}
    for key, value in expected_tags.items():
        expected_pairs.setdefault(key[:100], value[:500])
    assert tag_pairs(row.tags) == list(expected_pairs.items())
    assert tag_rows_from_record(record) == [
        {"request_id": record.request_id, "key": k, "value": v} for k, v in expected_pairs.items()
    ]
    assert row_from_record(record) == dict(zip(row._fields, row))


def test_over_long_strings_are_cut_to_their_columns_not_refused(db_url: str) -> None:
    store = LedgerStore(db_url)
    record = _record(error_message="x" * 5000, model="m" * 300, tags={"k" * 150: "v" * 900})
    assert store.insert([record]) == 1
    with store.session() as session:
        row = session.get_one(Call, record.request_id)
        assert row.error_message == "x" * 1000
        assert row.model == "m" * 200
        tag = session.scalars(sa.select(CallTag)).one()
        assert (len(tag.key), len(tag.value)) == (100, 500)
    store.close()


def test_tags_can_be_grouped_on_with_plain_sql(db_url: str) -> None:
    store = LedgerStore(db_url)
    store.insert(
        [
            _record(1, tags={"team": "search"}, cost=Decimal("0.10"), currency="USD"),
            _record(2, tags={"team": "search"}, cost=Decimal("0.25"), currency="USD"),
            _record(3, tags={"team": "ads"}, cost=Decimal("1.00"), currency="USD"),
            _record(4, tags={}, cost=Decimal("9.00"), currency="USD"),
        ]
    )
    statement = (
        sa.select(CallTag.value, sa.func.sum(Call.cost))
        .join(Call, Call.request_id == CallTag.request_id)
        .where(CallTag.key == "team")
        .group_by(CallTag.value)
        .order_by(CallTag.value)
    )
    with store.session() as session:
        assert session.execute(statement).all() == [("ads", Decimal("1.00")), ("search", Decimal("0.35"))]
    store.close()


def test_a_value_the_database_refuses_keeps_the_rest_of_the_batch(db_url: str) -> None:
    store = LedgerStore(db_url)
    good = [_record(i) for i in range(7)]
    bad = _record(100, completion_tokens=2**70)  # beyond BIGINT on both databases
    added, refused = store.insert_isolating(good[:3] + [bad] + good[3:])
    assert {r.request_id for r in added} == {r.request_id for r in good}
    assert [r.request_id for r, _ in refused] == [bad.request_id]
    assert refused[0][1]  # a reason, for the log
    assert _count(store, Call) == 7
    store.close()


def test_session_rolls_back_on_error(db_url: str) -> None:
    store = LedgerStore(db_url)
    record = _record()
    store.insert([record])
    with pytest.raises(RuntimeError), store.session() as session:
        session.execute(sa.delete(Call))
        raise RuntimeError("abort")
    assert _count(store, Call) == 1
    store.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_postgresql_is_one_line_without_the_password() -> None:
    url = f"postgresql+psycopg://meter:hunter2secret@127.0.0.1:{_closed_port()}/ledger"
    store = LedgerStore(url)
    with pytest.raises(DatabaseUnavailable) as raised:
        store.insert([_record()])
    message = str(raised.value)
    assert "\n" not in message
    assert "hunter2secret" not in message and "***" in message
    assert "127.0.0.1" in message
    assert "hunter2secret" not in store.url and "hunter2secret" not in repr(store)


def test_a_sqlite_file_in_a_missing_directory_is_database_unavailable(tmp_path: Path) -> None:
    store = LedgerStore(f"sqlite:///{tmp_path / 'nowhere' / 'ledger.db'}")
    with pytest.raises(DatabaseUnavailable, match="unable to open database file"):
        store.insert([_record()])


def test_require_schema_never_creates_a_missing_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = LedgerStore(f"sqlite:///{path}", migrate=False)
    with pytest.raises(DatabaseUnavailable, match="no ledger at"):
        store.require_schema()
    assert store.current_revision() is None
    assert not path.exists()


def test_require_schema_names_the_fix_for_an_empty_database(db_url: str) -> None:
    store = LedgerStore(db_url, migrate=False)
    store.engine.connect().close()  # the database exists but holds no ledger
    with pytest.raises(DatabaseUnavailable, match="dsmeter db upgrade"):
        store.require_schema()
    store.migrate()
    store.require_schema()
    store.close()


def test_unsupported_or_malformed_urls_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="supports SQLite and PostgreSQL"):
        LedgerStore("mysql://root@localhost/ledger")
    with pytest.raises(UsageError, match="not a database URL"):
        LedgerStore("::not a url::")


def test_the_same_sqlite_file_has_one_identity_however_it_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert database_identity("sqlite:///ledger.db") == database_identity(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert database_identity("postgresql://u:pw@h/db") == database_identity("postgresql+psycopg://u:other@h/db")
    assert "pw" not in database_identity("postgresql://u:pw@h/db")


def test_an_in_memory_sqlite_store_works_across_threads() -> None:
    import threading

    store = LedgerStore("sqlite://")
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(store.insert([_record()])))
    thread.start()
    thread.join()
    assert done == [1]
    assert _count(store, Call) == 1


def test_nul_characters_from_a_hostile_upstream_do_not_cost_the_row(db_url: str) -> None:
    # PostgreSQL text cannot hold NUL: the strings are marked with U+FFFD, the raw usage kept as sent.
    store = LedgerStore(db_url)
    record = _record(
        provider_request_id="a\x00b",
        model="m\x00",
        error_message="boom\x00",
        tags={"te\x00am": "se\x00arch"},
        usage_raw={"note\x00": "\x00", "prompt_tokens": 3},
    )
    assert store.insert([record]) == 1
    with store.session() as session:
        row = session.get_one(Call, record.request_id)
        assert (row.provider_request_id, row.model, row.error_message) == ("a\ufffdb", "m\ufffd", "boom\ufffd")
        assert row.tags == {"te\ufffdam": "se\ufffdarch"}
        assert row.usage_raw == {"note\x00": "\x00", "prompt_tokens": 3}
        assert session.scalars(sa.select(CallTag.key)).all() == ["te\ufffdam"]
    store.close()
