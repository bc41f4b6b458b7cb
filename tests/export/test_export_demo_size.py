"""Export at the demo model's size (ResNet-18, 8x8 grid, 256-dim decoder) with the full parity gate:
50 images, every beam-search caption token-identical to the PyTorch reference."""

from __future__ import annotations

import json


def test_full_parity_gate(demo_sized_export):
    """demo_sized_export (tests/conftest.py) ran the exporter with the 50-image gate."""
    model_dir, manifest = demo_sized_export
    p = manifest["parity"]["fp32"]
    assert p["measured"] and p["passed"]
    assert p["images"] == 50 and p["identical"] == 50 and p["mismatches"] == []
    assert max(p["max_rel_diff"].values()) < 1e-3
    m = manifest["model"]
    assert (m["backbone"], m["enc_size"], m["decoder_dim"], m["attention_dim"]) == ("resnet18", 8, 256, 256)
    assert json.loads((model_dir / "captrt.json").read_text())["parity"]["fp32"] == json.loads(json.dumps(p))
