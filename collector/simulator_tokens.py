"""The simulator's deterministic tokenizer and its DeepSeek-style context cache.

The tokenizer is not DeepSeek's; it only has to be deterministic, lossless and
roughly as dense as a real BPE, so token counts look plausible (about four
characters per token on English text). A token is one of:

- up to four word characters (``\\w``), optionally preceded by one space;
- one other non-space character (punctuation, a symbol), optionally preceded by one space;
- one whitespace character that neither of the above absorbed (a newline, a tab,
  the second of two spaces).

So ``"Hello, world"`` is ``["Hell", "o", ",", " worl", "d"]``, and joining the tokens
always gives back the text. A prompt is rendered as one special token per message
role (``<|user|>`` …), the message's text tokens and an ``<|end|>`` token; the tools
(canonical JSON) come first, and ``<|assistant|>`` closes the prompt.

The context cache mimics DeepSeek's: it works per API key, in units of 64 tokens, and
a prompt hits the longest prefix that an earlier prompt of the same key shared,
rounded down to a multiple of 64. It remembers 64-token blocks by a chained hash, so a
block matches only if everything before it matched too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CACHE_UNIT",
    "PrefixCache",
    "canonical_json",
    "count_tokens",
    "render_prompt",
    "tokenize",
]

CACHE_UNIT = 64  # DeepSeek's context cache stores and matches prefixes in 64-token units

_TOKEN = re.compile(r" ?\w{1,4}| ?[^\w\s]|\s")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens; ``"".join(tokenize(text)) == text`` always holds."""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return sum(1 for _ in _TOKEN.finditer(text))


def canonical_json(value: Any) -> str:
    """JSON with sorted keys, so equal values render (and so tokenize and cache) identically."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def render_prompt(segments: Iterable[tuple[str, str]], tools: Any = None) -> list[str]:
    """The prompt's tokens: ``segments`` are ``(role, text)`` pairs in conversation order."""
    tokens: list[str] = []
    if tools:
        tokens.append("<|tools|>")
        tokens.extend(tokenize(canonical_json(tools)))
        tokens.append("<|end|>")
    for role, text in segments:
        tokens.append(f"<|{role}|>")
        tokens.extend(tokenize(text))
        tokens.append("<|end|>")
    tokens.append("<|assistant|>")
    return tokens


def _block_digests(tokens: Sequence[str]) -> list[bytes]:
    """One chained digest per complete 64-token block: digest k stands for the first 64*(k+1) tokens."""
    digests: list[bytes] = []
    previous = b""
    for start in range(0, len(tokens) - CACHE_UNIT + 1, CACHE_UNIT):
        hasher = hashlib.blake2b(previous, digest_size=16)
        for token in tokens[start : start + CACHE_UNIT]:
            encoded = token.encode("utf-8")
            # Length-prefixed, so no two different token sequences hash the same bytes.
            hasher.update(len(encoded).to_bytes(4, "big"))
            hasher.update(encoded)
        previous = hasher.digest()
        digests.append(previous)
    return digests


class PrefixCache:
    """Prefix blocks seen per key; thread-safe. Oldest blocks are forgotten beyond ``max_blocks``."""

    def __init__(self, max_blocks: int = 1_000_000) -> None:
        self._max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._lock = threading.Lock()

    def hit_and_store(self, key: str, tokens: Sequence[str]) -> int:
        """Cache-hit tokens for this prompt (a multiple of 64), then remember its prefixes."""
        digests = _block_digests(tokens)
        with self._lock:
            hit_blocks = 0
            for digest in digests:
                if (key, digest) not in self._blocks:
                    break
                hit_blocks += 1
            for digest in digests:
                entry = (key, digest)
                if entry in self._blocks:
                    self._blocks.move_to_end(entry)
                else:
                    self._blocks[entry] = None
            while len(self._blocks) > self._max_blocks:
                self._blocks.popitem(last=False)
        return hit_blocks * CACHE_UNIT

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
