"""Servers with their own settings: queue full (503), timeout (504), SIGTERM drain, load failure,
bad configuration. Each starts a real `captrt serve` process."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx

from tests.serve.server_process import ServerProcess, free_port, metric


def parts(images):
    return [("image", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]


async def _burst(url: str, files_list, params=None, timeout=120.0):
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=64)) as http:
        return await asyncio.gather(*(http.post("/v1/captions", files=f, params=params) for f in files_list))


def test_503_when_the_queue_is_full(serve_model_dir, jpegs, tmp_path):
    """--queue 1 --max-batch 1: of 24 simultaneous requests some must wait in vain; they get 503 with
    Retry-After, the others their captions, and the queue empties afterwards."""
    with ServerProcess(serve_model_dir, "--max-batch", "1", "--queue", "1", "--max-images", "1",
                       log=tmp_path / "log") as srv:
        rs = asyncio.run(_burst(srv.url, [parts([jpegs[i % 12]]) for i in range(24)], {"beam_size": "10"}))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503}, codes
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        for r in rs:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and "queue full" in r.json()["detail"]
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "captrt_queue_depth") == 0
        assert metric(text, "captrt_requests_total", route="/v1/captions", method="POST", status="503") == codes.count(503)


def test_504_when_a_request_outlives_the_timeout(serve_model_dir, jpegs, tmp_path):
    """--timeout-s 0.001: no caption can be computed that fast; 504, and queued images are dropped."""
    with ServerProcess(serve_model_dir, "--timeout-s", "0.001", log=tmp_path / "log") as srv:
        rs = asyncio.run(_burst(srv.url, [parts(jpegs[:4]) for _ in range(6)]))
        assert [r.status_code for r in rs] == [504] * 6
        assert "limit" in rs[0].json()["detail"]
        deadline = time.monotonic() + 30
        while True:  # images in the engine when time ran out finish there; nothing stays queued
            text = httpx.get(srv.url + "/metrics").text
            if metric(text, "captrt_queue_depth") == 0 and metric(text, "captrt_requests_in_flight") <= 1:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(srv.url + "/healthz").status_code == 200


def test_sigterm_drains_in_flight_requests(serve_model_dir, jpegs, tmp_path):
    """SIGTERM while requests are in flight: every one of them is answered 200, no new connection is
    accepted, and the process exits 0."""
    srv = ServerProcess(serve_model_dir, "--max-batch", "2", log=tmp_path / "log")
    with srv:
        results: list = []

        def send() -> None:
            results.extend(asyncio.run(_burst(srv.url, [parts(jpegs[i:i + 4]) for i in range(0, 12, 4)] * 2,
                                              {"beam_size": "10"})))

        client = threading.Thread(target=send)
        client.start()
        deadline = time.monotonic() + 30
        while metric(httpx.get(srv.url + "/metrics").text, "captrt_requests_in_flight") < 4:
            assert time.monotonic() < deadline, "requests never arrived"
            time.sleep(0.01)
        code = srv.stop()
        client.join(120)
        assert code == 0, srv.log_text()
        assert [r.status_code for r in results] == [200] * 6
        assert all(len(r.json()["captions"]) == 4 for r in results)
        try:
            httpx.get(srv.url + "/healthz", timeout=2)
            raise AssertionError("the server still accepts connections after exiting")
        except httpx.TransportError:
            pass


def test_load_failure_exits_1_with_a_message(serve_model_dir, tmp_path):
    """A model directory whose graph was altered after export: the service reports why and exits 1."""
    bad = tmp_path / "model"
    shutil.copytree(serve_model_dir, bad)
    manifest = json.loads((bad / "captrt.json").read_text())
    graph = bad / manifest["graphs"]["fp32"]["decoder_step"]["file"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    proc = subprocess.run([sys.executable, "-m", "captrt", "serve", "--model", str(bad), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "model failed to load" in proc.stderr and "sha256" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_configuration_exits_2(serve_model_dir, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "captrt", "serve", *args], capture_output=True, text=True,
                              timeout=60)

    cases = [
        (("--model", str(tmp_path / "missing")), "no such model directory"),
        (("--model", str(serve_model_dir), "--max-batch", "0"), "--max-batch"),
        (("--model", str(serve_model_dir), "--timeout-s", "0"), "--timeout-s"),
        (("--model", str(serve_model_dir), "--queue", "8"), "--max-images"),
        (("--model", str(serve_model_dir), "--log-level", "loud"), "--log-level"),
        (("--model", str(serve_model_dir), "--api-key-env", "CAPTRT_SURELY_UNSET_VAR"), "CAPTRT_SURELY_UNSET_VAR"),
        (("--model", str(serve_model_dir), "--precision", "fp16"), "fp16"),
    ]
    for args, needle in cases:
        proc = run(*args, "--port", str(free_port()))
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    with socket.socket() as busy:  # a port somebody else listens on: refused before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proc = run("--model", str(serve_model_dir), "--port", str(busy.getsockname()[1]))
    assert proc.returncode == 2 and "cannot listen there" in proc.stderr and "Traceback" not in proc.stderr


def test_two_streams_serve_the_library_captions(serve_model_dir, jpegs, tmp_path):
    """--streams 2 --threads 1: concurrent requests get Captioner.caption's captions, /v1/model reports
    the streams and threads, and /metrics has captrt_streams_busy (a gauge within 0..2)."""
    from captrt.runtime import Captioner

    with Captioner.load(serve_model_dir, threads=1) as cap:
        expected = [c.tokens for c in cap.caption(jpegs[:8], beam_size=3)]
    with ServerProcess(serve_model_dir, "--streams", "2", "--threads", "1", "--max-batch", "2",
                       log=tmp_path / "log") as srv:
        info = httpx.get(srv.url + "/v1/model").json()
        assert (info["streams"], info["threads"]) == (2, 1)
        rs = asyncio.run(_burst(srv.url, [parts([jpegs[i]]) for i in range(8)], {"beam_size": "3"}))
        assert [r.status_code for r in rs] == [200] * 8, [r.text for r in rs]
        assert [r.json()["captions"][0]["tokens"] for r in rs] == expected
        text = httpx.get(srv.url + "/metrics").text
        assert "# TYPE captrt_streams_busy gauge" in text and 0 <= metric(text, "captrt_streams_busy") <= 2
        assert metric(text, "captrt_images_captioned_total") == 8


def test_bad_streams_exit_2_with_one_line(serve_model_dir):
    """--streams 0, or streams x threads above the usable cores without --oversubscribe: one error line,
    exit 2, before anything loads (in-process: no server starts)."""
    from typer.testing import CliRunner

    from captrt.cli import app
    from captrt.runtime.streams import usable_cores

    runner = CliRunner()
    too_many = str(usable_cores() + 1)
    for args, needle in ((("--streams", "0"), "--streams must be a positive integer or 'auto', got '0'"),
                         (("--streams", "two"), "--streams must be a positive integer or 'auto'"),
                         (("--streams", too_many, "--threads", "1"), "--oversubscribe")):
        res = runner.invoke(app, ["serve", "--model", str(serve_model_dir), "--port", "0", *args])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
        assert res.output.startswith("captrt: error: ") and res.output.count("\n") == 1, res.output
