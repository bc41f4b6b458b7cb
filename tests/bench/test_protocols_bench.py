"""benchmarks/protocols.py's pure parts: its request bodies parse as the service parses them, its
answer checks read the service's encodings, rounds are balanced, the section is preserved."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from captrt.bench.sections import PROTOCOLS_BEGIN, PROTOCOLS_END, PRESERVED
from captrt.serve.v2.tensors import OutputTensor, encode_response, parse_request

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("captrt_protocols_bench", BENCHMARKS / "protocols.py")
protocols = importlib.util.module_from_spec(spec)
sys.modules["captrt_protocols_bench"] = protocols
spec.loader.exec_module(protocols)


def test_v2_bodies_parse_as_the_service_parses_them():
    up = protocols.sb.Upload("a.jpg", b"\xff\xd8 not really a jpeg", "image/jpeg")
    for make in (protocols.v2_json_request, protocols.v2_binary_request):
        req = make(up, 5)
        parsed = parse_request(req.body, req.headers.get(protocols.HEADER), {"image": "BYTES"}, max_elements=1)
        assert parsed.inputs == {"image": [up.data]} and parsed.parameters == {"beam_size": 5}
        assert [o.name for o in parsed.outputs] == list(protocols.OUTPUTS)
    body = protocols.v1_request(up, 5).body
    assert up.data in body and b'name="beam_size"\r\n\r\n5' in body


def test_checks_read_the_service_answers():
    def answer(error: bytes, binary: bool):
        tensors = [OutputTensor("caption", "BYTES", [1], [b"a cat"]),
                   OutputTensor("score", "FP32", [1], np.array([-1.0], np.float32)),
                   OutputTensor("error", "BYTES", [1], [error])]
        body, length = encode_response({"model_name": "m"}, [(t, binary) for t in tensors])
        return body, {} if length is None else {protocols.HEADER: str(length)}

    for binary, check in ((False, protocols.check_v2_json), (True, protocols.check_v2_binary)):
        body, headers = answer(b"", binary)
        assert check(200, headers, body) is None
        body, headers = answer(b"image[0]: unreadable", binary)
        assert check(200, headers, body) == "200 with a caption error"
        assert check(503, headers, body) == "503"
    assert protocols.check_v2_binary(200, {protocols.HEADER: "3"}, b"{}") == "200 with a bad body"


def test_rounds_rotate_through_every_order_and_the_section_is_kept():
    orders = protocols.round_orders(6)
    assert sorted(orders) == sorted(itertools.permutations(protocols.MODES))
    for position in range(3):
        assert Counter(o[position] for o in orders) == Counter({m: 2 for m in protocols.MODES})
    assert (PROTOCOLS_BEGIN, PROTOCOLS_END) in PRESERVED
    rows = [{"mode": m, "concurrency": 1, "images_per_s": x, "round_images_per_s": [x, x]}
            for m, x in (("v1", 10.0), ("v2-json", 9.0), ("v2-binary", 9.8))]
    assert protocols.ratios(rows, "v2-binary", 1) == (0.98, [0.98, 0.98])
    [target] = protocols.targets(rows, [1])
    assert target["status"] == "met" and json.dumps(target)
