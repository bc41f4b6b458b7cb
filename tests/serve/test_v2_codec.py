"""The protocol's pieces without a server: the body codec against tritonclient's own (de)serializers,
parameter values in /v1's text form, route labels, and the loading state of an in-process app."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from captrt.serve.metrics import route_label
from captrt.serve.upload import ServeError
from captrt.serve.v2.params import as_text
from captrt.serve.v2.tensors import OutputTensor, ProtocolError, encode_response, parse_request

utils = pytest.importorskip("tritonclient.utils", reason="tritonclient[http] is in the dev extra")
http = pytest.importorskip("tritonclient.http")


def test_binary_input_as_tritonclient_serializes_it():
    files = [b"\xff\xd8 first", b"", b"third \x00\x01"]
    blob = utils.serialize_byte_tensor(np.array(files, dtype=np.object_)).item()
    head = json.dumps({"id": "a", "parameters": {"beam_size": 2, "binary_data_output": True},
                       "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "caption", "parameters": {"binary_data": False}}, {"name": "score"}]})
    req = parse_request(head.encode() + blob, str(len(head)), {"image": "BYTES"}, max_elements=4)
    assert req.inputs == {"image": files} and req.id == "a" and req.parameters == {"beam_size": 2}
    assert req.binary_output is True and [(o.name, o.binary) for o in req.outputs] == [("caption", False),
                                                                                      ("score", None)]
    with pytest.raises(ProtocolError, match="more than the service's --max-images") as err:
        parse_request(head.encode() + blob, str(len(head)), {"image": "BYTES"}, max_elements=2)
    assert err.value.status == 413
    with pytest.raises(ProtocolError, match="4-byte length is cut off"):
        bad = head.replace(f'"binary_data_size": {len(blob)}', f'"binary_data_size": {len(blob) + 2}')
        parse_request(bad.encode() + blob + b"\1\0", str(len(bad)), {"image": "BYTES"}, max_elements=4)
    with pytest.raises(ProtocolError, match="2 bytes of binary data after the last input"):
        parse_request(head.encode() + blob + b"..", str(len(head)), {"image": "BYTES"}, max_elements=4)
    with pytest.raises(ProtocolError, match="missing input"):
        parse_request(b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}', None,
                      {"image": "BYTES", "x": "BYTES"}, max_elements=4)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_by_tritonclient(binary):
    outputs = [OutputTensor("caption", "BYTES", [2], [b"a red circle", "\u00e9t\u00e9".encode()]),
               OutputTensor("score", "FP32", [2], np.array([-1.5, np.nan], np.float32)),
               OutputTensor("finished", "BOOL", [2], np.array([True, False])),
               OutputTensor("tokens", "INT64", [2, 3], np.array([[4, 5, -1], [6, 7, 8]], np.int64)),
               OutputTensor("empty", "INT64", [2, 0], np.zeros((2, 0), np.int64))]
    body, length = encode_response({"model_name": "m", "id": "1"}, [(t, binary) for t in outputs])
    assert (length is None) == (not binary)
    result = http.InferResult.from_response_body(body, header_length=length)
    got = result.as_numpy("caption").tolist()
    assert [x.decode() if isinstance(x, bytes) else x for x in got] == ["a red circle", "\u00e9t\u00e9"]
    score = result.as_numpy("score")
    assert score.dtype == np.float32 and score[0] == -1.5 and np.isnan(score[1])  # JSON: null, read as NaN
    assert result.as_numpy("finished").tolist() == [True, False]
    assert result.as_numpy("tokens").tolist() == [[4, 5, -1], [6, 7, 8]]
    assert result.as_numpy("empty").shape == (2, 0)
    if not binary:
        assert json.loads(body)["outputs"][1]["data"] == [-1.5, None]  # strict JSON: no NaN literal


def test_parameter_values_take_v1s_text_form():
    assert [as_text("x", v) for v in (True, False, 3, 0.25, "a b", ["a", "b"])] == \
        ["true", "false", "3", "0.25", "a b", "a b"]
    for bad in (None, {"a": 1}, [1, 2]):
        with pytest.raises(ServeError, match="parameter suppress must be") as err:
            as_text("suppress", bad)
        assert err.value.status == 400


def test_route_labels_stay_bounded():
    assert route_label("/v2") == "/v2" and route_label("/v2/health/ready") == "/v2/health/ready"
    assert route_label("/v2/models/anything/infer") == "/v2/models/{name}/infer"
    assert route_label("/v2/models/m/versions/123/ready") == "/v2/models/{name}/versions/{version}/ready"
    assert route_label("/v2/models/m") == "/v2/models/{name}"
    assert route_label("/v2/models/m/x/infer") == route_label("/v2/zzz") == "other"


def test_loading_state_and_one_parser(serve_model_dir):
    """While the model warms up, /v2 answers 503 with Retry-After in the protocol's error form; once ready,
    /v1's and /v2's forms of the same options give equal parameters (so their images share batches)."""
    from fastapi.testclient import TestClient

    from captrt.runtime import Captioner
    from captrt.serve import ServeConfig, create_app
    from captrt.serve.pipeline import parse_decode
    from captrt.serve.v2.params import decode_params

    gate = threading.Event()
    with Captioner.load(serve_model_dir, threads=1) as cap:
        warm = cap.warmup
        cap.warmup = lambda **kw: (gate.wait(60), warm(**kw))  # holds the service in its loading state
        app = create_app(ServeConfig(model=serve_model_dir, model_name="captions-v1"), captioner=cap)
        with TestClient(app) as client:
            assert client.get("/v2/health/live").json() == {"live": True}
            for path in ("/v2/health/ready", "/v2/models/captions-v1/ready"):
                r = client.get(path)
                assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "loading" in r.json()["error"]
            r = client.post("/v2/models/captions-v1/infer", json={"inputs": []})
            assert r.status_code == 503 and r.json() == {"error": "model is loading; retry shortly"}
            assert client.get("/v2/models/model/ready").status_code == 404  # --model-name renames it
            gate.set()
            deadline = time.monotonic() + 60
            while client.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            state = app.state.captrt
            v1 = parse_decode(state, [("beam_size", "3"), ("suppress", "red blue"), ("return_scores", "true")], {})
            v2 = decode_params(state, {"beam_size": 3, "suppress": ["red", "blue"], "return_scores": True})
            assert v1 == v2 and v1.batch_key == decode_params(state, {"suppress": "red blue", "beam_size": "3"}).batch_key
            with pytest.raises(ServeError) as err:
                decode_params(state, {"min_length": -1})
            assert err.value.status == 400 and "min_length" in err.value.detail


def test_model_name_flag(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from captrt.cli import app
    from captrt.serve import ServeConfig

    for bad in ("", "a/b", "-x", "x" * 129, "caption model"):
        with pytest.raises(ValueError, match="--model-name"):
            ServeConfig(model=tmp_path, model_name=bad).validate()
    seen: list = []
    monkeypatch.setattr("captrt.serve.server.serve", lambda config: seen.append(config) or 0)
    res = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--model-name", "captions.v1"])
    assert res.exit_code == 0, res.output
    assert seen[0].model_name == "captions.v1"
