"""Every captured DeepSeek stream in the shared fixtures, as the raw SSE bytes a client would read.

``.sse`` files are raw response bodies and are used as they are. ``.chunks.jsonl`` files
hold one chunk payload per line with the framing stripped (see fixtures/SOURCES.md); they
are reframed the way the API sends them: ``data: <line>\\n\\n`` per line, then
``data: [DONE]\\n\\n``. Every capture is LF-only, so each stream also comes in a CRLF
variant, which a robust parser must read the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "FIXTURES",
    "FixtureStream",
    "Framing",
    "load_streams",
    "stream_names",
    "to_crlf",
    "chunk_payloads",
    "nonstream_twin",
]

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "deepseek"

Framing = Literal["lf", "crlf"]


@dataclass(frozen=True, slots=True)
class FixtureStream:
    name: str  # the fixture's file name
    framing: Framing
    body: bytes
    path: Path

    @property
    def is_chat(self) -> bool:
        """A chat-completions stream (as opposed to the Responses API's typed events)."""
        return "responses-api" not in self.name

    def __str__(self) -> str:  # readable pytest ids
        return f"{self.name}[{self.framing}]"


def _stream_paths() -> list[Path]:
    paths = sorted(FIXTURES.glob("*.sse")) + sorted(FIXTURES.glob("*.chunks.jsonl"))
    if not paths:
        raise FileNotFoundError(f"no stream fixtures under {FIXTURES}")
    return paths


def stream_names() -> list[str]:
    return [path.name for path in _stream_paths()]


def to_crlf(body: bytes) -> bytes:
    """The same stream with every LF line ending written as CRLF (the fixtures have no CR)."""
    assert b"\r" not in body
    return body.replace(b"\n", b"\r\n")


def chunk_payloads(path: Path) -> list[str]:
    """The ``data:`` payloads of a ``.chunks.jsonl`` fixture, without the [DONE] sentinel."""
    return [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _raw_lf(path: Path) -> bytes:
    if path.name.endswith(".chunks.jsonl"):
        framed = b"".join(b"data: " + line.encode("utf-8") + b"\n\n" for line in chunk_payloads(path))
        return framed + b"data: [DONE]\n\n"
    return path.read_bytes()


def load_streams(framings: tuple[Framing, ...] = ("lf", "crlf")) -> list[FixtureStream]:
    streams: list[FixtureStream] = []
    for path in _stream_paths():
        lf = _raw_lf(path)
        for framing in framings:
            body = lf if framing == "lf" else to_crlf(lf)
            streams.append(FixtureStream(name=path.name, framing=framing, body=body, path=path))
    return streams


_NEUROUTER_TWINS = {
    "neurouter_chat_stream_tool_calls.sse": "neurouter_chat_nonstream_tool_calls.json",
    "neurouter_reasoner_stream_reasoning_content.sse": "neurouter_reasoner_nonstream.json",
}


def nonstream_twin(stream_name: str) -> dict[str, Any] | None:
    """The non-streamed response recorded for the same request, where the fixtures have one.

    Twins are separate recordings: model, finish_reason and tool names agree, the
    generated text and token counts usually do not.
    """
    twin = _NEUROUTER_TWINS.get(stream_name)
    if twin is None and stream_name.endswith(".chunks.jsonl"):
        twin = stream_name.removesuffix(".chunks.jsonl") + ".nonstream.json"
    if twin is None or not (FIXTURES / twin).exists():
        return None
    loaded: dict[str, Any] = json.loads((FIXTURES / twin).read_text(encoding="utf-8"))
    return loaded
