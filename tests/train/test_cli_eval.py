"""`captrt eval` and the CLI's error handling (one clear line, exit code 2)."""

import json
import subprocess
import sys

import pytest

from captrt.synth import make_synth_dataset
from captrt.train.evaluate import evaluate
from tests.conftest import make_tiny_checkpoint


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "captrt", *map(str, args)], capture_output=True, text=True, **kw)


def test_eval_reports_coco_metrics_and_writes_results(tmp_path):
    data_json = make_synth_dataset(tmp_path / "s", 12, seed=4)
    ckpt = make_tiny_checkpoint(tmp_path / "m.pt", end_bias=3.0)
    result = evaluate(ckpt, data_json, split="test", beam_size=3, results_path=tmp_path / "r.json", progress=False)
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "BLEU-4 (nltk corpus)"):
        assert key in result.metrics
    preds = json.loads((tmp_path / "r.json").read_text())
    assert len(preds) == len(result.predictions) >= 1
    assert set(preds[0]) == {"image_id", "caption"}


def test_cli_bad_inputs_end_with_one_clear_line(tmp_path):
    proc = run_cli("train", "--data", tmp_path / "nope", "-o", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope" in proc.stderr and "prepared dataset" in proc.stderr

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    proc = run_cli("eval", bad, "--data", tmp_path / "d.json")
    assert proc.returncode == 2 and "bad.pt" in proc.stderr and "Traceback" not in proc.stderr

    proc = run_cli("convert", bad, "-o", tmp_path / "new.pt")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "new.pt").exists()


def test_pretrained_weights_unavailable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; this machine has no route to download.pytorch.org
    from captrt.train.model import build_resnet

    try:
        build_resnet("resnet18", pretrained=True)
    except RuntimeError as exc:
        assert "--pretrained" in str(exc) and "hub" in str(exc)
    else:
        pytest.skip("ImageNet weights were downloadable here")


def test_help_is_fast_and_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("synth", "prepare", "train", "eval", "convert", "export", "demo"):
        assert cmd in proc.stdout
    probe = "import sys, captrt.cli; print(any(m == 'torch' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
