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


def test_ids_made_on_many_threads_at_once_are_all_distinct() -> None:
    # The random bits come from a per-thread pool of urandom output; threads must never share a slice.
    import threading

    made: list[list[uuid.UUID]] = [[] for _ in range(8)]

    def make(into: list[uuid.UUID]) -> None:
        into.extend(new_request_id() for _ in range(5000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({i for ids in made for i in ids}) == 8 * 5000


def test_a_forked_child_does_not_reuse_the_parents_random_bits() -> None:
    import os

    new_request_id()  # the parent's pool now holds bytes a careless child would hand out again
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"".join(new_request_id().bytes[6:] for _ in range(3)))
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    parent = b"".join(new_request_id().bytes[6:] for _ in range(3))
    assert len(child) == 30 and child != parent
