"""The metering core: one call in, one ``UsageRecord`` out, whatever carries the bytes.

The httpx transport and the proxy both drive a ``CallMeter``; neither parses streams
its own way. The core knows nothing of HTTP libraries or SQL:

1. ``prepare_request`` decides whether a request is metered and, for a streamed chat
   completion, injects ``stream_options.include_usage`` so the upstream reports usage.
2. ``CallMeter.response_started`` takes the status line; ``feed`` takes each body chunk as
   it arrives and returns the bytes to forward (the same bytes, except that an OpenAI-style
   usage-only chunk the caller never asked for is cut out); ``feed_eof`` returns any tail.
3. ``finish`` turns what was seen into a record: every outcome (completed, error,
   disconnected, cancelled, timeout) is a row; tokens the provider did not report are
   estimated and flagged, and unknown counts stay ``None``.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from collector.accumulator import AnthropicStreamAccumulator, StreamAccumulator
from collector.fingerprint import api_key_from_headers, key_fingerprint
from collector.record import Endpoint, Status, UsageRecord, utcnow
from collector.sse import SSEDecoder, SSELineTooLong
from collector.token_estimate import estimate_prompt_tokens, estimate_text_tokens
from collector.usage import InvalidUsage, Tokens, normalise_anthropic_usage, normalise_usage

__all__ = [
    "PreparedCall",
    "CallMeter",
    "Outcome",
    "InvalidTags",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamDisconnected",
    "UpstreamUnreachable",
    "prepare_request",
    "meter_for",
    "parse_tags",
    "TAGS_HEADER",
]

TAGS_HEADER = "x-dsmeter-tags"
MAX_TAGS = 16
MAX_BODY_BYTES = 32 << 20  # a non-streamed body larger than this is not parsed (still forwarded)
INFLATE_PIECE = 64 << 10  # a compressed read is inflated this much at a time: a small bomb never inflates whole
ERROR_MESSAGE_LIMIT = 500

Outcome = Literal["eof", "cancelled", "error", "timeout"]

_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TAG_VALUE = re.compile(r"^[^\x00-\x1f\x7f,=]{0,128}$")
_KEY_LIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{4,}|api key: \S+)", re.IGNORECASE)


class InvalidTags(ValueError):
    """An ``X-Dsmeter-Tags`` value that is not ``key=value[,key=value…]`` within the bounds."""


class UpstreamError(Exception):
    """How the upstream failed, in words that do not depend on the HTTP library carrying the call.

    Carriers (the httpx transport, the proxy) hand these to ``CallMeter.finish`` instead of
    their library's exception, so the same failure makes the same row whichever carried it
    (``error_type`` is the class name, ``error_message`` the text).
    """

    default_message = "the upstream failed"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class UpstreamTimeout(UpstreamError):
    default_message = "the upstream sent nothing within the timeout"


class UpstreamDisconnected(UpstreamError):
    default_message = "the upstream closed the connection before the response was complete"


class UpstreamUnreachable(UpstreamError):
    default_message = "could not connect to the upstream"


def parse_tags(value: str) -> dict[str, str]:
    """``team=search,feature=autocomplete`` -> ``{"team": "search", "feature": "autocomplete"}``.

    Bounded (16 tags, 64-char keys, 128-char values, no control characters) because tags
    become rows, columns and metric labels: a client must not be able to blow them up.
    """
    tags: dict[str, str] = {}
    if not value.strip():
        return tags
    for part in value.split(","):
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not _TAG_KEY.match(key) or not _TAG_VALUE.match(val):
            raise InvalidTags(f"invalid tag {part.strip()[:80]!r}: expected key=value, key [A-Za-z0-9_.-]{{1,64}}")
        tags[key] = val
    if len(tags) > MAX_TAGS:
        raise InvalidTags(f"too many tags ({len(tags)} > {MAX_TAGS})")
    return tags


def _endpoint_for(method: str, path: str) -> Endpoint | None:
    if method.upper() != "POST":
        return None
    path = path.rstrip("/")
    if path.endswith("/chat/completions") or path == "chat/completions":
        return Endpoint.CHAT_COMPLETIONS
    if path.endswith("/v1/messages") and "anthropic" in path:
        return Endpoint.ANTHROPIC_MESSAGES
    return None


def _thinking_requested(body: Mapping[str, Any]) -> bool | None:
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping):
        kind = thinking.get("type")
        if kind == "enabled":
            return True
        if kind == "disabled":
            return False
    if body.get("reasoning_effort"):
        return True
    if body.get("model") == "deepseek-reasoner":
        return True
    return None


@dataclass(slots=True)
class PreparedCall:
    """What the meter needs to know about a request, and the body to forward."""

    metered: bool
    body: bytes
    endpoint: Endpoint = Endpoint.CHAT_COMPLETIONS
    stream: bool = False
    requested_model: str | None = None
    include_usage_injected: bool = False  # the caller did not ask for usage; hide a usage-only chunk
    thinking: bool | None = None
    user: str | None = None
    request: dict[str, Any] | None = field(default=None, repr=False)  # kept only to estimate tokens


def prepare_request(method: str, path: str, body: bytes) -> PreparedCall:
    """Decide whether to meter, and for a streamed chat completion ask the upstream for usage.

    The body is re-serialised only when it has to change, so every other request is
    forwarded byte for byte.
    """
    endpoint = _endpoint_for(method, path)
    if endpoint is None:
        return PreparedCall(metered=False, body=body)
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, RecursionError):  # RecursionError: hostile nesting depth
        parsed = None
    if not isinstance(parsed, dict):
        # Metered anyway: the upstream will reject it, and that rejection is a row.
        return PreparedCall(metered=True, body=body, endpoint=endpoint)
    model = parsed.get("model")
    user = parsed.get("user")
    metadata = parsed.get("metadata")
    if user is None and isinstance(metadata, Mapping):
        user = metadata.get("user_id")  # the Anthropic surface's user field
    call = PreparedCall(
        metered=True,
        body=body,
        endpoint=endpoint,
        stream=parsed.get("stream") is True,
        requested_model=model if isinstance(model, str) else None,
        thinking=_thinking_requested(parsed),
        user=str(user)[:256] if user is not None else None,
        request=parsed,
    )
    if endpoint is Endpoint.CHAT_COMPLETIONS and call.stream:
        options = parsed.get("stream_options")
        if not (isinstance(options, Mapping) and options.get("include_usage") is True):
            spliced = _with_first_key(body, _INCLUDE_USAGE) if "stream_options" not in parsed else None
            if spliced is not None:
                call.body = spliced
            else:
                new_options = dict(options) if isinstance(options, Mapping) else {}
                new_options["include_usage"] = True
                parsed = {**parsed, "stream_options": new_options}
                call.body = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
            call.include_usage_injected = True
    return call


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true}'
_JSON_SPACE = b" \t\r\n"


def _with_first_key(body: bytes, member: bytes) -> bytes | None:
    """``body`` (a JSON object without that key) with ``member`` inserted as its first member.

    Every other byte stays the client's: no re-serialising a long prompt (a 400 KB body took
    milliseconds to dump again), no change to its number formats or escapes. None when the
    body does not start like a UTF-8 JSON object; the caller then re-serialises.
    """
    start = len(body) - len(body.lstrip(_JSON_SPACE))
    if body[start : start + 1] != b"{":
        return None
    rest = body[start + 1 :]
    separator = b"" if rest.lstrip(_JSON_SPACE)[:1] == b"}" else b","
    return body[: start + 1] + member + separator + rest


def meter_for(
    call: PreparedCall,
    headers: Mapping[str, str],
    *,
    tags: Mapping[str, str] | None = None,
    upstream: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    secret: bytes | None = None,
) -> CallMeter:
    """The meter for a request, attributed the same way whichever carrier (transport, proxy) has it.

    ``headers`` must look names up case-insensitively (httpx and aiohttp headers do). Tags are
    the carrier's own with the request's ``X-Dsmeter-Tags`` on top (``InvalidTags`` if malformed);
    the API key becomes its keyed fingerprint, and reaches the meter only to be scrubbed from errors.
    The carrier strips ``X-Dsmeter-Tags`` before forwarding. A carrier on a hot path passes the
    fingerprint ``secret`` it read once, rather than have it looked up on disk for every call.
    """
    all_tags = dict(tags or {})
    extra = _header_list(headers, TAGS_HEADER)
    if extra is not None:
        all_tags.update(parse_tags(extra))
    api_key = api_key_from_headers(headers)
    return CallMeter(
        call,
        tags=all_tags,
        key_fingerprint=key_fingerprint(api_key, secret) if api_key else None,
        upstream=upstream,
        api_key=api_key,
        clock=clock,
    )


def _header_list(headers: Mapping[str, str], name: str) -> str | None:
    """Every value of a repeated header as one comma-joined list, as HTTP reads it.

    httpx's ``get`` already joins them; aiohttp's multidict ``get`` returns only the first,
    which would let the carriers attribute the same request differently.
    """
    getall = getattr(headers, "getall", None)
    if getall is not None:
        values = getall(name, [])
        return ", ".join(values) if values else None
    return headers.get(name)


def _scrub(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "****")
    message = _KEY_LIKE.sub("****", message)
    return message[:ERROR_MESSAGE_LIMIT]


class CallMeter:
    """Watches one call's response go by and produces its ``UsageRecord``."""

    def __init__(
        self,
        call: PreparedCall,
        *,
        tags: Mapping[str, str] | None = None,
        key_fingerprint: str | None = None,
        upstream: str | None = None,
        api_key: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.call = call
        self._monotonic = monotonic
        self._t0 = monotonic()
        self._started_at = clock()
        self._tags = dict(tags or {})
        self._key_fingerprint = key_fingerprint
        self._upstream = upstream
        self._api_key = api_key  # only to scrub it out of error messages; never stored
        self.http_status: int | None = None
        self._sse = False
        self._decoder = SSEDecoder()
        self._acc: StreamAccumulator | AnthropicStreamAccumulator
        # Set while the next read may take feed's one-chunk fast path (see _arm_fast_path).
        self._fast: StreamAccumulator | None = None
        # The accumulator, while the response may take the fast path at all: a chat SSE stream,
        # not compressed, parsing not broken.
        self._fast_capable: StreamAccumulator | None = None
        if call.endpoint is Endpoint.ANTHROPIC_MESSAGES:
            self._acc = AnthropicStreamAccumulator(self._t0)
        else:
            self._acc = StreamAccumulator(self._t0)
        self._body = bytearray()
        self._body_truncated = False
        self._inflate: Any = None
        self._broken: str | None = None  # why parsing stopped (the bytes still flow)
        self.done = False  # saw data: [DONE] (chat) or message_stop (anthropic)
        # Forwarding state when a usage-only chunk may have to be cut out of the stream.
        self._filter = False
        self._pending = bytearray()
        self._pending_start = 0
        self._cut_lf_at: int | None = None
        self.record: UsageRecord | None = None

    # -- response ------------------------------------------------------------------------------

    def response_started(
        self, status: int, content_type: str | None = None, content_encoding: str | None = None
    ) -> None:
        self.http_status = status
        ctype = (content_type or "").lower()
        self._sse = status < 300 and ("text/event-stream" in ctype or (self.call.stream and not ctype))
        encoding = (content_encoding or "").lower().strip()
        # Event offsets are offsets into the decoded stream: nothing can be cut from compressed bytes.
        self._filter = self._sse and self.call.include_usage_injected and encoding in ("", "identity")
        if encoding in ("gzip", "deflate"):
            # Our copy must be decoded to be parsed; the caller still gets the bytes as sent.
            self._inflate = zlib.decompressobj(wbits=47)
        elif encoding not in ("", "identity"):
            self._broken = f"unsupported content-encoding {encoding!r}"
        if self._sse and self._inflate is None and self._broken is None and isinstance(self._acc, StreamAccumulator):
            self._fast_capable = self._acc
            self._arm_fast_path()

    @property
    def finished(self) -> bool:
        return self.record is not None

    def feed(self, chunk: bytes) -> bytes:
        """Observe one body chunk; return the bytes to forward now (usually ``chunk`` itself)."""
        fast = self._fast
        if fast is not None and fast.fold_event(chunk, self._monotonic):
            # Most reads of a live stream: exactly one ordinary chunk, shaped like one already
            # parsed, folded from its bytes without the decoder or json.loads. Nothing is held
            # back and nothing is cut (such a chunk is never usage-only). The decoder never sees
            # it: it is a whole event read while the decoder was between events, which changes
            # nothing in the decoder but offsets. So offsets (the decoder's, _pending_start, a
            # dropped event's range) count only the bytes fed to the decoder; every one of them
            # leaves such reads out alike, and _forward only ever compares them with each other.
            return chunk
        out = self._feed_decoded(chunk)
        self._arm_fast_path()
        return out

    def _arm_fast_path(self) -> None:
        """Let the next read take the fast path only while the decoder and forwarding hold nothing.

        A read the decoder is not given must be one that, fed, would have decoded the same
        whatever came before it: the decoder is ``between_events`` (no partial line, open
        block, CR awaiting its LF or unsettled BOM), and no bytes wait to be forwarded or cut.
        The fast path changes none of that, so this is decided once per read the decoder takes,
        not again for every read folded in between.
        """
        capable = self._fast_capable  # None once parsing broke (_break clears it)
        self._fast = (
            capable
            if capable is not None
            and not self._pending
            and self._cut_lf_at is None
            and self._decoder.between_events
            else None
        )

    def _feed_decoded(self, chunk: bytes) -> bytes:
        """``feed`` for a read the fast path did not fold: through the decoder and the accumulator."""
        if not chunk:
            return b""
        if not self._sse:
            self._collect_body(chunk)
            return chunk
        if self._broken is None:
            if self._inflate is None:
                drops = self._parse(chunk)
            else:
                drops = []
                for piece in self._inflated(chunk):
                    drops += self._parse(piece)
                    if self._broken is not None:
                        break
        else:
            drops = []
        if not self._filter:
            return chunk
        return self._forward(chunk, drops)

    def feed_eof(self) -> bytes:
        """The upstream body ended: parse what is pending and return any bytes still held back."""
        if self._sse and self._broken is None:
            if self._inflate is not None:
                for piece in self._inflated(b""):
                    self._parse(piece)
                    if self._broken is not None:
                        break
            if self._broken is None:
                self._observe(self._decoder.flush())
        out = b""
        if self._filter and self._pending:
            out = bytes(self._pending)
            self._pending_start += len(self._pending)
            self._pending.clear()
        self._arm_fast_path()
        return out

    def _break(self, reason: str) -> None:
        self._broken = reason
        self._fast = self._fast_capable = None

    def _parse(self, data: bytes) -> list[tuple[int, int]]:
        try:
            events = self._decoder.feed(data)
        except SSELineTooLong as error:
            self._break(f"line_too_long: {error}")
            events = error.events  # whole events before the long line still count
        return self._observe(events)

    def _inflated(self, chunk: bytes) -> Iterator[bytes]:
        """Decompress one read in bounded pieces; a body that does not decompress breaks parsing (never raises)."""
        inflate = self._inflate
        data = chunk
        while True:
            try:
                piece = inflate.decompress(data, INFLATE_PIECE)
            except zlib.error as error:
                self._break(f"bad_content_encoding: {error}")
                return
            data = inflate.unconsumed_tail
            if piece:
                yield piece
            if not data and len(piece) < INFLATE_PIECE:
                return

    def _collect_body(self, chunk: bytes) -> None:
        if self._body_truncated or self._broken is not None and self._inflate is not None:
            return
        pieces = self._inflated(chunk) if self._inflate is not None else (chunk,)
        for piece in pieces:
            if len(self._body) + len(piece) > MAX_BODY_BYTES:
                self._body_truncated = True
                self._body.clear()
                return
            self._body.extend(piece)

    def _observe(self, events: list[Any]) -> list[tuple[int, int]]:
        """Feed decoded events to the accumulator; return byte ranges to cut from the forwarded stream."""
        drops: list[tuple[int, int]] = []
        now = self._monotonic()
        acc = self._acc
        if isinstance(acc, AnthropicStreamAccumulator):
            for event in events:
                acc.add_event(event.event, event.data, now)
                if event.event == "message_stop":
                    self.done = True
            return drops
        for event in events:
            data = event.data
            if data == "[DONE]":
                self.done = True
                continue
            if acc.add_templated(data, now):
                continue  # an ordinary chunk shaped like one already parsed: no json.loads (never usage-only)
            try:
                chunk = json.loads(data)
            except (ValueError, RecursionError):
                acc.add_data(data, now)  # counted as malformed, never raised
                continue
            if not isinstance(chunk, dict):
                acc.add_data(data, now)
                continue
            if self._filter and chunk.get("choices") == [] and chunk.get("usage"):
                # An OpenAI-style usage-only chunk the caller never asked for: meter it, don't show it.
                drops.append((event.start, event.end))
            acc.add_chunk(chunk, now, data)
        return drops

    def _forward(self, chunk: bytes, drops: list[tuple[int, int]]) -> bytes:
        """Release bytes up to the decoder's stable offset, minus the dropped events."""
        if not drops and not self._pending and self._cut_lf_at is None and self._broken is None:
            end = self._pending_start + len(chunk)
            if self._decoder.stable_offset == end:
                # The usual read: whole events, nothing held back, nothing cut. Pass it on as it is.
                self._pending_start = end
                return chunk
        self._pending.extend(chunk)
        if self._broken is not None:
            # Parsing stopped; nothing more can be cut, so let everything through.
            out = bytes(self._pending)
            self._pending_start += len(self._pending)
            self._pending.clear()
            return out
        release_to = self._decoder.stable_offset
        if release_to <= self._pending_start:
            return b""
        base = self._pending_start
        pending = self._pending
        if self._cut_lf_at == base and pending[:1] == b"\n":
            # The LF of a cut event's CRLF arrived in this read: it belongs to the cut.
            drops = [(base, base + 1), *drops]
        self._cut_lf_at = None
        parts: list[bytes] = []
        cursor = base
        for start, end in drops:
            start, end = max(start, cursor), min(end, release_to)
            if start >= end:
                continue
            if pending[end - 1 - base : end - base] == b"\r":
                if end < release_to and pending[end - base : end + 1 - base] == b"\n":
                    end += 1
                elif end == release_to:
                    self._cut_lf_at = end
            parts.append(bytes(pending[cursor - base : start - base]))
            cursor = end
        parts.append(bytes(self._pending[cursor - base : release_to - base]))
        del self._pending[: release_to - base]
        self._pending_start = release_to
        return b"".join(parts)

    # -- the record ----------------------------------------------------------------------------

    def finish(self, outcome: Outcome, error: BaseException | None = None) -> UsageRecord:
        """Build the call's record once; later calls return the same record."""
        if self.record is not None:
            return self.record
        elapsed = self._monotonic() - self._t0
        record = UsageRecord(
            started_at=self._started_at,
            finished_at=self._started_at + timedelta(seconds=elapsed),
            requested_model=self.call.requested_model,
            endpoint=self.call.endpoint.value,
            upstream=self._upstream,
            stream=self.call.stream,
            thinking=self.call.thinking,
            http_status=self.http_status,
            duration_ms=round(elapsed * 1000.0, 3),
            key_fingerprint=self._key_fingerprint,
            user=self.call.user,
            tags=dict(self._tags),
        )
        if self.http_status is None:
            self._finish_without_response(record, outcome, error)
        elif self.http_status >= 300:  # a redirect (never followed) ran no call either
            self._finish_http_error(record)
        elif self._sse:
            self._finish_stream(record, outcome, error)
        else:
            self._finish_body(record, outcome, error)
        if record.thinking is None and record.status == Status.COMPLETED.value:
            record.thinking = bool(record.reasoning_tokens) or bool(getattr(self._acc, "reasoning_content", ""))
        self.record = record
        return record

    def _finish_without_response(self, record: UsageRecord, outcome: Outcome, error: BaseException | None) -> None:
        # The request never got a response (connect failure, timeout, cancelled while waiting).
        record.status = {
            "timeout": Status.TIMEOUT,
            "cancelled": Status.CANCELLED,
        }.get(outcome, Status.ERROR).value
        if error is not None:
            record.error_type = type(error).__name__
            record.error_message = _scrub(str(error), self._api_key) or None

    def _finish_http_error(self, record: UsageRecord) -> None:
        # A rejected request bills nothing, but no usage was reported: counts stay unknown (NULL).
        record.status = Status.ERROR.value
        body = self._decoded_body()
        record.error_type = f"http_{self.http_status}"
        if body is not None:
            err = body.get("error") if isinstance(body, dict) else None
            if isinstance(err, Mapping):
                kind = err.get("type") or err.get("code")
                if kind:
                    record.error_type = str(kind)[:64]
                if err.get("message"):
                    record.error_message = _scrub(str(err["message"]), self._api_key)
        elif self._body:
            record.error_message = _scrub(self._body[:ERROR_MESSAGE_LIMIT].decode("utf-8", "replace"), self._api_key)

    def _decoded_body(self) -> Any:
        if not self._body or self._body_truncated:
            return None
        try:
            # DeepSeek may send blank keep-alive lines before the JSON of a queued non-streamed call.
            return json.loads(self._body.decode("utf-8").strip())
        except (ValueError, RecursionError):
            return None

    def _finish_stream(self, record: UsageRecord, outcome: Outcome, error: BaseException | None) -> None:
        acc = self._acc
        record.provider_request_id = acc.id
        record.model = acc.model
        record.finish_reason = acc.finish_reason
        record.chunk_count = acc.chunk_count
        record.tool_call_count = acc.tool_call_count  # (tool_calls would join every call's arguments)
        record.ttft_ms = _round(acc.ttft_ms())
        record.first_content_ms = _round(acc.first_content_ms())
        has_usage = acc.usage is not None
        # The SDK closes the response right after [DONE]: that is a finished call, not a cancel.
        ended_whole = self.done or has_usage
        if acc.error is not None:
            record.status = Status.ERROR.value
            err = acc.error
            record.error_type = str(err.get("type") or err.get("code") or "stream_error")[:64]
            if err.get("message"):
                record.error_message = _scrub(str(err["message"]), self._api_key)
        elif self._broken is not None and not has_usage:
            record.status = Status.ERROR.value
            record.error_type, _, message = self._broken.partition(": ")
            record.error_message = message or None
        elif ended_whole:
            record.status = Status.COMPLETED.value
        elif outcome == "cancelled":
            record.status = Status.CANCELLED.value
        elif outcome == "timeout":
            record.status = Status.TIMEOUT.value
        else:
            record.status = Status.DISCONNECTED.value
        if error is not None and record.error_type is None and record.status != Status.COMPLETED.value:
            record.error_type = type(error).__name__
            record.error_message = _scrub(str(error), self._api_key) or None
        if acc.malformed_chunks and record.error_type is None:
            record.error_type = "malformed_chunk"
            record.error_message = f"{acc.malformed_chunks} chunk(s) were not valid JSON"
        self._apply_tokens(record, acc.usage, acc)

    def _finish_body(self, record: UsageRecord, outcome: Outcome, error: BaseException | None) -> None:
        body = self._decoded_body()
        if isinstance(body, dict) and isinstance(body.get("error"), Mapping):
            record.status = Status.ERROR.value
            err = body["error"]
            record.error_type = str(err.get("type") or err.get("code") or "error")[:64]
            record.error_message = _scrub(str(err.get("message") or ""), self._api_key) or None
            return
        if not isinstance(body, dict):
            if outcome == "cancelled":
                record.status = Status.CANCELLED.value
            elif outcome == "timeout":
                record.status = Status.TIMEOUT.value
            elif self._inflate is not None and self._broken is not None:
                record.status = Status.ERROR.value  # the body did not decompress
                record.error_type, _, message = self._broken.partition(": ")
                record.error_message = message or None
            elif error is not None or (not self._body and not self._body_truncated):
                record.status = Status.DISCONNECTED.value
            else:
                record.status = Status.ERROR.value
                record.error_type = "body_too_large" if self._body_truncated else "malformed_body"
            if error is not None:
                record.error_type = type(error).__name__
                record.error_message = _scrub(str(error), self._api_key) or None
            self._apply_tokens(record, None, None)
            return
        record.status = Status.COMPLETED.value
        record.provider_request_id = body.get("id") if isinstance(body.get("id"), str) else None
        record.model = body.get("model") if isinstance(body.get("model"), str) else None
        text_parts: list[str] = []
        if self.call.endpoint is Endpoint.ANTHROPIC_MESSAGES:
            record.finish_reason = body.get("stop_reason")
            for block in body.get("content") or []:
                if isinstance(block, Mapping):
                    text_parts.append(str(block.get("text") or block.get("thinking") or ""))
                    if block.get("type") == "tool_use":
                        record.tool_call_count += 1
        else:
            choices = body.get("choices") or []
            if choices and isinstance(choices[0], Mapping):
                record.finish_reason = choices[0].get("finish_reason")
                reply = choices[0].get("message") or {}
                text_parts.append(str(reply.get("content") or ""))
                text_parts.append(str(reply.get("reasoning_content") or ""))
                record.tool_call_count = len(reply.get("tool_calls") or [])
        usage = body.get("usage")
        self._apply_tokens(record, usage if isinstance(usage, Mapping) else None, None, "".join(text_parts))

    def _apply_tokens(
        self,
        record: UsageRecord,
        usage: Mapping[str, Any] | None,
        acc: StreamAccumulator | AnthropicStreamAccumulator | None,
        body_text: str | None = None,
    ) -> None:
        if usage is not None:
            record.usage_raw = dict(usage)
            try:
                tokens = (
                    normalise_anthropic_usage(usage)
                    if self.call.endpoint is Endpoint.ANTHROPIC_MESSAGES
                    else normalise_usage(usage)
                )
            except InvalidUsage as error:
                record.error_type = "invalid_usage"
                record.error_message = str(error)[:ERROR_MESSAGE_LIMIT]
            else:
                _set_tokens(record, tokens)
                return
        # No (valid) usage: estimate what was billed from what went out and came back, and say so.
        record.usage_estimated = True
        request = self.call.request
        record.prompt_tokens = estimate_prompt_tokens(request) if request is not None else None
        if acc is not None:
            reasoning = getattr(acc, "reasoning_content", "") or ""
            tool_args = "".join(
                str((call.get("function") or {}).get("arguments") or "") for call in getattr(acc, "tool_calls", [])
            )
            answer = (getattr(acc, "content", "") or "") + tool_args
            record.reasoning_tokens = estimate_text_tokens(reasoning) if reasoning else None
            record.completion_tokens = estimate_text_tokens(answer) + (record.reasoning_tokens or 0)
        elif body_text is not None:
            record.completion_tokens = estimate_text_tokens(body_text)


def _set_tokens(record: UsageRecord, tokens: Tokens) -> None:
    record.prompt_tokens = tokens.prompt_tokens
    record.prompt_cache_hit_tokens = tokens.prompt_cache_hit_tokens
    record.prompt_cache_miss_tokens = tokens.prompt_cache_miss_tokens
    record.completion_tokens = tokens.completion_tokens
    record.reasoning_tokens = tokens.reasoning_tokens
    record.usage_estimated = False


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
