"""`captrt serve` against slow, greedy and odd clients (docs/security.md): partial headers, stalled
bodies, idle connections, one address holding many connections, keys with whitespace, HEAD, a
multipart body cut off, a huge suppress list. One real server with small limits; raw sockets where
no HTTP library would send such a request. Loopback only: 127.0.0.2 ... act as other clients."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.raw_http import connect, read_answer, request
from tests.serve.server_process import ServerProcess, metric

KEY = "secret-7c1e"
HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE = 1.5, 1.0, 1.0
MAX_CONNECTIONS, PER_CLIENT = 32, 8
PARTIAL = b"POST /v1/captions HTTP/1.1\r\nHost: x\r\n"  # headers that never end


@pytest.fixture(scope="module")
def srv(serve_model_dir, tmp_path_factory):
    """Small limits, and a key that ends with a newline, as `$(cat keyfile)` variants and secret mounts give."""
    log = tmp_path_factory.mktemp("harden") / "server.log"
    with ServerProcess(serve_model_dir, "--max-connections", str(MAX_CONNECTIONS), "--max-connections-per-client",
                       str(PER_CLIENT), "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                       "--keep-alive-timeout", str(KEEP_ALIVE), "--max-batch", "4", "--api-key-env", "CAPTRT_HARDEN_KEY",
                       env={"CAPTRT_HARDEN_KEY": f" {KEY}\n"}, log=log) as server:
        yield server


def caption(srv, image: bytes, **kw) -> httpx.Response:
    return httpx.post(srv.url + "/v1/captions", files=[("image", ("a.jpg", image, "image/jpeg"))],
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30, **kw)


def raw_post(body: bytes, content_type: str, *, length: int | None = None, extra: str = "") -> bytes:
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n")
    return head.encode() + body


def test_one_client_with_partial_headers_cannot_deny_service(srv, jpegs):
    """Three times --max-connections partial-header connections from 127.0.0.2: beyond its per-client
    cap each is answered 503 and closed at once; the held ones are closed (408) after the header
    timeout; meanwhile /healthz and a caption from another client get 200 within a few seconds."""
    opened: list[tuple[object, float]] = []
    refused = 0
    for _ in range(3 * MAX_CONNECTIONS):
        sock = connect(srv.port, "127.0.0.2")
        sock.sendall(PARTIAL)
        opened.append((sock, time.monotonic()))
    started = time.monotonic()
    health = httpx.get(srv.url + "/healthz", timeout=5)
    r = caption(srv, jpegs[0], params={"beam_size": "2", "max_steps": "8"})
    assert health.status_code == 200 and r.status_code == 200, r.text
    assert time.monotonic() - started < 5
    held = []
    for sock, at in opened:
        answer = read_answer(sock, HEADER_TIMEOUT + 10)
        sock.close()
        if answer.status == 503:
            refused += 1
            assert "--max-connections-per-client is 8" in answer.json()["detail"] and answer.seconds < 1
        else:
            held.append(time.monotonic() - at)
            assert answer.status == 408 and answer.closed and "--header-timeout" in answer.json()["detail"]
    assert refused == 3 * MAX_CONNECTIONS - PER_CLIENT and len(held) == PER_CLIENT
    assert all(HEADER_TIMEOUT - 0.2 < t < HEADER_TIMEOUT + 5 for t in held), held
    text = httpx.get(srv.url + "/metrics").text
    assert metric(text, "captrt_connections_closed_total", reason="per_client_limit") >= refused
    assert metric(text, "captrt_connections_closed_total", reason="header_timeout") >= PER_CLIENT


def test_many_addresses_fill_the_service_only_until_the_header_timeout(srv):
    """Five addresses x the per-client cap exceed --max-connections: requests get 503 while they hold
    every slot, and the header timeout frees them; connections that never send a byte are closed too."""
    socks = []
    for i in range(2, 7):
        for _ in range(PER_CLIENT):
            sock = connect(srv.port, f"127.0.0.{i}")
            if i % 2:
                sock.sendall(PARTIAL)
            socks.append(sock)
    time.sleep(0.2)
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 503  # uvicorn's --max-connections
    deadline = time.monotonic() + HEADER_TIMEOUT + 5
    while httpx.get(srv.url + "/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the partial connections were never closed"
        time.sleep(0.1)
    for sock in socks:
        answer = read_answer(sock, 5)
        assert answer.closed and answer.status in (None, 408, 503)
        sock.close()


def test_a_stalled_body_is_408_after_the_body_timeout(srv):
    """Content-Length 5000 and 10 bytes sent: 408 naming --body-timeout after about a second (not the
    request timeout's 504 after 30 s), and the connection is closed."""
    answer = request(srv.port, raw_post(b"x" * 10, "image/jpeg", length=5000), timeout=20)
    assert answer.status == 408 and answer.closed, answer
    assert "--body-timeout" in answer.json()["detail"] and BODY_TIMEOUT - 0.2 < answer.seconds < BODY_TIMEOUT + 5


def test_idle_and_slow_keep_alive_connections_are_closed(srv):
    with connect(srv.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock, 10).status == 200
        started = time.monotonic()
        assert read_answer(sock, KEEP_ALIVE + 5).closed  # idle after a response: --keep-alive-timeout
        assert KEEP_ALIVE - 0.2 < time.monotonic() - started < KEEP_ALIVE + 5
    with connect(srv.port) as sock:  # a second request whose headers never end
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock, 10).status == 200
        sock.sendall(b"GET /hea")
        answer = read_answer(sock, HEADER_TIMEOUT + 5)
        assert answer.status == 408 and answer.closed


def test_the_key_ignores_surrounding_whitespace_everywhere(srv, jpegs):
    """The key was configured as ' KEY\\n': clients sending KEY, 'KEY ' or ' KEY' get in, by both headers."""
    for header in (f"Authorization: Bearer {KEY}", f"Authorization: Bearer {KEY} ", f"X-API-Key: {KEY} ",
                   f"X-API-Key:  {KEY}", f"authorization: bearer   {KEY}"):
        answer = request(srv.port, f"GET /v1/model HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode(), timeout=10)
        assert answer.status == 200, (header, answer)
    for header in (f"X-API-Key: {KEY}x", f"Authorization: Bearer {KEY[:-1]}", "X-API-Key: "):
        answer = request(srv.port, f"GET /v1/model HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode(), timeout=10)
        assert answer.status == 401, (header, answer)
    assert caption(srv, jpegs[1], params={"beam_size": "1", "max_steps": "4"}).status_code == 200


def test_head_on_every_get_route(srv):
    """Same status and headers as GET, no body; the probe routes stay open without the key."""
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/", "/ui/app.js", "/ui/style.css", "/healthz", "/readyz", "/metrics", "/v1/model", "/docs",
                 "/openapi.json", "/redoc"):
        get = httpx.get(srv.url + path, headers=auth)
        head = httpx.head(srv.url + path, headers=auth)
        assert get.status_code == head.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        if path != "/metrics":  # the scrape itself changes the counters
            assert head.headers["content-length"] == get.headers["content-length"], path
    assert httpx.head(srv.url + "/v1/model").status_code == 401
    assert httpx.head(srv.url + "/v1/captions").status_code == 405
    assert httpx.get(srv.url + "/readyz").status_code == httpx.get(srv.url + "/metrics").status_code == 200
    assert metric(httpx.get(srv.url + "/metrics").text, "captrt_requests_total", route="/healthz", method="HEAD",
                  status="200") >= 1


def test_a_multipart_body_cut_off_is_malformed(srv, jpegs):
    part = (b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")
    for body in (part + jpegs[0][:500],                                 # mid-part
                 part + jpegs[0] + b"\r\n" + part + jpegs[1][:300],    # a whole image, then mid-part
                 part + jpegs[0] + b"\r\n"):                           # no closing boundary at all
        answer = request(srv.port, raw_post(body, "multipart/form-data; boundary=B"), timeout=20)
        assert answer.status == 400, answer
        assert answer.json()["detail"].startswith("malformed multipart body: it ends before its closing boundary")
    whole = request(srv.port, raw_post(part + jpegs[0] + b"\r\n--B--\r\n", "multipart/form-data; boundary=B"))
    assert whole.status == 200, whole


def test_a_long_suppress_list_is_echoed_bounded(srv, jpegs):
    r = caption(srv, jpegs[2], data={"suppress": " ".join(["a"] * 5000), "beam_size": "1", "max_steps": "4"})
    assert r.status_code == 200, r.text
    params = r.json()["params"]
    assert params["suppress"] == ["a"] * 32 and params["suppress_count"] == 5000
    assert len(r.content) < 4000
    r = caption(srv, jpegs[2], data={"suppress": "a", "beam_size": "1", "max_steps": "4"})
    assert r.json()["params"]["suppress"] == ["a"] and "suppress_count" not in r.json()["params"]


def test_no_traceback_in_the_log(srv):
    assert "Traceback" not in srv.log_text(), srv.log_text()[-3000:]

