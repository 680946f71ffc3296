"""The proxy as an attack surface (issue 7): nobody is let in, nothing is let out.

Extends tests/test_proxy.py and tests/test_proxy_http.py (absolute-form, CONNECT, ``*`` and
dot-segment targets, ``Host`` / ``X-Forwarded-Host`` tricks, body limits, the key in
rows/logs/pages are theirs) with what a hostile client or a misconfigured environment
can still try:

* any request target at all (hypothesis): what is accepted goes to the configured host,
  under its base path, with no dot segment however often it is percent-decoded;
* an ambient ``HTTP(S)_PROXY`` or an upstream's redirect never sends a call elsewhere;
* header injection through ``X-Dsmeter-Tags`` (control characters, bare CR, obs-fold, a
  space before the colon) and request smuggling (``Content-Length`` with ``chunked``) are
  refused before anything reaches the upstream; repeated tags headers combine as HTTP says;
* tags are bounded per call (count and sizes), and no client input can grow ``/metrics``;
* request line and header sizes are bounded;
* ``dsmeter proxy`` listens on loopback only unless told otherwise.

The upstreams are the bundled simulator (one as the configured upstream, one as the
"evil" host a request tries to reach), both on loopback.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from collector.metering import MAX_TAGS
from collector.proxy import ProxyConfig
from collector.proxy_http import BadTarget, checked_target, parse_upstream
from collector.simulator import Simulator
from collector.store import LedgerStore
from proxy_support import StartProxy

KEY = "sk-test-proxy-security-5c2e8f1a9b"
BODY = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Hello."}]}


def _served(sim: Simulator, n: int, timeout: float = 5.0) -> bool:
    """Exactly ``n`` calls reached ``sim`` (it logs a call when it has finished serving it)."""
    deadline = time.monotonic() + timeout
    while len(sim.calls) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # and no more arrive
    return len(sim.calls) == n


@pytest.fixture
def sims() -> Iterator[tuple[Simulator, Simulator]]:
    with Simulator(seed=3) as upstream, Simulator(seed=3) as evil:
        yield upstream, evil


def _raw(base_url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (no client library to tidy them up); return the status line."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0]


def _post_head(extra: bytes, body: bytes, target: bytes = b"/chat/completions") -> bytes:
    return (b"POST " + target + b" HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
            + b"Content-Type: application/json\r\n" + extra + b"Content-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n")


# -- where a request can go ------------------------------------------------------------------------

_TARGET_PIECES = ["/", "//", "..", ".", "%2e", "%2E", "%252e", "%2f", "%5c", "\\", "@", ":", "?", "#", "evil.example",
                  "chat", "completions", "v1", "%00", "%", "%%", ";", "~", "é", " ", "\t", "http:", "https://", "*"]
targets = st.lists(st.one_of(st.sampled_from(_TARGET_PIECES), st.text(max_size=4)), max_size=12).map("".join)


def _fully_decoded(path: str) -> str:
    for _ in range(5):
        once = unquote(path)
        if once == path:
            break
        path = once
    return path


@settings(max_examples=400, deadline=None)
@given(target=targets, base=st.sampled_from(["", "/v1", "/deep/seek"]))
def test_any_accepted_target_stays_on_the_configured_host_and_under_its_base_path(target: str, base: str) -> None:
    upstream = parse_upstream(f"http://127.0.0.1:9000{base}")
    try:
        accepted = checked_target(target)
    except BadTarget:
        return
    # The request line the proxy writes: nothing in the target can split it or add a header.
    assert len(f"POST {upstream.path_for(accepted)} HTTP/1.1".split(" ")) == 3
    url = URL(upstream.url_for(accepted), encoded=True)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 9000)
    assert url.raw_path.startswith(base + "/")
    segments = _fully_decoded(url.raw_path).replace("\\", "/").split("/")
    assert "." not in segments and ".." not in segments


def test_an_ambient_http_proxy_setting_never_reroutes_a_call(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream, evil = sims
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, evil.base_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    proxy, sink = start_proxy(upstream.base_url)
    with httpx.Client(trust_env=False) as client:
        response = client.post(proxy.base_url + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert _served(upstream, 1) and evil.calls == []
    assert [r.status for r in sink.wait(1)] == ["completed"]


class _Redirecting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    location = ""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(307)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_an_upstream_redirect_is_handed_back_never_followed(sims: tuple[Simulator, Simulator], start_proxy: StartProxy) -> None:
    _, evil = sims
    handler = type("Redirect", (_Redirecting,), {"location": evil.base_url + "/chat/completions"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        proxy, sink = start_proxy(f"http://127.0.0.1:{server.server_address[1]}")
        with httpx.Client(follow_redirects=False) as client:
            response = client.post(proxy.base_url + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 307 and response.headers["location"].startswith(evil.base_url)
        assert evil.calls == []  # the proxy did not follow it; a client that does is on its own
        record = sink.wait(1)[0]
        # Regression: a 3xx was a "disconnected" row with estimated tokens, as if a call had run.
        assert record.status == "error" and record.http_status == 307 and record.error_type == "http_307"
        assert record.prompt_tokens is None and not record.usage_estimated
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- header injection and smuggling ---------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"X-Dsmeter-Tags: team=a\r\n X-Evil: 1\r\n",  # obs-fold: a continuation line
        b"X-Dsmeter-Tags: team=a\rX-Evil: 1\r\n",  # a bare CR
        b"X-Dsmeter-Tags: team=a\x00b\r\n",
        b"X-Dsmeter-Tags: team=a\x1bb\r\n",
        b"X-Dsmeter-Tags: team=a\tX-Evil: 1\r\n",  # legal in HTTP, never in a tag
        b"X-Dsmeter-Tags : team=a\r\n",  # whitespace before the colon
        b"X-Dsmeter-Tags: team=a\r\nTransfer-Encoding: chunked\r\n",  # Content-Length and chunked: smuggling
    ],
    ids=["obs-fold", "bare-cr", "nul", "escape", "tab", "space-before-colon", "cl-and-te"],
)
def test_header_injection_and_smuggling_attempts_are_refused_before_anything_is_forwarded(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy, header: bytes
) -> None:
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    body = json.dumps(BODY).encode()
    status = _raw(proxy.base_url, _post_head(header, body), body)
    assert re.match(rb"HTTP/1\.[01] 400 ", status), status
    time.sleep(0.1)
    assert upstream.calls == [] and sink.records == []


def test_a_smuggled_second_request_never_reaches_the_upstream(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy
) -> None:
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    smuggled = b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    chunked = b"0\r\n\r\n" + smuggled
    head = (b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(chunked)).encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert _raw(proxy.base_url, head, chunked).split(b" ")[1] == b"400"
    time.sleep(0.1)
    assert upstream.calls == [] and sink.records == []


def test_repeated_tags_headers_combine_as_one_list(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy
) -> None:
    # Regression: the proxy read only the first of two X-Dsmeter-Tags headers while the httpx
    # transport (like HTTP itself) reads them as one comma-joined list, so the same request
    # was attributed differently by the two carriers.
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    body = json.dumps(BODY).encode()
    extra = b"X-Dsmeter-Tags: team=a,feature=x\r\nX-Dsmeter-Tags: team=b\r\n"
    assert b" 200 " in _raw(proxy.base_url, _post_head(extra, body), body) + b" "
    record = sink.wait(1)[0]
    assert record.tags == {"team": "b", "feature": "x"}  # a later value wins, as in one header
    assert _served(upstream, 1)


# -- bounded tags and metrics -------------------------------------------------------------------------


def _post(client: httpx.Client, url: str, tags: str | None = None, model: str = "deepseek-v4-flash") -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    if tags is not None:
        headers["X-Dsmeter-Tags"] = tags
    return client.post(url + "/chat/completions", json={**BODY, "model": model}, headers=headers)


def test_tags_are_bounded_per_call_in_count_and_size(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy, sqlite_url: str
) -> None:
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    fits = ",".join(f"k{i:02d}{'x' * 61}={'v' * 128}" for i in range(MAX_TAGS))  # 16 tags, 64-char keys, 128-char values
    too_many = ",".join(f"k{i}=v" for i in range(MAX_TAGS + 1))
    with httpx.Client(timeout=10) as client:
        assert _post(client, proxy.base_url, fits).status_code == 200
        refused = [_post(client, proxy.base_url, tags) for tags in
                   (too_many, "k" * 65 + "=v", "k=" + "v" * 129, "k=a=b", "=v", "k=v,,")]
    assert [r.status_code for r in refused] == [400] * len(refused)
    assert all(r.json()["error"]["code"] == "invalid_tags" for r in refused)
    assert _served(upstream, 1)
    records = sink.wait(1)
    assert len(records) == 1 and len(records[0].tags) == MAX_TAGS
    store = LedgerStore(sqlite_url)
    try:
        store.insert(records)
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT count(*), max(length(key)), max(length(value)) FROM call_tags").one()
    finally:
        store.close()
    assert tuple(rows) == (MAX_TAGS, 64, 128)


def _metric_series(text: str) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]


def test_no_client_input_grows_the_metrics(sims: tuple[Simulator, Simulator], start_proxy: StartProxy) -> None:
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    calls = 150
    with httpx.Client(timeout=10) as client:
        for i in range(calls):
            _post(client, proxy.base_url, f"tenant{i}=t{i},user=u{i}", model=f"model-{i}-{'x' * 80}")
        for i in range(20):  # unmetered paths and refused targets with client-chosen parts
            client.get(proxy.base_url + f"/v1/models/m{i}")
            client.get(proxy.base_url + f"/%2e%2e/p{i}")
        metrics = client.get(proxy.base_url + "/metrics").text
    assert len(sink.wait(calls)) == calls
    series = _metric_series(metrics)
    models = {m for s in series for m in re.findall(r'model="([^"]*)"', s)}
    assert len(models) <= 64 + 1 and "other" in models  # the first 64 names, then "other"
    assert all(len(m) <= 64 for m in models)
    assert "tenant" not in metrics and "user=" not in metrics and "/v1/models/m" not in metrics
    # A fixed set of series per model label, whatever else the clients sent.
    per_model = len([s for s in series if 'model="other"' in s])
    assert len(series) <= (len(models) + 1) * per_model + 100, len(series)


# -- sizes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "head"),
    [
        ("a 20 kB request target", _post_head(b"", b"{}", b"/chat/completions?q=" + b"a" * 20_000)),
        ("a 20 kB header", _post_head(b"X-Padding: " + b"a" * 20_000 + b"\r\n", b"{}")),
        ("a 20 kB tags header", _post_head(b"X-Dsmeter-Tags: k=" + b"v" * 20_000 + b"\r\n", b"{}")),
        ("300 headers", _post_head(b"".join(b"X-H%d: v\r\n" % i for i in range(300)), b"{}")),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_oversized_request_lines_and_headers_are_refused_before_anything_is_forwarded(
    sims: tuple[Simulator, Simulator], start_proxy: StartProxy, what: str, head: bytes
) -> None:
    upstream, _ = sims
    proxy, sink = start_proxy(upstream.base_url)
    status = _raw(proxy.base_url, head, b"{}")
    assert re.match(rb"HTTP/1\.[01] (400|413|414|431) ", status), (what, status)
    time.sleep(0.1)
    assert upstream.calls == [] and sink.records == []


# -- loopback by default --------------------------------------------------------------------------------


def _other_local_addresses() -> list[str]:
    """127.0.0.2 (loopback, but not the address bound) and this host's outward address, if it has one."""
    addresses = ["127.0.0.2"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            outward = probe.getsockname()[0]
        if not outward.startswith("127."):
            addresses.append(outward)
    except OSError:
        pass
    return addresses


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_dsmeter_proxy_listens_on_loopback_only_unless_told_otherwise(sims: tuple[Simulator, Simulator]) -> None:
    upstream, _ = sims
    process = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "proxy", "--upstream", upstream.base_url, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or []], daemon=True).start()
    try:
        line = lines.get(timeout=60)
        match = re.search(r"listening on http://([\d.]+):(\d+)", line)
        assert match, line
        host, port = match.group(1), int(match.group(2))
        assert host == "127.0.0.1"
        assert _reachable("127.0.0.1", port)
        for other in _other_local_addresses():
            assert not _reachable(other, port), f"the proxy answers on {other}"
    finally:
        process.terminate()
        process.wait(30)
    assert ProxyConfig(upstream="http://127.0.0.1:1").host == "127.0.0.1"
