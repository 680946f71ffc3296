"""The Anthropic-format surface (``POST /anthropic/v1/messages``) of the simulator: pure parsing
and rendering of the standard Messages API events.

Model names map as DeepSeek documents (api-facts §5): ``claude-opus*`` → deepseek-v4-pro,
any other ``claude*`` → deepseek-v4-flash; DeepSeek's own names are accepted as they are;
anything else is a 400. No raw capture of DeepSeek's Anthropic stream exists, so usage
follows Anthropic's own convention: ``input_tokens`` counts the cache misses only and
``cache_read_input_tokens`` the hits; ``message_delta`` carries the cumulative
``output_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from collector.simulator_chat import CHAT_MODELS, MAX_OUTPUT_TOKENS
from collector.simulator_events import Event, Rejection
from collector.simulator_plan import Answer, PlanRequest, ToolSpec
from collector.simulator_tokens import canonical_json

__all__ = [
    "IN_STREAM_ERROR",
    "AnthropicRenderer",
    "AnthropicRequest",
    "anthropic_auth_error",
    "anthropic_error",
    "anthropic_fault_error",
    "anthropic_usage",
    "map_anthropic_model",
    "parse_anthropic_request",
]

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_FAULT_TYPES = {
    402: ("billing_error", "Insufficient Balance"),
    422: ("invalid_request_error", "Invalid Parameters"),
    429: ("rate_limit_error", "Rate Limit Reached"),
    500: ("api_error", "Server Error"),
    503: ("overloaded_error", "Server Overloaded"),
}
IN_STREAM_ERROR = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def anthropic_error(status: int, type_: str, message: str) -> Rejection:
    return Rejection(status, {"type": "error", "error": {"type": type_, "message": message}})


def anthropic_fault_error(status: int) -> Rejection:
    type_, message = _FAULT_TYPES[status]
    return anthropic_error(status, type_, message)


def anthropic_auth_error() -> Rejection:
    return anthropic_error(401, "authentication_error", "Authentication Fails, Your api key: ****xxxx is invalid")


def anthropic_usage(prompt: int, cache_hit: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt - cache_hit,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cache_hit,
        "output_tokens": output,
    }


def map_anthropic_model(name: str) -> str | None:
    """The DeepSeek model serving an Anthropic-format request for ``name``, or None if unsupported."""
    if name.startswith("claude-opus"):
        return "deepseek-v4-pro"
    if name.startswith("claude"):
        return "deepseek-v4-flash"
    if name in CHAT_MODELS:
        return CHAT_MODELS[name][0]
    return None


@dataclass(frozen=True, slots=True)
class AnthropicRequest:
    requested_model: str
    response_model: str
    thinking: bool
    stream: bool
    max_tokens: int | None
    tools: tuple[ToolSpec, ...]
    tools_raw: list[Any] | None
    forced_tool: str | None
    call_tool: bool
    segments: tuple[tuple[str, str], ...]
    conversation: str

    def plan_request(self, output_tokens: int | None, reasoning_tokens: int | None) -> PlanRequest:
        return PlanRequest(
            thinking=self.thinking,
            tools=self.tools,
            call_tool=self.call_tool,
            forced_tool=self.forced_tool,
            max_tokens=self.max_tokens,
            output_tokens=output_tokens,
            reasoning_tokens=reasoning_tokens if self.thinking else None,
        )


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if isinstance(block, Mapping):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            return str(block["text"])
        if kind == "thinking" and isinstance(block.get("thinking"), str):
            return str(block["thinking"])
        if kind == "tool_result":
            return _content_text(block.get("content"))
    return canonical_json(block)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(_block_text(block) for block in content)
    return _block_text(content)


def _invalid(message: str) -> Rejection:
    return anthropic_error(400, "invalid_request_error", message)


def parse_anthropic_request(body: Any) -> AnthropicRequest:
    if not isinstance(body, Mapping):
        raise _invalid("Invalid Format: the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _invalid("model: Field required")
    response_model = map_anthropic_model(model)
    if response_model is None:
        raise _invalid("Model Not Exist")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: at least one message is required")
    segments: list[tuple[str, str]] = []
    system = body.get("system")
    if system:
        segments.append(("system", _content_text(system)))
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        assert isinstance(message, Mapping)
        segments.append((str(role), _content_text(message.get("content"))))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("stream: Input should be a valid boolean")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_OUTPUT_TOKENS
    ):
        raise _invalid(f"max_tokens: must be between 1 and {MAX_OUTPUT_TOKENS}")
    thinking_param = body.get("thinking")
    thinking = isinstance(thinking_param, Mapping) and thinking_param.get("type") == "enabled"

    raw_tools = body.get("tools")
    tools: list[ToolSpec] = []
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise _invalid("tools: Input should be a valid list")
        for index, tool in enumerate(raw_tools):
            name = tool.get("name") if isinstance(tool, Mapping) else None
            if not isinstance(name, str) or not name:
                raise _invalid(f"tools.{index}.name: Field required")
            assert isinstance(tool, Mapping)
            schema = tool.get("input_schema")
            tools.append(ToolSpec(name, schema if isinstance(schema, Mapping) else {}))
    tool_choice = body.get("tool_choice")
    choice_type = tool_choice.get("type") if isinstance(tool_choice, Mapping) else None
    forced_tool = None
    if choice_type == "tool" and isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("name"), str):
        forced_tool = str(tool_choice["name"])
    last = messages[-1]
    last_content = last.get("content") if isinstance(last, Mapping) else None
    answers_tool = isinstance(last_content, list) and any(
        isinstance(block, Mapping) and block.get("type") == "tool_result" for block in last_content
    )
    call_tool = bool(tools) and choice_type != "none" and segments[-1][0] == "user" and not answers_tool
    return AnthropicRequest(
        requested_model=model,
        response_model=response_model,
        thinking=thinking,
        stream=stream,
        max_tokens=max_tokens,
        tools=tuple(tools),
        tools_raw=raw_tools if tools else None,
        forced_tool=forced_tool,
        call_tool=call_tool,
        segments=tuple(segments),
        conversation=canonical_json([system, messages]),
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class AnthropicRenderer:
    def __init__(self, *, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model

    def _message(self, content: list[Any], stop_reason: str | None, usage: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": dict(usage),
        }

    def stream_events(self, answer: Answer, usage: Mapping[str, Any]) -> list[Event]:
        """message_start … message_stop; ``usage`` is the final usage (output tokens included)."""
        start_usage = {**usage, "output_tokens": 0}
        events = [
            Event(_dumps({"type": "message_start", "message": self._message([], None, start_usage)}), "message_start"),
            Event(_dumps({"type": "ping"}), "ping"),
        ]
        index = 0

        def block(start: dict[str, Any], deltas: list[tuple[dict[str, Any], int]], start_tokens: int = 0) -> None:
            events.append(Event(_dumps({"type": "content_block_start", "index": index, "content_block": start}), "content_block_start", tokens=start_tokens))
            for delta, tokens in deltas:
                events.append(Event(_dumps({"type": "content_block_delta", "index": index, "delta": delta}), "content_block_delta", tokens=tokens))
            events.append(Event(_dumps({"type": "content_block_stop", "index": index}), "content_block_stop"))

        if answer.reasoning:
            block({"type": "thinking", "thinking": ""}, [({"type": "thinking_delta", "thinking": p}, 1) for p in answer.reasoning])
            index += 1
        if answer.content or answer.tool_call is None:
            block({"type": "text", "text": ""}, [({"type": "text_delta", "text": p}, 1) for p in answer.content])
            index += 1
        call = answer.tool_call
        if call is not None:
            block(
                {"type": "tool_use", "id": call.id, "name": call.name, "input": {}},
                [({"type": "input_json_delta", "partial_json": p}, 1) for p in call.argument_pieces],
                call.name_tokens,
            )
        delta = {"stop_reason": _STOP_REASONS[answer.finish_reason], "stop_sequence": None}
        events.append(
            Event(_dumps({"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["output_tokens"]}}), "message_delta", usage=True)
        )
        events.append(Event(_dumps({"type": "message_stop"}), "message_stop"))
        return events

    def body(self, answer: Answer, usage: Mapping[str, Any]) -> bytes:
        content: list[dict[str, Any]] = []
        if answer.reasoning:
            content.append({"type": "thinking", "thinking": answer.reasoning_text})
        if answer.content or answer.tool_call is None:
            content.append({"type": "text", "text": answer.content_text})
        call = answer.tool_call
        if call is not None:
            try:
                arguments: Any = json.loads(call.arguments)
            except ValueError:  # cut short by max_tokens
                arguments = {}
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
        return _dumps(self._message(content, _STOP_REASONS[answer.finish_reason], usage)).encode("utf-8")

