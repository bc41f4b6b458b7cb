"""int8 calibration and parity on a Karpathy-split dataset (--calib DATASET.json --images ROOT)."""

from __future__ import annotations

from pathlib import Path

from captrt.export.exporter import export_model
from captrt.export.images import CALIB_SPLITS, PARITY_SPLITS, from_dataset, read_karpathy
from captrt.synth import make_synth_dataset
from tests.conftest import make_tiny_checkpoint


def test_dataset_calibration_and_bleu_against_its_captions(tmp_path, capsys):
    data = tmp_path / "synth"
    dataset = make_synth_dataset(data, 30, seed=3)  # writes images/ and a Karpathy JSON with splits
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    # force, no search: this test is about which images calibrate and judge; the budget has its own tests.
    manifest = export_model(ckpt, tmp_path / "model", int8=True, calib_json=str(dataset), calib_images=str(data),
                            parity_count=5, calib_count=6, progress=True, force=True, int8_search=False)
    fp32, int8 = manifest["parity"]["fp32"], manifest["parity"]["int8"]
    assert fp32["passed"] and fp32["images"] == 5
    # BLEU is measured against the dataset's captions when the dataset provides them.
    assert fp32["bleu_references"] == int8["bleu_references"] == "dataset"
    assert fp32["bleu4_variant"] == fp32["bleu4_reference"]
    assert int8["calibration"] == {"images": 6, "source": "calibration dataset"}
    assert manifest["exporter"]["parity_images"] == "dataset"
    err = capsys.readouterr().err
    assert "tracing encoder" in err and "int8: calibrating the encoder on 6 images" in err


def test_dataset_image_selection(tmp_path):
    """Parity prefers held-out splits, calibration prefers training images, and they do not overlap."""
    data = tmp_path / "synth"
    dataset = make_synth_dataset(data, 30, seed=3)
    entries = read_karpathy(dataset, data)
    split_of = {str(e.path): e.split for e in entries}
    parity = from_dataset(entries, PARITY_SPLITS, 5, 256)
    calib = from_dataset(entries, CALIB_SPLITS, 6, 256, avoid={Path(p) for p in parity.paths})
    assert {split_of[p] for p in parity.paths} <= {"test", "val"}
    assert {split_of[p] for p in calib.paths} <= {"train", "restval"}
    assert not set(parity.paths) & set(calib.paths)
    assert parity.images.shape == (5, 256, 256, 3) and parity.captions and all(parity.captions)
    # Asking for more than the held-out splits hold tops up from the other splits.
    many = from_dataset(entries, PARITY_SPLITS, 20, 256)
    assert len(many) == 20 and {split_of[p] for p in many.paths[:3]} <= {"test", "val"}
