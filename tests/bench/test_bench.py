"""run_bench end to end on a tiny exported model (tests/bench/conftest.py): every engine, every field, the
table, bad input. Streams, torch-compile and the options row: test_bench_variants.py.

Nothing here asserts on time: the machine may be busy. The assertions are about what was run
(forced step counts, providers, configurations) and the arithmetic between reported fields.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from captrt.bench import run_bench
from captrt.runtime.errors import ModelDirError
from tests.conftest import make_tiny_checkpoint, random_images

pytest.importorskip("torch")
FAST = {"warmup": 0, "iters": 2, "bandwidth_mb": 8, "matmul_sizes": (128,), "progress": False}
PCT = ("p50", "p90", "p99")


def _check_stats(stats, n=None):
    assert all(isinstance(stats[k], float) and stats[k] >= 0 for k in PCT)
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    if n is not None:
        assert stats["n"] == n


def test_forced_steps_every_engine_json_and_table(tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = run_bench(tiny_model, engines="ort,torch,reference", precisions="fp32,int8", batches="1,2",
                       beams="3", steps=3, json_out=out, allow_unverified=True, **FAST)
    data = json.loads(out.read_text())
    assert data["results"] == json.loads(json.dumps(report["results"]))
    for key in ("machine", "versions", "floor", "model", "settings", "date"):
        assert key in data
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1
    other = data["machine"]["other_processes_cores"]
    assert other is None or other >= 0.0
    assert {"numpy", "onnx", "torch"} <= set(data["versions"])
    assert "onnxruntime" in data["versions"] or "onnxruntime-gpu" in data["versions"]
    floor = data["floor"]
    assert float(floor["bandwidth_gbps"]["1"]) > 0
    for prec in ("fp32", "int8"):
        f = floor["precisions"][prec]
        assert f["floor_ms"] > 0 and 0 < f["read_bytes"] <= f["weight_bytes"]
        assert "embedding.weight" in f["gathered_bytes"]  # the table is gathered by word id, not read whole
    assert floor["precisions"]["int8"]["read_bytes"] < floor["precisions"]["fp32"]["read_bytes"]

    got = {(r["engine"], r["precision"], r["batch"], r["beam"]) for r in data["results"]}
    want = {(e, p, n, k) for e, p in (("ort", "fp32"), ("ort", "int8"), ("torch", "fp32"), ("reference", "fp32"))
            for n in (1, 2) for k in (3,)}
    assert got == want
    providers = {"ort": "CPUExecutionProvider", "torch": "torch:cpu", "reference": "torch:cpu"}
    for r in data["results"]:
        assert r["provider"] == providers[r["engine"]]
        assert r["steps"] == 3 and r["steps_mean"] == 3.0  # end=-1: every search ran exactly 3 steps
        assert r["iters"] == 2
        _check_stats(r["encoder_ms"], 2)
        _check_stats(r["e2e_ms"]["per_batch"], 2)
        _check_stats(r["e2e_ms"]["per_image"], 2)
        # steps 2..3 of 2 searches inside the engine; the reference times 3 x 2 seed steps apart.
        _check_stats(r["step_ms"], 4 if r["engine"] != "reference" else 6)
        per_batch, per_image = r["e2e_ms"]["per_batch"], r["e2e_ms"]["per_image"]
        assert per_image["p50"] == pytest.approx(per_batch["p50"] / r["batch"], rel=1e-3)
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1e3 / per_batch["p50"], rel=1e-3)
        assert r["encoder_ms"]["p50"] <= per_batch["p99"]
        assert r["peak_rss_mb"] > 0 and r["peak_rss_scope"] in ("config", "process")
        assert r["floor_ms"] == floor["precisions"][r["precision"]]["floor_ms"]
        assert r["floor_ratio"] == pytest.approx(r["step_ms"]["p50"] / r["floor_ms"], rel=1e-2)

    printed = capsys.readouterr().out
    assert "encoder ms p50/p90/p99" in printed and "step/floor" in printed
    assert "memory floor fp32" in printed and "read bandwidth" in printed
    lines = [line for line in printed.splitlines() if line.startswith(("ort ", "torch ", "reference "))]
    assert len(lines) == len(want)


def test_real_decoding_of_an_image_folder(tiny_model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(random_images(3, seed=4)):
        Image.fromarray(image).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")  # listed, but not one of the image suffixes
    report = run_bench(tiny_model, engines="ort,reference", batches="2", beams="2", steps=None,
                       images=folder, print_table=True, **{**FAST, "iters": 1})
    # the folder's three images were loaded (without it: synthetic scenes, and another description)
    assert report["settings"]["images"] == f"{folder} (3 images)"
    for r in report["results"]:
        assert r["steps"] is None
        assert 1 <= r["steps_mean"] <= 50  # real decoding: <end> or the model's max_steps
    assert "~" in capsys.readouterr().out  # the steps column shows the mean of real decoding


def test_images_as_an_array_and_a_time_budget(tiny_model):
    report = run_bench(tiny_model, engines="ort", batches="1", beams="1", steps=2, images=random_images(2),
                       max_seconds=1e-6, print_table=False, **{**FAST, "iters": 50})
    r = report["results"][0]
    assert r["iters"] == 3  # the budget was spent after the minimum of three timed runs
    assert "array" in report["settings"]["images"]


def test_bad_arguments_are_clear(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown engine 'onnx'"):
        run_bench(tiny_model, engines="ort,onnx", **FAST)
    with pytest.raises(ValueError, match=r"beam: 7 exceeds max_beam 5 of .*captrt.json"):
        run_bench(tiny_model, beams="1,7", **FAST)
    with pytest.raises(ModelDirError, match="no such model directory"):
        run_bench(tmp_path / "nowhere", **FAST)
    with pytest.raises(ModelDirError, match="precision 'fp16' was not exported"):
        run_bench(tiny_model, precisions="fp16", **FAST)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        run_bench(tiny_model, precisions="int4", **FAST)
    with pytest.raises(ValueError, match="batch: expected integers"):
        run_bench(tiny_model, batches="1,x", **FAST)
    with pytest.raises(ValueError, match="beam: values must be >= 1"):
        run_bench(tiny_model, beams="0", **FAST)
    with pytest.raises(ValueError, match="steps"):
        run_bench(tiny_model, steps=0, **FAST)
    with pytest.raises(ValueError, match="device"):
        run_bench(tiny_model, device="tpu", **FAST)
    with pytest.raises(ValueError, match="images: .*no such file"):
        run_bench(tiny_model, images=tmp_path / "missing", **FAST)


def _copy_model(tiny_model, dest):
    """A copy of the model directory whose captrt.json names its checkpoint by file name only (as
    on another machine): the checkpoint must then be found near the directory."""
    shutil.copytree(tiny_model, dest)
    manifest = json.loads((dest / "captrt.json").read_text())
    manifest["source"]["checkpoint"] = "tiny.pt"
    (dest / "captrt.json").write_text(json.dumps(manifest))
    return dest


def test_reference_needs_the_source_checkpoint(tiny_model, tmp_path):
    moved = _copy_model(tiny_model, tmp_path / "model")  # the checkpoint stays behind
    with pytest.raises(ModelDirError, match="source checkpoint 'tiny.pt' not found"):
        run_bench(moved, engines="reference", steps=1, **FAST)
    other = make_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(ModelDirError, match="not the checkpoint this model directory was exported from"):
        run_bench(moved, engines="reference", steps=1, checkpoint=other, **FAST)
    report = run_bench(moved, engines="reference", steps=1, batches="1", beams="1", print_table=False,
                       checkpoint=tiny_model.parent / "tiny.pt", **FAST)
    assert report["results"][0]["engine"] == "reference"


def test_checkpoint_found_beside_the_model_directory(tiny_model, tmp_path):
    """The demo's layout: demo_out/model/captrt.json names best.pt, which lives in demo_out/run/."""
    _copy_model(tiny_model, tmp_path / "model")
    (tmp_path / "run").mkdir()
    (tmp_path / "decoy").mkdir()
    make_tiny_checkpoint(tmp_path / "decoy" / "tiny.pt", seed=3)  # same name, other weights: sha256 refuses it
    shutil.copy(tiny_model.parent / "tiny.pt", tmp_path / "run" / "tiny.pt")
    report = run_bench(tmp_path / "model", engines="torch,reference", steps=1, batches="1", beams="1",
                       print_table=False, **FAST)
    assert [r["engine"] for r in report["results"]] == ["torch", "reference"]


def test_unavailable_engine_is_skipped_with_its_reason(tiny_model):
    report = run_bench(tiny_model, engines="ort,trt", batches="1", beams="1", steps=1, print_table=False, **FAST)
    if any(r["engine"] == "trt" for r in report["results"]):
        pytest.skip("TensorRT runs on this machine")
    assert [s["engine"] for s in report["skipped"]] == ["trt"]
    assert report["skipped"][0]["reason"]


def test_captrt_bench_command(tiny_model, tmp_path):
    """The typer command passes its comma lists and flags to run_bench and writes --json."""
    from typer.testing import CliRunner

    from captrt.cli import app

    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_model), "--engine", "ort", "--precision", "fp32,int8",
                                   "--batch", "2", "--beam", "1,3", "--steps", "2", "--warmup", "0", "--iters", "1",
                                   "--threads", "1", "--json", str(out), "--allow-unverified"])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["precision"], r["batch"], r["beam"]) for r in rows) == [
        ("fp32", 2, 1), ("fp32", 2, 3), ("int8", 2, 1), ("int8", 2, 3)]
    bad = CliRunner().invoke(app, ["bench", "--model", str(tiny_model), "--beam", "0"])
    assert bad.exit_code == 2 and "beam" in bad.output and "Traceback" not in bad.output


def test_engines_take_turns_run_by_run():
    """Interleaving: every timed round runs each engine once, in order, on the same images."""
    from captrt.bench.timing import measure_rounds
    from captrt.bench.runners import RunSample

    calls = []

    class Fake:
        precision, provider = "fp32", "fake"

        def __init__(self, name):
            self.name = name

        def run(self, images, beam, steps):
            calls.append((self.name, int(images[0, 0, 0, 0])))
            return RunSample(2.0, 1.0, [0.1], [0.1], [steps] * len(images))

        def seed_step_ms(self, images, beam, warmup, iters):
            return None

    pool = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    recs = measure_rounds([Fake("a"), Fake("b")], pool, batch=1, beam=2, steps=3, warmup=1, iters=3,
                          max_seconds=None, device="cpu")
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert [r["engine"] for r in recs] == ["a", "b"] and all(r["iters"] == 3 for r in recs)


def test_a_precision_below_budget_is_skipped_unless_allowed(tiny_model):
    """The tiny random model's int8 misses the budget (written with force): the bench refuses it as
    Captioner.load does, with its numbers, and benches it marked FAIL when allowed."""
    report = run_bench(tiny_model, engines="ort", precisions="fp32,int8", batches="1", beams="2", steps=2, **FAST)
    assert {r["precision"] for r in report["results"]} == {"fp32"}
    [skip] = [s for s in report["skipped"] if s["precision"] == "int8"]
    assert "missed the quality budget" in skip["reason"] and "--allow-unverified" in skip["reason"]
    allowed = run_bench(tiny_model, engines="ort", precisions="int8", batches="1", beams="2", steps=2,
                        allow_unverified=True, **FAST)
    [row] = allowed["results"]
    assert row["quality"]["status"] == "failed" and row["quality"]["passed"] is False
