"""The seed's real shapes: ResNet-101, 14x14 grid (8x8 -> 14x14 upsampling pool), vocabulary 9490,
512-dim attention/embedding/decoder, random weights. One export (about a minute or more on 2 cores)."""

from __future__ import annotations

from types import SimpleNamespace

import onnx
import pytest
import torch

from captrt.export.exporter import export_model
from captrt.export.images import synthetic
from captrt.export.ops import op_histogram, tensorrt_problems
from captrt.export.parity import make_session, numeric_parity, torch_threads
from captrt.train.checkpoint import load_checkpoint
from tests.export.helpers import make_large_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    d = tmp_path_factory.mktemp("large_export")
    ckpt_path = make_large_checkpoint(d / "r101.pt")
    manifest = export_model(ckpt_path, d / "model", parity_count=2, progress=False)
    ckpt = load_checkpoint(ckpt_path)
    return SimpleNamespace(dir=d / "model", manifest=manifest, ckpt=ckpt, model=ckpt.build_model())


def test_shapes_and_manifest(large):
    m = large.manifest
    assert m["model"] == {"backbone": "resnet101", "enc_size": 14, "image_size": 256, "encoder_dim": 2048,
                          "attention_dim": 512, "embed_dim": 512, "decoder_dim": 512, "vocab_size": 9490}
    assert m["vocab"]["size"] == 9490 and m["grid"] == 14
    enc = onnx.load(large.dir / "encoder.onnx")
    dec = onnx.load(large.dir / "decoder_step.onnx")
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for g in (enc, dec) for v in list(g.graph.input) + list(g.graph.output)}
    assert shapes["image"] == ["batch", 256, 256, 3]
    assert shapes["features"] == ["batch", 196, 2048] and shapes["att_proj"] == ["batch", 196, 512]
    assert shapes["h0"] == ["batch", 512] and shapes["h"] == ["batch", "prev_beams", 512]
    assert shapes["alpha"] == ["batch", "beams", 196] and shapes["cand_ids"] == ["batch", "beams", 10]
    size = (large.dir / "encoder.onnx").stat().st_size
    assert 150e6 < size < 2**31  # ResNet-101 in one self-contained file
    assert all(not t.external_data for t in enc.graph.initializer)


def test_tensorrt_allow_list(large):
    for name in ("encoder.onnx", "decoder_step.onnx"):
        model = onnx.load(large.dir / name)
        assert tensorrt_problems(model) == [], name
    ops = op_histogram(onnx.load(large.dir / "encoder.onnx"))
    assert ops["Conv"] >= 100 and "AveragePool" not in ops and "GlobalAveragePool" not in ops


def test_parity(large):
    r = large.manifest["parity"]["fp32"]
    assert r["passed"] and r["identical"] == r["images"] == 2
    # Our own few steps of numeric parity, on other images (3 steps, 3 beams, crossing origins).
    images = synthetic(2, 256, seed=4242).images
    enc = make_session((large.dir / "encoder.onnx").read_bytes(), 2)
    dec = make_session((large.dir / "decoder_step.onnx").read_bytes(), 2)
    with torch.no_grad(), torch_threads(2):
        abs_diff, rel_diff = numeric_parity(large.model, enc, dec, images, large.ckpt.vocab.start, steps=3, beams=3)
    assert max(rel_diff.values()) < 1e-3, rel_diff
    assert abs_diff["logp"] < 1e-3
