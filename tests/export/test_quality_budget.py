"""The quality budget end to end on a tiny model whose int8 variant loses captions (random weights,
uncalibrated-for scenes): export refuses it, --force writes it marked failed, loads refuse it unless
allowed, `captrt verify` passes fp16 and fails int8, verifications are cached by key, and a tampered
parity set is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from captrt.cli import app
from captrt.runtime import Captioner, ModelDir, ModelDirError
from captrt.runtime.errors import UnverifiedPrecisionError
from tests.conftest import make_tiny_checkpoint, random_images

PARITY, CALIB = 40, 4  # 40: one fp16 near-tie flip (CPU-dependent) still leaves 97.5% identical


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """fp16 + int8 (no search) written with --force: fp16 within budget, int8 not."""
    from captrt.export.exporter import export_model

    d = tmp_path_factory.mktemp("budget")
    ckpt = make_tiny_checkpoint(d / "tiny.pt")
    manifest = export_model(ckpt, d / "model", fp16=True, int8=True, int8_search=False, parity_count=PARITY,
                            calib_count=CALIB, force=True, progress=False)
    return d / "model", manifest, ckpt


def _record(manifest: dict, precision: str) -> dict:
    [entry] = [e for e in manifest["verification"] if e["precision"] == precision]
    return entry


def test_forced_export_records_both_verdicts(forced):
    model, manifest, _ = forced
    assert set(manifest["graphs"]) == {"fp32", "fp16", "int8"} and "refused" not in manifest
    fp16, int8 = _record(manifest, "fp16"), _record(manifest, "int8")
    assert fp16["report"]["passed"] is True and fp16["report"]["identical"] >= 0.97 * PARITY
    assert int8["report"]["passed"] is False and int8["report"]["identical"] < 0.97 * PARITY
    assert manifest["parity"]["int8"]["passed"] is False  # the parity report carries the same verdict
    assert fp16["key"]["engine"] == "ort" and fp16["key"]["provider"] == "CPUExecutionProvider"
    assert len(manifest["parity_set"]["files"]) == 2 and manifest["parity_set"]["images"] == PARITY


def test_export_refuses_a_variant_below_budget(forced, tmp_path, monkeypatch):
    """int8 below budget is not written (exit 1, named with its numbers); --bf16 on a CPU without bf16 units
    records why, naming the flags it needs (there are no bf16 files to refuse)."""
    import captrt.runtime.hardware as hardware

    monkeypatch.setattr(hardware, "all_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["avx2", "fma"])
    _, _, ckpt = forced
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["export", str(ckpt), "-o", str(out), "--int8", "--no-int8-search", "--bf16",
                                      "--parity-images", str(PARITY)])
    assert result.exit_code == 1, result.output
    assert "int8 refused" in result.output and "captions identical to fp32" in result.output
    names = {p.name for p in out.iterdir()}
    assert "encoder.onnx" in names and not {"encoder.int8.onnx", "decoder_step.int8.onnx"} & names
    manifest = json.loads((out / "captrt.json").read_text())
    assert set(manifest["graphs"]) == {"fp32"} and manifest["refused"]["int8"]["quality"]["passed"] is False
    with pytest.raises(ModelDirError, match="refused at export because it missed the quality budget"):
        Captioner.load(out, precision="int8")
    why = manifest["not_verified"]["openvino-bf16"]  # no bf16 units (or, without the openvino extra, no openvino)
    assert "avx512_bf16" in why or "openvino" in why
    assert not [e for e in manifest["verification"] if e["precision"] == "bf16"]
    assert "openvino-bf16" not in manifest["refused"]
    ModelDir.load(out).require_precision("bf16")  # an engine precision over the fp32 graphs


def test_load_refuses_a_failed_variant_unless_allowed(forced):
    model, _, _ = forced
    with pytest.raises(UnverifiedPrecisionError, match=r"missed the quality budget \(export\).*allow_unverified=True"):
        Captioner.load(model, precision="int8")
    with Captioner.load(model, precision="int8", allow_unverified=True) as cap:
        assert cap.info()["verification"]["status"] == "unverified"
        assert cap.info()["verification"]["passed"] is False
        assert cap.caption(random_images(1))[0].ok
    with Captioner.load(model, precision="fp16") as cap:
        assert cap.info()["verification"] == {**cap.info()["verification"], "status": "verified", "source": "export"}
    with Captioner.load(model) as cap:  # fp32 on ONNX Runtime's CPU provider: exact, nothing to verify
        assert cap.info()["verification"]["status"] == "exact"


def test_caption_cli_needs_allow_unverified(forced, tmp_path):
    from PIL import Image

    model, _, _ = forced
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1)[0]).save(image)
    refused = CliRunner().invoke(app, ["caption", str(image), "--model", str(model), "--precision", "int8"])
    assert refused.exit_code == 2 and "--allow-unverified" in refused.output
    allowed = CliRunner().invoke(app, ["caption", str(image), "--model", str(model), "--precision", "int8",
                                       "--allow-unverified"])
    assert allowed.exit_code == 0 and str(image) in allowed.output


def test_verify_command_passes_and_fails(forced):
    model, manifest, _ = forced
    ok = CliRunner().invoke(app, ["verify", str(model), "--precision", "fp16"])
    assert ok.exit_code == 0, ok.output
    # N/N: the count the export measured for fp16 on this machine (one near-tie flip may cost an image)
    identical = _record(manifest, "fp16")["report"]["identical"]
    assert identical >= 0.97 * PARITY
    assert f"identical: {identical}/{PARITY} captions equal fp32's" in ok.output, ok.output
    assert "passed" in ok.output
    bad = CliRunner().invoke(app, ["verify", str(model), "--precision", "int8", "--json"])
    assert bad.exit_code == 1
    report = json.loads(bad.output)["report"]
    assert report["passed"] is False and report["images"] == PARITY
    missing = CliRunner().invoke(app, ["verify", str(model), "--precision", "bf16", "--engine", "ort"])
    assert missing.exit_code == 2


@pytest.fixture
def model_copy(forced, tmp_path):
    return shutil.copytree(forced[0], tmp_path / "model", ignore=shutil.ignore_patterns("cache"))


def _count_measures(monkeypatch) -> list:
    import captrt.runtime.verification.verify as verify

    calls: list = []
    real = verify.measure

    def counting(*args, **kwargs):
        calls.append(args[0].precision)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "measure", counting)
    return calls


def test_first_load_on_another_machine_verifies_then_reuses_the_cache(model_copy, monkeypatch):
    import captrt.runtime.hardware as hardware

    calls = _count_measures(monkeypatch)
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Some Other CPU")  # not the export's machine
    with Captioner.load(model_copy, precision="fp16") as cap:
        assert cap.verification.status == "verified" and cap.verification.source == "this load"
    cached = list((model_copy / "cache" / "verify").glob("ort-fp16-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["key"]["cpu"] == "Some Other CPU"
    with Captioner.load(model_copy, precision="fp16") as cap:
        assert cap.verification.source == "cache"
    assert calls == ["fp16"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["avx2", "avx512_bf16"])  # a changed key verifies again
    with Captioner.load(model_copy, precision="fp16") as cap:
        assert cap.verification.source == "this load"
    assert calls == ["fp16", "fp16"] and len(list((model_copy / "cache" / "verify").glob("*.json"))) == 2
    # allow_unverified never spends time verifying: it loads at once, marked unverified
    monkeypatch.setattr(hardware, "cpu_model", lambda: "A Third CPU")
    with Captioner.load(model_copy, precision="fp16", allow_unverified=True) as cap:
        assert cap.verification.status == "unverified" and cap.verification.report is None
    assert len(calls) == 2


def test_read_only_directory_verifies_in_memory(model_copy, monkeypatch):
    import captrt.atomic
    import captrt.runtime.hardware as hardware

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    calls = _count_measures(monkeypatch)
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Read-only CPU")
    monkeypatch.setattr(captrt.atomic, "atomic_write_text", read_only)
    for _ in range(2):
        with Captioner.load(model_copy, precision="fp16") as cap:
            assert cap.verification.status == "verified"
    assert calls == ["fp16"]  # the second load found the first one's result in memory
    assert not list((model_copy / "cache" / "verify").glob("*.json"))


def test_tampered_parity_set_is_refused(model_copy, monkeypatch):
    import captrt.runtime.hardware as hardware

    images = np.load(model_copy / "parity_images.npy")
    images[0, 0, 0, 0] ^= 1
    np.save(model_copy / "parity_images.npy", images)
    result = CliRunner().invoke(app, ["verify", str(model_copy), "--precision", "fp16"])
    assert result.exit_code == 2 and "parity_images.npy: sha256" in result.output
    monkeypatch.setattr(hardware, "cpu_model", lambda: "Tamper CPU")  # forces a fresh verification at load
    with pytest.raises(ModelDirError, match="parity set was modified or corrupted"):
        Captioner.load(model_copy, precision="fp16")



def test_batch_refuses_an_unverified_precision_before_writing(forced, tmp_path):
    from PIL import Image

    from captrt.batch import BatchUsageError, run_batch

    model, _, _ = forced
    images = tmp_path / "in"
    images.mkdir()
    for i, pixels in enumerate(random_images(3, seed=4)):
        Image.fromarray(pixels).save(images / f"{i}.png")
    with pytest.raises(BatchUsageError, match="missed the quality budget"):
        run_batch([str(images)], model, tmp_path / "out", precision="int8", progress=False)
    assert not (tmp_path / "out").exists()
    result = run_batch([str(images)], model, tmp_path / "out", precision="int8", allow_unverified=True, progress=False)
    assert (result.captioned, result.failed) == (3, 0)
