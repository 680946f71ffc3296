"""The dashboard's own queries (collector/queries.py, dashboard section) on SQLite and PostgreSQL.

Each is checked against the same figure computed here from the records inserted, and the
filters against the aggregates' own reading of the same ``Filters``.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from collector import queries
from collector.errors import UsageError
from collector.projection import TRAFFIC_COLUMNS
from collector.record import UsageRecord
from collector.store import LedgerStore
from dashboard_seed import seed_through_writer, synthetic_records

NOW = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)


@pytest.fixture
def ledger(db_url: str) -> Iterator[tuple[LedgerStore, list[UsageRecord]]]:
    records = list(synthetic_records(400, seed=3, start=NOW - timedelta(days=10), end=NOW))
    store = LedgerStore(db_url)
    store.insert(records)
    try:
        yield store, records
    finally:
        store.close()


def _selected(records: list[UsageRecord], filters: queries.Filters) -> list[UsageRecord]:
    out = []
    for r in records:
        if filters.since is not None and r.started_at < filters.since:
            continue
        if filters.until is not None and r.started_at >= filters.until:
            continue
        if filters.models and (r.model or r.requested_model) not in filters.models:
            continue
        if filters.statuses and r.status not in filters.statuses:
            continue
        if filters.key_fingerprints and r.key_fingerprint not in filters.key_fingerprints:
            continue
        if filters.users and r.user not in filters.users:
            continue
        if any(key not in r.tags or (values and r.tags[key] not in values) for key, values in filters.tags.items()):
            continue
        out.append(r)
    return out


FILTERS = [
    queries.Filters(),
    queries.Filters(since=NOW - timedelta(days=3), until=NOW - timedelta(days=1)),
    queries.Filters(models=("deepseek-v4-pro",), statuses=("completed", "cancelled")),
    queries.Filters(tags={"team": ("search", "analytics")}),
    queries.Filters(tags={"feature": ()}, key_fingerprints=("fp-support",)),
    queries.Filters(tags={"team": ("no-such-team",)}),
    queries.Filters(users=("u-2", "u-5"), statuses=("completed",)),
]


@pytest.mark.parametrize("filters", FILTERS, ids=range(len(FILTERS)))
def test_the_listing_selects_exactly_the_calls_the_aggregates_count(
    ledger: tuple[LedgerStore, list[UsageRecord]], filters: queries.Filters
) -> None:
    store, records = ledger
    expected = _selected(records, filters)
    _, total = queries.list_calls(store.engine, filters, limit=1)
    assert total == len(expected) == queries.totals(store.engine, filters, source="ledger").calls
    assert len(queries.traffic_frame(store.engine, filters)) == len(expected)


def test_pages_of_the_listing_cover_every_call_once_in_server_order(
    ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    store, records = ledger
    seen: list[uuid.UUID] = []
    costs: list[Decimal | None] = []
    for offset in range(0, len(records), 70):
        page, total = queries.list_calls(store.engine, queries.Filters(), sort_by="cost", descending=True,
                                         limit=70, offset=offset)
        assert total == len(records)
        seen += list(page["request_id"])
        costs += list(page["cost"])
    assert sorted(seen) == sorted(r.request_id for r in records)
    priced = [c for c in costs if c is not None]
    assert priced == sorted(priced, reverse=True)
    assert costs[len(priced):] == [None] * (len(costs) - len(priced))  # unpriced calls last, not first


def test_sorting_by_a_column_the_listing_does_not_offer_is_a_usage_error(
    ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    with pytest.raises(UsageError, match="cannot sort calls by"):
        queries.list_calls(ledger[0].engine, queries.Filters(), sort_by="error_message; DROP TABLE calls")


def _nearest_rank(values: list[float], p: int) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


def test_latency_percentiles_are_nearest_rank_per_model_and_thinking_mode(
    ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    store, records = ledger
    frame = queries.latency_percentiles(store.engine, queries.Filters())
    groups = {(r.model, r.thinking) for r in records}
    assert {(m, t) for m, t in zip(frame["model"], frame["thinking"])} == groups
    for row in frame.to_dict("records"):
        mine = [r for r in records if (r.model, r.thinking) == (row["model"], row["thinking"])]
        for metric in ("ttft_ms", "duration_ms"):
            values = [getattr(r, metric) for r in mine if getattr(r, metric) is not None]
            assert row[f"{metric}_calls"] == len(values)
            for p in queries.PERCENTILES:
                assert row[f"{metric}_p{p}"] == pytest.approx(_nearest_rank(values, p), abs=1e-9)


def test_finish_reasons_count_every_call_once(ledger: tuple[LedgerStore, list[UsageRecord]]) -> None:
    store, records = ledger
    frame = queries.finish_reasons(store.engine, queries.Filters())
    expected = Counter(r.finish_reason or "(none)" for r in records)
    assert dict(zip(frame["finish_reason"], frame["calls"])) == expected
    assert list(frame["calls"]) == sorted(frame["calls"], reverse=True)


def test_error_classes_put_each_failed_call_where_people_act_on_it(db_url: str) -> None:
    at = NOW - timedelta(hours=1)
    cases = {
        "429 rate limited": dict(status="error", http_status=429),
        "402 insufficient balance": dict(status="error", http_status=402),
        "5xx server error": dict(status="error", http_status=503),
        "other 4xx": dict(status="error", http_status=400),
        "error in stream": dict(status="error", http_status=200),
        "disconnected": dict(status="disconnected", http_status=200),
        "timeout": dict(status="timeout", http_status=200),
        "cancelled by caller": dict(status="cancelled", http_status=200),
    }
    records = [UsageRecord(started_at=at, requested_model="m", **fields) for fields in cases.values()]  # type: ignore[arg-type]
    records.append(UsageRecord(started_at=at, requested_model="m", status="completed", http_status=200))
    store = LedgerStore(db_url)
    try:
        store.insert(records)
        frame = queries.error_classes(store.engine, queries.Filters())
    finally:
        store.close()
    assert list(frame["error_class"]) == list(queries.ERROR_CLASSES)
    assert dict(zip(frame["error_class"], frame["calls"])) == dict.fromkeys(cases, 1)


def test_filter_choices_offer_every_model_status_and_tag_value(ledger: tuple[LedgerStore, list[UsageRecord]]) -> None:
    store, records = ledger
    choices = queries.filter_choices(store.engine)
    assert set(choices.models) == {r.model for r in records} | {r.requested_model for r in records}
    assert set(choices.statuses) == {r.status for r in records}
    assert choices.tag_values == {
        key: tuple(sorted({r.tags[key] for r in records})) for key in ("feature", "team")
    }
    assert choices.first_call == min(r.started_at for r in records)
    assert choices.last_call == max(r.started_at for r in records)


def test_an_empty_ledger_has_no_calls_and_no_choices(db_url: str) -> None:
    store = LedgerStore(db_url)
    try:
        store.migrate()
        assert not queries.has_calls(store.engine)
        choices = queries.filter_choices(store.engine)
    finally:
        store.close()
    assert choices.models == () and choices.tag_values == {} and choices.last_call is None


def test_the_traffic_frame_is_what_the_projection_reads_with_unknowns_kept_unknown(
    ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    store, records = ledger
    frame = queries.traffic_frame(store.engine, queries.Filters(statuses=("error",)))
    assert tuple(frame.columns) == TRAFFIC_COLUMNS
    errors = [r for r in records if r.status == "error"]
    assert len(frame) == len(errors) > 0
    assert all(value is None for value in frame["completion_tokens"])  # NULL stays None, never NaN or 0
    assert list(frame["started_at"]) == sorted(frame["started_at"])


# -- End users (the request body's `user` field) --------------------------------------------------

# Whole UTC days: the daily rollup could answer these filters, were it not for the end user.
WEEK = queries.Filters(since=datetime(2026, 11, 13, tzinfo=timezone.utc),
                       until=datetime(2026, 11, 20, tzinfo=timezone.utc))


@pytest.fixture
def users_ledger(db_url: str) -> Iterator[tuple[LedgerStore, list[UsageRecord]]]:
    """Calls written through the real writer, so the rollup is built and current; every fifth has no user."""
    records = list(synthetic_records(400, seed=7, start=NOW - timedelta(days=10), end=NOW))
    for record in records[::5]:
        record.user = None
    seed_through_writer(db_url, records)
    store = LedgerStore(db_url)
    try:
        yield store, records
    finally:
        store.close()


def _statements(store: LedgerStore) -> tuple[list[str], object]:
    """Every SQL statement the store's engine runs from now on (and the listener, to remove it)."""
    import sqlalchemy as sa

    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", record)
    return seen, record


def _by_user(records: list[UsageRecord]) -> dict[tuple[str | None, str | None], tuple[int, Decimal, int]]:
    """(user, currency) -> (calls, cost, output tokens), summed here from the records themselves."""
    sums: dict[tuple[str | None, str | None], tuple[int, Decimal, int]] = {}
    for r in records:
        calls, cost, output = sums.get((r.user, r.currency), (0, Decimal(0), 0))
        sums[(r.user, r.currency)] = (calls + 1, cost + (r.cost or Decimal(0)), output + (r.completion_tokens or 0))
    return sums


def _cost(records: list[UsageRecord]) -> Decimal:
    return sum((r.cost for r in records if r.cost is not None), Decimal(0))


@pytest.mark.parametrize("filters", [queries.Filters(), WEEK, WEEK.between(WEEK.since, NOW),
                                     queries.Filters(tags={"team": ("search", "support")}, statuses=("completed",))],
                         ids=["everything", "whole-days", "part-day", "tag-and-status"])
def test_spend_by_end_user_is_the_hand_sum_read_from_the_ledger_with_the_rollup_built(
    users_ledger: tuple[LedgerStore, list[UsageRecord]], filters: queries.Filters
) -> None:
    import sqlalchemy as sa

    store, records = users_ledger
    assert queries.rollup_complete(store.engine)
    seen, listener = _statements(store)
    try:
        frame = queries.aggregate(store.engine, filters, ["user", "currency"])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", listener)
    assert any("FROM calls" in s for s in seen) and not any("rollup_daily" in s for s in seen), seen
    got = {(u, c): (calls, cost, output) for u, c, calls, cost, output in
           zip(frame["user"], frame["currency"], frame["calls"], frame["cost"], frame["completion_tokens"])}
    selected = _selected(records, filters)
    assert got == _by_user(selected)
    assert any(user is None for user, _ in got)  # calls without a user are a group of their own
    assert len({user for user, _ in got}) == 7  # u-1 ... u-6 and None
    # The same calls as the rollup sees them (grouped by something it keeps) cost the same in total.
    if filters.whole_days:
        rolled = queries.aggregate(store.engine, filters, ["currency"], source="rollup")
        assert sum(rolled["cost"], Decimal(0)) == sum(frame["cost"], Decimal(0)) == _cost(selected)


def test_top_spenders_and_spend_per_day_by_end_user_are_the_hand_sums(
    users_ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    store, records = users_ledger
    mine = _selected(records, WEEK)
    priced = [r for r in mine if r.currency == "USD"]
    top = queries.top_spenders(store.engine, WEEK, "user", limit=100)
    expected = {user: _cost([r for r in priced if r.user == user]) for user in {r.user for r in priced}}
    assert dict(zip(top["group"], top["cost"])) == expected
    assert list(top["cost"]) == sorted(expected.values(), reverse=True)
    assert dict(zip(top["group"], top["calls"])) == {u: sum(1 for r in priced if r.user == u) for u in expected}
    assert sum(top["share"], Decimal(0)) == pytest.approx(Decimal(1), abs=Decimal("0.0005"))  # 7 shares, 1e-4 each
    daily = queries.spend_by_day(store.engine, WEEK, "user")
    per_day = {(d, u): c for d, u, cur, c in zip(daily["day"], daily["group"], daily["currency"], daily["cost"])
               if cur == "USD"}
    hand: dict[tuple[object, str | None], Decimal] = {}
    for r in priced:
        key = (r.started_at.date(), r.user)
        hand[key] = hand.get(key, Decimal(0)) + (r.cost or Decimal(0))
    assert per_day == hand


def test_the_end_user_filter_reads_the_ledger_and_selects_exactly_those_calls(
    users_ledger: tuple[LedgerStore, list[UsageRecord]]
) -> None:
    store, records = users_ledger
    filters = queries.Filters(since=WEEK.since, until=WEEK.until, users=("u-3", "u-4"))
    mine = _selected(records, filters)
    assert mine and {r.user for r in mine} == {"u-3", "u-4"}
    totals = queries.totals(store.engine, filters)
    assert totals.source == "ledger"
    assert totals.calls == len(mine)
    assert totals.cost["USD"].total == _cost(mine)
    assert queries.spend_totals(store.engine, filters) == {"USD": _cost(mine)}
    assert queries.list_calls(store.engine, filters, limit=1)[1] == len(mine)


def test_the_rollup_alone_cannot_answer_for_end_users(users_ledger: tuple[LedgerStore, list[UsageRecord]]) -> None:
    store, _ = users_ledger
    engine = store.engine
    assert queries.uses_rollup(engine, WEEK, "rollup")  # the rollup answers these filters otherwise
    assert not queries.uses_rollup(engine, WEEK, "auto", ["day", "user"])
    with_user = queries.Filters(since=WEEK.since, until=WEEK.until, users=("u-1",))
    for refused in (
        lambda: queries.aggregate(engine, WEEK, ["day", "user"], source="rollup"),
        lambda: queries.top_spenders(engine, WEEK, "user", source="rollup"),
        lambda: queries.spend_by_day(engine, WEEK, "user", source="rollup"),
        lambda: queries.totals(engine, with_user, source="rollup"),
        lambda: queries.uses_rollup(engine, WEEK, "rollup", ["user"]),
    ):
        with pytest.raises(UsageError, match="no end-user"):
            refused()
    with engine.connect() as connection, pytest.raises(UsageError, match="no end-user"):
        queries.aggregate_on(connection, WEEK, ["user"], rollup=True)


def test_has_users_looks_only_at_the_calls_the_filters_select(db_url: str) -> None:
    day = datetime(2026, 11, 10, tzinfo=timezone.utc)
    records = [UsageRecord(started_at=day + timedelta(hours=h), requested_model="m", status="completed",
                           user="u-9" if h == 5 else None, tags={"team": "ads" if h == 5 else "infra"})
               for h in range(8)]
    store = LedgerStore(db_url)
    try:
        store.insert(records)
        engine = store.engine
        assert queries.has_users(engine, queries.Filters())
        fifth_hour = queries.Filters(since=day + timedelta(hours=5), until=day + timedelta(hours=6))
        assert queries.has_users(engine, fifth_hour)
        assert not queries.has_users(engine, queries.Filters(since=day, until=day + timedelta(hours=5)))
        assert not queries.has_users(engine, queries.Filters(tags={"team": ("infra",)}))
    finally:
        store.close()
