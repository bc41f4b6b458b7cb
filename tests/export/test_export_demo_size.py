"""Export at the demo model's size (ResNet-18, 8x8 grid, 256-dim decoder) with the full parity gate:
50 images, every beam-search caption token-identical to the PyTorch reference."""

from __future__ import annotations

import json

import pytest

from captrt.export.exporter import export_model
from tests.export.helpers import make_varied_length_checkpoint


@pytest.fixture(scope="module")
def demo_sized(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo_sized")
    ckpt = make_varied_length_checkpoint(d / "demo.pt", backbone="resnet18", enc_size=8, dim=256)
    manifest = export_model(ckpt, d / "model", parity_count=50, progress=False)
    return d / "model", manifest


def test_full_parity_gate(demo_sized):
    model_dir, manifest = demo_sized
    p = manifest["parity"]["fp32"]
    assert p["measured"] and p["passed"]
    assert p["images"] == 50 and p["identical"] == 50 and p["mismatches"] == []
    assert max(p["max_rel_diff"].values()) < 1e-3
    m = manifest["model"]
    assert (m["backbone"], m["enc_size"], m["decoder_dim"], m["attention_dim"]) == ("resnet18", 8, 256, 256)
    assert json.loads((model_dir / "captrt.json").read_text())["parity"]["fp32"] == json.loads(json.dumps(p))
