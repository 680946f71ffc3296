"""Daily rollups: per (UTC day, model, status, currency, key fingerprint, tag set, tariff) sums, in shards.

Reports and the dashboard read ``rollup_daily`` instead of scanning millions of calls
(``collector.queries`` picks it when the range is whole UTC days). It must always equal
what the raw ledger gives, so it changes in exactly two ways:

* **Incrementally**: every ``LedgerWriter`` owns a ``RollupHook`` (``writer.rollup``). It adds
  the sums of the calls a batch actually added inside that batch's transaction, so calls and
  rollup commit together (a replayed duplicate is never counted twice). Spool replays and
  ``attach`` call it after the commit instead, in a transaction of its own. If the rollup
  cannot be written, the sums wait in memory and go with the next batch.
* **By re-deriving days** from the raw ledger: ``rebuild`` (``dsmeter rollup``, after a
  reprice, after upgrading a ledger that had calls before the rollup existed). It replaces
  the days' rows in one transaction. Idempotent: any range, any number of times.

Writers do not wait for each other (PostgreSQL; SQLite's writers take turns on the whole
file anyway). Each writer transaction adds to a ``shard`` of the rollup that no other open
transaction holds: it claims one with a transaction-scoped advisory lock, preferring the
shard it used last, so a key has a row per writer that added to it at the same time rather
than one row every writer queues on. Reads sum over shards as they sum over rows; a rebuild
writes one row per key. A new tag set is committed before the batch that carries it
(``RollupHook.prepare``), so two batches with the same new tags do not queue on it either.

Writers and rebuilds serialise on a lock (PostgreSQL advisory lock, shared by writers,
exclusive for a rebuild; SQLite's write lock). One race is left where calls are committed
before their sums are added (a replay, or a batch whose rollup had to wait), or, on
PostgreSQL, inserted before the batch takes the rollup lock: a rebuild that read the raw
ledger in between has already counted them. So every rebuild stamps the days it
re-derived, and a hook that finds one of its days re-derived within ``REBUILD_MARGIN`` of its
own start re-derives that day too instead of adding to it (on PostgreSQL, in a transaction of
its own under the exclusive lock): exact either way.

``rollup_state.complete`` says the rollup covers every call. Migration 0003 sets it when the
ledger is empty; otherwise the first full ``rebuild`` does, and until then reads go raw.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from collector.models import call_row
from collector.record import UsageRecord, utcnow
from collector.reporting_schema import (
    ROLLUP_COUNT_COLUMNS,
    ROLLUP_DAILY,
    ROLLUP_KEY_COLUMNS,
    ROLLUP_MONEY_COLUMNS,
    ROLLUP_REBUILDS,
    ROLLUP_STATE,
    ROLLUP_TAG_SET_ITEMS,
    ROLLUP_TAG_SETS,
    UNKNOWN,
    canonical_tags,
    tag_set_id,
    tags_text,
)
from collector.store import BulkInsert, LedgerStore, is_operational_error

__all__ = [
    "ROLLUP_DIMS",
    "ROLLUP_SHARDS",
    "REBUILD_MARGIN",
    "RollupKey",
    "Sums",
    "rollup_sums",
    "sums_of_rows",
    "MAX_PENDING",
    "RollupHook",
    "attach",
    "rebuild",
    "RebuildResult",
    "Drift",
    "compare",
]

log = logging.getLogger("dsmeter.rollups")

# The aggregate dimensions that make a rollup row (queries.aggregate names), in key order.
ROLLUP_DIMS: tuple[str, ...] = ("day", "model", "status", "currency", "key", "tag_set", "tariff")
# How long after a day was re-derived a hook re-derives it again rather than adding to it:
# it must exceed the time between a writer's commit and its hook (milliseconds) plus clock skew.
REBUILD_MARGIN = timedelta(seconds=5)
_LOCK_KEY = 0x64736D726F6C6C31  # "dsmroll1": PostgreSQL advisory lock taken only by rollup writers
# Writer transactions that can add to one key at once without waiting; past that they share shards
# (still exact: the upsert then waits on the row lock, as every writer did before shards).
ROLLUP_SHARDS = 16
_SHARD_LOCK_SPACE = 0x64736D73  # "dsms": advisory locks (space, shard), one per shard, int4 pairs
_MEASURES = ROLLUP_COUNT_COLUMNS + ROLLUP_MONEY_COLUMNS

# (day, model, status, currency, key_fingerprint, tag_set_id, tariff_id); '' for a NULL.
RollupKey = tuple[date, str, str, str, str, str, str]
Sums = dict[str, Any]  # every ROLLUP_COUNT_COLUMNS (int) and ROLLUP_MONEY_COLUMNS (Decimal)


def _zero() -> Sums:
    sums: Sums = dict.fromkeys(ROLLUP_COUNT_COLUMNS, 0)
    sums.update(dict.fromkeys(ROLLUP_MONEY_COLUMNS, Decimal(0)))
    return sums


def _add(into: Sums, other: Sums) -> None:
    for name in _MEASURES:
        into[name] += other[name]


def _add_each(into: dict[RollupKey, Sums], sums: dict[RollupKey, Sums]) -> None:
    """Add every key's sums of ``sums`` to ``into`` (keys new to ``into`` start at zero)."""
    for key, value in sums.items():
        _add(into.setdefault(key, _zero()), value)


def rollup_sums(records: Iterable[UsageRecord]) -> tuple[dict[RollupKey, Sums], dict[str, dict[str, str]]]:
    """What ``records`` add to the rollup: sums per rollup key, and the tag sets they use by id.

    Pure. Each record is first fitted exactly as the ledger stores it (``call_row``), so the
    sums equal what a raw query over the stored rows gives.
    """
    return sums_of_rows(call_row(record) for record in records)


# sums_of_rows adds these columns by name, one statement each (a loop over the column names
# cost 40% more per call: callgrind); this stops the import if the rollup's columns change.
if (ROLLUP_COUNT_COLUMNS, ROLLUP_MONEY_COLUMNS) != (
    ("calls", "unpriced_calls", "estimated_calls", "prompt_cache_hit_tokens", "prompt_cache_miss_tokens",
     "completion_tokens", "reasoning_tokens"),
    ("cost", "cost_cache_hit", "cost_cache_miss", "cost_output"),
):  # pragma: no cover
    raise RuntimeError("the rollup's measures changed: update sums_of_rows")


def sums_of_rows(rows: Iterable[Any]) -> tuple[dict[RollupKey, Sums], dict[str, dict[str, str]]]:
    """``rollup_sums`` of ``calls`` rows as ``call_row`` builds them (``CallRow``: the store's own, reused)."""
    out: dict[RollupKey, Sums] = {}
    tag_sets: dict[str, dict[str, str]] = {}
    set_ids: dict[tuple[tuple[str, str], ...], str] = {}  # a batch has few distinct tag sets: hash each once
    utc = timezone.utc
    for row in rows:
        tags = row.tags
        given = tuple(tags.items()) if tags else ()
        set_id = set_ids.get(given)
        if set_id is None:
            canonical = canonical_tags(tags)
            set_id = set_ids[given] = tag_set_id(canonical)
            tag_sets.setdefault(set_id, canonical)
        model = row.model if row.model is not None else row.requested_model
        key: RollupKey = (
            row.started_at.astimezone(utc).date(),
            UNKNOWN if model is None else model,
            row.status,
            row.currency or UNKNOWN,
            row.key_fingerprint or UNKNOWN,
            set_id,
            row.tariff_id or UNKNOWN,
        )
        sums = out.get(key)
        if sums is None:
            sums = out[key] = _zero()
        sums["calls"] += 1
        if row.cost is None:
            if row.prompt_tokens is not None or row.completion_tokens is not None:
                sums["unpriced_calls"] += 1
        else:
            sums["cost"] += row.cost
        if row.usage_estimated:
            sums["estimated_calls"] += 1
        # Unknown counts (None) add nothing; so do zeros.
        if row.prompt_cache_hit_tokens:
            sums["prompt_cache_hit_tokens"] += row.prompt_cache_hit_tokens
        if row.prompt_cache_miss_tokens:
            sums["prompt_cache_miss_tokens"] += row.prompt_cache_miss_tokens
        if row.completion_tokens:
            sums["completion_tokens"] += row.completion_tokens
        if row.reasoning_tokens:
            sums["reasoning_tokens"] += row.reasoning_tokens
        if row.cost_cache_hit is not None:
            sums["cost_cache_hit"] += row.cost_cache_hit
        if row.cost_cache_miss is not None:
            sums["cost_cache_miss"] += row.cost_cache_miss
        if row.cost_output is not None:
            sums["cost_output"] += row.cost_output
    return out, tag_sets


# -- writing the rollup -------------------------------------------------------------------------


def _insert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert


def _lock(connection: Connection, *, exclusive: bool) -> None:
    """Serialise rollup writers (SQLite: the caller's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        connection.execute(sa.text(f"SELECT {function}(:key)"), {"key": _LOCK_KEY})


@dataclass(frozen=True, slots=True)
class _Statements:
    """The write path's statements, compiled once per dialect (every batch runs all three)."""

    tag_sets: BulkInsert
    tag_set_items: BulkInsert
    add_sums: BulkInsert


_compiled: dict[tuple[str, str], _Statements] = {}


def _statements(dialect: sa.Dialect) -> _Statements:
    key = (dialect.name, dialect.driver)
    found = _compiled.get(key)
    if found is None:
        insert = _insert(dialect.name)
        add = insert(ROLLUP_DAILY)
        add = add.on_conflict_do_update(
            index_elements=[*ROLLUP_KEY_COLUMNS, "shard"],
            set_={name: ROLLUP_DAILY.c[name] + add.excluded[name] for name in _MEASURES},
        )
        found = _compiled[key] = _Statements(
            tag_sets=BulkInsert(
                insert(ROLLUP_TAG_SETS).on_conflict_do_nothing(index_elements=["tag_set_id"]), ROLLUP_TAG_SETS, dialect
            ),
            tag_set_items=BulkInsert(
                insert(ROLLUP_TAG_SET_ITEMS).on_conflict_do_nothing(index_elements=["tag_set_id", "key"]),
                ROLLUP_TAG_SET_ITEMS,
                dialect,
            ),
            add_sums=BulkInsert(add, ROLLUP_DAILY, dialect),
        )
    return found


def _store_tag_sets(connection: Connection, tag_sets: dict[str, dict[str, str]]) -> None:
    if not tag_sets:
        return
    statements = _statements(connection.dialect)
    ordered = sorted(tag_sets.items())
    statements.tag_sets.execute(connection, [{"tag_set_id": set_id, "tags": tags_text(tags)} for set_id, tags in ordered])
    statements.tag_set_items.execute(
        connection,
        [
            {"tag_set_id": set_id, "key": key, "value": value}
            for set_id, tags in ordered
            for key, value in sorted(tags.items())
        ],
    )


def _row(key: RollupKey, sums: Sums) -> dict[str, Any]:
    row: dict[str, Any] = dict(zip(ROLLUP_KEY_COLUMNS, key))
    row.update({name: sums[name] for name in _MEASURES})
    row["shard"] = 0  # a re-derived day is one row per key
    return row


# rollup_daily's columns are the key's, the measures', then the shard: a row is the key, its sums and its shard.
_measures_of = operator.itemgetter(*_MEASURES)
if [c.key for c in ROLLUP_DAILY.columns] != [*ROLLUP_KEY_COLUMNS, *_MEASURES, "shard"]:  # pragma: no cover
    raise RuntimeError("rollup_daily's columns are no longer (key columns, measures, shard) in order")


def _claim_shard(connection: Connection, preferred: int) -> int:
    """A shard no other open writer transaction adds to, held until this transaction ends.

    PostgreSQL: the first of ``preferred``, ``preferred + 1``, ... (modulo ``ROLLUP_SHARDS``)
    whose advisory lock is free, in one round trip; ``preferred`` if every one is taken.
    SQLite: 0, since its writers hold the whole database in turn.
    """
    if connection.dialect.name != "postgresql":
        return 0
    claimed = connection.execute(
        sa.text(
            # A volatile function in WHERE is evaluated row by row in generate_series order, and
            # LIMIT stops at the first lock taken: no other shard's lock is touched.
            "SELECT shard FROM (SELECT (CAST(:preferred AS integer) + i) % :shards AS shard"
            " FROM generate_series(0, :shards - 1) AS i) AS candidates"
            " WHERE pg_try_advisory_xact_lock(:space, shard) LIMIT 1"
        ),
        {"preferred": preferred, "shards": ROLLUP_SHARDS, "space": _SHARD_LOCK_SPACE},
    ).scalar()
    return preferred if claimed is None else int(claimed)


def _add_sums(connection: Connection, sums: dict[RollupKey, Sums], shard: int) -> None:
    """Add ``sums`` to the rollup rows of ``shard`` (created when absent), in key order so writers never deadlock."""
    if sums:
        add = _statements(connection.dialect).add_sums
        tail = (shard,)
        add.execute_values(connection, [add.row_values(key + _measures_of(sums[key]) + tail) for key in sorted(sums)])


def _stamp(connection: Connection, days: Iterable[date], at: datetime) -> None:
    rows = [{"day": day, "rebuilt_at": at} for day in sorted(set(days))]
    if not rows:
        return
    insert = _insert(connection.dialect.name)
    statement = insert(ROLLUP_REBUILDS)
    statement = statement.on_conflict_do_update(
        index_elements=["day"], set_={"rebuilt_at": statement.excluded.rebuilt_at}
    )
    connection.execute(statement, rows)


def _day_bound(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=timezone.utc)


def _rederive(connection: Connection, since: date | None, until: date | None, at: datetime) -> tuple[int, set[date]]:
    """Replace the rollup rows of days in [since, until) with sums read from the raw ledger.

    Returns (rows written, days re-derived). Runs inside the caller's locked transaction.
    """
    from collector.queries import Filters, aggregate_on  # pandas: only when re-deriving, not on the write path

    filters = Filters(
        since=None if since is None else _day_bound(since), until=None if until is None else _day_bound(until)
    )
    groups = aggregate_on(connection, filters, ROLLUP_DIMS, rollup=False)
    day_column = ROLLUP_DAILY.c.day
    bounds: list[sa.ColumnElement[bool]] = []
    if since is not None:
        bounds.append(day_column >= since)
    if until is not None:
        bounds.append(day_column < until)
    in_range = sa.and_(sa.true(), *bounds)
    old_days = set(connection.execute(sa.select(day_column).where(in_range).distinct()).scalars())
    connection.execute(ROLLUP_DAILY.delete().where(in_range))
    sums: dict[RollupKey, Sums] = {}
    tag_sets: dict[str, dict[str, str]] = {}
    for group in groups:
        tags = json.loads(group["tag_set"])
        set_id = tag_set_id(tags)
        tag_sets.setdefault(set_id, tags)
        key: RollupKey = (
            group["day"],
            group["model"] if group["model"] is not None else UNKNOWN,
            group["status"],
            group["currency"] or UNKNOWN,
            group["key"] or UNKNOWN,
            set_id,
            group["tariff"] or UNKNOWN,
        )
        into = sums.setdefault(key, _zero())
        _add(into, group)
    _store_tag_sets(connection, tag_sets)
    if sums:
        connection.execute(ROLLUP_DAILY.insert(), [_row(key, sums[key]) for key in sorted(sums)])
    days = old_days | {key[0] for key in sums}
    _stamp(connection, days, at)
    return len(sums), days


@dataclass(frozen=True, slots=True)
class RebuildResult:
    rows: int  # rollup rows written
    days: int  # days re-derived (with calls now or before)
    complete: bool  # the rollup now covers the whole ledger


def _begin(engine: Engine) -> Any:
    connection = engine.connect()
    # SQLite: take the write lock before reading, so nothing commits between our read and our write.
    return connection.execution_options(dsmeter_sqlite_begin="BEGIN IMMEDIATE")


def rebuild(store: LedgerStore, since: date | None = None, until: date | None = None) -> RebuildResult:
    """Re-derive the rollup for UTC days in [since, until) (open ends: every day) from the raw ledger.

    Idempotent. Rebuilding everything (both ends open) also marks the rollup complete, so
    reads use it from then on; it removes tag sets no row uses any more.
    """
    if since is not None and until is not None and until <= since:
        raise ValueError(f"empty day range [{since}, {until})")
    store.ensure_schema()
    with _begin(store.engine) as connection, connection.begin():
        _lock(connection, exclusive=True)
        at = utcnow()
        rows, days = _rederive(connection, since, until, at)
        full = since is None and until is None
        if full:
            used = sa.select(ROLLUP_DAILY.c.tag_set_id).distinct()
            connection.execute(ROLLUP_TAG_SET_ITEMS.delete().where(ROLLUP_TAG_SET_ITEMS.c.tag_set_id.not_in(used)))
            connection.execute(ROLLUP_TAG_SETS.delete().where(ROLLUP_TAG_SETS.c.tag_set_id.not_in(used)))
            connection.execute(ROLLUP_STATE.update().where(ROLLUP_STATE.c.id == 1).values(complete=True, built_at=at))
        complete = bool(connection.execute(sa.select(ROLLUP_STATE.c.complete).where(ROLLUP_STATE.c.id == 1)).scalar())
    return RebuildResult(rows=rows, days=len(days), complete=complete)


MAX_PENDING = 50_000  # rollup rows kept in memory while the rollup cannot be written
_MAX_REMEMBERED_TAG_SETS = 100_000  # past this many a hook forgets them all (bounded memory) and stores them again


class _NeedsExclusive(Exception):
    """A day was just re-derived: on PostgreSQL adding to it needs the exclusive lock, in a transaction of its own."""


class RollupHook:
    """Adds each committed batch's sums to the rollup.

    Two ways in. The writer makes it its store's ``TransactionCompanion``: ``stage`` adds the
    sums inside the batch's own transaction (in a savepoint), so calls and rollup commit
    together, with one commit per batch. Called as a ``LedgerWriter.on_written`` hook (or by a
    spool replay) with records already committed, it adds their sums in a transaction of its own.

    ``store`` is the ledger's ``LedgerStore``, or a callable returning it (the writer passes
    its own, so no second engine is opened). Never raises into the writer: if the rollup
    cannot be written, the sums are kept and added with the next batch (``pending`` says how
    many rollup rows wait); past ``MAX_PENDING`` they are dropped with an error telling to run
    ``dsmeter rollup``, and the rollup is marked incomplete if the database lets us.
    """

    def __init__(self, store: LedgerStore | Callable[[], LedgerStore]) -> None:
        self._store = store
        self._pid = os.getpid()
        self._lock = threading.Lock()
        # The shard this hook adds to while no other writer holds it (see the module doc).
        self._shard = random.randrange(ROLLUP_SHARDS)
        # Tag sets (as calls carry them) this process has seen committed: ``prepare`` skips them.
        self._stored_tag_sets: set[tuple[tuple[str, str], ...]] = set()
        self._pending: dict[RollupKey, Sums] = {}
        self._pending_tags: dict[str, dict[str, str]] = {}
        # Between stage() and settle(): the batch's own sums, and whether the savepoint wrote them.
        self._staged: tuple[dict[RollupKey, Sums], dict[str, dict[str, str]], bool] | None = None

    @property
    def store(self) -> LedgerStore:
        return self._store if isinstance(self._store, LedgerStore) else self._store()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _after_fork(self) -> None:
        # A lock copied through fork may be held by a parent thread that does not exist here,
        # and the parent's pending sums are the parent's to write.
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._pending, self._pending_tags = {}, {}
            self._shard = random.randrange(ROLLUP_SHARDS)  # parent and child write at the same time

    def __call__(self, records: Sequence[UsageRecord]) -> None:
        self._after_fork()
        started = utcnow()
        sums, tag_sets = rollup_sums(records)
        with self._lock:
            self._keep(sums, tag_sets)
            self._try(started)

    # -- around the batch's transaction (collector.store.TransactionCompanion) ------------------

    def prepare(self, connection: Connection, rows: list[Any]) -> None:
        """Before the batch's transaction, commit the tag sets of ``rows`` not seen stored yet.

        A tag set added inside the batch is a new row until that batch commits, and another
        writer's batch adding the same set waits for that commit. Committed here, in a short
        transaction of its own, both find it stored and neither waits. The batch adds its tag
        sets again in its own transaction all the same (a full rebuild removes unused ones),
        which costs nothing once they are stored. PostgreSQL only: SQLite's writers take turns.
        """
        if connection.dialect.name != "postgresql":
            return
        self._after_fork()
        stored = self._stored_tag_sets
        new = {tuple(tags.items()) if (tags := row.tags) else () for row in rows} - stored
        if not new:
            return
        tag_sets = {tag_set_id(canonical): canonical for canonical in (canonical_tags(dict(given)) for given in new)}
        try:
            with connection.begin():
                _store_tag_sets(connection, tag_sets)
        except Exception as error:
            if is_operational_error(error):
                raise  # the database or the connection failed: the batch's own outage handling decides
            # Refused (never expected of these rows): it only saved a wait, and the batch adds them itself.
            log.debug("tag sets not stored ahead of the batch: %s", (str(error).splitlines() or [""])[0])
            return
        if len(stored) > _MAX_REMEMBERED_TAG_SETS:
            stored.clear()
        stored.update(new)

    def stage(self, connection: Connection, rows: list[Any]) -> None:
        """Add the sums of ``rows`` (and any waiting ones) inside the caller's transaction.

        Holds the hook's lock until ``settle``, so no ``flush`` writes the waiting sums twice.
        Never raises: a failure rolls back only the savepoint, and the sums wait instead.
        """
        self._after_fork()
        self._lock.acquire()
        ok = False
        sums: dict[RollupKey, Sums] = {}
        tag_sets: dict[str, dict[str, str]] = {}
        try:
            started = utcnow()
            sums, tag_sets = sums_of_rows(rows)
            merged = sums  # nothing waits, the usual case: the batch's own sums, not a copy of them
            if self._pending:
                merged = {key: dict(value) for key, value in self._pending.items()}
                _add_each(merged, sums)
            with connection.begin_nested():
                self._write_in(connection, merged, {**self._pending_tags, **tag_sets}, started, exclusive=False)
            ok = True
        except _NeedsExclusive:
            pass  # settle() keeps the sums; the writer's flush() adds them under the exclusive lock
        except Exception as error:  # noqa: BLE001 - the calls must commit even if the rollup cannot
            log.warning("rollup update deferred to its own transaction: %s", (str(error).splitlines() or [""])[0])
        self._staged = (sums, tag_sets, ok)

    def settle(self, committed: bool) -> None:
        """The batch's transaction ended: forget what it wrote, or keep what it could not."""
        staged, self._staged = self._staged, None
        if staged is None:
            return
        try:
            sums, tag_sets, ok = staged
            if not committed:
                return  # the calls are not stored either: their sums go with them
            if ok:
                self._pending, self._pending_tags = {}, {}  # the savepoint wrote them too
            else:
                self._keep(sums, tag_sets)
                self._check_overflow("the rollup could not be written in the batch's transaction")
        finally:
            self._lock.release()

    def _keep(self, sums: dict[RollupKey, Sums], tag_sets: dict[str, dict[str, str]]) -> None:
        _add_each(self._pending, sums)
        self._pending_tags.update(tag_sets)

    def _check_overflow(self, reason: str) -> None:
        if len(self._pending) > MAX_PENDING:
            log.error("the rollup could not be written for too long; dropping %d waiting rows. "
                      "Run `dsmeter rollup` to re-derive it (%s)", len(self._pending), reason)
            self._pending, self._pending_tags = {}, {}
            self._mark_incomplete()

    def flush(self) -> bool:
        """Try again to write sums that are waiting; True when none wait."""
        self._after_fork()
        with self._lock:
            if self._pending:
                self._try(utcnow())
            return not self._pending

    def _try(self, started: datetime) -> None:
        try:
            self._apply(started)
        except Exception as error:  # noqa: BLE001 - never take the writer down; keep the sums
            first = (str(error).splitlines() or [type(error).__name__])[0]
            if len(self._pending) <= MAX_PENDING:
                log.warning("rollup update deferred (%d rows wait): %s", len(self._pending), first)
            self._check_overflow(first)
            return
        self._pending, self._pending_tags = {}, {}

    def _mark_incomplete(self) -> None:
        try:
            with self.store.engine.begin() as connection:
                connection.execute(ROLLUP_STATE.update().where(ROLLUP_STATE.c.id == 1).values(complete=False))
        except Exception:  # noqa: BLE001 - reads then go raw only if this worked; the log says what to do
            log.exception("could not mark the rollup incomplete")

    def _apply(self, started: datetime) -> None:
        store = self.store
        store.ensure_schema()
        try:
            with _begin(store.engine) as connection, connection.begin():
                self._write_in(connection, self._pending, self._pending_tags, started, exclusive=False)
        except _NeedsExclusive:
            with _begin(store.engine) as connection, connection.begin():
                self._write_in(connection, self._pending, self._pending_tags, started, exclusive=True)

    def _write_in(
        self,
        connection: Connection,
        sums: dict[RollupKey, Sums],
        tag_sets: dict[str, dict[str, str]],
        started: datetime,
        *,
        exclusive: bool,
    ) -> None:
        """Add ``sums`` within ``connection``'s transaction, re-deriving days rebuilt since ``started``."""
        _lock(connection, exclusive=exclusive)
        days = {key[0] for key in sums}
        recent = set(
            connection.execute(
                sa.select(ROLLUP_REBUILDS.c.day).where(
                    ROLLUP_REBUILDS.c.day.in_(sorted(days)),
                    ROLLUP_REBUILDS.c.rebuilt_at >= started - REBUILD_MARGIN,
                )
            ).scalars()
        )
        if recent and not exclusive and connection.dialect.name == "postgresql":
            raise _NeedsExclusive  # re-deriving needs every other rollup writer out of the way
        at = utcnow()
        for day in sorted(recent):
            _rederive(connection, day, day + timedelta(days=1), at)
        _store_tag_sets(connection, tag_sets)
        self._shard = _claim_shard(connection, self._shard)
        _add_sums(connection, {key: value for key, value in sums.items() if key[0] not in recent}, self._shard)


def attach(writer: Any, url: str | None = None) -> RollupHook:
    """Keep the rollup of the writer's ledger current with every batch ``writer`` commits.

    ``LedgerWriter`` attaches one by itself; this returns that one (never a second, which would
    count every call twice), or attaches a new hook for ``url`` (resolved like ``--db``).
    """
    own = getattr(writer, "rollup", None)
    if isinstance(own, RollupHook):
        return own
    for hook in writer.on_written:
        if isinstance(hook, RollupHook):
            return hook
    created = RollupHook(LedgerStore(url))
    writer.on_written.append(created)
    return created


# -- checking ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """One rollup group that differs from the raw ledger: the key and both sums."""

    key: tuple[Any, ...]
    rollup: Sums | None
    ledger: Sums | None


def compare(store: LedgerStore, since: date | None = None, until: date | None = None) -> list[Drift]:
    """Every group (``ROLLUP_DIMS``) of days in [since, until) where the rollup and the raw ledger differ.

    Empty means they agree exactly, counts and money. Reads both in one transaction.
    """
    from collector.queries import Filters, aggregate_on

    filters = Filters(
        since=None if since is None else _day_bound(since), until=None if until is None else _day_bound(until)
    )
    with store.engine.connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        raw = aggregate_on(connection, filters, ROLLUP_DIMS, rollup=False)
        rolled = aggregate_on(connection, filters, ROLLUP_DIMS, rollup=True)

    def keyed(groups: list[dict[str, Any]]) -> dict[tuple[Any, ...], Sums]:
        return {tuple(g[d] for d in ROLLUP_DIMS): {m: g[m] for m in _MEASURES} for g in groups if g["calls"]}

    a, b = keyed(rolled), keyed(raw)
    drifts = [Drift(key, a.get(key), b.get(key)) for key in sorted(set(a) | set(b), key=repr) if a.get(key) != b.get(key)]
    return drifts
