"""Coverage-guided fuzzing of the metering core with atheris (not part of the test run).

    pip install atheris
    python tests/fuzz/fuzz_wire.py -max_total_time=60            # a one-minute run
    python tests/fuzz/fuzz_wire.py -atheris_runs=200000 corpus/  # keep what it finds in corpus/

Without a corpus directory it seeds a temporary one.

Each input is split into a response shape (path, usage injected or asked for, status,
content type, encoding), read boundaries and a body; the body goes through
``CallMeter.feed`` / ``feed_eof`` / ``finish`` exactly as the transport and the proxy drive
it. Anything that escapes is a crash, and so is a record that differs when the same
bytes arrive in one read, or a forwarded stream that differs between the two. The seed
corpus is every real capture in shared/fixtures (framed as the API sends them).
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from collector.metering import CallMeter, prepare_request
    from collector.record import Status

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fixture_streams import load_streams  # noqa: E402

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
STATUSES = {s.value for s in Status}
PATHS = ("/chat/completions", "/anthropic/v1/messages")
CONTENT_TYPES = ("text/event-stream", None, "application/json")
ENCODINGS = (None, None, None, "gzip", "deflate")
STATUS_CODES = (200, 200, 200, 400, 429, 500)


def _run(path: str, asked: bool, status: int, ctype: str | None, encoding: str | None,
         pieces: list[bytes]) -> tuple[bytes, dict[str, object]]:
    body = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}], "stream": ctype != "application/json"}
    if asked:
        body["stream_options"] = {"include_usage": True}
    meter = CallMeter(prepare_request("POST", path, json.dumps(body).encode()), clock=lambda: T0, monotonic=lambda: 0.0)
    meter.response_started(status, ctype, encoding)
    out = bytearray()
    for piece in pieces:
        out += meter.feed(piece)
    out += meter.feed_eof()
    record = meter.finish("eof").to_dict()
    record.pop("request_id")
    return bytes(out), record


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = PATHS[fdp.ConsumeIntInRange(0, len(PATHS) - 1)]
    asked = fdp.ConsumeBool()
    status = STATUS_CODES[fdp.ConsumeIntInRange(0, len(STATUS_CODES) - 1)]
    ctype = CONTENT_TYPES[fdp.ConsumeIntInRange(0, len(CONTENT_TYPES) - 1)]
    encoding = ENCODINGS[fdp.ConsumeIntInRange(0, len(ENCODINGS) - 1)]
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 16)))
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    pieces = [body[a:b] for a, b in zip(points, points[1:]) if b > a]
    out, record = _run(path, asked, status, ctype, encoding, pieces)
    if record["status"] not in STATUSES:
        raise AssertionError(f"unknown status {record['status']!r}")
    if encoding is None:
        whole_out, whole = _run(path, asked, status, ctype, encoding, [body])
        if (out, record) != (whole_out, whole):
            raise AssertionError(f"read boundaries changed the result:\n{record}\n{whole}")


def _seed_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stream in load_streams(("lf",)):
        # Shape bytes: chat path, usage injected, 200, event-stream, identity, no cuts.
        (directory / stream.name).write_bytes(b"\x00\x00\x00\x00\x00\x00" + stream.body)


def main() -> None:
    args = sys.argv
    corpus = [a for a in args[1:] if not a.startswith("-")]
    if not corpus:
        seed = Path(tempfile.mkdtemp(prefix="dsmeter-fuzz-"))  # libFuzzer adds what it finds here
        _seed_corpus(seed)
        args = [*args, str(seed)]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
