"""The proxy's own HTTP/1.1 on both sides (``collector.proxy_wire``, ``collector.upstream_pool``).

What tests/test_proxy.py cannot see through a well-behaved client and the simulator: bytes as
a raw socket sends them (pipelining, HTTP/1.0, HEAD, exact refusal codes), and an upstream
written here byte by byte (a reused connection, one closed while idle, a body that ends
with the connection, TLS, a client too slow to keep up).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from collector.simulator import Simulator
from proxy_support import StartProxy

KEY = "sk-test-proxy-wire-7d1e0c44aa"
CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Hello."}]}


def _address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _read_response(sock: socket.socket, buffered: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    """One response off a raw socket: status line, headers (lowercased names) and the decoded body."""

    def fill() -> bool:
        data = sock.recv(65536)
        buffered.extend(data)
        return bool(data)

    while b"\r\n\r\n" not in buffered:
        if not fill():
            raise AssertionError(f"connection closed inside a response head: {bytes(buffered)!r}")
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    buffered[:] = rest
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    code = int(status.split(" ")[1])
    if code in (204, 304) or "head-request" in headers:
        return status.encode(), headers, b""
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffered) < length:
            if not fill():
                raise AssertionError("connection closed inside a body")
        body = bytes(buffered[:length])
        del buffered[:length]
        return status.encode(), headers, body
    if headers.get("transfer-encoding") == "chunked":
        body = bytearray()
        while True:
            while b"\r\n" not in buffered:
                fill()
            size_line, _, _ = bytes(buffered).partition(b"\r\n")
            size = int(size_line, 16)
            del buffered[: len(size_line) + 2]
            while len(buffered) < size + 2:
                fill()
            body += buffered[:size]
            del buffered[: size + 2]
            if size == 0:
                return status.encode(), headers, bytes(body)
    while fill():  # close-delimited
        pass
    body = bytes(buffered)
    buffered.clear()
    return status.encode(), headers, body


def _post(path: str, body: bytes, *, version: str = "1.1", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: proxy\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


# -- a client's bytes ---------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_each_forwarded_and_metered_once(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, sink = start_proxy(sim.base_url)
        first = json.dumps({**CHAT, "messages": [{"role": "user", "content": "first"}]}).encode()
        second = json.dumps({**CHAT, "model": "deepseek-v4-pro"}).encode()
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(_post("/chat/completions", first) + _post("/chat/completions", second))
            buffered = bytearray()
            answers = [_read_response(sock, buffered) for _ in range(2)]
        assert [json.loads(body)["model"] for _, _, body in answers] == ["deepseek-v4-flash", "deepseek-v4-pro"]
        records = sink.wait(2)
        assert sorted(r.requested_model or "" for r in records) == ["deepseek-v4-flash", "deepseek-v4-pro"]
        assert all(r.status == "completed" for r in records)
        assert len(sim.calls) == 2


def test_a_request_sent_while_the_previous_answer_still_streams_waits_its_turn(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, sink = start_proxy(sim.base_url)
        slow = json.dumps({**CHAT, "stream": True}).encode()
        quick = json.dumps(CHAT).encode()
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(_post("/chat/completions", slow, extra="X-Simulator-Chunk-Delay-Ms: 20\r\n"))
            buffered = bytearray(sock.recv(65536))  # the stream has begun
            sock.sendall(_post("/chat/completions", quick))
            _, _, streamed = _read_response(sock, buffered)
            _, _, answered = _read_response(sock, buffered)
        assert streamed.rstrip().endswith(b"data: [DONE]")
        assert json.loads(answered)["object"] == "chat.completion"
        assert sorted(r.stream for r in sink.wait(2)) == [False, True]


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, sink = start_proxy(sim.base_url)
        body = json.dumps(CHAT).encode()
        head = _post("/chat/completions", b"", extra="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(body))
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(head)
            assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            status, _, answer = _read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 200") and json.loads(answer)["usage"]["completion_tokens"] > 0
        assert [r.status for r in sink.wait(1)] == ["completed"]


def test_an_http_1_0_client_gets_a_stream_that_ends_with_the_connection(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, sink = start_proxy(sim.base_url)
        body = json.dumps({**CHAT, "stream": True}).encode()
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(_post("/chat/completions", body, version="1.0"))
            status, headers, payload = _read_response(sock, bytearray())
        assert status.startswith(b"HTTP/1.1 200")
        assert "transfer-encoding" not in headers and headers.get("connection") == "close"
        assert payload.rstrip().endswith(b"data: [DONE]")
        [record] = sink.wait(1)
        assert record.status == "completed" and record.completion_tokens


def test_head_is_forwarded_without_a_body_and_the_connection_stays_usable(start_proxy: StartProxy) -> None:
    upstream = ScriptedUpstream(lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\nX-Seen: head\r\n\r\n"
                                if request.startswith(b"HEAD") else _ok(b'{"object":"list","data":[]}'))
    with upstream:
        proxy, _ = start_proxy(upstream.url)
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(b"HEAD /models HTTP/1.1\r\nHost: proxy\r\n\r\nGET /models HTTP/1.1\r\nHost: proxy\r\n\r\n")
            buffered = bytearray()
            status, headers, _ = _read_response_to_head(sock, buffered)
            assert status.startswith(b"HTTP/1.1 200") and headers["content-length"] == "42"
            assert headers["x-seen"] == "head"
            _, _, body = _read_response(sock, buffered)
        assert json.loads(body) == {"object": "list", "data": []}


def _read_response_to_head(sock: socket.socket, buffered: bytearray) -> tuple[bytes, dict[str, str], bytes]:
    while b"\r\n\r\n" not in buffered:
        buffered.extend(sock.recv(65536))
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    buffered[:] = rest
    status, *lines = head.decode("latin-1").split("\r\n")
    return status.encode(), {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}, b""


def test_an_upgrade_request_is_answered_in_http_1_1_and_the_upgrade_never_forwarded(start_proxy: StartProxy) -> None:
    # curl --http2 on an http:// URL asks for h2c this way; the answer must still come, in HTTP/1.1.
    upstream = ScriptedUpstream(lambda request: _ok(b'{"seen":%d}' % request.lower().count(b"upgrade")))
    with upstream:
        proxy, _ = start_proxy(upstream.url)
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(b"GET /models HTTP/1.1\r\nHost: proxy\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                         b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                         b"GET /models HTTP/1.1\r\nHost: proxy\r\n\r\n")
            buffered = bytearray()
            answers = [_read_response(sock, buffered) for _ in range(2)]
        assert [status.split(b" ")[1] for status, _, _ in answers] == [b"200", b"200"]
        assert [json.loads(body) for _, _, body in answers] == [{"seen": 0}, {"seen": 0}]


def test_a_connect_request_is_refused_and_its_connection_closed(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, _ = start_proxy(sim.base_url)
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            sock.sendall(b"CONNECT api.deepseek.com:443 HTTP/1.1\r\nHost: api.deepseek.com:443\r\n\r\n\x16\x03\x01")
            status, headers, body = _read_response(sock, bytearray())
            assert status.split(b" ")[1] == b"400" and headers.get("connection") == "close"
            assert json.loads(body)["error"]["code"] == "invalid_request_target"
            assert sock.recv(65536) == b""  # closed: the bytes meant for a tunnel are never read as HTTP
        assert sim.calls == []


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /models?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"GET /models HTTP/1.1\r\nHost: x\r\nX-Never-Ends: " + b"a" * 200_000, 431),
        (b"NOT-HTTP\r\n\r\n", 400),
    ],
    ids=["long-target", "big-header", "101-headers", "header-without-end", "garbage"],
)
def test_oversized_or_malformed_heads_get_their_exact_status_and_nothing_is_forwarded(
    start_proxy: StartProxy, head: bytes, status: int
) -> None:
    with Simulator(seed=11) as sim:
        proxy, _ = start_proxy(sim.base_url)
        with socket.create_connection(_address(proxy.base_url), timeout=10) as sock:
            try:
                for start in range(0, len(head), 16384):  # a head that arrives over many reads
                    sock.sendall(head[start : start + 16384])
                    time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused while it was still sending: the answer is already on its way
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "invalid_request_error"
        time.sleep(0.05)
        assert sim.calls == []
        metrics = httpx.get(proxy.base_url + "/metrics").text
        assert f'dsmeter_proxy_rejected_requests_total{{status="{status}"}} 1' in metrics


# -- the upstream's bytes -------------------------------------------------------------------------------


class ScriptedUpstream:
    """An HTTP/1.1 upstream answering each request with ``answer(request_bytes)``; it records which
    connection each request came on. ``close_after_each`` closes every connection after one answer
    while still saying keep-alive (an upstream that drops idle connections)."""

    def __init__(self, answer: Callable[[bytes], bytes], *, close_after_each: bool = False,
                 close_on_reuse: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.close_after_each = close_after_each
        self.close_on_reuse = close_on_reuse  # closes a kept-alive connection as the next request arrives, unread
        self.tls = tls
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{self.port}"
        self._connections = 0
        self._stop = False

    def __enter__(self) -> ScriptedUpstream:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._connections += 1
            threading.Thread(target=self._serve, args=(conn, self._connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                return
        buffered = b""
        served = 0
        with conn:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffered += data
                head, _, rest = buffered.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    rest += conn.recv(65536)
                buffered = rest[length:]
                if served and self.close_on_reuse:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return  # reset: as if it had timed the connection out just before the request came
                served += 1
                self.requests.append((number, head))
                conn.sendall(self.answer(head + b"\r\n\r\n" + rest[:length]))
                if self.close_after_each:
                    return


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


_COMPLETION = json.dumps({
    "id": "c1", "object": "chat.completion", "model": "deepseek-v4-flash",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
              "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": 10},
}).encode()


def test_sequential_calls_reuse_one_upstream_connection(start_proxy: StartProxy) -> None:
    with ScriptedUpstream(lambda request: _ok(_COMPLETION)) as upstream:
        proxy, sink = start_proxy(upstream.url)
        with httpx.Client() as client:
            for _ in range(3):
                assert client.post(proxy.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert [number for number, _ in upstream.requests] == [1, 1, 1]
        assert [r.completion_tokens for r in sink.wait(3)] == [2, 2, 2]


def test_an_upstream_that_closed_an_idle_connection_gets_each_call_exactly_once(start_proxy: StartProxy) -> None:
    # It says keep-alive, then closes: the proxy's next call finds the pooled connection dead,
    # and must neither fail the call nor send it twice.
    with ScriptedUpstream(lambda request: _ok(_COMPLETION), close_after_each=True) as upstream:
        proxy, sink = start_proxy(upstream.url)
        with httpx.Client() as client:
            for _ in range(5):
                response = client.post(proxy.base_url + "/chat/completions", json=CHAT)
                assert response.status_code == 200, response.text
        assert len(upstream.requests) == 5
        assert len({number for number, _ in upstream.requests}) == 5
        assert [r.status for r in sink.wait(5)] == ["completed"] * 5


def test_a_call_on_a_connection_the_upstream_dropped_as_it_was_reused_is_sent_again_once(start_proxy: StartProxy) -> None:
    # The race every keep-alive client meets: the upstream times a connection out just as a
    # request goes down it, and closes it without reading it. The call must still be made, once.
    with ScriptedUpstream(lambda request: _ok(_COMPLETION), close_on_reuse=True) as upstream:
        proxy, sink = start_proxy(upstream.url)
        with httpx.Client() as client:
            for _ in range(3):
                response = client.post(proxy.base_url + "/chat/completions", json=CHAT)
                assert response.status_code == 200, response.text
        assert [number for number, _ in upstream.requests] == [1, 2, 3]
        assert [r.status for r in sink.wait(3)] == ["completed"] * 3


def test_a_stream_longer_than_the_gap_timeout_is_no_timeout_while_chunks_keep_coming(start_proxy: StartProxy) -> None:
    with Simulator(seed=11) as sim:
        proxy, sink = start_proxy(sim.base_url, read_timeout=0.25)
        body = {**CHAT, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}", "X-Simulator-Chunk-Delay-Ms": "40",
                   "X-Simulator-Output-Tokens": "25"}  # about a second of stream, never 0.25 s silent
        began = time.monotonic()
        response = httpx.post(proxy.base_url + "/chat/completions", json=body, headers=headers, timeout=10)
        assert time.monotonic() - began > 0.75
        assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
        [record] = sink.wait(1)
        assert record.status == "completed" and record.completion_tokens == 25


def test_a_body_that_ends_with_the_upstream_connection_is_complete(start_proxy: StartProxy) -> None:
    events = b"".join(
        b'data: {"id":"s1","object":"chat.completion.chunk","model":"deepseek-v4-flash","choices":[{"index":0,'
        b'"delta":{"content":"%b"},"finish_reason":null}]}\n\n' % word for word in (b"a", b"b", b"c")
    ) + (b'data: {"id":"s1","object":"chat.completion.chunk","model":"deepseek-v4-flash","choices":[{"index":0,'
         b'"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8,'
         b'"prompt_cache_hit_tokens":0,"prompt_cache_miss_tokens":5}}\n\ndata: [DONE]\n\n')
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + events
    with ScriptedUpstream(lambda request: answer, close_after_each=True) as upstream:
        proxy, sink = start_proxy(upstream.url)
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        response = httpx.post(proxy.base_url + "/chat/completions", json=body, timeout=10)
        assert response.status_code == 200 and response.content == events
        [record] = sink.wait(1)
        assert (record.status, record.completion_tokens, record.prompt_cache_miss_tokens) == ("completed", 3, 5)


def test_a_client_too_slow_to_keep_up_still_gets_every_byte_in_order(start_proxy: StartProxy) -> None:
    # 8 MiB from an upstream faster than the client: the proxy must pause the upstream, not
    # buffer it all, and lose nothing when it resumes.
    blob = bytes(range(256)) * (8 * 4096)
    with ScriptedUpstream(lambda request: b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: %d\r\n\r\n%b" % (len(blob), blob)) as upstream:
        proxy, _ = start_proxy(upstream.url)
        with socket.create_connection(_address(proxy.base_url), timeout=20) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.sendall(b"GET /files/blob HTTP/1.1\r\nHost: proxy\r\n\r\n")
            received = bytearray()
            time.sleep(0.5)  # let the proxy fill every buffer it has before we read a byte
            while b"\r\n\r\n" not in received:
                received += sock.recv(4096)
            head, _, body = bytes(received).partition(b"\r\n\r\n")
            received = bytearray(body)
            while len(received) < len(blob):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        assert bytes(received) == blob


# -- TLS to the upstream ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


def _server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_an_https_upstream_is_reached_over_verified_tls(
    start_proxy: StartProxy, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust our test CA the way an operator would
    with ScriptedUpstream(lambda request: _ok(_COMPLETION), tls=_server_context(cert, key)) as upstream:
        proxy, sink = start_proxy(upstream.url)
        response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT, timeout=10)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
        [record] = sink.wait(1)
        assert record.status == "completed" and record.upstream == upstream.url
        assert upstream.requests and b"\r\nHost: localhost:%d\r\n" % upstream.port in upstream.requests[0][1]


def test_an_upstream_whose_certificate_is_not_trusted_is_a_502_and_an_error_row(
    start_proxy: StartProxy, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    with ScriptedUpstream(lambda request: _ok(_COMPLETION), tls=_server_context(cert, key)) as upstream:
        proxy, sink = start_proxy(upstream.url)
        response = httpx.post(proxy.base_url + "/chat/completions", json=CHAT, timeout=10)
        assert response.status_code == 502
        assert "TLS" in response.json()["error"]["message"]
        [record] = sink.wait(1)
        assert record.status == "error" and record.error_type == "UpstreamUnreachable"
        assert upstream.requests == []
