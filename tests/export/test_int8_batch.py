"""The int8 graphs give an image the same caption alone or among 15 others (the service batches strangers' images).

The decoder's int8 MatMuls use per-row activation scales (captrt.export.quantize.quantize_decoder), the
encoder fixed calibrated scales, so nothing an image gets depends on its batch. The former dynamic
decoder (one scale per call) serves as the control: the same checks catch it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from captrt.export.images import synthetic
from captrt.export.quantize import quantize_decoder, quantize_decoder_dynamic, quantize_encoder
from captrt.runtime.decoding.processing import neutral_feeds
from captrt.train.checkpoint import load_checkpoint
from tests.export.helpers import make_varied_length_checkpoint
from tests.export.int8_helpers import captions, session, trace_graphs

IMAGES = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = make_varied_length_checkpoint(tmp_path_factory.mktemp("int8_batch") / "tiny.pt")
    enc, dec = trace_graphs(ckpt)
    images = synthetic(IMAGES, 256, seed=7).images
    enc8 = quantize_encoder(enc, list(images[:8]))
    return {"enc": enc, "dec": dec, "enc8": enc8, "dec8": quantize_decoder(dec), "images": images,
            "vocab": load_checkpoint(ckpt).vocab}


def test_int8_captions_are_the_same_alone_and_in_a_batch_of_16(tiny):
    alone = captions(tiny["enc8"], tiny["dec8"], tiny["images"], tiny["vocab"], batch=1)
    batched = captions(tiny["enc8"], tiny["dec8"], tiny["images"], tiny["vocab"], batch=16)
    assert len(alone) == IMAGES and len({tuple(c) for c in alone}) > IMAGES // 3  # varied captions, not one
    assert [i for i in range(IMAGES) if alone[i] != batched[i]] == []


def test_the_dynamic_decoder_fails_the_same_check(tiny):
    """Control: one activation scale per call makes captions depend on the batch (so the check above can fail)."""
    dyn = quantize_decoder_dynamic(tiny["dec"])
    alone = captions(tiny["enc"], dyn, tiny["images"], tiny["vocab"], batch=1)
    batched = captions(tiny["enc"], dyn, tiny["images"], tiny["vocab"], batch=16)
    assert sum(a != b for a, b in zip(alone, batched)) >= 2


def _step_feeds(n: int, k: int, dec: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.graph.input}
    hidden, (p, e), a = dims["h"][2], dims["features"][1:], dims["att_proj"][2]
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(1, 10, (n, k)).astype(np.int64), "origin": rng.integers(0, k, (n, k)).astype(np.int64),
            "h": rng.standard_normal((n, k, hidden)).astype(np.float32),
            "c": rng.standard_normal((n, k, hidden)).astype(np.float32),
            # Rows of very different magnitudes: a per-call scale is set by the largest one.
            "features": (rng.random((n, p, e)) * np.geomspace(0.1, 10, n)[:, None, None]).astype(np.float32),
            "att_proj": rng.standard_normal((n, p, a)).astype(np.float32),
            **({} if "ban_ids" not in dims else neutral_feeds(n, k, _vocab(dec)))}


def _vocab(dec: onnx.ModelProto) -> int:
    return next(o.type.tensor_type.shape.dim[2].dim_value for o in dec.graph.output if o.name == "logp") - 1


@pytest.mark.parametrize("form", ["u8u8", "u8s8"])
def test_decoder_step_rows_are_bit_exact_alone_or_batched(tiny, form):
    dec8 = quantize_decoder(tiny["dec"], form=form)
    ops = [n.op_type for n in dec8.graph.node]
    assert ops.count("MatMulInteger") == 5 and "DynamicQuantizeLinear" not in ops
    feeds = _step_feeds(16, 5, dec8)
    sess = session(dec8)
    batched = sess.run(None, feeds)
    for i in (0, 7, 15):
        alone = sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})
        for got, want in zip(alone, batched):
            np.testing.assert_array_equal(got[0], want[i])
    dyn = session(quantize_decoder_dynamic(tiny["dec"]))
    batched = dyn.run(None, feeds)
    alone = dyn.run(None, {k: v[:1] for k, v in feeds.items()})
    assert not np.array_equal(alone[0][0], batched[0][0])  # control: per-call scales are not row-exact


def test_encoder_int8_backbone_is_bit_exact_alone_or_batched(tiny):
    """The quantized ResNet (up to its last Conv) gives bit-identical activations alone or in a batch; the
    fp32 tail (pooling matrices, projections) then differs by float rounding only, as in the fp32 encoder."""
    enc8 = onnx.ModelProto.FromString(tiny["enc8"].SerializeToString())
    last_conv = [n for n in enc8.graph.node if n.op_type == "Conv"][-1].output[0]
    enc8.graph.output.append(helper.make_tensor_value_info(last_conv, TensorProto.FLOAT, None))
    sess = session(enc8)
    images = tiny["images"][:16]
    batched = sess.run(None, {"image": images})
    features_max = np.abs(batched[0]).max()
    for i in (0, 9, 15):
        alone = sess.run(None, {"image": images[i:i + 1]})
        np.testing.assert_array_equal(alone[-1][0], batched[-1][i])
        for got, want in zip(alone[:-1], batched[:-1]):
            np.testing.assert_allclose(got[0], want[i], rtol=0, atol=1e-5 * max(features_max, 1.0))


@pytest.mark.parametrize("form", ["u8u8", "u8s8"])
def test_int8_matmul_does_not_saturate(form):
    """Extreme activations x extreme weights: u8 x s8 with 8-bit weights saturates in int16 on CPUs without
    VNNI (vpmaddubsw); both offered forms must stay exact up to quantization."""
    k, n = 512, 64
    weight = np.full((k, n), 0.5, np.float32)
    weight[:, ::2] = -0.5
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.full((3, k), 2.0, np.float32)
    x[1] = -3.0
    got = session(quantize_decoder(model, form=form)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ weight, rtol=1e-3)
