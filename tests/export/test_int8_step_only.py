"""The int8 step alone as the export's int8 variant, and precision="auto" choosing from recorded verifications.

The model: a tiny captioner whose encoder cannot be quantized and whose step can. Encoder: every residual
block of the ResNet carries one outlier channel (its first BatchNorm 1000x larger on channel 3, the next
Conv's weights on it 1000x smaller: the same function in fp32), so per-tensor activation scales keep ~1 level
for the other channels of 8 Convs; int8 breaks every caption and returning 2 layers to fp32 repairs nothing.
Decoder: every word is "a" by a wide logit margin and an image-dependent step counter (tests/export/helpers)
decides when <end> wins, so the int8 step's rounding changes no caption while the encoder's changes their
lengths. Search speed is not asserted (int8_min_speedup=0 lets the tiny model's step-only variant ship).
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from typer.testing import CliRunner

from captrt.cli import app
from captrt.export.int8_search import STEP_ONLY
from captrt.runtime import Captioner
from captrt.runtime.auto import choose
from captrt.runtime.engines import create_engine
from captrt.runtime.model_dir import ModelDir
from captrt.runtime.verification.parity_set import fingerprint
from captrt.runtime.verification.verify import (QualityReport, key_digest, record, store_record, verification_key,
                                   verify_model)
from captrt.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import random_images
from tests.export.helpers import make_varied_length_checkpoint

PARITY = 24


def _sensitive_encoder_robust_step(path, factor: float = 1000.0, channel: int = 3):
    make_varied_length_checkpoint(path, sharpen=1.0, dim=64)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    with torch.no_grad():
        model.decoder.fc.bias[ckpt.vocab.word2id["a"]] += 5.0
        for stage in model.encoder.resnet[4:8]:
            for block in stage:
                block.bn1.weight[channel] *= factor
                block.bn1.bias[channel] *= factor
                block.conv2.weight[:, channel] /= factor
    ckpt.encoder_state, ckpt.decoder_state = model.encoder.state_dict(), model.decoder.state_dict()
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from captrt.export.exporter import export_model

    d = tmp_path_factory.mktemp("step_only")
    ckpt = _sensitive_encoder_robust_step(d / "sensitive.pt")
    manifest = export_model(ckpt, d / "model", int8=True, fp16=True, parity_count=PARITY, calib_count=8,
                            tune_count=16, int8_min_speedup=0.0, int8_max_fp32_layers=2, progress=False)
    return d / "model", manifest


@pytest.fixture
def copy(exported, tmp_path):
    return shutil.copytree(exported[0], tmp_path / "model", ignore=shutil.ignore_patterns("cache"))


def _record(manifest: dict, precision: str) -> dict:
    [entry] = [e for e in manifest["verification"] if e["precision"] == precision]
    return entry


def test_the_step_alone_is_chosen_written_by_reference_and_verified(exported):
    model_dir, manifest = exported
    search = manifest["parity"]["int8"]["search"]
    assert search["chosen"] == STEP_ONLY and search["useful"] and not search["encoder"].startswith("int8")
    candidates = {c["name"]: c for c in search["candidates"]}
    assert candidates[STEP_ONLY]["passed"] and candidates[STEP_ONLY]["chosen"]
    assert candidates[STEP_ONLY]["timings_ms"]["fp32"] > 0 and candidates[STEP_ONLY]["speedup"] > 0
    mixes = [c for name, c in candidates.items() if name != STEP_ONLY]
    # every encoder configuration tried is listed with its quality; none met the budget
    assert len(mixes) == 5 and not any(c["passed"] for c in mixes) and all("quality" in c for c in mixes)
    int8, fp32 = manifest["graphs"]["int8"], manifest["graphs"]["fp32"]
    assert int8["encoder"]["file"] == "encoder.onnx" and int8["encoder"]["sha256"] == fp32["encoder"]["sha256"]
    assert int8["decoder_step"]["file"] == "decoder_step.int8.onnx"
    assert not (model_dir / "encoder.int8.onnx").exists() and (model_dir / "decoder_step.int8.onnx").is_file()
    rec = _record(manifest, "int8")
    assert rec["report"]["passed"] and rec["speed"]["speedup"] > 0 and rec["speed"]["images"] == 8
    with Captioner.load(model_dir, precision="int8") as cap:
        assert cap.info()["verification"]["status"] == "verified" and cap.engine.precision == "int8"
        images = random_images(8, seed=5)
        alone = [cap.caption(im)[0].tokens for im in images]
        batched = [c.tokens for c in cap.caption(images, batch_size=8)]
        assert alone == batched and len({len(t) for t in alone}) > 2  # batch-independent, image-dependent


def test_verify_measures_and_records_the_speed(copy):
    report, facts = verify_model(copy, precision="int8")
    assert report.passed and facts["speed"]["speedup"] > 0 and facts["speed"]["fp32_ms_per_image"] > 0
    [cached] = (copy / "cache" / "verify").glob("ort-int8-*.json")
    assert json.loads(cached.read_text())["speed"] == facts["speed"]


# ------------------------------------------------------------------------------- precision="auto"
def _edit(model_dir, change) -> None:
    path = model_dir / "captrt.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _set(precision: str, *, speedup: float | None, identical: int | None = None):
    def change(manifest: dict) -> None:
        entry = _record(manifest, precision)
        if identical is not None:
            entry["report"]["identical"] = identical
        if speedup is None:
            entry.pop("speed", None)
        else:
            entry["speed"] = {"ms_per_image": 10.0, "fp32_ms_per_image": 10.0 * speedup, "speedup": speedup,
                              "measured_at": "2026-01-01T00:00:00+00:00"}
    return change


def _statuses(choice) -> dict[str, str]:
    return {c["precision"]: c["status"] for c in choice.candidates}


def test_auto_loads_the_fastest_verified_precision(copy):
    _edit(copy, _set("int8", speedup=1.6))
    _edit(copy, _set("fp16", speedup=1.2))
    with Captioner.load(copy, precision="auto") as cap:
        info = cap.info()
        assert cap.engine.precision == "int8" and info["verification"]["status"] == "verified"
        choice = info["precision_choice"]
        assert choice["chosen"] == "int8" and "1.60x fp32" in choice["reason"]
        assert {c["precision"]: c.get("speedup") for c in choice["candidates"]} == {"fp32": 1.0, "fp16": 1.2, "int8": 1.6}
    _edit(copy, _set("int8", speedup=0.9))  # slower than fp32: not worth its rounding
    assert choose(ModelDir.load(copy), "ort", "cpu").chosen == "fp16"


def test_auto_never_loads_a_refused_or_failed_variant(copy, monkeypatch):
    import captrt.runtime.verification.verify as verify

    _edit(copy, _set("int8", speedup=3.0, identical=PARITY // 2))  # the fastest, but below the budget
    _edit(copy, _set("fp16", speedup=1.3))
    loaded = []
    real = create_engine

    def spy(name, model, **kw):
        loaded.append(kw.get("precision"))
        return real(name, model, **kw)

    monkeypatch.setattr("captrt.runtime.engines.create_engine", spy)
    monkeypatch.setattr(verify, "measure", lambda *a, **k: pytest.fail("auto never verifies at load"))
    with Captioner.load(copy, precision="auto") as cap:
        assert cap.engine.precision == "fp16" and loaded == ["fp16"]
        assert _statuses(cap.precision_choice) == {"fp32": "baseline", "fp16": "verified", "int8": "failed"}

    def refuse_int8(manifest: dict) -> None:  # as an export without --force leaves it: not written, refused
        manifest["graphs"].pop("int8")
        manifest["refused"] = {"int8": {"reason": "missed the budget"}}
        manifest["verification"] = [e for e in manifest["verification"] if e["precision"] != "int8"]
        for entry in manifest["verification"]:  # the keys of an export that wrote these graphs only
            entry["key"]["model"] = fingerprint(manifest["graphs"], manifest["parity_set"])
            entry["key_sha256"] = key_digest(entry["key"])

    _edit(copy, refuse_int8)
    choice = choose(ModelDir.load(copy), "ort", "cpu")
    assert choice.chosen == "fp16" and _statuses(choice)["int8"] == "refused"
    with pytest.raises(ValueError, match="refused at export"):
        Captioner.load(copy, precision="int8")


def test_auto_is_fp32_when_nothing_faster_is_verified_here(copy, monkeypatch):
    import captrt.runtime.hardware as hardware

    _edit(copy, _set("int8", speedup=None))  # verified at export, never timed here
    _edit(copy, _set("fp16", speedup=1.4))
    choice = choose(ModelDir.load(copy), "ort", "cpu")
    assert choice.chosen == "fp16" and _statuses(choice)["int8"] == "untimed"
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Another CPU")  # the records are another machine's
    with Captioner.load(copy, precision="auto") as cap:
        assert cap.engine.precision == "fp32" and cap.info()["verification"]["status"] == "exact"
        assert _statuses(cap.precision_choice) == {"fp32": "baseline", "fp16": "unverified", "int8": "unverified"}
        assert "faster than fp32 is verified" in cap.precision_choice.reason


def test_auto_skips_a_record_whose_exact_key_does_not_hold(copy):
    """A record that matches this machine's CPU and libraries but not the engine's full key (here: another
    provider) is not a verification of what would load: auto goes on to the next candidate."""
    _edit(copy, _set("int8", speedup=2.0))
    _edit(copy, lambda m: _record(m, "int8")["key"].update(provider="SomeOtherExecutionProvider"))
    _edit(copy, lambda m: _record(m, "int8").update(key_sha256="0" * 64))
    _edit(copy, _set("fp16", speedup=1.1))
    with Captioner.load(copy, precision="auto") as cap:
        assert cap.engine.precision == "fp16"
        assert _statuses(cap.precision_choice)["int8"] == "unverified"


def test_a_verify_run_times_a_precision_for_auto(copy):
    """captrt verify's record (with its speed) is what auto uses on a machine the export did not run on."""
    _edit(copy, lambda m: m.update(verification=[]))
    model = ModelDir.load(copy)
    engine = create_engine("ort", model, precision="fp16")
    key, digest = verification_key(model, engine)
    engine.close()
    passed = QualityReport(images=PARITY, identical=PARITY, references=False)
    store_record(model, record(passed, key, digest, "verify", {"speedup": 1.25, "ms_per_image": 8.0,
                                                              "measured_at": "2026-01-02T00:00:00+00:00"}))
    choice = choose(ModelDir.load(copy), "ort", "cpu")
    assert choice.chosen == "fp16" and _statuses(choice) == {"fp32": "baseline", "fp16": "verified",
                                                             "int8": "unverified"}


def test_caption_json_header_and_service_report_the_choice(copy, tmp_path):
    from PIL import Image

    _edit(copy, _set("int8", speedup=1.5))
    _edit(copy, _set("fp16", speedup=1.1))
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1)[0]).save(image)
    result = CliRunner().invoke(app, ["caption", str(image), "--model", str(copy), "--precision", "auto", "--json"])
    assert result.exit_code == 0, result.output
    header, line = [json.loads(x) for x in result.stdout.strip().splitlines()]
    assert header["header"]["precision"] == "int8" and header["header"]["precision_choice"]["chosen"] == "int8"
    assert line["image"] == str(image) and line["caption"]
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captrt.serve import ServeConfig, create_app

    cap = Captioner.load(copy, precision="auto")
    with TestClient(create_app(ServeConfig(model=copy, precision="auto"), captioner=cap)) as client:
        for _ in range(600):  # the service installs the captioner in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        info = client.get("/v1/model").json()
    assert info["precision"] == "int8" and info["precision_choice"]["candidates"][0]["precision"] == "fp32"



def test_openvino_bf16_with_the_int8_step_is_verified_and_timed_beside_bf16(copy):
    """--bf16 on a directory with an int8 variant verifies OpenVINO's bf16 encoder with the int8 step too; auto
    then loads whichever of the two verified faster here (on a CPU without bf16 units neither runs)."""
    pytest.importorskip("openvino")
    from captrt.export.progress import Progress
    from captrt.export.variant_quality import verify_engines_here
    from captrt.runtime import hardware
    from captrt.runtime.engines.openvino import BF16_FLAGS

    manifest = json.loads((copy / "captrt.json").read_text())
    manifest = verify_engines_here(copy, manifest, [("openvino", "bf16")], 0.99, Progress(False))
    if not any(f in hardware.all_cpu_flags() for f in BF16_FLAGS):
        assert set(manifest["not_verified"]) == {"openvino-bf16", "openvino-bf16-int8"}
        return
    records = {e["precision"]: e for e in manifest["verification"] if e["engine"] == "openvino"}
    assert set(records) == {"bf16", "bf16-int8"} and all(r["speed"]["speedup"] > 0 for r in records.values())
    assert records["bf16-int8"]["key"]["graphs"]["decoder_step"] == {"backend": "ort", "inference_precision": "f32"}
    assert records["bf16-int8"]["key"]["variant"] == "fp32+int8"
    passed = {p: r["speed"]["speedup"] for p, r in records.items() if r["report"]["passed"]}
    choice = choose(ModelDir.load(copy), "openvino", "cpu")
    faster = [p for p, x in sorted(passed.items(), key=lambda kv: -kv[1]) if x > 1.0]
    assert choice.chosen == (faster[0] if faster else "fp32")
    engine = create_engine("openvino", ModelDir.load(copy), precision="bf16-int8", threads=1)
    assert engine.provider == "openvino:CPU[bf16]+ort:CPU"
    engine.close()


def test_batch_and_bench_resolve_auto_once(copy, tmp_path):
    from PIL import Image

    from captrt.batch import run_batch
    from captrt.bench.bench import plan_configs

    _edit(copy, _set("int8", speedup=1.5))
    _edit(copy, _set("fp16", speedup=1.1))
    choices: dict = {}
    pairs, _ = plan_configs(ModelDir.load(copy), ["ort"], ["auto", "fp32"], "cpu", choices)
    assert pairs == [("ort", "int8"), ("ort", "fp32")] and choices["ort"]["chosen"] == "int8"
    images = tmp_path / "in"
    images.mkdir()
    for i, pixels in enumerate(random_images(3, seed=4)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    result = run_batch([str(images)], copy, tmp_path / "out", precision="auto", fmt="jsonl", progress=False)
    rows = [json.loads(x) for f in sorted((tmp_path / "out").glob("*.jsonl")) for x in f.read_text().splitlines()]
    assert result.captioned == 3 and {r["precision"] for r in rows} == {"int8"}
