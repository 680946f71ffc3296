"""The SSE decoder: WHATWG event-stream parsing over bytes, split anywhere, with exact offsets.

The expected events come from ``reference_events``, a deliberately naive, whole-body
reading of the spec (a regex over the full body, string fields), which shares no code
with the incremental decoder. Every real capture is decoded whole, byte by byte, split
in two, and split at random by hypothesis, in LF and CRLF framing, and must give the
same events with the same offsets every time.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.sse import SSEDecoder, SSEEvent, SSELineTooLong
from fixture_streams import FixtureStream, chunk_payloads, load_streams

STREAMS = load_streams()
SMALL = [s for s in STREAMS if len(s.body) < 7000]
BIG = [s for s in STREAMS if len(s.body) >= 7000]
BOM = b"\xef\xbb\xbf"


def _ids(streams: Sequence[FixtureStream]) -> list[str]:
    return [str(s) for s in streams]


# -- an independent reading of the spec --------------------------------------------------------

_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def reference_events(body: bytes) -> list[SSEEvent]:
    """The spec, read literally over the whole body (no chunking, no cleverness).

    Offsets follow the decoder's documented convention: ``start`` is the first field
    line of the block, ``end`` is just past the first byte of the dispatching blank
    line's terminator (for CRLF, the CR). At the end of the body it is as lenient as the
    decoder's ``flush``: an unterminated last line counts, and so does a pending event.
    """
    events: list[SSEEvent] = []
    data: list[str] | None = None
    event_type = ""
    last_id: str | None = None
    retry: int | None = None
    start: int | None = None
    pos = len(BOM) if body.startswith(BOM) else 0
    lines = [(m.group(1), m.start(), m.start(2) + 1) for m in _LINE.finditer(body, pos)]
    tiled = lines[-1][2] if lines else pos
    assert all(body[e - 1 : e] in (b"\r", b"\n") for _, _, e in lines)
    tail_start = max(tiled + (body[tiled : tiled + 1] == b"\n" and body[tiled - 1 : tiled] == b"\r"), pos)
    if tail_start < len(body):
        lines.append((body[tail_start:], tail_start, len(body)))  # lenient EOF: the last line counts
    lines.append((b"", len(body), len(body)))  # and so does a block whose blank line never came
    for raw, line_start, line_end in lines:
        line = raw.decode("utf-8", "replace")
        if line == "":
            if start is not None and data is not None:
                events.append(SSEEvent("\n".join(data), event_type or "message", last_id, retry, start, line_end))
            data, event_type, retry, start = None, "", None, None
            continue
        if line.startswith(":"):
            continue
        if start is None:
            start = line_start
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data = (data or []) + [value]
        elif name == "event":
            event_type = value
        elif name == "id" and "\x00" not in value:
            last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return events


def decode(pieces: Iterable[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    decoder = decoder or SSEDecoder()
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(decoder.feed(piece))
    events.extend(decoder.flush())
    return events


def split_at(body: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(body)]
    return [body[a:b] for a, b in zip(points, points[1:])]


def with_noise(body: bytes) -> bytes:
    """A capture with what DeepSeek documents but no capture shows: keep-alive comments and
    blank lines between events, plus an ``id:`` line that must not dispatch on its own."""
    newline = b"\r\n" if b"\r\n" in body else b"\n"
    blocks = body.split(newline + newline)
    noisy: list[bytes] = []
    for i, block in enumerate(blocks):
        if i % 3 == 1:
            noisy.append(b": keep-alive" + newline + b"id: 7" + newline + b": keep-alive")
        if i % 4 == 2:
            noisy.append(b"")  # an extra blank line between events
        noisy.append(block)
    return (newline + newline).join(noisy)


# -- the reference agrees with what the captures say they hold --------------------------------


@pytest.mark.parametrize("stream", STREAMS, ids=_ids(STREAMS))
def test_reference_reading_matches_the_capture_payloads(stream: FixtureStream) -> None:
    events = reference_events(stream.body)
    nl = b"\r\n" if stream.framing == "crlf" else b"\n"
    if stream.name.endswith(".chunks.jsonl"):
        assert [e.data for e in events] == [*chunk_payloads(stream.path), "[DONE]"]
    for event in events:
        raw = stream.body[event.start : event.end]
        assert raw.endswith(nl + nl[:1]), "an event ends just past its blank line's first terminator byte"
        lines = [line.decode() for line in raw[: -len(nl) - 1].split(nl)]
        assert "\n".join(line.removeprefix("data: ") for line in lines if line.startswith("data:")) == event.data
        if event.data != "[DONE]":
            json.loads(event.data)
    if stream.is_chat:
        assert all(e.event == "message" for e in events) and events[-1].data == "[DONE]"
    else:
        assert all(e.event == json.loads(e.data)["type"] for e in events)


# -- every capture, every way of splitting it --------------------------------------------------


@pytest.mark.parametrize("stream", STREAMS, ids=_ids(STREAMS))
def test_capture_decoded_whole_gives_reference_events(stream: FixtureStream) -> None:
    decoder = SSEDecoder()
    events = decoder.feed(stream.body)
    assert events == reference_events(stream.body)
    assert decoder.flush() == []
    assert decoder.offset == decoder.stable_offset == len(stream.body)


@pytest.mark.parametrize("stream", STREAMS, ids=_ids(STREAMS))
def test_capture_fed_one_byte_at_a_time_gives_the_same_events(stream: FixtureStream) -> None:
    body = stream.body
    assert decode(body[i : i + 1] for i in range(len(body))) == reference_events(body)


@pytest.mark.parametrize("stream", STREAMS, ids=_ids(STREAMS))
def test_noisy_capture_one_byte_at_a_time_gives_the_same_events(stream: FixtureStream) -> None:
    body = with_noise(stream.body)
    expected = reference_events(body)
    assert [e.data for e in expected] == [e.data for e in reference_events(stream.body)]
    assert decode(body[i : i + 1] for i in range(len(body))) == expected


@pytest.mark.parametrize("stream", SMALL, ids=_ids(SMALL))
def test_small_capture_split_in_two_at_every_boundary_gives_the_same_events(stream: FixtureStream) -> None:
    body = stream.body
    expected = reference_events(body)
    for cut in range(1, len(body)):
        assert decode((body[:cut], body[cut:])) == expected, f"split at byte {cut}"


@pytest.mark.parametrize("stream", BIG, ids=_ids(BIG))
def test_big_capture_split_in_two_at_sampled_boundaries_gives_the_same_events(stream: FixtureStream) -> None:
    """Every cut below 12 kB, some 4000 above, each decoded in a window from the previous event's end.

    Decoding the full 100 kB body for every cut would take minutes; a fresh decoder
    started at an event boundary is in the same state as one that read everything
    before it (these captures have no ``id:`` lines or BOM to carry over), so only the
    offsets shift, by the window's start.
    """
    body = stream.body
    assert b"\nid:" not in body and not body.startswith(BOM)
    expected = reference_events(body)
    ends = [0] + [e.end for e in expected]
    rng = random.Random(f"{stream}")
    terminators = [m.start() for m in re.finditer(rb"[\r\n]", body)]
    if len(body) < 12000:
        cuts = set(range(1, len(body)))
    else:
        cuts = set(rng.sample(range(1, len(body)), 2500))
        cuts.update(t + d for t in rng.sample(terminators, min(500, len(terminators))) for d in (0, 1, 2))
    for cut in sorted(c for c in cuts if 0 < c < len(body)):
        lo = max(e for e in ends if e <= cut)
        hi = min((e for e in ends if e > cut), default=len(body))
        window = [e for e in expected if lo <= e.start and e.end <= hi]
        got = decode((body[lo:cut], body[cut:hi]))
        shifted = [SSEEvent(e.data, e.event, e.id, e.retry, e.start + lo, e.end + lo) for e in got]
        assert shifted == window, f"split at byte {cut}"


@pytest.mark.parametrize("stream", BIG[::3], ids=_ids(BIG[::3]))
def test_big_capture_split_in_two_full_body_at_a_few_boundaries(stream: FixtureStream) -> None:
    body = stream.body
    expected = reference_events(body)
    rng = random.Random(len(body))
    for cut in rng.sample(range(1, len(body)), 60):
        assert decode((body[:cut], body[cut:])) == expected, f"split at byte {cut}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_capture_split_at_random_points_gives_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from(STREAMS), label="stream")
    noisy = data.draw(st.booleans(), label="noisy")
    body = with_noise(stream.body) if noisy else stream.body
    cuts = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=80), label="cuts")
    assert decode(split_at(body, cuts)) == reference_events(body)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_arbitrary_event_stream_split_anywhere_gives_the_reference_events(data: st.DataObject) -> None:
    """Made-up streams that mix every line ending, comments, ids, retries and non-ASCII text."""
    line = st.one_of(
        st.builds(lambda v: b"data:" + v, st.sampled_from([b"", b" ", b" x", b"  two", b"{\"a\":1}", "é€😀".encode()])),
        st.sampled_from([b"", b": keep-alive", b"event: ping", b"event:", b"id: 3", b"id", b"retry: 10", b"retry: x1"]),
        st.sampled_from([b"data", b"unknown: 1", b"data \xe2\x82", "data: \u2028\u0085x".encode()]),
    )
    lines = data.draw(st.lists(line, max_size=25), label="lines")
    endings = data.draw(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=len(lines), max_size=len(lines)))
    body = (BOM if data.draw(st.booleans(), label="bom") else b"") + b"".join(a + b for a, b in zip(lines, endings))
    if not body:
        return
    cuts = data.draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=12), label="cuts")
    assert decode(split_at(body, cuts)) == reference_events(body)


# -- offsets: cutting one event's bytes out leaves a stream that reads the same otherwise ------


@pytest.mark.parametrize("stream", STREAMS, ids=_ids(STREAMS))
def test_cutting_an_event_out_by_its_offsets_removes_exactly_that_event(stream: FixtureStream) -> None:
    events = reference_events(stream.body)
    for victim in (0, len(events) // 2, len(events) - 2):
        e = events[victim]
        remaining = stream.body[: e.start] + stream.body[e.end :]
        assert [x.data for x in decode([remaining])] == [x.data for x in events if x is not e]


@pytest.mark.parametrize("stream", STREAMS[:4] + STREAMS[-4:], ids=_ids(STREAMS[:4] + STREAMS[-4:]))
def test_stable_offset_never_reaches_into_an_event_still_being_received(stream: FixtureStream) -> None:
    body = with_noise(stream.body)
    events = reference_events(body)
    decoder = SSEDecoder()
    seen: list[SSEEvent] = []
    previous = 0
    for i in range(len(body)):
        seen.extend(decoder.feed(body[i : i + 1]))
        stable = decoder.stable_offset
        assert previous <= stable <= decoder.offset == i + 1
        previous = stable
        if seen:
            assert stable >= seen[-1].end
        for e in events[len(seen) :]:
            assert not e.start < stable < e.end + 1, f"byte {i}: stable offset {stable} inside an open event"


# -- edge cases, one behaviour each ------------------------------------------------------------


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # Were the LF a second line ending, it would be a blank line and dispatch "a" alone.
    events = decoder.feed(b"\ndata: b\r\n\r\n")
    assert [e.data for e in events] == ["a\nb"]
    assert (events[0].start, events[0].end) == (0, 19)


def test_cr_at_the_end_of_a_read_ends_the_line_without_waiting_for_the_next_read() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"data: now\r\n\r")
    assert [e.data for e in events] == ["now"]
    assert events[0].end == 12
    assert decoder.stable_offset == 12
    assert decoder.feed(b"\n") == [] and decoder.stable_offset == 13
    assert [e.data for e in decoder.feed(b"data: next\r\n\r\n")] == ["next"]


def test_lone_cr_line_endings_are_line_ends() -> None:
    assert [e.data for e in decode([b"data: a\rdata: b\r\rdata: c\r\r"])] == ["a\nb", "c"]


def test_crlf_event_end_does_not_depend_on_where_reads_split() -> None:
    body = b"data: x\r\n\r\ndata: y\r\n\r\n"
    whole = decode([body])
    assert [(e.start, e.end) for e in whole] == [(0, 10), (11, 21)]
    assert decode([body[:10], body[10:]]) == whole


def test_multibyte_utf8_character_split_across_reads_is_decoded_whole() -> None:
    body = 'data: {"content":"你好😀"}\n\n'.encode()
    cut = body.index("好".encode()) + 1
    events = decode([body[:cut], body[cut : cut + 1], body[cut + 1 :]])
    assert [e.data for e in events] == ['{"content":"你好😀"}']


def test_invalid_utf8_is_replaced_not_raised() -> None:
    assert [e.data for e in decode([b"data: a\xffb\n\n"])] == ["a\ufffdb"]


def test_unicode_line_separators_inside_data_do_not_split_lines() -> None:
    text = "a\u2028b\u2029c\u0085d\x0be\x0cf\x1cg"
    assert [e.data for e in decode([f"data: {text}\n\n".encode()])] == [text]


def test_keep_alive_comment_between_events_is_ignored() -> None:
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b"data: 1\n\n: keep-alive\n\n")] == ["1"]
    assert decoder.stable_offset == 23  # the comment and blank line are settled bytes
    assert [e.data for e in decoder.feed(b": keep-alive\ndata: 2\n\n")] == ["2"]


def test_comment_inside_an_event_block_does_not_end_it() -> None:
    assert [e.data for e in decode([b"data: a\n: keep-alive\ndata: b\n\n"])] == ["a\nb"]


def test_id_then_keep_alive_then_blank_line_dispatches_nothing() -> None:
    """The httpx-sse / openai SDK bug: they dispatch an empty event here."""
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 42\n: keep-alive\n\n") == []
    assert decoder.stable_offset == decoder.offset
    (event,) = decoder.feed(b"data: x\n\n")
    assert (event.data, event.id) == ("x", "42")  # the last event ID persists, per spec


def test_event_and_retry_without_data_dispatch_nothing_and_reset() -> None:
    events = decode([b"event: usage\nretry: 5\n\ndata: x\n\n"])
    assert [(e.data, e.event, e.retry) for e in events] == [("x", "message", None)]


def test_multi_line_data_is_joined_with_newlines() -> None:
    assert [e.data for e in decode([b"data: {\ndata:   \"a\": 1\ndata\ndata: }\n\n"])] == ['{\n  "a": 1\n\n}']


def test_only_one_leading_space_is_removed_and_a_missing_space_is_fine() -> None:
    assert [e.data for e in decode([b"data:x\n\ndata:  y\n\n"])] == ["x", " y"]


def test_field_name_without_colon_is_a_field_with_empty_value() -> None:
    assert [e.data for e in decode([b"data\n\n"])] == [""]


def test_event_type_applies_to_its_own_event_only() -> None:
    events = decode([b"event: message_start\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n"])
    assert [(e.event, e.data) for e in events] == [("message_start", "1"), ("message", "2"), ("message", "3")]


def test_id_with_nul_is_ignored() -> None:
    events = decode([b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"])
    assert [e.id for e in events] == ["1", "1"]


def test_retry_is_taken_only_when_all_ascii_digits() -> None:
    events = decode([b"retry: 1500\ndata: a\n\nretry: 15s\ndata: b\n\nretry: \xd9\xa3\ndata: c\n\n"])
    assert [e.retry for e in events] == [1500, None, None]


def test_done_sentinel_is_an_ordinary_event() -> None:
    assert [e.data for e in decode([b"data: [DONE]\n\n"])] == ["[DONE]"]


def test_leading_bom_is_stripped_even_when_split_across_reads() -> None:
    body = BOM + b"data: a\n\n"
    for cut in range(1, 4):
        events = decode([body[:cut], body[cut:]])
        assert [(e.data, e.start, e.end) for e in events] == [("a", 3, 12)]


def test_bom_after_stream_start_is_part_of_the_line() -> None:
    # A second BOM makes the field name "\ufeffdata", an unknown field: no event.
    assert decode([BOM + b"data: a\n\n" + BOM + b"data: b\n\n"])[1:] == []


def test_unknown_field_belongs_to_the_event_block() -> None:
    (event,) = decode([b": hi\nfoo: bar\ndata: x\n\n"])
    assert (event.start, event.end) == (5, 23)


def test_flush_dispatches_an_event_whose_final_blank_line_never_came() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"usage":1}\n') == []
    (event,) = decoder.flush()
    assert (event.data, event.start, event.end) == ('{"usage":1}', 0, 18)
    assert decoder.flush() == []


def test_flush_takes_an_unterminated_last_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2") == [SSEEvent("1", start=0, end=9)]
    assert decoder.flush() == [SSEEvent("2", start=9, end=16)]


def test_flush_does_not_dispatch_a_block_without_data() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\nevent: x\n")
    assert decoder.flush() == []


def test_line_longer_than_the_limit_raises() -> None:
    decoder = SSEDecoder(max_line_bytes=16)
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"data: " + b"x" * 11 + b"\n\n")


def test_line_at_the_limit_is_accepted() -> None:
    assert [e.data for e in decode([b"data: " + b"x" * 10 + b"\r\n\r\n"], SSEDecoder(max_line_bytes=16))] == ["x" * 10]


def test_unterminated_line_over_the_limit_raises_without_waiting_for_its_end() -> None:
    decoder = SSEDecoder(max_line_bytes=64)
    decoder.feed(b"data: " + b"x" * 50)
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"x" * 50)
    with pytest.raises(SSELineTooLong):
        decoder.feed(b"\n\n")  # the decoder does not resume mid-line on garbage


def test_line_too_long_keeps_the_events_that_completed_before_it() -> None:
    decoder = SSEDecoder(max_line_bytes=32)
    with pytest.raises(SSELineTooLong) as caught:
        decoder.feed(b"data: ok\n\ndata: " + b"y" * 40 + b"\r\n")
    assert [e.data for e in caught.value.events] == ["ok"]


def test_long_line_with_crlf_endings_raises() -> None:
    with pytest.raises(SSELineTooLong):
        SSEDecoder(max_line_bytes=8).feed(b"data: 1\r\ndata: 123456789\r\n\r\n")


def test_empty_reads_are_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == [] and decoder.offset == 0
    assert [e.data for e in decode([b"", b"data: a\n", b"", b"\n"], decoder)] == ["a"]


def test_public_surface_is_the_decoder_its_event_and_its_error() -> None:
    import collector.sse as module

    assert sorted(module.__all__) == ["SSEDecoder", "SSEEvent", "SSELineTooLong"]
    assert all(hasattr(module, name) for name in module.__all__)
