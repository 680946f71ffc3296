#!/usr/bin/env python3
"""Benchmark: chunks per second through our SSE decoder + metering, against what else reads the same bytes.

For each workload (a 2,000-chunk stream built from a real DeepSeek capture in
shared/fixtures: its first chunk, its middle chunks repeated, its finishing and usage
chunks) it measures, in the same run, CPU time per chunk of:

- ``metering``: ``CallMeter.feed`` over the body, as the httpx transport and the proxy
  drive it (request as the openai SDK sends it, so ``include_usage`` is injected and the
  usage-only chunk filter is armed), then ``finish``; the record is checked against the
  capture's own usage so a fast path cannot cheat;
- ``parse-every-chunk``: our SSE decoder + ``json.loads`` + ``StreamAccumulator.add_chunk``
  on every event (what metering did before its fast path);
- ``openai SDK``: the SDK's own ``Stream[ChatCompletionChunk]`` over an in-memory
  response: its SSE decoder, ``json.loads`` and the ``ChatCompletionChunk`` it builds for
  every event (exactly what ``for chunk in client.chat.completions.create(stream=True)`` runs
  per chunk, minus the socket);
- ``json.loads floor``: a bare ``json.loads`` of every payload, already cut out of the
  stream (the floor for any parser that looks at every chunk).

Bodies are fed in two ways: one read per event (a live stream: each chunk arrives on its
own) and 64 KiB reads (a replayed or buffered body). Figures are medians of ``--repeat``
runs of CPU time (``time.process_time``), after a warm-up run.

    python tests/benchmarks/bench_decoder.py
    python tests/benchmarks/bench_decoder.py --chunks 2000 --repeat 9 --json decoder.json
    python tests/benchmarks/bench_decoder.py --instructions    # valgrind instruction counts (load-independent)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import FIXTURES, callgrind_instructions, conditions, cpu_times, median, print_conditions, table, write_json  # noqa: E402

from collector.accumulator import StreamAccumulator  # noqa: E402
from collector.metering import CallMeter, prepare_request  # noqa: E402
from collector.sse import SSEDecoder  # noqa: E402

READ_SIZE = 65536  # the large-read case: what a client reading 64 KiB at a time gets

WORKLOADS = {
    "text": "vercel-ai_v4flash_deepseek-text.chunks.jsonl",
    "reasoning": "pydantic-ai_reasoner_thinking_stream_2025-07-10.raw.sse",
    "tool-call": "vercel-ai_v4flash_deepseek-tool-call.chunks.jsonl",
}
REQUEST = json.dumps(
    {"model": "deepseek-v4-flash", "stream": True, "messages": [{"role": "user", "content": "Tell me about caching."}]}
).encode()


def _payloads(path: Path) -> list[str]:
    """The capture's chunk payloads, without the [DONE] sentinel."""
    text = path.read_text(encoding="utf-8")
    if path.name.endswith(".chunks.jsonl"):
        return [line for line in text.split("\n") if line.strip()]
    found = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    return [p for p in found if p != "[DONE]"]


@dataclass
class Workload:
    name: str
    source: str
    payloads: list[str]
    body: bytes
    usage: dict[str, Any]

    @property
    def chunks(self) -> int:
        return len(self.payloads)

    @property
    def mean_chunk_bytes(self) -> float:
        return sum(len(p.encode()) for p in self.payloads) / len(self.payloads)

    def reads(self, size: int | None) -> list[bytes]:
        """The body as a client would read it: one event per read (``None``), or fixed-size reads."""
        if size is None:
            events = [b"data: " + p.encode() + b"\n\n" for p in self.payloads]
            return events + [b"data: [DONE]\n\n"]
        return [self.body[i : i + size] for i in range(0, len(self.body), size)]


def build(name: str, source: str, chunks: int) -> Workload:
    captured = _payloads(FIXTURES / source)
    parsed = [json.loads(p) for p in captured]
    # The tail is every chunk from the first that finishes a choice or carries usage.
    tail_from = next(
        i for i, c in enumerate(parsed) if c.get("usage") or any(ch.get("finish_reason") for ch in c.get("choices") or [])
    )
    head, middle, tail = captured[:1], captured[1:tail_from], captured[tail_from:]
    fill = max(0, chunks - len(head) - len(tail))
    body_chunks = head + [middle[i % len(middle)] for i in range(fill)] + tail
    usage = [c["usage"] for c in parsed if c.get("usage")][-1]
    body = b"".join(b"data: " + p.encode() + b"\n\n" for p in body_chunks) + b"data: [DONE]\n\n"
    return Workload(name, source, body_chunks, body, usage)


# -- the contenders ------------------------------------------------------------------------------


def metering(workload: Workload, reads: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        meter = CallMeter(prepare_request("POST", "/chat/completions", REQUEST))
        meter.response_started(200, "text/event-stream; charset=utf-8")
        feed = meter.feed
        for read in reads:
            feed(read)
        meter.feed_eof()
        record = meter.finish("eof")
        if record.chunk_count != workload.chunks or record.completion_tokens != workload.usage["completion_tokens"]:
            raise SystemExit(f"metering miscounted {workload.name}: {record}")

    return run


def parse_every_chunk(workload: Workload, reads: list[bytes]) -> Callable[[], None]:
    loads = json.loads

    def run() -> None:
        decoder = SSEDecoder()
        acc = StreamAccumulator(0.0, learn=False)
        for read in reads:
            for event in decoder.feed(read):
                if event.data != "[DONE]":
                    acc.add_chunk(loads(event.data), 1.0)
        if acc.chunk_count != workload.chunks or acc.usage != workload.usage:
            raise SystemExit(f"parse-every-chunk miscounted {workload.name}")

    return run


def openai_sdk(workload: Workload, reads: list[bytes]) -> Callable[[], None]:
    import httpx2
    from openai import OpenAI
    from openai._streaming import Stream
    from openai.types.chat import ChatCompletionChunk

    client = OpenAI(api_key="sk-bench-not-a-real-key", base_url="http://127.0.0.1:9/v1")
    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")

    def run() -> None:
        response = httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(reads), request=request
        )
        count = 0
        last: ChatCompletionChunk | None = None
        for last in Stream(cast_to=ChatCompletionChunk, response=response, client=client):
            count += 1
        if count != workload.chunks or last is None or last.usage is None:
            raise SystemExit(f"the SDK read {count} chunks of {workload.name}")

    return run


def json_floor(workload: Workload) -> Callable[[], None]:
    loads = json.loads
    payloads = workload.payloads

    def run() -> None:
        for payload in payloads:
            loads(payload)

    return run


# -- main --------------------------------------------------------------------------------------


def measure(workloads: list[Workload], repeat: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for workload in workloads:
        for mode, size in (("event", None), ("64k", READ_SIZE)):
            reads = workload.reads(size)
            contenders: dict[str, Callable[[], None]] = {
                "metering": metering(workload, reads),
                "parse-every-chunk": parse_every_chunk(workload, reads),
                "openai SDK": openai_sdk(workload, reads),
                "json.loads floor": json_floor(workload),
            }
            # Interleave the contenders within each repeat so load changes hit them alike.
            samples: dict[str, list[float]] = {name: [] for name in contenders}
            for name, run in contenders.items():
                run()  # warm-up
            for _ in range(repeat):
                for name, run in contenders.items():
                    samples[name].extend(cpu_times(run, 1, warmup=0))
            us = {name: median(times) / workload.chunks * 1e6 for name, times in samples.items()}
            results.append(
                {
                    "workload": workload.name,
                    "source": workload.source,
                    "reads": mode,
                    "chunks": workload.chunks,
                    "mean_chunk_bytes": round(workload.mean_chunk_bytes, 1),
                    "us_per_chunk": {k: round(v, 3) for k, v in us.items()},
                    "chunks_per_s": {k: round(1e6 / v) for k, v in us.items()},
                    "sdk_over_metering": round(us["openai SDK"] / us["metering"], 1),
                    "metering_over_floor": round(us["metering"] / us["json.loads floor"], 3),
                }
            )
    return results


def report(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        us = r["us_per_chunk"]
        rows.append(
            [
                r["workload"],
                r["reads"],
                r["mean_chunk_bytes"],
                f"{us['metering']:.2f}",
                f"{us['parse-every-chunk']:.2f}",
                f"{us['openai SDK']:.2f}",
                f"{us['json.loads floor']:.2f}",
                f"{r['chunks_per_s']['metering']:,}",
                f"{r['sdk_over_metering']}x",
                f"{r['metering_over_floor']:.2f}",
            ]
        )
    return table(
        ["workload", "reads", "bytes/chunk", "metering us", "parse-all us", "SDK us", "json.loads us",
         "metering chunks/s", "SDK/metering", "metering/floor"],
        rows,
    )


# One contender in a fresh process: ``runs`` passes over one workload after a warm-up pass.
_COUNTED = """
import sys
sys.path.insert(0, {here!r})
import bench_decoder as bd
name, contender, size, chunks, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
workload = bd.build(name, bd.WORKLOADS[name], chunks)
reads = workload.reads(None if size == "event" else int(size))
run = bd.metering(workload, reads) if contender == "metering" else bd.json_floor(workload)
for _ in range(runs + 1):
    run()
"""


def instructions_per_chunk(workload: Workload, contender: str, size: int | None, runs: int = 3) -> float:
    """Instructions per chunk under valgrind: ``runs`` passes minus a process doing none (startup, warm-up)."""
    script = _COUNTED.format(here=str(Path(__file__).resolve().parent))
    reads = "event" if size is None else str(size)
    totals = [
        callgrind_instructions([sys.executable, "-c", script, workload.name, contender, reads, str(workload.chunks), str(n)])
        for n in (0, runs)
    ]
    return (totals[1] - totals[0]) / runs / workload.chunks


def report_instructions(workloads: list[Workload]) -> list[dict[str, Any]]:
    """Metering against the json.loads floor in instructions, which load on the machine does not move."""
    rows = []
    print("decoder + metering, instructions per chunk (valgrind)")
    print(f"{'workload':10s} {'reads':6s} {'metering':>9s} {'json.loads':>11s} {'metering/floor':>15s}")
    for workload in workloads:
        floor = instructions_per_chunk(workload, "floor", None)
        for size, label in ((None, "event"), (READ_SIZE, "64k")):
            ours = instructions_per_chunk(workload, "metering", size)
            rows.append({"workload": workload.name, "reads": label, "metering": round(ours),
                         "json_loads_floor": round(floor), "metering_over_floor": round(ours / floor, 3)})
            print(f"{workload.name:10s} {label:6s} {ours:9,.0f} {floor:11,.0f} {ours / floor:15.2f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=2000, help="chunks per stream (default 2000)")
    parser.add_argument("--repeat", type=int, default=9, help="timed runs per contender (default 9; median reported)")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="only these workloads")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions under valgrind instead of timing (load-independent; minutes)")
    args = parser.parse_args(argv)
    names = args.workload or list(WORKLOADS)
    workloads = [build(name, WORKLOADS[name], args.chunks) for name in names]
    if args.instructions:
        if shutil.which("valgrind") is None:
            parser.error("--instructions needs valgrind (apt-get install valgrind)")
        rows = report_instructions(workloads)
        print("target: metering/floor < 1.00")
        write_json(args.json, {"benchmark": "decoder-instructions", "conditions": conditions(), "results": rows})
        return 0
    results = measure(workloads, args.repeat)
    print(f"decoder + metering, CPU time per chunk (median of {args.repeat}), {args.chunks}-chunk streams")
    print(report(results))
    print("targets: SDK/metering >= 20x; metering/floor < 1.00 (cheaper than json.loads of every chunk)")
    env = print_conditions()
    write_json(args.json, {"benchmark": "decoder", "conditions": env, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
