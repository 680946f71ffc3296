"""The ledger's schema: one ``calls`` row per ``UsageRecord``, plus ``call_tags`` for grouping.

The columns mirror ``collector.record.UsageRecord`` field for field (same names), so a
record goes in and comes out unchanged; ``row_from_record`` / ``record_from_row`` are the
one place that converts between the two.

Two column types exist because the databases differ:

* ``UTCDateTime``: SQLite has no time zones and hands back naive datetimes; this type
  refuses naive datetimes on the way in and always returns aware UTC on the way out.
* ``Money``: SQLite has no exact decimal type (NUMERIC is stored as REAL, a float), so
  money is stored as a whole number of pico-units (10^-12 of the currency unit) in a
  BIGINT and mapped back to an exact ``Decimal``. ``func.sum(Call.cost)`` keeps the
  column type, so sums come back as exact Decimals on both databases. Limit: SQLite sums
  in int64 and raises "integer overflow" past about 9.2 million currency units in one
  SUM (one row is limited the same way); PostgreSQL sums BIGINT as NUMERIC, without limit.

Migrations (``migrations/versions``) spell the same schema with plain SQLAlchemy types
(DateTime(timezone=True), BigInteger), so history never changes when this module does;
``alembic check`` in the tests proves the two agree.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import operator
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from collector.record import UsageRecord

__all__ = [
    "NAMING_CONVENTION",
    "MONEY_SCALE",
    "Base",
    "Call",
    "CallTag",
    "CALLS",
    "CALL_TAGS",
    "Money",
    "UTCDateTime",
    "decimal_to_pico",
    "pico_to_decimal",
    "row_from_record",
    "CALL_COLUMN_KEYS",
    "CallRow",
    "call_row",
    "tag_rows_from_record",
    "tag_pairs",
    "record_from_row",
    "RECORD_FIELDS",
    "json_dumps",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MONEY_SCALE = 12  # digits after the decimal point that Money keeps: pico-units
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_PICO = 10**MONEY_SCALE


def decimal_to_pico(value: Decimal | int) -> int:
    """An exact Decimal as a whole number of 10^-12 units; refuses anything that would round."""
    pico: int
    if isinstance(value, Decimal):
        # Exact integer arithmetic (the bind processor of every money column runs this per row,
        # so the Decimal case comes first and skips the digit tuple: 1.5 -> 0.35 us).
        try:
            numerator, denominator = value.as_integer_ratio()
        except (ValueError, OverflowError):  # NaN, sNaN, +-Infinity
            raise ValueError(f"money must be a finite Decimal, got {value!r}") from None
        pico, remainder = divmod(numerator * _PICO, denominator)
        if remainder:
            raise ValueError(f"money {value} has more than {MONEY_SCALE} decimal places; round it explicitly first")
    elif isinstance(value, int) and not isinstance(value, bool):
        pico = value * _PICO
    else:
        # A float here means money already went through binary floating point: refuse it.
        raise TypeError(f"money must be a Decimal, got {type(value).__name__} {value!r}")
    if not _INT64_MIN <= pico <= _INT64_MAX:
        raise ValueError(f"money {value} is out of the ledger's range (about ±9.2 million units)")
    return pico


def pico_to_decimal(value: int | Decimal) -> Decimal:
    """Inverse of ``decimal_to_pico``; exact whatever the Decimal context (no rounding)."""
    pico = int(value)  # PostgreSQL returns SUM(bigint) as an integral NUMERIC
    if pico != value:
        raise ValueError(f"a money column held a non-integral value {value!r}")
    sign, digits, _ = Decimal(pico).as_tuple()
    return Decimal((sign, digits, -MONEY_SCALE))


class Money(TypeDecorator[Decimal]):
    """Exact money in a BIGINT of pico-units (see the module docstring for why and the limit)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> int | None:
        return None if value is None else decimal_to_pico(value)

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], int | None] | None:
        # BIGINT has no processor of its own on SQLite or psycopg, so ``process_bind_param`` is
        # the whole conversion: called directly, without TypeDecorator's two wrapping calls
        # (a ledger row binds four money columns and its rollup row four more).
        if self.impl_instance.bind_processor(dialect) is not None:  # pragma: no cover - another driver
            return super().bind_processor(dialect)

        def process(value: Any) -> int | None:
            return None if value is None else decimal_to_pico(value)

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else pico_to_decimal(value)


# ``json.dumps(value)`` builds a new C encoder object for every value it encodes; a ledger row
# encodes two (``usage_raw`` and ``tags``), and that set-up was a third of the time spent on
# JSON. ``json_dumps`` uses the same encoder, built once, with ``check_circular`` off so it
# holds no state between calls and is safe to share between threads (a circular value then
# fails with a RecursionError instead of a ValueError: refused either way). Module-level, not
# a closure: psycopg caches its JSON dumper by the function's code, and warns about closures.
_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_encode_string = json.encoder.encode_basestring_ascii
_JSON_ENCODER = (
    None
    if _c_make_encoder is None
    else _c_make_encoder(None, json.JSONEncoder().default, _encode_string, None, ": ", ", ", False, False, True)
)


def json_dumps(value: Any) -> str:
    """``json.dumps(value)`` with its default settings, character for character (the engines' json_serializer).

    ``tests/test_models_migrations.py`` checks the two agree.
    """
    if _JSON_ENCODER is None:  # pragma: no cover - CPython always has the C accelerator
        return json.dumps(value)
    if isinstance(value, str):
        return _encode_string(value)  # what json.dumps does for a top-level string
    return "".join(_JSON_ENCODER(value, 0))


# The text of each minute seen lately, "YYYY-MM-DD HH:MM:" (a ledger's timestamps come in
# time order, so a batch touches a few minutes), and of each second, "SS.".
_MINUTE_TEXT: dict[tuple[int, int, int, int, int], str] = {}
_SECOND_TEXT = tuple("%02d." % second for second in range(60))


def _sqlite_text(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (microseconds always written) of a UTC time.

    Formatting seven numbers was a tenth of the cost of a ledger row on SQLite (two times
    each); the minute's text is looked up instead, and only seconds and microseconds are
    added. Exactly the text the %-format gives (tests/test_models_migrations.py).
    """
    minute = (value.year, value.month, value.day, value.hour, value.minute)
    text = _MINUTE_TEXT.get(minute)
    if text is None:
        if len(_MINUTE_TEXT) >= 4096:
            _MINUTE_TEXT.clear()  # bounded; losing it only costs formatting again
        text = _MINUTE_TEXT[minute] = "%04d-%02d-%02d %02d:%02d:" % minute
    return text + _SECOND_TEXT[value.second] + str(1_000_000 + value.microsecond)[1:]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every dialect."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores timezone-aware UTC only")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            # Stored as text without an offset; always UTC, so text order is time order.
            return value.replace(tzinfo=None)
        return value

    def bind_processor(self, dialect: Dialect) -> Callable[[Any], Any] | None:
        """``process_bind_param`` then the dialect's own processor, fused for plain UTC ``datetime`` values.

        Composed, that is three Python calls and (SQLite) a %-format of a seven-key dict per
        value, the largest single cost of binding a ledger row (two timestamps each). The fast
        path gives exactly what the composed one gives (tests/test_models_migrations.py checks
        it): SQLite's DATETIME text ``YYYY-MM-DD HH:MM:SS.ffffff`` of the UTC time, or the aware
        UTC datetime itself where the driver takes datetimes. Anything else (None, another time
        zone, a subclass, a wrong type, a naive time) takes the composed path, which converts
        or refuses as before.
        """
        composed = super().bind_processor(dialect)
        if composed is None:  # pragma: no cover - process_bind_param is always defined
            return composed
        utc = timezone.utc
        # Which of the two shapes the composed processor gives here, and that the fast path
        # agrees with it (else every value takes the composed path).
        probe = datetime(2000, 1, 2, 3, 4, 5, 6, tzinfo=utc)
        sample = composed(probe)
        if not isinstance(sample, str):
            if sample != probe:  # pragma: no cover - a driver that wants something else
                return composed

            def process(value: Any) -> Any:
                return value if type(value) is datetime and value.tzinfo is utc else composed(value)

            return process
        if sample != _sqlite_text(probe):  # pragma: no cover - another storage format
            return composed

        def process_text(value: Any) -> Any:
            return _sqlite_text(value) if type(value) is datetime and value.tzinfo is utc else composed(value)

        return process_text

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Call(Base):
    """One metered call. Columns are ``UsageRecord``'s fields, same names, same meaning."""

    __tablename__ = "calls"

    request_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    requested_model: Mapped[str | None] = mapped_column(String(200))
    provider_request_id: Mapped[str | None] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(40))
    upstream: Mapped[str | None] = mapped_column(String(500))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    model: Mapped[str | None] = mapped_column(String(200))
    stream: Mapped[bool] = mapped_column(Boolean)
    thinking: Mapped[bool | None] = mapped_column(Boolean)
    status: Mapped[str] = mapped_column(String(20))
    http_status: Mapped[int | None] = mapped_column(Integer)
    finish_reason: Mapped[str | None] = mapped_column(String(40))
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(String(1000))

    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger)
    prompt_cache_hit_tokens: Mapped[int | None] = mapped_column(BigInteger)
    prompt_cache_miss_tokens: Mapped[int | None] = mapped_column(BigInteger)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger)
    reasoning_tokens: Mapped[int | None] = mapped_column(BigInteger)
    usage_estimated: Mapped[bool] = mapped_column(Boolean)
    # none_as_null: None means "no usage object", a SQL NULL, not the JSON text 'null'.
    usage_raw: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    chunk_count: Mapped[int] = mapped_column(Integer)
    tool_call_count: Mapped[int] = mapped_column(Integer)
    ttft_ms: Mapped[float | None] = mapped_column(Double)
    first_content_ms: Mapped[float | None] = mapped_column(Double)
    duration_ms: Mapped[float | None] = mapped_column(Double)

    key_fingerprint: Mapped[str | None] = mapped_column(String(100))
    user: Mapped[str | None] = mapped_column(String(500))
    tags: Mapped[dict[str, str]] = mapped_column(JSON(none_as_null=True))

    currency: Mapped[str | None] = mapped_column(String(3))
    cost: Mapped[Decimal | None] = mapped_column(Money)
    cost_cache_hit: Mapped[Decimal | None] = mapped_column(Money)
    cost_cache_miss: Mapped[Decimal | None] = mapped_column(Money)
    cost_output: Mapped[Decimal | None] = mapped_column(Money)
    tariff_id: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        Index("ix_calls_started_at", "started_at"),
        Index("ix_calls_model_started_at", "model", "started_at"),
        Index("ix_calls_requested_model_started_at", "requested_model", "started_at"),
        Index("ix_calls_status", "status"),
        Index("ix_calls_key_fingerprint", "key_fingerprint"),
        # No index on provider_request_id (migration 0005): nothing reads calls by it, and its
        # random values made it the costliest index to write.
    )


class CallTag(Base):
    """One tag of one call, so any tag key can be grouped on with plain SQL on every dialect."""

    __tablename__ = "call_tags"

    request_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("calls.request_id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))

    __table_args__ = (Index("ix_call_tags_key_value", "key", "value"),)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageRecord))

CALLS: Table = cast(Table, Call.__table__)
CALL_TAGS: Table = cast(Table, CallTag.__table__)

_CALL_COLUMNS = CALLS.columns
if set(RECORD_FIELDS) != set(_CALL_COLUMNS.keys()):  # pragma: no cover - caught at import, in every test
    raise RuntimeError(
        "calls columns and UsageRecord fields differ: "
        f"{sorted(set(RECORD_FIELDS) ^ set(_CALL_COLUMNS.keys()))}"
    )

# (field, max length) for every bounded string column: over-long values are cut here, in
# Python, so PostgreSQL never refuses a row over a long error message or model name.
_STRING_LIMITS: tuple[tuple[str, int], ...] = tuple(
    (column.name, column.type.length)
    for column in _CALL_COLUMNS
    if isinstance(column.type, String) and column.type.length
)
_TAG_KEY_LIMIT = 100
_TAG_VALUE_LIMIT = 500


def _text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    text = value if type(value) is str else str(value)
    # PostgreSQL text cannot hold NUL; an upstream can still send one. Keep the row, mark the spot.
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


CALL_COLUMN_KEYS: tuple[str, ...] = tuple(_CALL_COLUMNS.keys())  # the table's column order
# A ``calls`` row as the write path builds it: fitted values in column order, each readable
# by name (``row.model``). A named tuple, not a dict: building a 37-key dict per call cost as
# much as converting all its values for the driver (tests/benchmarks/bench_ledger.py).
CallRow = collections.namedtuple("CallRow", CALL_COLUMN_KEYS)  # type: ignore[misc]
# Every field of a record in table order, in one C-level call.
_record_values = operator.attrgetter(*CALL_COLUMN_KEYS)
_STRING_SLOTS = tuple((CALL_COLUMN_KEYS.index(name), limit) for name, limit in _STRING_LIMITS)
_TAGS_SLOT = CALL_COLUMN_KEYS.index("tags")


def _plain_tags(tags: dict[Any, Any]) -> bool:
    """Whether every tag key and value is a plain ``str`` without NUL (kept as they are).

    A plain loop: for the two or three tags a call has, it costs less than C-level passes
    (``map``, ``join``), whose set-up dominates at that size (measured with callgrind).
    """
    for key, value in tags.items():
        if type(key) is not str or type(value) is not str or "\x00" in key or "\x00" in value:
            return False
    return True


def call_row(record: UsageRecord) -> Any:
    """The ``calls`` row for a record (a ``CallRow``): its fields in column order, strings fitted to their columns."""
    values = list(_record_values(record))
    for i, limit in _STRING_SLOTS:
        value = values[i]
        if value is None:
            continue
        if type(value) is not str or "\x00" in value:
            values[i] = value = _text(value)
        if len(value) > limit:
            values[i] = value[:limit]
    values[_TAGS_SLOT] = _clean_tags(values[_TAGS_SLOT])
    return CallRow._make(values)


def _clean_tags(tags: dict[Any, Any] | None) -> dict[str, str]:
    """A copy of a call's tags as the ``tags`` column holds them: text, NUL marked (no length limit)."""
    if not tags:
        return {}
    if _plain_tags(tags):
        return dict(tags)
    return {_text(k): _text(v) for k, v in tags.items()}


def row_from_record(record: UsageRecord) -> dict[str, Any]:
    """The ``calls`` row for a record as a dict: same keys, strings fitted to their columns."""
    return call_row(record)._asdict()


def tag_pairs(tags: dict[str, str]) -> list[tuple[str, str]]:
    """The ``call_tags`` (key, value) pairs of a row's tags (``CallRow.tags``: text without NUL).

    Keys are cut to 100 characters, values to 500; if two keys are the same once cut, the
    first wins. The row's tags, not the record's, so call_tags agrees with the tags column
    (and the rollup) however odd the keys were.
    """
    pairs = list(tags.items()) if tags else []
    for key, value in pairs:
        if len(key) > _TAG_KEY_LIMIT or len(value) > _TAG_VALUE_LIMIT:
            break
    else:
        return pairs  # distinct keys, nothing to cut: nothing can collide
    cut: dict[str, str] = {}
    for key, value in pairs:
        cut.setdefault(key[:_TAG_KEY_LIMIT], value[:_TAG_VALUE_LIMIT])
    return list(cut.items())


def tag_rows_from_record(record: UsageRecord) -> list[dict[str, Any]]:
    """The ``call_tags`` rows for a record (keys cut to fit, first one wins if two collide)."""
    return [{"request_id": record.request_id, "key": k, "value": v} for k, v in tag_pairs(_clean_tags(record.tags))]


def record_from_row(row: Call | Mapping[str, Any]) -> UsageRecord:
    """A ``UsageRecord`` from a ``Call`` object or a ``calls`` row mapping (``row._mapping``)."""
    if isinstance(row, Call):
        values = {name: getattr(row, name) for name in RECORD_FIELDS}
    else:
        values = {name: row[name] for name in RECORD_FIELDS}
    if values["tags"] is None:
        values["tags"] = {}
    return UsageRecord(**values)
