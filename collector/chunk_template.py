"""Read an ordinary streamed chunk without parsing it, by recognising the shape of one already parsed.

A streamed chat completion is mostly chunks that differ from each other in one string:
the ``content`` (or ``reasoning_content``) of ``choices[0].delta``, or the ``arguments``
fragment of its one tool call. The id, model,
``created`` and every other field repeat byte for byte. So after a chunk has been parsed
in full, its text is split around that one string into a ``ChunkTemplate``: a prefix
ending just after the string's opening quote and a suffix starting at its closing quote.
A later chunk that starts with the prefix, ends with the suffix and has a valid JSON
string body in between (no unescaped quote, no control character, complete escapes) is
the same JSON with only that string changed; that is a grammar fact, not a guess, since
a string body that cannot close early ends exactly at the suffix's quote. Its meaning
for metering is then known without ``json.loads``: it carries no usage, no finish reason,
no error, and its token is that one string.

A template also matches its chunk framed as a whole SSE event on the wire,
``data: <chunk>\n\n`` (``event_body``), so the metering core can fold a read that is
exactly one such event from its bytes, without the SSE decoder or a UTF-8 decode of the
envelope. The envelope contains no line break, and a string body cannot contain one, so
such a read is one ``data`` line and its blank line, nothing else.

Learning is checked, not assumed: the candidate split is confirmed by parsing the
template with a probe string in the hole and comparing with the parsed chunk (so a
duplicate key, or a hole that is not the value the parse kept, never makes a template).
Bodies stay raw (JSON-escaped) until somebody needs the text: ``json_string`` decodes one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Literal, NamedTuple

__all__ = [
    "ChunkTemplate",
    "TokenField",
    "learn_template",
    "has_one_token",
    "json_string",
    "is_json_string_body",
    "QUOTE",
    "FLAG_SPECIAL",
]

TokenField = Literal["content", "reasoning_content", "arguments"]

# The body of a JSON string (RFC 8259, as Python's strict json reads it): no raw quote,
# backslash or control character, and every escape complete.
_BODY = re.compile(r'[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*')
_fullmatch = _BODY.fullmatch
_fullmatch_bytes = re.compile(_BODY.pattern.encode()).fullmatch  # the same over UTF-8 (any byte >= 0x20 passes)
is_json_string_body = _fullmatch_bytes  # for callers that inline ``event_body`` on their hot path
# Most token strings have no byte the pattern treats specially, and then they are a valid
# body as they stand. Mapping those bytes to a quote and looking for one quote is a third of
# the cost of running the pattern (one C call and a memchr instead of the regex engine's
# set-up and match object), so the pattern only runs when such a byte is there.
QUOTE = ord('"')
FLAG_SPECIAL = bytes(QUOTE if byte < 0x20 or byte in b'"\\' else byte for byte in range(256))
_WS = " \t\n\r"
_PROBES = ("dsmeter\\u0000probe", "dsmeter-probe")


@dataclass(frozen=True, slots=True)
class ChunkTemplate:
    """A parsed chunk's text with a hole where its one token string was."""

    prefix: str  # up to and including the hole's opening quote
    suffix: str  # from the hole's closing quote to the end
    kind: TokenField  # which field the hole is: delta content or reasoning, or a tool call's arguments
    first_choice: bool  # the hole is choice 0's (whose text the accumulator keeps)
    tool: tuple[int, int] | None = None  # (choice index, tool call index) of an ``arguments`` hole
    fixed: int = dataclass_field(init=False, repr=False)  # len(prefix) + len(suffix)
    event_prefix: bytes = dataclass_field(init=False, repr=False)  # b"data: " + prefix, b"" if not one line
    event_suffix: bytes = dataclass_field(init=False, repr=False)  # suffix + b"\n\n"
    # len(event_prefix) + len(event_suffix); -1 if not one line: no read is shorter than its body
    event_fixed: int = dataclass_field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fixed", len(self.prefix) + len(self.suffix))
        one_line = not any(c in self.prefix or c in self.suffix for c in "\r\n")
        object.__setattr__(self, "event_prefix", b"data: " + self.prefix.encode() if one_line else b"")
        object.__setattr__(self, "event_suffix", self.suffix.encode() + b"\n\n")
        object.__setattr__(self, "event_fixed", len(self.event_prefix) + len(self.event_suffix) if one_line else -1)

    def match(self, data: str) -> str | None:
        """The raw (still escaped) string body if ``data`` is this template with another string in the hole."""
        # As in event_body: one-argument string methods, and the suffix is taken from what follows
        # the prefix, so a text too short to hold both (they would overlap) never matches.
        body = data.removeprefix(self.prefix).removesuffix(self.suffix)
        if len(data) - len(body) != self.fixed:
            return None
        if body.isprintable() and '"' not in body and "\\" not in body:
            return body  # no control character (none is printable), quote or escape: valid as it stands
        return body if _fullmatch(body) is not None else None

    def event_body(self, event: bytes) -> bytes | None:
        """As ``match``, for the chunk framed as one LF-terminated SSE event (``data: <chunk>\n\n``):
        the body's raw bytes, neither UTF-8 decoded nor unescaped yet.

        ``removeprefix`` / ``removesuffix`` take one argument, so they cost about half of
        ``startswith`` / ``endswith`` (whose optional arguments are parsed on every call) and
        cut the body out as they go. Both matched exactly when the read is ``event_fixed``
        bytes longer than what is left; the suffix is taken from what follows the prefix,
        so the two can never overlap.
        """
        body = event.removeprefix(self.event_prefix).removesuffix(self.event_suffix)
        if len(event) - len(body) != self.event_fixed:
            return None
        if QUOTE in body.translate(FLAG_SPECIAL) and _fullmatch_bytes(body) is None:
            return None
        return body


def json_string(body: str) -> str:
    """Decode a raw JSON string body (as ``ChunkTemplate.match`` returns it)."""
    if "\\" not in body:
        return body
    value: str = json.loads('"' + body + '"')
    return value


class _Hole(NamedTuple):
    kind: TokenField
    value: str
    first_choice: bool
    tool: tuple[int, int] | None


def _is_token(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _hole_value(chunk: Mapping[str, Any]) -> _Hole | None:
    """The chunk's one token string if the chunk means nothing else to metering, else None.

    Everything else in the chunk must be idempotent for an accumulator that has already
    seen it once: no error, no usage, no finish reason, no second token; id, model, role,
    a tool call's id and type only ever fill a field that is still empty. A tool call
    fragment must carry its ``index`` (without one, which call it continues depends on
    what came before) and no name (names are concatenated, so a repeated one would grow).
    """
    if chunk.get("error") is not None or isinstance(chunk.get("usage"), Mapping):
        return None
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], Mapping):
        return None
    choice = choices[0]
    if _is_token(choice.get("finish_reason")):
        return None
    delta = choice.get("delta")
    if not isinstance(delta, Mapping):
        return None
    index = choice.get("index", 0)
    if not isinstance(index, int) or isinstance(index, bool):
        index = 0  # as the accumulator reads it
    content, reasoning, tool_calls = delta.get("content"), delta.get("reasoning_content"), delta.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        if len(tool_calls) != 1 or _is_token(content) or _is_token(reasoning):
            return None
        fragment = tool_calls[0]
        if not isinstance(fragment, Mapping):
            return None
        call_index, function = fragment.get("index"), fragment.get("function")
        if not isinstance(call_index, int) or isinstance(call_index, bool) or not isinstance(function, Mapping):
            return None
        arguments, name = function.get("arguments"), function.get("name")
        if not isinstance(arguments, str) or _is_token(name):
            return None
        return _Hole("arguments", arguments, index == 0, (index, call_index))
    if isinstance(content, str) and not _is_token(reasoning):
        return _Hole("content", content, index == 0, None)
    if isinstance(reasoning, str) and not _is_token(content):
        return _Hole("reasoning_content", reasoning, index == 0, None)
    return None


def _with_hole(chunk: Mapping[str, Any], kind: TokenField, value: str) -> dict[str, Any]:
    """A copy of the chunk with ``value`` in the hole."""
    choice = dict(chunk["choices"][0])
    delta = dict(choice["delta"])
    if kind == "arguments":
        fragment = dict(delta["tool_calls"][0])
        fragment["function"] = {**fragment["function"], "arguments": value}
        delta["tool_calls"] = [fragment]
    else:
        delta[kind] = value
    choice["delta"] = delta
    return {**chunk, "choices": [choice]}


def has_one_token(chunk: Mapping[str, Any]) -> bool:
    """Whether ``chunk`` is an ordinary chunk whose one token string could make a template (cheap)."""
    return _hole_value(chunk) is not None


def learn_template(data: str, chunk: Mapping[str, Any]) -> ChunkTemplate | None:
    """The template of ``data`` (whose parse is ``chunk``), or None if it is not an ordinary chunk."""
    hole = _hole_value(chunk)
    if hole is None:
        return None
    key = '"' + hole.kind + '"'
    at = data.find(key)
    while at != -1:
        i = at + len(key)
        while i < len(data) and data[i] in _WS:
            i += 1
        if data.startswith(":", i):
            i += 1
            while i < len(data) and data[i] in _WS:
                i += 1
            if data.startswith('"', i):
                body = _BODY.match(data, i + 1)
                assert body is not None  # the pattern also matches an empty body
                close = body.end()
                if data.startswith('"', close) and json_string(body.group()) == hole.value:
                    template = ChunkTemplate(data[: i + 1], data[close:], hole.kind, hole.first_choice, hole.tool)
                    if _confirmed(template, chunk, hole.value):
                        return template
        at = data.find(key, at + 1)
    return None


def _confirmed(template: ChunkTemplate, chunk: Mapping[str, Any], value: str) -> bool:
    """Parse the template with a probe in the hole: it must be the chunk with the probe as its token."""
    probe = next(p for p in _PROBES if json_string(p) != value)
    try:
        parsed = json.loads(template.prefix + probe + template.suffix)
    except (ValueError, RecursionError):
        return False
    return bool(parsed == _with_hole(chunk, template.kind, json_string(probe)))
