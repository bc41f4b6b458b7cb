"""Export straight from a seed-notebook checkpoint (whole pickled modules) with the tutorial's word map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from captrt.export.errors import ExportError
from captrt.export.exporter import export_model
from captrt.vocab import END, PAD, START, UNK

FIXTURES = Path(__file__).resolve().parents[1] / "train" / "legacy_fixtures"
VOCAB = 20


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """Written by the notebook's own classes in a subprocess (they pickle as __main__.ImageEncoder ...)."""
    d = tmp_path_factory.mktemp("seed_ckpt")
    args = [str(d / "seed.pth"), str(d / "seed_ref.pt"), "--backbone", "resnet18", "--enc-size", "4",
            "--dim", "16", "--vocab", str(VOCAB)]
    proc = subprocess.run([sys.executable, str(FIXTURES / "seed_classes.py"), *args], cwd=d,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return d / "seed.pth"


def _word_map(path: Path, size: int) -> Path:
    words = {f"word{i}": i for i in range(1, size - 3)}
    words.update({PAD: 0, UNK: size - 3, START: size - 2, END: size - 1})
    path.write_text(json.dumps(words))  # the tutorial's WORDMAP_*.json: a bare word -> id dict
    return path


def test_legacy_checkpoint_exports_with_word_map(seed_checkpoint, tmp_path):
    word_map = _word_map(tmp_path / "WORDMAP.json", VOCAB)
    manifest = export_model(seed_checkpoint, tmp_path / "model", word_map=str(word_map), parity_count=6,
                            progress=False)
    assert manifest["source"]["kind"] == "legacy-seed"
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["fp32"]["identical"] == 6
    assert manifest["model"]["vocab_size"] == VOCAB and manifest["model"]["decoder_dim"] == 20
    vocab = json.loads((tmp_path / "model" / "vocab.json").read_text())["word2id"]
    assert vocab == json.loads(word_map.read_text())


def test_legacy_checkpoint_needs_a_word_map(seed_checkpoint, tmp_path):
    with pytest.raises(ExportError, match=rf"{seed_checkpoint}.*--word-map"):
        export_model(seed_checkpoint, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_legacy_checkpoint_with_the_wrong_word_map(seed_checkpoint, tmp_path):
    word_map = _word_map(tmp_path / "WORDMAP.json", VOCAB - 1)
    with pytest.raises(ExportError, match=rf"{word_map}.*{VOCAB - 1} words.*predicts {VOCAB}"):
        export_model(seed_checkpoint, tmp_path / "model", word_map=str(word_map), progress=False)
    assert not (tmp_path / "model").exists()
