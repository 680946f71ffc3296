"""The DeepSeek (OpenAI-format) ``/chat/completions`` surface of the simulator: pure request
parsing, error envelopes and response rendering, byte-for-byte in the shape of the
captures in ``shared/fixtures/deepseek`` (vercel-ai v4flash chunk lists, neurouter SSE).

Rendering writes the JSON by hand from fixed fragments so the key order matches the
captures exactly and a stream of hundreds of chunks costs little CPU.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from collector.simulator_events import Event, Rejection
from collector.simulator_plan import Answer, PlanRequest, ToolSpec
from collector.simulator_tokens import canonical_json

__all__ = [
    "AUTH_MESSAGE",
    "CHAT_MODELS",
    "IN_STREAM_ERROR",
    "MAX_OUTPUT_TOKENS",
    "ChatRenderer",
    "ChatRequest",
    "auth_error",
    "deepseek_error",
    "deepseek_usage",
    "fault_error",
    "parse_chat_request",
]

# requested name -> (model the response reports, forced thinking mode or None = from the request)
CHAT_MODELS: dict[str, tuple[str, bool | None]] = {
    "deepseek-v4-flash": ("deepseek-v4-flash", None),
    "deepseek-v4-pro": ("deepseek-v4-pro", None),
    "deepseek-flash": ("deepseek-flash", None),
    # Legacy aliases: V4-Flash non-thinking / thinking; the response names the real model.
    "deepseek-chat": ("deepseek-v4-flash", False),
    "deepseek-reasoner": ("deepseek-v4-flash", True),
}
MAX_OUTPUT_TOKENS = 393_216  # V4: 384K output tokens

# Bodies for faults. 402 is from logs of the real API; 422/429/500/503 bodies were never
# captured (api-facts §2.3), so they follow the same envelope with the documented names.
_FAULT_BODIES: dict[int, tuple[str, str, str]] = {
    402: ("Insufficient Balance", "unknown_error", "invalid_request_error"),
    422: ("Invalid Parameters", "invalid_request_error", "invalid_request_error"),
    429: (
        "Your current concurrency is 40, which exceeds your concurrency limit of 39 based on your "
        "remaining balance. Please top up your balance to restore your concurrency.",
        "rate_limit_error",
        "invalid_request_error",
    ),
    500: ("Server Error", "server_error", "server_error"),
    503: ("Server Overloaded", "server_error", "server_overloaded"),
}
AUTH_MESSAGE = "Authentication Fails, Your api key: ****xxxx is invalid"
IN_STREAM_ERROR = {
    "error": {
        "message": "The inference was interrupted due to insufficient system resources",
        "type": "server_error",
        "param": None,
        "code": "insufficient_system_resource",
    }
}


def deepseek_error(status: int, message: str, type_: str = "invalid_request_error", code: str = "invalid_request_error") -> Rejection:
    return Rejection(status, {"error": {"message": message, "type": type_, "param": None, "code": code}})


def fault_error(status: int) -> Rejection:
    message, type_, code = _FAULT_BODIES[status]
    return deepseek_error(status, message, type_, code)


def auth_error() -> Rejection:
    return deepseek_error(401, AUTH_MESSAGE, "authentication_error")


def deepseek_usage(prompt: int, cache_hit: int, completion: int, reasoning: int | None) -> dict[str, Any]:
    """DeepSeek's usage object, keys in the order the API sends them."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_hit},
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    usage["prompt_cache_hit_tokens"] = cache_hit
    usage["prompt_cache_miss_tokens"] = prompt - cache_hit
    return usage


@dataclass(frozen=True, slots=True)
class ChatRequest:
    requested_model: str
    response_model: str
    thinking: bool
    stream: bool
    include_usage: bool
    max_tokens: int | None
    tools: tuple[ToolSpec, ...]
    tools_raw: list[Any] | None
    forced_tool: str | None
    call_tool: bool
    segments: tuple[tuple[str, str], ...]  # (role, text) for the tokenizer
    conversation: str  # canonical JSON of the messages: seeds the answer

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


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(canonical_json(part))
        return "".join(parts)
    return canonical_json(content)


def _invalid(message: str) -> Rejection:
    return deepseek_error(422, message)


def _parse_tools(raw: Any) -> tuple[ToolSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _invalid("Failed to deserialize the JSON body into the target type: tools: invalid type, expected a sequence")
    tools = []
    for index, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise _invalid(f"Failed to deserialize the JSON body into the target type: tools[{index}]: missing field `function.name`")
        parameters = function.get("parameters") if isinstance(function, Mapping) else None
        tools.append(ToolSpec(name, parameters if isinstance(parameters, Mapping) else {}))
    return tuple(tools)


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded request body the way DeepSeek does; raise :class:`Rejection` if it fails."""
    if not isinstance(body, Mapping):
        raise deepseek_error(400, "Invalid Format: the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _invalid("Failed to deserialize the JSON body into the target type: missing field `model`")
    if model not in CHAT_MODELS:
        raise deepseek_error(400, "Model Not Exist")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("Failed to deserialize the JSON body into the target type: missing field `messages`")
    if not messages:
        raise deepseek_error(400, "Empty input messages")
    segments = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ("system", "user", "assistant", "tool"):
            raise _invalid(f"Failed to deserialize the JSON body into the target type: messages[{index}]: unknown variant `{role}`")
        assert isinstance(message, Mapping)
        text = _text_of(message.get("content"))
        if message.get("reasoning_content"):
            text = _text_of(message.get("reasoning_content")) + text
        if message.get("tool_calls"):
            text += canonical_json(message["tool_calls"])
        segments.append((str(role), text))

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("Failed to deserialize the JSON body into the target type: stream: invalid type, expected a boolean")
    options = body.get("stream_options")
    include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_OUTPUT_TOKENS
    ):
        raise deepseek_error(400, f"Invalid max_tokens value, the valid range of max_tokens is [1, {MAX_OUTPUT_TOKENS}]")

    response_model, forced_thinking = CHAT_MODELS[model]
    thinking_param = body.get("thinking")
    thinking_type = thinking_param.get("type") if isinstance(thinking_param, Mapping) else None
    if thinking_type == "disabled":
        thinking = False
    else:
        thinking = bool(forced_thinking) or thinking_type == "enabled" or body.get("reasoning_effort") is not None

    tools = _parse_tools(body.get("tools"))
    tool_choice = body.get("tool_choice")
    forced_tool = None
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("name"), str):
            forced_tool = function["name"]
    call_tool = bool(tools) and tool_choice != "none" and segments[-1][0] == "user"
    return ChatRequest(
        requested_model=model,
        response_model=response_model,
        thinking=thinking,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        tools=tools,
        tools_raw=body.get("tools") if tools else None,
        forced_tool=forced_tool,
        call_tool=call_tool,
        segments=tuple(segments),
        conversation=canonical_json(messages),
    )


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ENCODE_STRING = json.encoder.encode_basestring  # C; what the encoder above does with a str


def _dumps(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``, without building an encoder per call."""
    return _ENCODE_STRING(value) if type(value) is str else _ENCODE(value)


class ChatRenderer:
    """Renders one answer as DeepSeek chunks (or, with ``openai_style``, OpenAI's layout) or one body."""

    def __init__(
        self,
        *,
        response_id: str,
        created: int,
        model: str,
        fingerprint: str,
        thinking: bool,
        include_usage: bool,
        openai_style: bool = False,
    ) -> None:
        self.response_id = response_id
        self.created = created
        self.model = model
        self.fingerprint = fingerprint
        self.thinking = thinking
        self.include_usage = include_usage
        self.openai_style = openai_style
        self._head = (
            f'{{"id":"{response_id}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"system_fingerprint":"{fingerprint}","choices":'
        )
        usage_null = ',"usage":null' if include_usage else ""
        self._tail = ',"logprobs":null,"finish_reason":null}]' + usage_null + "}"

    def _chunk(self, delta: str, tokens: int = 0) -> Event:
        return Event(self._head + '[{"index":0,"delta":' + delta + self._tail, tokens=tokens)

    def stream_events(self, answer: Answer, usage: Mapping[str, Any]) -> list[Event]:
        """Every event of the stream, ending with ``[DONE]``."""
        thinking = self.thinking
        events = [self._chunk('{"role":"assistant","content":null,"reasoning_content":""}' if thinking else '{"role":"assistant","content":""}')]
        for piece in answer.reasoning:
            events.append(self._chunk('{"content":null,"reasoning_content":' + _dumps(piece) + "}", 1))
        for piece in answer.content:
            if thinking:
                events.append(self._chunk('{"content":' + _dumps(piece) + ',"reasoning_content":null}', 1))
            else:
                events.append(self._chunk('{"content":' + _dumps(piece) + "}", 1))
        call = answer.tool_call
        if call is not None:
            header = {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            events.append(self._chunk('{"tool_calls":[' + _dumps(header) + "]}", call.name_tokens))
            for piece in call.argument_pieces:
                events.append(self._chunk('{"tool_calls":[{"index":0,"function":{"arguments":' + _dumps(piece) + "}}]}", 1))
        finish = _dumps(answer.finish_reason)
        if self.openai_style:
            usage_null = ',"usage":null' if self.include_usage else ""
            events.append(Event(self._head + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":' + finish + "}]" + usage_null + "}"))
            if self.include_usage:
                events.append(Event(self._head + '[],"usage":' + _dumps(usage) + "}", usage=True))
        else:
            last_delta = '{"content":"","reasoning_content":null}' if thinking else '{"content":""}'
            events.append(
                Event(
                    self._head + '[{"index":0,"delta":' + last_delta + ',"logprobs":null,"finish_reason":' + finish + '}],"usage":' + _dumps(usage) + "}",
                    usage=True,
                )
            )
        events.append(Event("[DONE]", chunk=False))
        return events

    def body(self, answer: Answer, usage: Mapping[str, Any]) -> bytes:
        """The non-streaming ``chat.completion`` body."""
        message: dict[str, Any] = {"role": "assistant", "content": answer.content_text}
        if self.thinking:
            message["reasoning_content"] = answer.reasoning_text
        if answer.tool_call is not None:
            call = answer.tool_call
            message["tool_calls"] = [
                {"index": 0, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ]
        body = {
            "id": self.response_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}],
            "usage": usage,
            "system_fingerprint": self.fingerprint,
        }
        return _dumps(body).encode("utf-8")

