"""The OpenVINO engine (captrt.runtime.engines.openvino): fp32 captions equal to ONNX Runtime's, bf16 only
with bf16 units (the check tested with faked CPU flags), int8/mixes/fallback, caching, thread safety,
and the model directory's checks (tampered graph, external data) as in the ONNX Runtime engine."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from captrt.runtime import Captioner, EngineUnavailableError, ModelDirError, UnverifiedPrecisionError
from captrt.runtime import hardware
from captrt.runtime.engines import create_engine
from captrt.runtime.model_dir import ModelDir
from tests.conftest import random_images
from tests.runtime.test_model_dir import manifest, rehash, write_manifest
from tests.runtime.threads import assert_thread_safe

pytest.importorskip("openvino")
from captrt.runtime.engines import openvino as ov_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
HAS_BF16 = any(f in hardware.all_cpu_flags() for f in ov_engine.BF16_FLAGS)
AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})


@pytest.fixture
def model_copy(varied_model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(varied_model_dir, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def tokens(caps) -> list[list[int]]:
    assert all(c.ok for c in caps), [c.error for c in caps if not c.ok]
    return [c.tokens for c in caps]


# ------------------------------------------------------------------ fp32: the same captions as ONNX Runtime
@pytest.mark.parametrize("beam", [1, 5])
def test_fp32_captions_identical_to_ort_on_the_demo_sized_model(demo_sized_export, beam):
    model_dir, _ = demo_sized_export
    images = random_images(8, seed=11)
    ort_cap = Captioner.load(model_dir, engine="ort", threads=2)
    expected = tokens(ort_cap.caption(images, beam_size=beam, batch_size=8))
    assert len({tuple(t) for t in expected}) > 1  # the images get different captions: a real comparison
    # the default placement (encoder in OpenVINO, step in ORT) and both graphs in OpenVINO
    for placement in ({}, {"encoder_on": "openvino", "step_on": "openvino"}):
        ov_cap = Captioner.load(model_dir, engine="openvino", precision="fp32", threads=2, **placement)
        assert ov_cap.engine.needs_verification is False  # f32 asked explicitly and reported back
        assert ov_cap.verification.status == "exact"
        for batch in (1, 8):
            got = ov_cap.caption(images, beam_size=beam, batch_size=batch)
            assert tokens(got) == expected, (placement, batch)
            ref = ort_cap.caption(images, beam_size=beam, batch_size=batch)
            np.testing.assert_allclose([c.score for c in got], [c.score for c in ref], rtol=1e-4, atol=1e-4)


def test_info_and_numerics_report_what_ran(varied_model_dir):
    cap = Captioner.load(varied_model_dir, engine="openvino", threads=1)  # default: encoder OV, step ORT
    info = cap.info()
    assert info["engine"] == "openvino" and info["provider"] == "openvino:CPU[f32]+ort:CPU"
    assert info["numerics"]["graphs"]["encoder"]["inference_precision"] == "f32"
    numerics = cap.engine.numerics()
    assert numerics["libraries"]["openvino"] and numerics["libraries"]["onnxruntime"]
    assert {g["inference_precision"] for g in numerics["graphs"].values()} == {"f32"}
    assert numerics["cpu"] == hardware.cpu_model() and numerics["cpu_flags"] == hardware.cpu_flags()
    described = cap.engine.describe()
    assert described["cpu"] == hardware.cpu_model() and described["inference_num_threads"] == 1
    assert described["graphs"] == {"encoder": {"backend": "openvino", "inference_precision": "f32"},
                                   "decoder_step": {"backend": "ort", "inference_precision": "f32"}}
    only_ov = create_engine("openvino", cap.model, threads=1, step_on="openvino")
    assert only_ov.provider == "openvino:CPU[f32]" and "onnxruntime" not in only_ov.numerics()["libraries"]


def test_every_placement_is_selectable_and_reported(varied_model_dir):
    model = ModelDir.load(varied_model_dir)
    images = random_images(4, seed=5)
    from captrt.runtime.decoding.beam import beam_search

    def run(engine):
        res = beam_search(engine, images, start=model.vocab.start, end=model.vocab.end, vocab_size=model.vocab_size,
                          beam_size=3, max_steps=model.max_steps)
        return [r.tokens for r in res]

    expected = run(create_engine("ort", model, threads=1))
    for enc, step in (("openvino", "openvino"), ("ort", "openvino"), ("ort", "ort")):
        engine = create_engine("openvino", model, threads=1, encoder_on=enc, step_on=step)
        graphs = engine.numerics()["graphs"]
        assert (graphs["encoder"]["backend"], graphs["decoder_step"]["backend"]) == (enc, step)
        assert ("onnxruntime" in engine.numerics()["libraries"]) == ("ort" in (enc, step))
        assert not engine.needs_verification
        assert run(engine) == expected, (enc, step)
    with pytest.raises(ValueError, match="step_on: expected 'openvino' or 'ort'"):
        create_engine("openvino", model, step_on="tensorrt")


# ------------------------------------------------------------------ bf16
def test_bf16_without_bf16_units_is_a_clear_error(varied_model_dir, monkeypatch):
    """The check itself, with the CPU flags faked (whatever this machine has)."""
    monkeypatch.setattr(hardware, "all_cpu_flags", lambda: AVX2_ONLY)
    with pytest.raises(EngineUnavailableError) as info:
        Captioner.load(varied_model_dir, engine="openvino", precision="bf16", threads=1)
    message = str(info.value)
    assert "avx512_bf16" in message and "amx_bf16" in message and "has neither" in message
    assert "precision='fp32'" in message
    ov_engine.check_bf16_cpu(AVX2_ONLY | {"avx512_bf16"})  # either flag is enough
    ov_engine.check_bf16_cpu(AVX2_ONLY | {"amx_bf16"})


@pytest.mark.skipif(HAS_BF16, reason="this CPU has bf16 units: OpenVINO does run bf16 here")
def test_bf16_flags_without_bf16_kernels_never_run_fp32(varied_model_dir, monkeypatch):
    """Flags that claim bf16 (e.g. a VM hiding the instructions): OpenVINO then compiles f32, quietly;
    the engine reads back the precision it got and refuses rather than run fp32 under the name bf16."""
    monkeypatch.setattr(hardware, "all_cpu_flags", lambda: AVX2_ONLY | {"avx512f", "avx512_bf16"})
    with pytest.raises(EngineUnavailableError, match="not bf16"):
        create_engine("openvino", ModelDir.load(varied_model_dir), precision="bf16", threads=1)


def test_bf16_is_an_openvino_precision_only(varied_model_dir):
    model = ModelDir.load(varied_model_dir)
    for engine in ("ort", "trt", "torch"):
        with pytest.raises(ValueError, match="engine precision of engine 'openvino'.*--engine openvino"):
            create_engine(engine, model, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8"):
        create_engine("openvino", model, precision="fp16")
    with pytest.raises(ValueError, match="CPU only"):
        create_engine("openvino", model, device="cuda")


@pytest.mark.skipif(not HAS_BF16, reason="needs a CPU with avx512_bf16 or amx_bf16 (this one has "
                    f"{', '.join(hardware.cpu_flags()) or 'neither'}): bf16 cannot run here")
def test_bf16_is_verified_against_the_budget(demo_sized_export, tmp_path):
    """bf16 really runs, is measured on the parity set, and loads by that verdict: verified from the cache
    when within budget, refused (loadable only with allow_unverified) when not. The demo-sized model has
    random weights, whose captions bf16 may change beyond the budget (seen on an AVX-512 EPYC with
    avx512_bf16: 39/50 identical): which verdict comes depends on the CPU; both are checked."""
    from captrt.runtime.verification.verify import verify_model

    model_dir = tmp_path / "model"
    shutil.copytree(demo_sized_export[0], model_dir, ignore=shutil.ignore_patterns("cache"))
    report, _ = verify_model(model_dir, engine="openvino", precision="bf16", threads=2)
    if report.passed:
        cap = Captioner.load(model_dir, engine="openvino", precision="bf16", threads=2)  # finds the cached result
        assert cap.verification.status == "verified" and cap.verification.source == "cache"
    else:
        with pytest.raises(UnverifiedPrecisionError, match="missed the quality budget"):
            Captioner.load(model_dir, engine="openvino", precision="bf16", threads=2)
        cap = Captioner.load(model_dir, engine="openvino", precision="bf16", threads=2, allow_unverified=True)
        assert cap.verification.status == "unverified" and cap.verification.source == "cache"
    assert cap.verification.report.identical == report.identical  # the measurement made above, not a new one
    assert cap.engine.needs_verification
    assert {g["inference_precision"] for g in cap.engine.numerics()["graphs"].values()} == {"bf16"}
    assert cap.provider == "openvino:CPU[bf16]"


# ------------------------------------------------------------------ int8 and the per-graph fallback
def add_int8(model_dir: Path) -> None:
    """The exporter's int8 graphs (captrt.export.quantize) added to a model directory, calibrated on 4 images (those the test encodes):
    seconds instead of a second export (whose quality gate would refuse a random model's int8 anyway)."""
    onnx = pytest.importorskip("onnx")
    from captrt.export.quantize import quantize_decoder, quantize_encoder

    m = manifest(model_dir)
    entry = {}
    for graph, quantize in (("encoder", lambda g: quantize_encoder(g, list(random_images(4, seed=1)))),
                            ("decoder_step", quantize_decoder)):
        name = f"{graph}.int8.onnx"
        (model_dir / name).write_bytes(quantize(onnx.load(str(model_dir / f"{graph}.onnx"))).SerializeToString())
        entry[graph] = {"file": name, "sha256": hashlib.sha256((model_dir / name).read_bytes()).hexdigest()}
    m["graphs"]["int8"] = entry
    write_manifest(model_dir, m)


def test_int8_runs_the_int8_graphs_and_needs_verification(model_copy):
    add_int8(model_copy)
    model = ModelDir.load(model_copy)
    engine = create_engine("openvino", model, precision="int8", threads=1, step_on="openvino")
    assert engine.variant == "int8" and engine.needs_verification
    assert engine.describe()["graphs"]["decoder_step"]["backend"] == "openvino"  # OpenVINO reads MatMulInteger
    default = create_engine("openvino", model, precision="int8", threads=1)
    assert default.provider == "openvino:CPU[f32]+ort:CPU" and default.needs_verification
    images = random_images(3, seed=1)
    state = engine.encode(images)
    # The int8 graphs ran as graphs: as close to fp32 as ONNX Runtime's run of the same graphs (closer, here:
    # relative errors 0.026/0.035/0.29/0.20 vs ORT's 0.030/0.039/0.34/0.25 for features/att_proj/h/c; this
    # random model's h0/c0 amplify the features' error). Judging captions is the verification's job.
    ref = create_engine("openvino", model, precision="fp32", threads=1).encode(images)
    ort8 = create_engine("ort", model, precision="int8", threads=1).encode(images)
    for name in ("features", "att_proj", "h", "c"):
        want = getattr(ref, name)
        ov_err, ort_err = (float(np.linalg.norm(getattr(s, name) - want) / np.linalg.norm(want)) for s in (state, ort8))
        assert ov_err <= 1.25 * ort_err, (name, ov_err, ort_err)
    assert np.linalg.norm(state.features - ref.features) / np.linalg.norm(ref.features) < 0.1
    out = engine.step(state, np.full((3, 1), 3, np.int64), np.zeros((3, 1), np.int64))
    assert out.cand_ids.shape == (3, 1, engine.max_beam) and out.cand_ids.dtype == np.int64
    assert np.all(np.diff(out.cand_logp, axis=-1) <= 0)


def test_a_graph_openvino_cannot_compile_falls_back_to_ort_and_says_so(varied_model_dir, monkeypatch):
    real = ov_engine.import_openvino()

    class FailingStepCore(real.Core):
        def compile_model(self, model, *args, **kwargs):
            if any(o.get_any_name() == "features" for o in model.outputs):
                raise RuntimeError("Unsupported operation: MatMulNBits (faked)")
            return super().compile_model(model, *args, **kwargs)

    class FakeOpenVino:
        __version__ = real.__version__
        Core = FailingStepCore

    monkeypatch.setattr(ov_engine, "import_openvino", lambda: FakeOpenVino)
    model = ModelDir.load(varied_model_dir)
    engine = create_engine("openvino", model, threads=1, step_on="openvino")
    graphs = engine.numerics()["graphs"]
    assert graphs["encoder"]["backend"] == "ort" and graphs["decoder_step"]["backend"] == "openvino"
    assert "MatMulNBits" in graphs["encoder"]["fallback"]
    assert engine.provider == "ort:CPU+openvino:CPU[f32]" and "onnxruntime" in engine.numerics()["libraries"]
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: OpenVINO .* cannot compile this graph"):
        create_engine("openvino", model, threads=1, encoder_on="openvino")  # asked for explicitly: no fallback


# ------------------------------------------------------------------ the compiled-model cache
def test_compiled_models_are_cached_under_the_model_directory(model_copy):
    first = create_engine("openvino", ModelDir.load(model_copy), threads=1, step_on="openvino")
    cache = Path(first.describe()["cache_dir"])
    assert cache.parent == model_copy / "cache" and cache.name.startswith("openvino-")
    assert len(list(cache.glob("*.blob"))) == 2
    again = create_engine("openvino", ModelDir.load(model_copy), threads=1, step_on="openvino")
    assert again.encoder.compiled.get_property("LOADED_FROM_CACHE") is True
    assert again.decoder.compiled.get_property("LOADED_FROM_CACHE") is True


def test_unwritable_cache_compiles_without_it(model_copy):
    (model_copy / "cache").write_text("not a directory")  # mkdir fails as on a read-only model directory
    engine = create_engine("openvino", ModelDir.load(model_copy), threads=1)
    assert engine.describe()["cache_dir"] is None
    assert engine.encode(random_images(1)).batch == 1


# ------------------------------------------------------------------ bad model directories
def test_tampered_graph_is_refused(model_copy):
    path = model_copy / "encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: sha256 .* does not match captrt\.json"):
        Captioner.load(model_copy, engine="openvino")


def test_external_data_is_refused(model_copy):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(model_copy / "decoder_step.onnx"))
    onnx.save_model(model, str(model_copy / "decoder_step.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    rehash(model_copy)  # a correct hash: the refusal must come from the external data itself
    with pytest.raises(ModelDirError, match=r"decoder_step\.onnx: refers to external data"):
        Captioner.load(model_copy, engine="openvino")


# ------------------------------------------------------------------ threads
def test_thread_safety_eight_threads(varied_model_dir):
    """One Captioner shared by 8 threads gives exactly the sequential results (one InferRequest per thread)."""
    assert_thread_safe(Captioner.load(varied_model_dir, engine="openvino", threads=1, step_on="openvino"))


def test_closed_engine_fails_clearly(varied_model_dir):
    cap = Captioner.load(varied_model_dir, engine="openvino", threads=1)
    cap.engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        cap.engine.encode(random_images(1))


def test_runtime_import_does_not_import_openvino(varied_model_dir):
    code = textwrap.dedent(f"""
        import sys
        import captrt.runtime
        from captrt.runtime import Captioner
        Captioner.load({str(varied_model_dir)!r}, threads=1)
        assert "openvino" not in sys.modules, "openvino imported by captrt.runtime"
        Captioner.load({str(varied_model_dir)!r}, engine="openvino", threads=1)
        assert "openvino" in sys.modules
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
