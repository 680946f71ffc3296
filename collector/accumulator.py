"""Fold a streamed response's chunks into what the call produced (pure: no HTTP, no SQL).

``StreamAccumulator`` reads OpenAI-format ``/chat/completions`` chunks, the format of
DeepSeek's main surface; ``AnthropicStreamAccumulator`` reads the typed events of its
Anthropic-format surface (``/anthropic/v1/messages``). Both expose the same results
(id, model, text, reasoning, tool calls, finish reason, raw usage, timings) so the
metering core treats them alike.

They never raise on what the upstream sends: a payload that is not JSON is counted in
``malformed_chunks`` (the last one kept, truncated, for the error message), and an
in-stream ``{"error": {...}}`` object is kept in ``error``.

``StreamAccumulator`` reads most chunks without parsing them: a chunk shaped exactly like
one it already parsed, but for its token string, is folded from that string alone
(``add_templated``; see ``collector.chunk_template``). Such strings are kept as raw JSON
(a read folded from its bytes by ``fold_event``: raw UTF-8 too) and decoded only if
``content``, ``reasoning_content`` or ``tool_calls`` is read.

Times are ``time.monotonic()`` seconds supplied by the caller, so the accumulator can be
replayed deterministically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from collector.chunk_template import (
    FLAG_SPECIAL,
    QUOTE,
    ChunkTemplate,
    has_one_token,
    is_json_string_body,
    json_string,
    learn_template,
)

__all__ = ["StreamAccumulator", "AnthropicStreamAccumulator", "MALFORMED_KEEP"]

MALFORMED_KEEP = 200  # characters of the last malformed payload kept for the error message
MAX_TEMPLATES = 4  # chunk shapes remembered per stream (reasoning, content, and a spare or two)
LEARN_BUDGET = 16  # full learning attempts per stream: a stream whose chunks never repeat stops trying

# A text part: decoded text; a 1-tuple holding a raw JSON string body not unescaped yet; or
# bytes: a raw body as it came off the wire, neither UTF-8 decoded nor unescaped yet.
_Part = str | tuple[str] | bytes


def _raw_text(part: tuple[str] | bytes) -> str:
    if isinstance(part, tuple):
        return json_string(part[0])
    # Each part decoded on its own, bad bytes replaced, as the SSE decoder decodes its line.
    return json_string(part.decode("utf-8", "replace"))


def _join(parts: list[_Part]) -> str:
    return "".join([part if isinstance(part, str) else _raw_text(part) for part in parts])


class _Timings:
    """Arrival times shared by both accumulators."""

    started: float
    first_token_at: float | None
    first_content_at: float | None
    last_at: float | None

    def ttft_ms(self) -> float | None:
        """Time to the first generated token of any kind (reasoning and tool calls included)."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started) * 1000.0

    def first_content_ms(self) -> float | None:
        """Time to the first answer token (``content``), after any reasoning."""
        if self.first_content_at is None:
            return None
        return (self.first_content_at - self.started) * 1000.0


def _as_error(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    return {"message": str(value)}


class StreamAccumulator(_Timings):
    """Chat-completions chunks in, the call's outcome out.

    With ``n > 1`` choices, ``content``, ``reasoning_content``, ``role`` and
    ``finish_reason`` are choice 0's (what a caller reading ``choices[0]`` saw); tool
    calls of every choice are kept, since each is generated output.
    """

    def __init__(self, started: float, *, learn: bool = True) -> None:
        """``learn=False`` parses every chunk: the reference the template fast path is tested against."""
        self.started = started
        self.id: str | None = None
        self.model: str | None = None
        self.role: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunk_count = 0
        self.malformed_chunks = 0
        self.last_malformed: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False  # add_data saw the "[DONE]" sentinel
        self.first_token_at: float | None = None
        self.first_content_at: float | None = None
        self.last_at: float | None = None
        self._content: list[_Part] = []
        self._reasoning: list[_Part] = []
        self._templates: list[ChunkTemplate] = []  # most recently matched first
        self._learn_budget = LEARN_BUDGET if learn else 0
        self._other_finish: str | None = None  # a finish_reason from a choice other than 0
        # (choice index, tool call index) -> the merged call
        self._tools: dict[tuple[int, int], dict[str, Any]] = {}
        # Each call's arguments as parts, joined only when read: appending to one growing string
        # copied it whole on every fragment, and escaped fragments stay undecoded until then.
        self._tool_arguments: dict[tuple[int, int], list[_Part]] = {}
        self._last_tool: dict[int, tuple[int, int]] = {}

    # -- results -------------------------------------------------------------------------------

    @property
    def content(self) -> str:
        return _join(self._content)

    @property
    def reasoning_content(self) -> str:
        return _join(self._reasoning)

    @property
    def tool_call_count(self) -> int:
        """``len(tool_calls)``, without joining and decoding every call's arguments."""
        return len(self._tools)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Merged calls, ordered by choice then index: ``{"index", "id", "type", "function": {"name", "arguments"}}``."""
        return [
            {**call, "function": {**call["function"], "arguments": _join(self._tool_arguments.get(key, []))}}
            for key, call in sorted(self._tools.items(), key=lambda item: item[0])
        ]

    # -- input ---------------------------------------------------------------------------------

    def add_data(self, data: str, at: float) -> None:
        """One SSE ``data`` payload. ``[DONE]`` marks the end; anything not a JSON object is malformed."""
        self.last_at = at
        if data == "[DONE]":
            self.done = True
            return
        if self.add_templated(data, at):
            return
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
            chunk = None
        if not isinstance(chunk, dict):
            self.malformed_chunks += 1
            self.last_malformed = data[:MALFORMED_KEEP]
            return
        self.add_chunk(chunk, at, data)

    def add_templated(self, data: str, at: float) -> bool:
        """Fold one ``data`` payload without parsing it, if it has the shape of a chunk already parsed.

        Returns False (and changes nothing) when it does not: the caller parses it and calls
        ``add_chunk``. Folding it here has exactly the effect ``add_chunk`` would have.
        """
        templates = self._templates
        if not templates:
            return False
        body = templates[0].match(data)
        if body is not None:
            template = templates[0]
        else:
            for position in range(1, len(templates)):
                template = templates[position]
                body = template.match(data)
                if body is not None:
                    del templates[position]
                    templates.insert(0, template)  # the next chunk is most likely this shape again
                    break
            else:
                return False
        self.add_matched(template, body, at)
        return True

    def fold_event(self, event: bytes, clock: Callable[[], float]) -> bool:
        """``add_templated`` for the chunk as one whole SSE event on the wire (``data: <chunk>\n\n``),
        at the time ``clock()`` tells (read only if the event is folded).

        False when ``event`` is anything else (several events, a partial one, CRLF framing,
        another shape): the caller decodes it the ordinary way.

        The metering core's path for most reads of a live stream, so it is one call: the
        usual case (the same shape as the last chunk) is ``ChunkTemplate.event_body`` and
        ``add_matched`` inlined, and the body is kept as the raw bytes it arrived as (no
        UTF-8 decode, no escape check) until the text is read, which most calls never do.
        """
        templates = self._templates
        if not templates:
            return False
        template = templates[0]
        body = event.removeprefix(template.event_prefix).removesuffix(template.event_suffix)
        if len(event) - len(body) != template.event_fixed or (
            QUOTE in body.translate(FLAG_SPECIAL) and is_json_string_body(body) is None
        ):
            for position in range(1, len(templates)):
                template = templates[position]
                found = template.event_body(event)
                if found is not None:
                    del templates[position]
                    templates.insert(0, template)  # the next chunk is most likely this shape again
                    body = found
                    break
            else:
                return False
        at = clock()
        self.chunk_count += 1
        self.last_at = at
        if template.tool is not None:
            self._add_tool_arguments(template.tool, body)  # even when empty, as in add_matched
            if self.first_token_at is None:
                self.first_token_at = at
        elif body:
            if template.kind == "content":
                if self.first_content_at is None:
                    self.first_content_at = at
                if template.first_choice:
                    self._content.append(body)
            elif template.first_choice:
                self._reasoning.append(body)
            if self.first_token_at is None:
                self.first_token_at = at
        return True

    def add_matched(self, template: ChunkTemplate, body: str, at: float) -> None:
        """Fold a chunk a template recognised, from its token's raw body: what ``add_chunk`` would do with it."""
        self.chunk_count += 1
        self.last_at = at
        if template.tool is not None:
            # A tool call's arguments fragment is a token even when empty, as in _add_choice.
            self._add_tool_arguments(template.tool, body if "\\" not in body else (body,))
            if self.first_token_at is None:
                self.first_token_at = at
            return
        if not body:
            return
        part: _Part = body if "\\" not in body else (body,)  # decoded only if the text is ever read
        if template.kind == "content":
            if self.first_content_at is None:
                self.first_content_at = at
            if template.first_choice:
                self._content.append(part)
        elif template.first_choice:
            self._reasoning.append(part)
        if self.first_token_at is None:
            self.first_token_at = at  # a non-empty JSON string body is a non-empty string: a token

    def add_chunk(self, chunk: Mapping[str, Any], at: float, data: str | None = None) -> None:
        """One parsed chunk; ``data``, its text, lets later chunks of the same shape skip parsing."""
        if data is not None and self._learn_budget > 0:
            self._learn(data, chunk)
        self.chunk_count += 1
        self.last_at = at
        if "error" in chunk and chunk["error"] is not None:
            self.error = _as_error(chunk["error"])
        chunk_id = chunk.get("id")
        if self.id is None and isinstance(chunk_id, str) and chunk_id:
            self.id = chunk_id
        model = chunk.get("model")
        if self.model is None and isinstance(model, str) and model:
            self.model = model
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            # DeepSeek puts usage on the last content chunk (which may carry content too);
            # OpenAI on a separate chunk with empty choices. Either way: any non-null usage.
            self.usage = dict(usage)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, Mapping):
                    self._add_choice(choice, at)

    def _learn(self, data: str, chunk: Mapping[str, Any]) -> None:
        if not has_one_token(chunk):
            return  # usage, finish, error, a tool call's start...: a shape that does not repeat
        # Only attempts at a shape that could repeat spend the budget: learning parses a probe.
        self._learn_budget -= 1
        template = learn_template(data, chunk)
        if template is not None:
            self._templates.insert(0, template)
            del self._templates[MAX_TEMPLATES:]

    def _add_choice(self, choice: Mapping[str, Any], at: float) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            index = 0
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            if index == 0:
                self.finish_reason = finish
            elif self._other_finish is None:
                self._other_finish = finish
                if self.finish_reason is None:
                    self.finish_reason = finish  # replaced as soon as choice 0 finishes
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        token = False
        content = delta.get("content")
        if isinstance(content, str) and content:
            token = True
            if self.first_content_at is None:
                self.first_content_at = at
            if index == 0:
                self._content.append(content)
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            token = True
            if index == 0:
                self._reasoning.append(reasoning)
        role = delta.get("role")
        if index == 0 and self.role is None and isinstance(role, str) and role:
            self.role = role
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list) and tool_calls:
            token = True
            for position, fragment in enumerate(tool_calls):
                if isinstance(fragment, Mapping):
                    self._add_tool_fragment(index, position, fragment)
        if token and self.first_token_at is None:
            self.first_token_at = at

    def _tool_call(self, key: tuple[int, int]) -> dict[str, Any]:
        """The merged call at ``key`` (created empty on its first fragment), now the choice's latest."""
        call = self._tools.get(key)
        if call is None:
            # Its arguments are kept apart, in _tool_arguments, and joined by tool_calls.
            call = self._tools[key] = {"index": key[1], "id": None, "type": None, "function": {"name": ""}}
        self._last_tool[key[0]] = key
        return call

    def _add_tool_arguments(self, key: tuple[int, int], arguments: _Part) -> None:
        """What ``_add_tool_fragment`` does with a fragment that has an index, arguments and nothing new."""
        self._tool_call(key)
        parts = self._tool_arguments.get(key)
        if parts is None:
            self._tool_arguments[key] = [arguments]
        else:
            parts.append(arguments)

    def _add_tool_fragment(self, choice: int, position: int, fragment: Mapping[str, Any]) -> None:
        call_id = fragment.get("id")
        call_index = fragment.get("index")
        if isinstance(call_index, int) and not isinstance(call_index, bool):
            key = (choice, call_index)
        elif isinstance(call_id, str) and call_id and not any(
            c["id"] == call_id for k, c in self._tools.items() if k[0] == choice
        ):
            # No index (not OpenAI-conformant): a new id starts a new call after the others.
            key = (choice, 1 + max((k[1] for k in self._tools if k[0] == choice), default=-1))
        else:
            # No index and no new id: a continuation of the choice's latest call.
            key = self._last_tool.get(choice, (choice, position))
        call = self._tool_call(key)
        if isinstance(call_id, str) and call_id and not call["id"]:
            call["id"] = call_id
        kind = fragment.get("type")
        if isinstance(kind, str) and kind and not call["type"]:
            call["type"] = kind
        function = fragment.get("function")
        if isinstance(function, Mapping):
            name = function.get("name")
            if isinstance(name, str):
                call["function"]["name"] += name
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                self._add_tool_arguments(key, arguments)


class AnthropicStreamAccumulator(_Timings):
    """Anthropic Messages stream events in, the same results as ``StreamAccumulator`` out.

    Events: ``message_start`` (id, model, role, initial usage), ``content_block_start``
    (a ``tool_use`` block opens a tool call), ``content_block_delta`` (``text_delta``,
    ``thinking_delta``, ``input_json_delta``), ``message_delta`` (stop reason, usage),
    ``message_stop``, ``ping`` and ``error``. Usage from ``message_start.message.usage``
    is merged with each ``message_delta.usage`` field by field, a later value overwriting
    an earlier one when present: ``output_tokens`` there is cumulative, and input and cache
    fields may be repeated. A ``tool_use`` block's start counts as a generated token for
    ``ttft_ms`` (its name has been generated), as a first ``tool_calls`` delta does in chat.
    """

    def __init__(self, started: float) -> None:
        self.started = started
        self.id: str | None = None
        self.model: str | None = None
        self.role: str | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunk_count = 0
        self.malformed_chunks = 0
        self.last_malformed: str | None = None
        self.error: dict[str, Any] | None = None
        self.done = False  # message_stop seen
        self.first_token_at: float | None = None
        self.first_content_at: float | None = None
        self.last_at: float | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tools: dict[int, dict[str, Any]] = {}  # content block index -> tool call

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning_content(self) -> str:
        return "".join(self._reasoning)

    @property
    def tool_call_count(self) -> int:
        return len(self._tools)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """``tool_use`` blocks in chat-completions shape; ``arguments`` is the concatenated input JSON."""
        return [{**call, "function": dict(call["function"])} for _, call in sorted(self._tools.items())]

    def add_event(self, event: str, data: str, at: float) -> None:
        """One SSE event. Without an ``event:`` line the payload's ``type`` names it."""
        self.last_at = at
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
            payload = None
        if not isinstance(payload, dict):
            self.malformed_chunks += 1
            self.last_malformed = data[:MALFORMED_KEEP]
            return
        kind = event if event and event != "message" else payload.get("type")
        if kind != "ping":
            self.chunk_count += 1
        if kind == "message_start":
            self._message_start(payload)
        elif kind == "content_block_start":
            self._block_start(payload, at)
        elif kind == "content_block_delta":
            self._block_delta(payload, at)
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.finish_reason = delta["stop_reason"]
            self._merge_usage(payload.get("usage"))
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.error = _as_error(payload.get("error", payload))

    def _message_start(self, payload: Mapping[str, Any]) -> None:
        message = payload.get("message")
        if not isinstance(message, Mapping):
            return
        for attr in ("id", "model", "role"):
            value = message.get(attr)
            if isinstance(value, str) and value and getattr(self, attr) is None:
                setattr(self, attr, value)
        self._merge_usage(message.get("usage"))

    def _merge_usage(self, usage: Any) -> None:
        if not isinstance(usage, Mapping):
            return
        merged = dict(self.usage) if self.usage is not None else {}
        for key, value in usage.items():
            if value is not None:
                merged[key] = value
        self.usage = merged

    def _block_start(self, payload: Mapping[str, Any], at: float) -> None:
        block = payload.get("content_block")
        index = payload.get("index")
        if not isinstance(block, Mapping) or not isinstance(index, int):
            return
        kind = block.get("type")
        if kind == "tool_use":
            name = block.get("name")
            self._tools[index] = {
                "index": len(self._tools),
                "id": block.get("id") if isinstance(block.get("id"), str) else None,
                "type": "function",
                "function": {"name": name if isinstance(name, str) else "", "arguments": ""},
            }
            self._token(at)
        elif kind == "text" and isinstance(block.get("text"), str) and block["text"]:
            self._text(block["text"], at)
        elif kind == "thinking" and isinstance(block.get("thinking"), str) and block["thinking"]:
            self._reasoning.append(block["thinking"])
            self._token(at)

    def _block_delta(self, payload: Mapping[str, Any], at: float) -> None:
        delta = payload.get("delta")
        if not isinstance(delta, Mapping):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                self._text(text, at)
        elif kind == "thinking_delta":
            thinking = delta.get("thinking")
            if isinstance(thinking, str) and thinking:
                self._reasoning.append(thinking)
                self._token(at)
        elif kind == "input_json_delta":
            partial = delta.get("partial_json")
            index = payload.get("index")
            call = self._tools.get(index) if isinstance(index, int) else None
            if isinstance(partial, str) and partial and call is not None:
                call["function"]["arguments"] += partial
                self._token(at)

    def _text(self, text: str, at: float) -> None:
        self._content.append(text)
        if self.first_content_at is None:
            self.first_content_at = at
        self._token(at)

    def _token(self, at: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = at
