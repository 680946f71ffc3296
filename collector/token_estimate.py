"""Token ESTIMATES for calls that ended without the provider's usage (disconnect, cancel, error).

These are not counts. Rows priced from them are flagged ``usage_estimated``; the
provider's own ``usage`` always wins when it arrives.

The rate is DeepSeek's published rule of thumb (Token & Token Usage,
https://api-docs.deepseek.com/quick_start/token_usage): "1 English character ≈ 0.3
token. 1 Chinese character ≈ 0.6 token." We apply the Chinese rate to every CJK
character (Han ideographs, kana, Hangul, CJK punctuation and full-width forms), which
tokenise about as densely as Chinese, and the English rate to everything else,
whitespace included. A deterministic function of the text, rounded up, so that the
same lost call always gets the same estimate and any non-empty text costs at least one
token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "estimate_text_tokens",
    "estimate_prompt_tokens",
    "MESSAGE_OVERHEAD_TOKENS",
    "REQUEST_OVERHEAD_TOKENS",
]

# Tenths of a token per character, from the published rule.
_OTHER_TENTHS = 3
_CJK_TENTHS = 6

# The chat template wraps each message in role markers and separators, and primes the
# reply with an assistant marker. A few tokens each; OpenAI's cookbook counts 3 + 3.
MESSAGE_OVERHEAD_TOKENS = 3
REQUEST_OVERHEAD_TOKENS = 3

_CJK = re.compile(
    "[\u1100-\u11ff"  # Hangul Jamo
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3000-\u303f"  # CJK symbols and punctuation
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3100-\u31ff"  # Bopomofo, Hangul compatibility Jamo, Kanbun, CJK strokes, Katakana ext.
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\ufe30-\ufe4f"  # CJK compatibility forms
    "\uff00-\uffef"  # half-width and full-width forms
    "\U00020000-\U0003134f"  # CJK Extensions B-G
    "]"
)


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens in ``text``: 0.3 per character, 0.6 per CJK character, rounded up."""
    if not text:
        return 0
    cjk = 0 if text.isascii() else len(_CJK.findall(text))
    tenths = _OTHER_TENTHS * (len(text) - cjk) + _CJK_TENTHS * cjk
    return -(-tenths // 10)


def _json_text(value: Any) -> str:
    # Compact and key-sorted, so the estimate does not depend on the client's formatting.
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(value)


def _content_tokens(content: Any) -> int:
    """A message's content: a string, or a list of parts (OpenAI parts or Anthropic blocks).

    Image parts are not counted: their price depends on the image, which a text rule
    cannot estimate; only their part overhead is.
    """
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if not isinstance(content, list):
        return 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += estimate_text_tokens(part)
            continue
        if not isinstance(part, Mapping):
            continue
        total += 1  # the part's own framing
        kind = part.get("type")
        if isinstance(part.get("text"), str):
            total += estimate_text_tokens(part["text"])
        elif kind == "thinking" and isinstance(part.get("thinking"), str):
            total += estimate_text_tokens(part["thinking"])
        elif kind == "tool_use":
            total += estimate_text_tokens(str(part.get("name") or "")) + estimate_text_tokens(_json_text(part.get("input")))
        elif kind == "tool_result":
            total += _content_tokens(part.get("content"))
    return total


def _message_tokens(message: Mapping[str, Any]) -> int:
    total = MESSAGE_OVERHEAD_TOKENS + _content_tokens(message.get("content"))
    for key in ("name", "reasoning_content"):  # V4 requires reasoning_content sent back: it is input
        value = message.get(key)
        if isinstance(value, str):
            total += estimate_text_tokens(value)
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list):
        for call in tool_calls:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                total += estimate_text_tokens(str(function.get("name") or ""))
                total += estimate_text_tokens(str(function.get("arguments") or ""))
    return total


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a chat-completions (or Anthropic Messages) request body.

    Counts every message's content (string or list of parts), names, reasoning sent
    back and tool calls, each message's template overhead, the tool definitions (as
    compact JSON), an Anthropic-style top-level ``system``, and the reply priming.
    """
    total = REQUEST_OVERHEAD_TOKENS
    system = body.get("system")
    if system is not None:
        total += MESSAGE_OVERHEAD_TOKENS + _content_tokens(system)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                total += _message_tokens(message)
    for key in ("tools", "functions"):
        tools = body.get(key)
        if isinstance(tools, list):
            total += sum(estimate_text_tokens(_json_text(tool)) for tool in tools)
    return total
