"""Tests of the native TensorRT engine (captrt.runtime.engines.trt / trt_build).

Without a GPU (this machine) the pure-Python parts run for real: the import stays light, the
errors say what to install, profiles come from a real manifest, cache keys, the signed cache, and
the device-side row compaction plan (checked by replaying it on numpy arrays). The build/run/parity
tests are marked `tensorrt` and skip unless tensorrt imports and a CUDA GPU is visible.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from captrt.runtime.engines import create_engine
from captrt.runtime.engines import trt_build as tb
from captrt.runtime.engines.trt import TrtEngine, compaction_copies
from captrt.runtime.errors import EngineUnavailableError
from captrt.runtime.model_dir import DECODER_INPUTS, DECODER_STATE_INPUTS, ModelDir
from tests.conftest import tiny_vocab

ROOT = Path(__file__).resolve().parents[3]


def fake_model_dir(root: Path, *, grid: int = 4, max_beam: int = 6, dims: tuple[int, int, int] = (512, 48, 40),
                   format_version: int = 2) -> ModelDir:
    """A real captrt.json + vocab.json; the graph files exist but are not ONNX (never read here)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (root / "vocab.json").write_text(json.dumps(vocab.to_json()), encoding="utf-8")
    for name in ("encoder.onnx", "decoder_step.onnx"):
        (root / name).write_bytes(b"placeholder")
    e, a, h = dims
    manifest = {"format": "captrt-model", "format_version": format_version,
                "model": {"backbone": "resnet18", "enc_size": grid, "image_size": 256, "encoder_dim": e,
                          "attention_dim": a, "embed_dim": 32, "decoder_dim": h, "vocab_size": len(vocab)},
                "vocab": {"file": "vocab.json", "size": len(vocab)}, "grid": grid, "max_beam": max_beam,
                "graphs": {"fp32": {"encoder": {"file": "encoder.onnx", "sha256": "0" * 64},
                                    "decoder_step": {"file": "decoder_step.onnx", "sha256": "1" * 64}}}}
    (root / "captrt.json").write_text(json.dumps(manifest), encoding="utf-8")
    return ModelDir.load(root)


def ort_cuda_major() -> int:
    """The CUDA major version ONNX Runtime was built for (12 for a CPU-only build, like install_hint)."""
    from onnxruntime.capi import build_and_package_info as info

    return int((getattr(info, "cuda_version", "") or "12").split(".")[0])


def block_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make `import name` fail the way it does when the package is not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# ------------------------------------------------------------------ import and availability

def test_import_needs_neither_tensorrt_cuda_nor_torch():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import captrt.runtime.engines.trt, captrt.runtime.engines.trt_build\n"
            "bad = [m for m in ('torch', 'tensorrt', 'cuda', 'cuda.bindings') if sys.modules.get(m) is not None]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_without_tensorrt_the_error_says_what_to_install(tmp_path, monkeypatch):
    model = fake_model_dir(tmp_path / "m")
    block_modules(monkeypatch, "tensorrt")
    for make in (lambda: TrtEngine(model, device="cuda"), lambda: create_engine("trt", model, device="cuda")):
        with pytest.raises(EngineUnavailableError) as info:
            make()
        msg = str(info.value)
        assert "tensorrt package cannot be imported" in msg
        assert tb.install_hint() in msg and "--engine ort" in msg
        assert f"pip install tensorrt-cu{ort_cuda_major()} cuda-python" in msg  # the CUDA the install already has
    assert not (tmp_path / "m" / "cache").exists()  # nothing was built or cached


def test_missing_cuda_bindings_are_reported_with_tensorrt(tmp_path, monkeypatch):
    model = fake_model_dir(tmp_path / "m")
    block_modules(monkeypatch, "tensorrt", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")
    with pytest.raises(EngineUnavailableError, match="CUDA Python bindings cannot be imported") as info:
        TrtEngine(model, device="cuda")
    assert "tensorrt package cannot be imported" in str(info.value)  # every missing piece at once


def test_a_missing_driver_is_named_first(tmp_path, monkeypatch):
    from captrt.runtime.engines.cuda_setup import prepare

    if prepare(tensorrt=True).driver is not None:
        pytest.skip("an NVIDIA driver is installed here")
    model = fake_model_dir(tmp_path / "m")
    block_modules(monkeypatch, "tensorrt")
    with pytest.raises(EngineUnavailableError) as info:
        TrtEngine(model, device="cuda")
    missing = str(info.value).split("missing here: ", 1)[1]
    assert missing.startswith("no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded); ")
    assert "cudaGetDeviceCount" not in missing  # the bindings' own error code would say the same, less plainly


def test_cpu_device_and_unknown_options_are_refused_before_loading_anything(tmp_path, monkeypatch):
    model = fake_model_dir(tmp_path / "m")
    block_modules(monkeypatch, "tensorrt")
    with pytest.raises(EngineUnavailableError, match="--device cuda"):
        TrtEngine(model, device="cpu")
    with pytest.raises(ValueError, match="unknown option.*max_batchh"):
        TrtEngine(model, device="cuda", max_batchh=4)
    with pytest.raises(ValueError, match="max_batch: expected an integer >= 1"):
        TrtEngine(model, device="cuda", max_batch=0)


def test_no_gpu_is_reported_by_the_real_cuda_bindings():
    cudart = pytest.importorskip("cuda.bindings.runtime")
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaSuccess and count > 0:
        pytest.skip("a CUDA GPU is visible: nothing to report")
    assert tb.cuda_device_problem(cudart).startswith(("no usable CUDA GPU", "no CUDA GPU is visible"))


# ------------------------------------------------------------------ optimization profiles

def test_profiles_from_a_manifest(tmp_path):
    model = fake_model_dir(tmp_path / "m", grid=4, max_beam=6, dims=(512, 48, 40))
    prof = tb.profiles_for_model(model, max_batch=16)
    assert prof["encoder"] == {"image": ((1, 256, 256, 3), (8, 256, 256, 3), (16, 256, 256, 3))}
    dec = prof["decoder_step"]
    assert set(dec) == set(DECODER_INPUTS)
    assert dec["tokens"] == dec["origin"] == ((1, 1), (8, 5), (16, 6))
    assert dec["h"] == dec["c"] == ((1, 1, 40), (8, 5, 40), (16, 6, 40))  # K_prev from 1 (h0) to max_beam
    assert dec["features"] == ((1, 16, 512), (8, 16, 512), (16, 16, 512))  # P = grid^2
    assert dec["att_proj"] == ((1, 16, 48), (8, 16, 48), (16, 16, 48))
    # Decoding controls: id lists of 1 (the default path's padding) up to MAX_CONTROL_IDS per slot.
    assert dec["ban_ids"] == dec["penalty_ids"] == ((1, 1, 1), (8, 5, 1), (16, 6, tb.MAX_CONTROL_IDS))
    assert dec["penalty"] == ((1,), (8,), (16,))
    old = tb.profiles_for_model(fake_model_dir(tmp_path / "v1", format_version=1), max_batch=16)["decoder_step"]
    assert set(old) == set(DECODER_STATE_INPUTS)  # a format-1 step graph has no control inputs


def test_profile_options_are_checked(tmp_path):
    model = fake_model_dir(tmp_path / "m", max_beam=3)
    small = tb.profiles_for_model(model, max_batch=2, opt_batch=1, opt_beam=2)
    assert small["decoder_step"]["tokens"] == ((1, 1), (1, 2), (2, 3))
    assert tb.profiles_for_model(model, max_batch=4)["decoder_step"]["tokens"][1] == (4, 3)  # opt clipped to max
    for kwargs, field in (({"max_batch": 0}, "max_batch"), ({"max_batch": 4, "opt_batch": 5}, "opt_batch"),
                          ({"max_batch": 4, "opt_beam": 4}, "opt_beam"), ({"max_batch": True}, "max_batch")):
        with pytest.raises(ValueError, match=field):
            tb.profiles_for_model(model, **kwargs)


# ------------------------------------------------------------------ cache keys and the signed cache

PROFILE = {"image": ((1, 256, 256, 3), (8, 256, 256, 3), (32, 256, 256, 3))}
KEY_ARGS = dict(graph="encoder", graph_sha256="ab" * 32, precision="fp16", trt_version="10.3.0",
                compute_capability="8.6", profile=PROFILE, build={"strongly_typed": True, "workspace_bytes": 1 << 30})


@pytest.mark.parametrize("change", [
    {"graph_sha256": "cd" * 32}, {"precision": "fp32"}, {"trt_version": "10.4.0"}, {"compute_capability": "8.9"},
    {"graph": "decoder_step"}, {"build": {"strongly_typed": False, "workspace_bytes": 1 << 30}},
    {"profile": {"image": ((1, 256, 256, 3), (8, 256, 256, 3), (16, 256, 256, 3))}},
])
def test_cache_key_changes_with_every_input(change):
    assert tb.cache_name(tb.cache_key(**{**KEY_ARGS, **change})) != tb.cache_name(tb.cache_key(**KEY_ARGS))


def test_cache_key_is_stable():
    a = tb.cache_key(**KEY_ARGS)
    reordered = dict(reversed(list(KEY_ARGS.items())))
    reordered["profile"] = {"image": tuple(list(s) for s in PROFILE["image"])}  # lists vs tuples
    reordered["graph_sha256"] = KEY_ARGS["graph_sha256"].upper()
    assert tb.cache_name(a) == tb.cache_name(tb.cache_key(**reordered)) == tb.cache_name(json.loads(json.dumps(a)))
    assert len(tb.cache_name(a)) == 40


# ------------------------------------------------------------------ device row compaction

def replay(copies, x: np.ndarray) -> np.ndarray:
    x = x.copy()
    for src, dst, count in copies:
        assert count >= 1 and (dst + count <= src or src + count <= dst), "a copy overlaps itself"
        x[dst:dst + count] = x[src:src + count]
    return x


@pytest.mark.parametrize("rows", [[], [0], [0, 1, 2], [2], [1, 2, 3], [0, 2, 3, 4, 7], [5, 6, 7, 8, 9], [3, 4, 9]])
def test_compaction_copies_examples(rows):
    x = np.arange(10 * 3).reshape(10, 3)
    np.testing.assert_array_equal(replay(compaction_copies(rows), x)[:len(rows)], x[rows])


def test_compaction_copies_random_and_minimal():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        rows = sorted(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False).tolist())
        x = rng.integers(0, 1000, size=(n, 2))
        np.testing.assert_array_equal(replay(compaction_copies(rows), x)[:len(rows)], x[rows])
    assert compaction_copies(list(range(8))) == []  # nothing moves: no copy at all
    assert compaction_copies([4, 5, 6, 7, 8, 9, 10, 11]) == [(4, 0, 4), (8, 4, 4)]  # chunks of `shift`


# ------------------------------------------------------------------ on a GPU with TensorRT

def _gpu_or_skip() -> None:
    pytest.importorskip("tensorrt")
    try:
        tb.load_backend()
    except EngineUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    _gpu_or_skip()
    pytest.importorskip("torch")
    from tests.conftest import make_tiny_checkpoint
    from tests.runtime.modeldirs import make_model_dir

    root = tmp_path_factory.mktemp("trt")
    ckpt = make_tiny_checkpoint(root / "tiny.pt", end_bias=2.0)
    return ModelDir.load(make_model_dir(ckpt, root / "model", max_beam=5))


@pytest.fixture(scope="module")
def engines(gpu_model, tmp_path_factory):
    from captrt.runtime.engines.ort import OrtEngine

    trt_engine = TrtEngine(gpu_model, device="cuda", max_batch=4, cache_dir=tmp_path_factory.mktemp("cache"))
    yield trt_engine, OrtEngine(gpu_model, device="cpu")
    trt_engine.close()


def _images(n: int, seed: int = 0) -> np.ndarray:
    from tests.conftest import random_images

    return random_images(n, seed=seed)


def _compare(out_trt, out_ort, alpha: bool = False) -> None:
    """TensorRT's fp32 uses TF32 matmuls by default: values agree to ~1e-3 relative, so only the best
    word is compared exactly (lower candidates may swap when they nearly tie); all values are compared."""
    np.testing.assert_array_equal(out_trt.cand_ids[..., 0], out_ort.cand_ids[..., 0])
    np.testing.assert_allclose(out_trt.cand_logp, out_ort.cand_logp, rtol=5e-3, atol=5e-3)
    if alpha:
        np.testing.assert_allclose(out_trt.alpha, out_ort.alpha, rtol=5e-3, atol=1e-3)


@pytest.mark.tensorrt
def test_steps_and_select_match_onnx_runtime(engines, gpu_model):
    trt_e, ort_e = engines
    images = _images(3)
    st, so = trt_e.encode(images), ort_e.encode(images)
    tokens = np.full((3, 1), gpu_model.vocab.start, dtype=np.int64)
    origin = np.zeros((3, 1), dtype=np.int64)
    a, b = trt_e.step(st, tokens, origin, want_alpha=True), ort_e.step(so, tokens, origin, want_alpha=True)
    _compare(a, b, alpha=True)
    assert a.cand_ids.dtype == np.int64 and a.cand_logp.dtype == np.float32 and st.beams == 1
    tokens, origin = a.cand_ids[:, 0, :3].copy(), np.zeros((3, 3), dtype=np.int64)  # K: 1 -> 3
    _compare(trt_e.step(st, tokens, origin), ort_e.step(so, tokens, origin))
    assert st.beams == 3
    trt_e.select(st, np.array([0, 2])), ort_e.select(so, np.array([0, 2]))  # drop image 1 on the device
    tokens, origin = np.array([[4, 5, 6], [7, 8, 9]]), np.array([[2, 0, 1], [1, 1, 0]])
    _compare(trt_e.step(st, tokens, origin, want_alpha=True), ort_e.step(so, tokens, origin, want_alpha=True), True)
    trt_e.release(st), ort_e.release(so)
    with pytest.raises(ValueError, match="not a live decode state"):
        trt_e.step(st, tokens, origin)


@pytest.mark.tensorrt
def test_beam_search_matches_onnx_runtime_and_reuses_workspaces(engines, gpu_model):
    from captrt.runtime.decoding.beam import beam_search

    trt_e, ort_e = engines
    v = gpu_model.vocab
    kw = dict(start=v.start, end=v.end, vocab_size=len(v), beam_size=3, max_steps=12)
    for seed in range(3):
        images = _images(4, seed=seed)
        got, want = beam_search(trt_e, images, **kw), beam_search(ort_e, images, **kw)
        assert [r.tokens for r in got] == [r.tokens for r in want]
    assert len(trt_e._workspaces) == 1  # released states went back to the pool


@pytest.mark.tensorrt
def test_bad_inputs_are_clear_errors(engines):
    trt_e, _ = engines
    with pytest.raises(ValueError, match="max_batch=4"):
        trt_e.encode(_images(5))
    st = trt_e.encode(_images(2))
    with pytest.raises(ValueError, match="origin: slots must be in 0..0"):
        trt_e.step(st, np.zeros((2, 2), np.int64), np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="tokens: word ids"):
        trt_e.step(st, np.full((2, 1), 10**6), np.zeros((2, 1), np.int64))
    trt_e.release(st)


@pytest.mark.tensorrt
def test_threads_get_their_own_contexts_and_agree(engines, gpu_model):
    from captrt.runtime.decoding.beam import beam_search

    trt_e, _ = engines
    v = gpu_model.vocab
    kw = dict(start=v.start, end=v.end, vocab_size=len(v), beam_size=3, max_steps=10)
    batches = [_images(2, seed=10 + i) for i in range(4)]
    expected = [[r.tokens for r in beam_search(trt_e, b, **kw)] for b in batches]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        results[i] = [r.tokens for r in beam_search(trt_e, batches[i], **kw)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(4)] == expected


@pytest.mark.tensorrt
@pytest.mark.slow
def test_engines_are_cached_and_verified(gpu_model, tmp_path):
    first = TrtEngine(gpu_model, device="cuda", max_batch=2, cache_dir=tmp_path)
    assert first.status == {"encoder": "built", "decoder_step": "built"}
    first.close()
    second = TrtEngine(gpu_model, device="cuda", max_batch=2, cache_dir=tmp_path)
    assert second.status == {"encoder": "cached", "decoder_step": "cached"}
    second.close()
    for blob in tmp_path.glob("*.bin"):
        if not blob.name.startswith("timing-"):
            blob.write_bytes(blob.read_bytes()[:-1] + b"\0")  # damage every engine
    third = TrtEngine(gpu_model, device="cuda", max_batch=2, cache_dir=tmp_path)
    assert third.status == {"encoder": "built", "decoder_step": "built"}
    third.close()
    other = TrtEngine(gpu_model, device="cuda", max_batch=3, cache_dir=tmp_path)  # another profile
    assert other.status == {"encoder": "built", "decoder_step": "built"}
    other.close()


def _agreement(engine, reference, vocab, seeds=(0, 1)) -> float:
    from captrt.runtime.decoding.beam import beam_search

    kw = dict(start=vocab.start, end=vocab.end, vocab_size=len(vocab), beam_size=3, max_steps=12)
    pairs = [(a.tokens, b.tokens) for s in seeds
             for a, b in zip(beam_search(engine, _images(4, seed=s), **kw), beam_search(reference, _images(4, seed=s), **kw))]
    return sum(a == b for a, b in pairs) / len(pairs)


@pytest.mark.tensorrt
@pytest.mark.slow
def test_fp16_without_an_fp16_export_uses_the_builder_flag(gpu_model, engines, tmp_path):
    assert "fp16" not in gpu_model.precisions
    eng = TrtEngine(gpu_model, device="cuda", precision="fp16", max_batch=4, cache_dir=tmp_path)
    try:
        assert eng.describe()["graphs"] == "fp32"  # fp32 graph, TensorRT free to pick fp16 kernels
        assert _agreement(eng, engines[1], gpu_model.vocab) >= 0.75  # judged by caption agreement
    finally:
        eng.close()


@pytest.mark.tensorrt
@pytest.mark.slow
def test_fp16_export_is_built_strongly_typed(gpu_model, engines, tmp_path):
    from captrt.export.exporter import export_model
    from captrt.train.torch_engine import find_checkpoint

    export_model(find_checkpoint(gpu_model, None), tmp_path / "m16", max_beam=5, fp16=True, force=True, progress=False,
                 parity_count=4)
    model16 = ModelDir.load(tmp_path / "m16")
    eng = TrtEngine(model16, device="cuda", precision="fp16", max_batch=4, cache_dir=tmp_path / "cache")
    try:
        assert eng.describe()["graphs"] == "fp16" and eng.status == {"encoder": "built", "decoder_step": "built"}
        assert _agreement(eng, engines[1], gpu_model.vocab) >= 0.75
    finally:
        eng.close()
