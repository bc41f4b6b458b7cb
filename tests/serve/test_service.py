"""The real service (uvicorn in a subprocess, demo-sized model): captions, batching, every error code,
metrics, disconnecting clients, flat memory over many requests."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from captrt.runtime import Captioner
from captrt.runtime.model_dir import ModelDir
from tests.serve.conftest import encode
from tests.serve.server_process import metric


def post(srv, files=None, *, params=None, headers=None, content=None, content_type=None, timeout=60.0, data=None):
    headers = dict(headers or {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    return httpx.post(srv.url + "/v1/captions", files=files, params=params, headers=headers, content=content,
                      timeout=timeout, data=data)


def parts(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


def scrape(srv) -> str:
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def test_operations_endpoints(server, auth, serve_model_dir):
    health = httpx.get(server.url + "/healthz")
    assert health.json() == {"status": "ok"} and len(health.headers["x-request-id"]) == 32
    assert httpx.get(server.url + "/healthz", headers={"X-Request-ID": "abc-1"}).headers["x-request-id"] == "abc-1"
    ready = httpx.get(server.url + "/readyz").json()
    info = httpx.get(server.url + "/v1/model", headers=auth).json()
    assert ready["model"] == info["id"] and info["id"].startswith("model@")
    model = ModelDir.load(serve_model_dir)
    assert (info["grid"], info["vocab_size"], info["image_size"], info["max_beam"]) == (8, model.vocab_size, 256, 10)
    assert info["engine"] == "ort" and info["provider"] == "CPUExecutionProvider" and info["precision"] == "fp32"
    assert "fp32" in info["precisions"] and info["max_batch"] == 16
    assert info["verification"] == {"status": "exact", "source": None}  # fp32 on ORT's CPU provider
    assert httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/captions"]["post"]["parameters"]
    maps = open(f"/proc/{server.pid}/maps").read()  # the running service never loaded torch
    assert "libtorch" not in maps and "onnxruntime" in maps
    text = scrape(server)
    assert "captrt_ready 1.0" in text and "captrt_queue_depth" in text and "captrt_batch_size_bucket" in text


def test_captions_equal_captioner(server, auth, jpegs, serve_model_dir):
    """One multipart request with 4 images, and 4 raw-body requests: the same tokens as the library."""
    with Captioner.load(serve_model_dir) as cap:
        expected = cap.caption(jpegs[:4], beam_size=5)
    r = post(server, parts(jpegs[:4]), headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["params"] == {"beam_size": 5, "max_steps": 50, "attention": False, "length_penalty": 0.0}
    got = body["captions"]
    assert [c["name"] for c in got] == [f"img{i}.jpg" for i in range(4)]
    assert [c["tokens"] for c in got] == [e.tokens for e in expected]
    assert [c["caption"] for c in got] == [e.text for e in expected]
    assert all(abs(c["score"] - e.score) < 1e-3 for c, e in zip(got, expected))
    for data, e in zip(jpegs[:4], expected):
        one = post(server, content=data, content_type="image/jpeg", headers=auth).json()["captions"]
        assert [(c["name"], c["tokens"]) for c in one] == [("body", e.tokens)]


def test_parameters_and_attention(server, auth, jpegs, serve_model_dir):
    with Captioner.load(serve_model_dir) as cap:
        [e] = cap.caption(jpegs[5], beam_size=2, max_steps=4, return_attention=True)
    r = post(server, parts([jpegs[5]]), params={"beam_size": "2", "max_steps": "4", "attention": "true"}, headers=auth)
    assert r.status_code == 200, r.text
    [c] = r.json()["captions"]
    assert c["tokens"] == e.tokens and len(c["tokens"]) <= 4
    assert len(c["attention"]) == len(e.tokens) and len(c["attention"][0]) == 8 and len(c["attention"][0][0]) == 8
    # form fields work like query parameters
    r = post(server, parts([jpegs[5]]) + [("beam_size", (None, "2")), ("max_steps", (None, "4"))], headers=auth)
    assert r.json()["captions"][0]["tokens"] == e.tokens


def test_concurrent_clients_share_batches(server, auth, jpegs, serve_model_dir):
    """32 clients at once: same captions as the library, and the engine saw batches larger than one."""
    with Captioner.load(serve_model_dir) as cap:
        expected = {i: c.tokens for i, c in enumerate(cap.caption(jpegs))}
    before = scrape(server)

    async def client(http: httpx.AsyncClient, k: int) -> list[tuple[int, int, list[int]]]:
        out = []
        for rep in range(2):
            i = (k + rep) % len(jpegs)
            r = await http.post("/v1/captions", files=parts([jpegs[i]]), headers=auth)
            out.append((i, r.status_code, r.json()["captions"][0]["tokens"] if r.status_code == 200 else r.text))
        return out

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(client(http, k) for k in range(32)))

    results = [x for per in asyncio.run(main()) for x in per]
    assert len(results) == 64
    assert all(status == 200 for _, status, _ in results), results
    assert all(tokens == expected[i] for i, _, tokens in results)
    after = scrape(server)
    batches = metric(after, "captrt_batch_size_count") - metric(before, "captrt_batch_size_count")
    singles = metric(after, "captrt_batch_size_bucket", le="1.0") - metric(before, "captrt_batch_size_bucket", le="1.0")
    images = metric(after, "captrt_images_captioned_total") - metric(before, "captrt_images_captioned_total")
    assert images == 64
    assert batches < 64 and singles < batches, (batches, singles)  # some batches held several images


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "nope"}])
def test_401_without_the_key(server, jpegs, headers):
    r = post(server, parts([jpegs[0]]), headers=headers)
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/model", headers=headers).status_code == 401
    assert post(server, parts([jpegs[0]]), headers={"X-API-Key": "test-key-3f9a"}).status_code == 200


def test_400_unreadable_image_names_the_part(server, auth, jpegs):
    r = post(server, [("image", ("broken.jpg", jpegs[0][:200], "image/jpeg"))], headers=auth)
    assert r.status_code == 400 and r.json()["detail"].startswith("broken.jpg:")
    r = post(server, [("image", ("notes.txt", b"hello world", "text/plain"))], headers=auth)
    assert r.status_code == 400 and "notes.txt: not a recognized image" in r.json()["detail"]
    # one bad part among good ones: 200, the bad one carries its error
    r = post(server, [("image", ("good.jpg", jpegs[1], "image/jpeg")), ("image", ("bad.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))],
             headers=auth)
    assert r.status_code == 200
    good, bad = r.json()["captions"]
    assert good["error"] is None and good["tokens"]
    assert bad["caption"] is None and bad["error"].startswith("bad.png:")
    assert post(server, content=b"", content_type="image/png", headers=auth).status_code == 400
    r = post(server, content=b"--x\r\nnot multipart", content_type="multipart/form-data; boundary=zzz", headers=auth)
    assert r.status_code == 400
    r = post(server, [("beam_size", (None, "3"))], headers=auth)  # no file part
    assert r.status_code == 400 and "no image" in r.json()["detail"]


def test_413_too_large(server, auth, jpegs):
    big = b"\xff\xd8\xff" + bytes(1024 * 1024 + 10)
    r = post(server, content=big, content_type="image/jpeg", headers=auth)  # refused from Content-Length
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(40):
            yield bytes(64 * 1024)

    r = post(server, content=chunks(), content_type="image/png", headers=auth)
    assert r.status_code == 413

    def multipart_chunks():  # the same for a multipart body: the cap holds inside the form parser
        yield (b'--B\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        yield from chunks()

    r = post(server, content=multipart_chunks(), content_type="multipart/form-data; boundary=B", headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = post(server, parts(jpegs[:5]), headers=auth)  # --max-images 4
    assert r.status_code == 413 and "more than 4 images" in r.json()["detail"]
    import numpy as np

    huge = encode(np.zeros((9000, 8000, 3), np.uint8), "PNG")  # 72 Mpx, a small file: above the pixel cap
    assert len(huge) < 1024 * 1024
    r = post(server, [("image", ("huge.png", huge, "image/png"))], headers=auth)
    assert r.status_code == 413 and r.json()["detail"].startswith("huge.png:")


def test_415_unsupported_type(server, auth, jpegs):
    from PIL import Image
    import io
    import numpy as np

    r = post(server, content=jpegs[0], content_type="text/plain", headers=auth)
    assert r.status_code == 415 and "text/plain" in r.json()["detail"]
    assert post(server, content=jpegs[0], headers=auth).status_code == 415  # no Content-Type at all
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="TIFF")
    r = post(server, [("image", ("scan.tiff", buf.getvalue(), "image/tiff"))], headers=auth)
    assert r.status_code == 415 and "scan.tiff: TIFF images are not accepted" in r.json()["detail"]
    gif = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(gif, format="GIF")  # the service allows JPEG/PNG/WEBP
    assert post(server, [("image", ("a.gif", gif.getvalue(), "image/gif"))], headers=auth).status_code == 415


@pytest.mark.parametrize("params,field", [
    ({"beam_size": "11"}, "beam_size"), ({"beam_size": "0"}, "beam_size"), ({"beam_size": "two"}, "beam_size"),
    ({"max_steps": "51"}, "max_steps"), ({"max_steps": "-1"}, "max_steps"), ({"attention": "maybe"}, "attention"),
    ({"length_penalty": "nan"}, "length_penalty"), ({"beam": "3"}, "beam"),
    # Not ASCII numbers (str.isdigit() accepts the first four, int() or float() the next three): 422, never a 500
    ({"beam_size": "\u00b2"}, "beam_size"), ({"num_hypotheses": "\u2460"}, "num_hypotheses"),
    ({"max_steps": "\u00b2"}, "max_steps"), ({"seed": "\u00b2"}, "seed"), ({"beam_size": "\u0663"}, "beam_size"),
    ({"beam_size": "\uff13"}, "beam_size"), ({"repetition_penalty": "1_0"}, "repetition_penalty"),
    ({"min_length": "1" * 5000}, "min_length"), ({"seed": "9" * 5000}, "seed"),
])
def test_422_bad_parameters(server, auth, jpegs, params, field):
    r = post(server, parts([jpegs[0]]), params=params, headers=auth)
    assert r.status_code == 422 and field in r.json()["detail"], r.text
    assert len(r.json()["detail"]) < 400  # a 5,000-digit value is not echoed back whole
    r = post(server, parts([jpegs[0]]), data=params, headers=auth)  # the same as form fields
    assert r.status_code == 422 and field in r.json()["detail"], r.text


def _raw_request(srv, body: bytes, content_length: int, *, send: int | None = None) -> bytes:
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-key-3f9a\r\n"
            f"Content-Type: multipart/form-data; boundary=BOUNDARY\r\nContent-Length: {content_length}\r\n\r\n")
    return head.encode() + (body if send is None else body[:send])


def _multipart(images: list[bytes], params: dict[str, str]) -> bytes:
    out = b""
    for k, v in params.items():
        out += f'--BOUNDARY\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for i, data in enumerate(images):
        out += (f'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="d{i}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
    return out + b"--BOUNDARY--\r\n"


def _wait_idle(srv, timeout: float = 60.0) -> str:
    """Metrics once nothing but the scrape itself is in flight and the queue is empty."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(srv)
        if metric(text, "captrt_requests_in_flight") <= 1 and metric(text, "captrt_queue_depth") == 0:
            return text
        assert time.monotonic() < deadline, text
        time.sleep(0.05)


def test_disconnecting_clients_cost_nothing(server, auth, jpegs):
    """Clients that vanish mid-upload or mid-inference: 499 in the metrics, queue and in-flight back to
    zero, no leaked sockets, and the next request is served normally."""
    body = _multipart(jpegs[:4], {"beam_size": "10"})
    before = _wait_idle(server)
    fds = server.open_fds()
    for _ in range(10):  # mid-upload: headers promise the whole body, half arrives, then the socket closes
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(_raw_request(server, body, len(body), send=len(body) // 2))
            time.sleep(0.02)
    for _ in range(10):  # mid-inference: the whole request, then gone before the answer
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(_raw_request(server, body, len(body)))
            time.sleep(0.01)
    after = _wait_idle(server)
    gone = metric(after, "captrt_requests_total", route="/v1/captions", method="POST", status="499") - \
        metric(before, "captrt_requests_total", route="/v1/captions", method="POST", status="499")
    assert gone == 20
    assert metric(after, "captrt_queue_depth") == 0
    assert server.open_fds() <= fds + 2
    assert post(server, parts([jpegs[0]]), headers=auth).status_code == 200


def test_memory_is_flat_over_many_requests(server, auth, jpegs):
    """RSS does not grow with the requests served: no per-request leak of 8 kB or more.

    300 requests warm the service up (allocator arenas, ONNX Runtime's buffers for every batch size the
    8 clients form; measured here, RSS still rose 1.7 MiB over requests 200-400, then stayed within
    0.1 MiB). Then RSS is read after each of 5 rounds of 100 requests, and the least-squares slope of
    the 6 readings must stay under 8 kB per request. This keeps the finding of the earlier
    2,000-request version (RSS after 2,000 within 16 MiB of RSS after 200: under 9 kB per request, so a
    10 kB-per-request leak failed it) with 800 requests: a steady leak has the same slope over 500
    requests as over 1,800, and one-off growth is still allowed for (a step of up to 3 MiB between any
    two rounds passes; a 10 kB-per-request leak, 1 MiB per round, fails).
    """
    async def run(n: int) -> int:
        sent = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=8)) as http:
            async def worker(k: int) -> None:
                nonlocal sent
                for i in range(k, n, 8):
                    files = parts([jpegs[i % len(jpegs)]])
                    r = await http.post("/v1/captions", files=files, params={"beam_size": "2", "max_steps": "3"},
                                        headers=auth)
                    assert r.status_code == 200, r.text
                    sent += 1
            await asyncio.gather(*(worker(k) for k in range(8)))
        return sent

    assert asyncio.run(run(300)) == 300
    rounds, per_round = 5, 100
    rss = [server.rss_bytes()]
    for _ in range(rounds):
        assert asyncio.run(run(per_round)) == per_round
        rss.append(server.rss_bytes())
    xs = [k * per_round for k in range(rounds + 1)]  # requests served since the warm-up
    mx, my = sum(xs) / len(xs), sum(rss) / len(rss)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, rss)) / sum((x - mx) ** 2 for x in xs)  # bytes per request
    assert slope < 8 * 1024, ([r / 2**20 for r in rss], slope)


def test_event_loop_answers_while_the_engine_runs(server, auth, jpegs):
    """Inference runs off the event loop: /healthz keeps answering while batches are in the engine.
    If the loop blocked, a health check could only slip in between batches (a handful at most)."""
    import threading

    done = threading.Event()

    def captions() -> None:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                return await asyncio.gather(*(http.post("/v1/captions", files=parts(jpegs[k:k + 4]), headers=auth,
                                                        params={"beam_size": "10"}) for k in range(0, 8, 1)))
        try:
            rs = asyncio.run(burst())
            assert all(r.status_code == 200 for r in rs)
        finally:
            done.set()

    worker = threading.Thread(target=captions)
    before = metric(scrape(server), "captrt_batch_size_count")
    worker.start()
    answered = 0
    with httpx.Client(base_url=server.url, timeout=30) as http:
        while metric(scrape(server), "captrt_batch_size_count") == before and not done.is_set():
            pass  # wait until the engine has started on this burst
        while not done.is_set():
            assert http.get("/healthz").status_code == 200
            answered += not done.is_set()
    worker.join()
    batches = metric(scrape(server), "captrt_batch_size_count") - before
    assert answered > 4 * batches, (answered, batches)


def test_decoding_controls_over_http(server, auth, jpegs, serve_model_dir):
    """Query and form fields carry the decoding controls; answers equal the library's; bad values 422."""
    with Captioner.load(serve_model_dir) as cap:
        want = cap.caption(jpegs[:2], beam_size=3, num_hypotheses=2, return_scores=True, suppress=["a"],
                           min_length=4)
        sampled = cap.caption(jpegs[:2], beam_size=1, sample=True, seed=5, sampling_topp=0.9)
    r = httpx.post(server.url + "/v1/captions", headers=auth, params={"beam_size": "3", "num_hypotheses": "2",
                                                                      "suppress": "a"},
                   files=parts(jpegs[:2]), data={"return_scores": "true", "min_length": "4"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["params"]["num_hypotheses"] == 2 and body["params"]["suppress"] == ["a"]
    for got, c in zip(body["captions"], want):
        assert [h["tokens"] for h in got["hypotheses"]] == [h.tokens for h in c.hypotheses]
        assert got["token_scores"] == pytest.approx(c.token_scores)
        assert got["hypotheses"][0]["caption"] == got["caption"] == c.text
    r = post(server, parts(jpegs[:2]), headers=auth,
             params={"beam_size": "1", "sample": "true", "seed": "5", "sampling_topp": "0.9"})
    assert [c["tokens"] for c in r.json()["captions"]] == [c.tokens for c in sampled]
    assert "token_scores" not in r.json()["captions"][0] and "hypotheses" not in r.json()["captions"][0]
    for params, needle in (({"suppress": "zebra"}, "suppress: 'zebra' is not in the model's vocabulary"),
                           ({"repetition_penalty": "0"}, "repetition_penalty must be a finite number >= 0.001 and <= 1000"),
                           ({"repetition_penalty": "5e-324"}, "repetition_penalty must be a finite number >= 0.001"),
                           ({"num_hypotheses": "6"}, "num_hypotheses must be an integer between 1 and 5"),
                           ({"sample": "true"}, "beam_size must be 1 with sample=True"),
                           ({"sample": "1"}, "sample must be true or false"),
                           ({"min_length": "x"}, "min_length must be an integer")):
        r = post(server, parts(jpegs[:1]), headers=auth, params=params)
        assert r.status_code == 422 and needle in r.json()["detail"], (params, r.text)
    schema = httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/captions"]["post"]["parameters"]
    assert {"num_hypotheses", "suppress", "prefix", "sample", "seed"} <= {p["name"] for p in schema}
