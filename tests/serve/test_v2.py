"""The Open Inference Protocol on a real `captrt serve` (the module's server: API key, --max-images 4,
--max-body-mb 1): the real tritonclient (sync and asyncio) with binary and JSON tensors, a hand-written
JSON request checked field by field, malformed bodies, and /v1 and /v2 sharing the batcher."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import struct

import httpx
import numpy as np
import pytest

from captrt.runtime import Captioner
from tests.serve.conftest import API_KEY
from tests.serve.server_process import metric

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "model"  # the served directory's name
TEXT = b"this is a text file, not an image\n"
BASE = ("caption", "score", "finished", "tokens", "error")


@pytest.fixture(scope="module")
def library(serve_model_dir):
    with Captioner.load(serve_model_dir) as cap:
        yield cap


@pytest.fixture(scope="module")
def client(server):
    c = tritonclient.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


def key(k: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {k}"}


def image_input(images: list[bytes], binary: bool):
    inp = tritonclient.InferInput("image", [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(x) for x in images]  # JSON carries the files base64-encoded
    return inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)


def text(x) -> str:
    """A BYTES element as the client gives it: bytes from binary tensors, str from JSON ones."""
    return x.decode() if isinstance(x, bytes) else x


def check_against(result, expected, *, hypotheses: int = 1) -> None:
    """caption/score/finished/tokens/error (and hypotheses) of a tritonclient result = the library's."""
    caps = [text(x) for x in result.as_numpy("caption")]
    assert caps == [e.text for e in expected]
    np.testing.assert_allclose(result.as_numpy("score"), [e.score for e in expected], rtol=1e-5)
    assert result.as_numpy("finished").tolist() == [e.finished for e in expected]
    tokens = result.as_numpy("tokens")
    assert tokens.dtype == np.int64 and tokens.shape == (len(expected), max(len(e.tokens) for e in expected))
    assert [[t for t in row if t >= 0] for row in tokens.tolist()] == [e.tokens for e in expected]
    assert [text(x) for x in result.as_numpy("error")] == [""] * len(expected)
    if hypotheses > 1:
        hyp = result.as_numpy("hypotheses")
        assert hyp.shape == (len(expected), hypotheses)
        assert [[text(h) for h in row] for row in hyp] == [[h.text for h in e.hypotheses] for e in expected]
        np.testing.assert_allclose(result.as_numpy("hypothesis_scores"),
                                   [[h.score for h in e.hypotheses] for e in expected], rtol=1e-5)


def test_probes_and_metadata(client, server, serve_model_dir):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=key())
    info = httpx.get(server.url + "/v1/model", headers=key()).json()
    version = info["id"].split("@")[1]
    assert client.is_model_ready(MODEL, model_version=version, headers=key())
    assert not client.is_model_ready(MODEL, model_version="0" * 12, headers=key())
    assert not client.is_model_ready("other", headers=key())
    meta = client.get_model_metadata(MODEL, headers=key())
    assert meta["name"] == MODEL and meta["versions"] == [version] and meta["platform"] == "captrt_ort"
    [image] = meta["inputs"]
    assert (image["name"], image["datatype"], image["shape"]) == ("image", "BYTES", [-1])
    assert "base64" in image["parameters"]["description"]
    shapes = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert shapes == {"caption": ("BYTES", [-1]), "score": ("FP32", [-1]), "finished": ("BOOL", [-1]),
                      "tokens": ("INT64", [-1, -1]), "error": ("BYTES", [-1]), "hypotheses": ("BYTES", [-1, -1]),
                      "hypothesis_scores": ("FP32", [-1, -1]), "token_scores": ("FP32", [-1, -1, -1]),
                      "attention": ("FP32", [-1, -1, 8, 8])}
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "captrt" and "binary_tensor_data" in server_meta["extensions"]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("other", headers=key())
    assert err.value.status() == "404" and "'model'" in err.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_the_library(client, library, jpegs, binary):
    """Its defaults (binary tensors both ways) and binary_data=False (JSON, images base64): 1 and 4 images."""
    for images in (jpegs[:1], jpegs[1:5]):
        expected = library.caption(images, beam_size=5)
        outputs = None if binary else [tritonclient.InferRequestedOutput(n, binary_data=False) for n in BASE]
        result = client.infer(MODEL, [image_input(images, binary)], outputs=outputs, headers=key())
        check_against(result, expected)
        response = result.get_response()
        assert response["model_name"] == MODEL and len(response["outputs"]) == 5
        assert all(("data" in o) != binary for o in response["outputs"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_with_decoding_parameters(client, library, jpegs, binary):
    params = {"beam_size": 3, "num_hypotheses": 2, "max_steps": 12, "length_penalty": 0.5, "suppress": ["red"],
              "return_scores": True}
    expected = library.caption(jpegs[5:8], beam_size=3, num_hypotheses=2, max_steps=12, length_penalty=0.5,
                               suppress=["red"], return_scores=True)
    outputs = None if binary else [tritonclient.InferRequestedOutput(n, binary_data=False)
                                   for n in (*BASE, "hypotheses", "hypothesis_scores", "token_scores")]
    result = client.infer(MODEL, [image_input(jpegs[5:8], binary)], outputs=outputs, parameters=params,
                          headers=key())
    check_against(result, expected, hypotheses=2)
    scores = result.as_numpy("token_scores")
    assert scores.shape[:2] == (3, 2)
    for row, e in zip(scores, expected):
        for got, h in zip(row, e.hypotheses):
            np.testing.assert_allclose(got[:len(h.token_scores)], h.token_scores, rtol=1e-5)
            assert np.isnan(got[len(h.token_scores):]).all()
    assert result.get_response()["parameters"]["suppress"] == "red"


def test_attention_and_a_selected_output(client, library, jpegs):
    [e] = library.caption(jpegs[9], beam_size=2, max_steps=5, return_attention=True)
    outputs = [tritonclient.InferRequestedOutput("attention"), tritonclient.InferRequestedOutput("tokens")]
    result = client.infer(MODEL, [image_input([jpegs[9]], True)], outputs=outputs, headers=key(),
                          parameters={"beam_size": 2, "max_steps": 5, "attention": True})
    assert [o["name"] for o in result.get_response()["outputs"]] == ["attention", "tokens"]
    np.testing.assert_allclose(result.as_numpy("attention")[0], e.attention, rtol=1e-4, atol=1e-6)


def test_a_text_file_gets_its_error_element(client, library, jpegs):
    expected = library.caption([jpegs[0], jpegs[2]])
    result = client.infer(MODEL, [image_input([jpegs[0], TEXT, jpegs[2]], True)], headers=key())
    errors = [x.decode() for x in result.as_numpy("error")]
    assert errors[0] == errors[2] == "" and "image[1]" in errors[1]
    caps = [text(x) for x in result.as_numpy("caption")]
    assert caps == [expected[0].text, "", expected[1].text]
    assert np.isnan(result.as_numpy("score")[1]) and not result.as_numpy("finished")[1]
    assert (result.as_numpy("tokens")[1] == -1).all()


@pytest.mark.parametrize("params, needle", [({"beam_size": 99}, "beam_size"), ({"bogus": 1}, "bogus"),
                                            ({"return_scores": "maybe"}, "return_scores"),
                                            ({"suppress": [1, 2]}, "suppress")])
def test_a_bad_parameter_is_400_naming_it(client, jpegs, params, needle):
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [image_input([jpegs[0]], True)], parameters=params, headers=key())
    assert err.value.status() == "400" and needle in err.value.message()


def test_a_wrong_key_is_401(client, jpegs):
    for headers in ({}, key("nope"), {"X-API-Key": "nope"}):
        with pytest.raises(InferenceServerException) as err:
            client.infer(MODEL, [image_input([jpegs[0]], True)], headers=headers)
        assert err.value.status() == "401" and "API key" in err.value.message()
    assert client.infer(MODEL, [image_input([jpegs[0]], True)], headers={"X-API-Key": API_KEY}).as_numpy("caption")


def test_the_asyncio_client(server, library, jpegs):
    import tritonclient.http.aio as aioclient

    expected = library.caption(jpegs[:3])

    async def main():
        c = aioclient.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            assert await c.is_server_live() and await c.is_model_ready(MODEL, headers=key())
            meta = await c.get_model_metadata(MODEL, headers=key())
            assert meta["inputs"][0]["name"] == "image"
            inputs = [aioclient.InferInput("image", [3], "BYTES")]
            inputs[0].set_data_from_numpy(np.array(jpegs[:3], dtype=np.object_))
            binary = await c.infer(MODEL, inputs, headers=key())
            json_inputs = [aioclient.InferInput("image", [3], "BYTES")]
            json_inputs[0].set_data_from_numpy(np.array([base64.b64encode(x) for x in jpegs[:3]], dtype=np.object_),
                                               binary_data=False)
            as_json = await c.infer(MODEL, json_inputs, headers=key(),
                                    outputs=[aioclient.InferRequestedOutput(n, binary_data=False) for n in BASE])
            with pytest.raises(InferenceServerException) as err:
                await c.infer(MODEL, inputs, headers=key(), parameters={"max_steps": 0})
            return binary, as_json, err.value
        finally:
            await c.close()

    binary, as_json, error = asyncio.run(main())
    check_against(binary, expected)
    check_against(as_json, expected)
    assert error.status() == "400" and "max_steps" in error.message()


def test_a_hand_written_json_request(server, library, jpegs):
    """What curl sends: every field of the response has the specification's shape."""
    expected = library.caption(jpegs[:2], beam_size=2)
    body = {"id": "req-7", "parameters": {"beam_size": 2},
            "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                        "data": [base64.b64encode(x).decode() for x in jpegs[:2]]}],
            "outputs": [{"name": "caption"}, {"name": "score"}, {"name": "tokens"}, {"name": "finished"}]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=key(), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and HEADER not in r.headers
    doc = r.json()
    version = httpx.get(server.url + "/v1/model", headers=key()).json()["id"].split("@")[1]
    assert set(doc) == {"model_name", "model_version", "id", "parameters", "outputs"}
    assert (doc["model_name"], doc["model_version"], doc["id"]) == (MODEL, version, "req-7")
    assert doc["parameters"]["beam_size"] == 2
    assert [o["name"] for o in doc["outputs"]] == ["caption", "score", "tokens", "finished"]
    for o in doc["outputs"]:
        assert set(o) == {"name", "datatype", "shape", "data"}
        assert all(isinstance(d, int) and d >= 0 for d in o["shape"]) and len(o["data"]) == math.prod(o["shape"])
    caption, score, tokens, finished = doc["outputs"]
    assert (caption["datatype"], caption["shape"], caption["data"]) == ("BYTES", [2], [e.text for e in expected])
    assert score["datatype"] == "FP32" and all(abs(s - e.score) < 1e-4 for s, e in zip(score["data"], expected))
    width = max(len(e.tokens) for e in expected)
    assert (tokens["datatype"], tokens["shape"]) == ("INT64", [2, width])
    assert tokens["data"] == [t for e in expected for t in e.tokens + [-1] * (width - len(e.tokens))]
    assert (finished["datatype"], finished["data"]) == ("BOOL", [e.finished for e in expected])
    no_id = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/{version}/infer", headers=key(), timeout=60,
                       json={"inputs": body["inputs"][:1] and [{**body["inputs"][0], "shape": [1],
                                                                 "data": body["inputs"][0]["data"][:1]}]})
    assert no_id.status_code == 200 and no_id.json()["id"] == no_id.headers["x-request-id"]


HEADER = "Inference-Header-Content-Length"


def _binary_request(images: list[bytes], *, size_delta: int = 0, header_delta: int = 0, shape: int | None = None,
                    datatype: str = "BYTES", cut: int = 0) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(x)) + x for x in images)
    blob = blob[:len(blob) - cut]
    head = json.dumps({"inputs": [{"name": "image", "shape": [len(images) if shape is None else shape],
                                   "datatype": datatype, "parameters": {"binary_data_size": len(blob) + size_delta}}]})
    return head.encode() + blob, {HEADER: str(len(head) + header_delta), **key()}


def _json_request(**changes) -> dict:
    one = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}
    return {"inputs": [{**one, **changes}]}


@pytest.mark.parametrize("make, needle", [
    (lambda j: _json_request(datatype="FP32", data=[1.0]), "datatype must be BYTES"),
    (lambda j: _json_request(shape=[3], data=[base64.b64encode(j).decode()] * 2), "shape [3] says 3"),
    (lambda j: _json_request(shape=[1, 1]), "shape must be [N]"),
    (lambda j: _json_request(data=["not base64!"]), "not base64"),
    (lambda j: _json_request(data="aGVsbG8="), "data must be an array"),
    (lambda j: _json_request(name="pixels"), "unknown input 'pixels'"),
    (lambda j: {"inputs": []}, "inputs must be a non-empty array"),
    (lambda j: {"inputs": _json_request()["inputs"], "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    (lambda j: {**_json_request(), "outputs": [{"name": "token_scores"}]}, "return_scores=true"),
    (lambda j: {**_json_request(), "id": 7}, "id must be a string"),
    (lambda j: {**_json_request(), "parameters": {"beam_size": None}}, "beam_size"),
    (lambda j: _binary_request([j], size_delta=100), "runs past the end of the body"),
    (lambda j: _binary_request([j], header_delta=10 ** 6), "is larger than the body"),
    (lambda j: _binary_request([j], header_delta=-3), "JSON"),
    (lambda j: _binary_request([j, j], shape=3), "shape [3] says 3"),
    (lambda j: _binary_request([j], cut=10, size_delta=0), "remain in its binary_data_size"),
    (lambda j: _binary_request([j], datatype="UINT8"), "datatype must be BYTES"),
    (lambda j: (b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES"}]}' + j,
                {HEADER: "66", **key()}), "no 'data' and no binary_data_size"),
    (lambda j: _json_request(parameters={"shared_memory_region": "r"}), "shared_memory_region not supported"),
    (lambda j: (b"{not json", key()), "must be a JSON inference request"),
    (lambda j: (b"", key()), "must be a JSON inference request"),
    (lambda j: (b"\x1f\x8b garbage", {**key(), "Content-Encoding": "gzip"}), "not valid gzip"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_a_malformed_body_is_400_naming_the_problem(server, jpegs, make, needle):
    made = make(jpegs[0])
    if isinstance(made, dict):
        r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=made, headers=key(), timeout=30)
    else:
        r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=made[0], headers=made[1], timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"], r.json()


def test_one_image_file_right_after_the_json(server, library, jpegs):
    """OpenVINO Model Server's short form (what curl can send): one input of one image and no
    binary_data_size: the whole body after the JSON is the file. Clients' null fields read as absent."""
    head = json.dumps({"id": None, "parameters": {"content_type": "base64"}, "outputs": None,
                       "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": None}]})
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=head.encode() + jpegs[4], timeout=60,
                   headers={HEADER: str(len(head)), "Content-Type": "application/octet-stream", **key()})
    assert r.status_code == 200, r.text
    [e] = library.caption(jpegs[4])
    assert {o["name"]: o["data"] for o in r.json()["outputs"]}["caption"] == [e.text]


def test_limits_and_compression(server, jpegs):
    url = f"{server.url}/v2/models/{MODEL}/infer"
    body, headers = _binary_request([jpegs[0]] * 5)  # --max-images 4
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert r.status_code == 413 and "--max-images" in r.json()["error"]
    big, headers = _binary_request([b"\0" * (1 << 20)])  # --max-body-mb 1
    r = httpx.post(url, content=big, headers=headers, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = httpx.post(url, content=gzip.compress(big), headers={**headers, "Content-Encoding": "gzip"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]  # the cap holds after decompression
    body, headers = _binary_request([jpegs[0]])
    r = httpx.post(url, content=gzip.compress(body), headers={**headers, "Content-Encoding": "gzip"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    r = httpx.post(url, content=body, headers={**headers, "Content-Encoding": "br"}, timeout=30)
    assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]
    body, headers = _binary_request([TEXT])
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    assert r.status_code == 400 and "image[0]" in r.json()["error"]  # every image unreadable: /v1's rule
    assert httpx.get(f"{server.url}/v2/nothing").json() == {"error": "Not Found"}
    assert httpx.get(f"{server.url}/v1/nothing").json() == {"detail": "Not Found"}  # /v1 unchanged


def test_v1_and_v2_share_batches_and_labels(server, jpegs):
    """One /v1 and one /v2 request at a time with equal options: they run in one batch, and the metrics
    tell the routes apart."""
    before = httpx.get(server.url + "/metrics").text
    body, headers = _binary_request([jpegs[3]])

    async def pair(http: httpx.AsyncClient):
        return await asyncio.gather(
            http.post("/v1/captions", files=[("image", ("a.jpg", jpegs[3], "image/jpeg"))], headers=key()),
            http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers))

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return [await pair(http) for _ in range(5)]

    pairs = asyncio.run(main())
    for v1, v2 in pairs:
        assert v1.status_code == 200 and v2.status_code == 200
        assert v2.json()["outputs"][0]["data"] == [v1.json()["captions"][0]["caption"]]
    after = httpx.get(server.url + "/metrics").text
    batches = metric(after, "captrt_batch_size_count") - metric(before, "captrt_batch_size_count")
    images = metric(after, "captrt_batch_size_sum") - metric(before, "captrt_batch_size_sum")
    assert images == 10 and batches < 10, batches  # some pair (one image from each protocol) shared a batch
    route = "/v2/models/{name}/infer"
    assert metric(after, "captrt_requests_total", route=route, method="POST", status="200") >= 5
    assert metric(after, "captrt_requests_total", route="/v1/captions", method="POST", status="200") >= 5
