"""Request ids: UUIDv7, so ledger inserts land at the end of the primary key, not at random."""

from __future__ import annotations

import time
import uuid

from collector.record import UsageRecord, new_request_id, utcnow


def _millis(value: uuid.UUID) -> int:
    return value.int >> 80


def test_request_ids_are_rfc9562_version_7() -> None:
    value = new_request_id()
    assert value.version == 7
    assert value.variant == uuid.RFC_4122


def test_the_id_carries_the_current_unix_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    value = new_request_id()
    after = time.time_ns() // 1_000_000
    assert before <= _millis(value) <= after


def test_ids_made_in_later_milliseconds_sort_after_earlier_ones() -> None:
    earlier = [new_request_id() for _ in range(50)]
    time.sleep(0.003)
    later = [new_request_id() for _ in range(50)]
    assert max(earlier) < min(later)


def test_ids_stay_unique_within_one_millisecond() -> None:
    ids = [new_request_id() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)
    # Many share a millisecond, so uniqueness comes from the random bits, not the clock.
    assert len({_millis(i) for i in ids}) < len(ids)


def test_a_new_record_gets_a_version_7_id() -> None:
    first, second = UsageRecord(started_at=utcnow()), UsageRecord(started_at=utcnow())
    assert first.request_id.version == 7
    assert first.request_id != second.request_id
