"""The proxy's forwarding rules on their own: which targets may go upstream, which headers cross."""

from __future__ import annotations

import pytest

from collector.errors import UsageError
from collector.proxy_http import BadTarget, checked_target, parse_upstream, request_headers, response_headers


def test_upstream_url_keeps_its_base_path_and_appends_the_request_target() -> None:
    upstream = parse_upstream("https://api.deepseek.com/anthropic/")
    assert upstream.origin == "https://api.deepseek.com"
    assert upstream.url_for("/v1/messages?beta=true") == "https://api.deepseek.com/anthropic/v1/messages?beta=true"


def test_upstream_with_port_and_ipv6_host_renders_a_valid_origin() -> None:
    assert parse_upstream("http://127.0.0.1:9000").origin == "http://127.0.0.1:9000"
    assert parse_upstream("http://[::1]:9000").origin == "http://[::1]:9000"


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("ftp://api.deepseek.com", "http:// or https://"),
        ("https://", "no host"),
        ("https://user:sk-secret@api.deepseek.com", "credentials"),
        ("https://api.deepseek.com/?a=1", "query"),
        ("https://api.deepseek.com:99999", "not a valid URL"),
        ("https://api.deepseek.com/a/../b", "dot segments"),
    ],
)
def test_bad_upstream_urls_are_a_usage_error_that_never_echoes_a_password(url: str, complaint: str) -> None:
    with pytest.raises(UsageError, match=complaint) as caught:
        parse_upstream(url)
    assert "sk-secret" not in str(caught.value)


@pytest.mark.parametrize(
    "target",
    [
        "http://evil.example/chat/completions",  # absolute-form: a forward-proxy request
        "https://evil.example",
        "evil.example:443",  # authority-form (CONNECT)
        "*",  # asterisk-form
        "/v1/../../admin",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2e/admin",
        "/v1/%252e%252e/admin",  # double-encoded, decoded by a hop behind the upstream
        "/v1/./chat",
        "/v1/..%5cadmin",  # an encoded backslash some servers treat as a slash
        "/v1/chat completions",
        "/v1/chat\\..\\admin",
        "/chat#frag",
    ],
)
def test_targets_that_could_leave_the_upstream_or_its_base_path_are_refused(target: str) -> None:
    with pytest.raises(BadTarget):
        checked_target(target)


@pytest.mark.parametrize(
    "target",
    ["/chat/completions", "/v1/chat/completions?x=%41", "/anthropic/v1/messages", "//double/slash", "/a..b/c.d"],
)
def test_origin_form_targets_pass_unchanged(target: str) -> None:
    assert checked_target(target) == target


def test_double_slash_target_still_goes_to_the_configured_host() -> None:
    upstream = parse_upstream("http://127.0.0.1:9000")
    url = upstream.url_for(checked_target("//evil.example/x"))
    assert url.startswith("http://127.0.0.1:9000//")


def test_request_headers_drop_hop_by_hop_host_length_and_the_tags_header() -> None:
    sent = [
        ("Host", "evil.example"),
        ("Connection", "keep-alive, X-Private"),
        ("X-Private", "hop-only"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "12"),
        ("Proxy-Authorization", "Basic abc"),
        ("TE", "trailers"),
        ("Upgrade", "h2c"),
        ("X-Dsmeter-Tags", "team=search"),
        ("Authorization", "Bearer sk-live"),
        ("Content-Type", "application/json"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
    ]
    out = request_headers(sent, metered=False)
    assert out == [
        ("Authorization", "Bearer sk-live"),
        ("Content-Type", "application/json"),
        ("X-Custom", "a"),
        ("X-Custom", "b"),
    ]


def test_metered_requests_ask_the_upstream_for_an_uncompressed_body() -> None:
    out = request_headers([("Accept-Encoding", "gzip, br"), ("Accept", "text/event-stream")], metered=True)
    assert out == [("Accept", "text/event-stream"), ("Accept-Encoding", "identity")]
    unmetered = request_headers([("Accept-Encoding", "gzip, br")], metered=False)
    assert unmetered == [("Accept-Encoding", "gzip, br")]


def test_response_headers_keep_length_only_when_the_body_is_forwarded_unchanged() -> None:
    upstream = [
        ("Content-Type", "application/json"),
        ("Content-Length", "42"),
        ("Connection", "close"),
        ("Transfer-Encoding", "chunked"),
        ("Set-Cookie", "a=1"),
        ("x-ds-trace-id", "t1"),
    ]
    assert response_headers(upstream, keep_length=False) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("x-ds-trace-id", "t1"),
    ]
    assert ("Content-Length", "42") in response_headers(upstream, keep_length=True)
