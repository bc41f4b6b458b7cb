"""Bad input gets an ExportError naming the file, and a failed export leaves no model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import captrt.export.exporter as exporter_module
from captrt.export.errors import ExportError
from captrt.export.exporter import export_model
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_existing_output_is_refused_without_overwrite(ckpt, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match=f"{out}: already exists.*overwrite"):
        export_model(ckpt, out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_model(ckpt, afile, overwrite=True, progress=False)


def test_truncated_checkpoint(ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ExportError, match=f"{bad}: unreadable or truncated"):
        export_model(bad, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists() and _leftovers(tmp_path) == []


def test_wrong_kind_of_file(tmp_path):
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, not_ckpt)  # a bare state dict, not a captrt checkpoint
    with pytest.raises(ExportError, match=f"{not_ckpt}: not a captrt checkpoint"):
        export_model(not_ckpt, tmp_path / "m1", progress=False)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ExportError, match=str(text)):
        export_model(text, tmp_path / "m2", progress=False)
    with pytest.raises(ExportError, match="no such checkpoint"):
        export_model(tmp_path / "missing.pt", tmp_path / "m3", progress=False)
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3"))


def test_bad_arguments(ckpt, tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="max_beam"):
        export_model(ckpt, out, max_beam=0, progress=False)
    with pytest.raises(ExportError, match="exceeds the vocabulary size"):
        export_model(ckpt, out, max_beam=500, progress=False)
    with pytest.raises(ExportError, match="opset"):
        export_model(ckpt, out, opset=16, progress=False)
    with pytest.raises(ExportError, match="--images"):
        export_model(ckpt, out, int8=True, calib_json=str(tmp_path / "d.json"), progress=False)
    assert not out.exists()


def _dataset(root, n, corrupt: int | None = None, missing: int | None = None):
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        name = f"img{i}.png"
        split = "train" if i % 2 else "test"
        (root / "imgs").mkdir(exist_ok=True)
        if i == corrupt:
            (root / "imgs" / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        elif i != missing:
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "imgs" / name)
        images.append({"filepath": "imgs", "filename": name, "split": split,
                       "sentences": [{"tokens": ["a", "red", "circle"]}]})
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": images}))
    return path


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_unreadable_calibration_image_is_named(ckpt, tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    dataset = _dataset(data, 6, corrupt=3 if kind == "corrupt" else None, missing=3 if kind == "missing" else None)
    bad = data / "imgs" / "img3.png"
    with pytest.raises(ExportError, match=f"{bad}: (unreadable image|image file not found)"):
        export_model(ckpt, tmp_path / "model", int8=True, calib_json=str(dataset), calib_images=str(data),
                     progress=False)
    assert not (tmp_path / "model").exists() and _leftovers(tmp_path) == []


def test_unreadable_calibration_json(ckpt, tmp_path):
    broken = tmp_path / "dataset.json"
    broken.write_text("{not json")
    with pytest.raises(ExportError, match=f"{broken}: cannot read calibration dataset JSON"):
        export_model(ckpt, tmp_path / "model", int8=True, calib_json=str(broken), calib_images=str(tmp_path),
                     progress=False)


def test_missing_parity_image_is_named(ckpt, tmp_path):
    with pytest.raises(ExportError, match=f"{tmp_path / 'nope.jpg'}: image file not found"):
        export_model(ckpt, tmp_path / "model", parity_images=[tmp_path / "nope.jpg"], progress=False)


def test_failure_while_exporting_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """A trace that fails after the encoder was exported: no model directory, no temporary sibling."""
    def broken_forward(self, *args):
        raise RuntimeError("simulated tracing failure")

    monkeypatch.setattr(exporter_module.DecoderStepGraph, "forward", broken_forward)
    out = tmp_path / "model"
    with pytest.raises(ExportError, match="could not export DecoderStepGraph"):
        export_model(ckpt, out, parity_count=2, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failure_after_files_were_written_keeps_the_old_directory(ckpt, tmp_path, monkeypatch):
    """Disk full while writing the second graph, with overwrite=True: the previous model survives intact."""
    out = tmp_path / "model"
    out.mkdir()
    (out / "captrt.json").write_text('{"old": true}')
    written = []
    real_save = exporter_module.save_onnx

    def save_then_fail(model, path):
        if written:
            raise OSError(28, "No space left on device", str(path))
        real_save(model, path)
        written.append(path)

    monkeypatch.setattr(exporter_module, "save_onnx", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_model(ckpt, out, overwrite=True, parity_count=2, progress=False)
    assert written and written[0].name == "encoder.onnx" and not written[0].exists()  # the partial dir is gone
    assert [p.name for p in out.iterdir()] == ["captrt.json"]
    assert (out / "captrt.json").read_text() == '{"old": true}'
    assert _leftovers(tmp_path) == []
