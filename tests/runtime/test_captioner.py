"""Captioner: input kinds, per-image errors, argument checks, engines that cannot run, threads, imports."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captrt.runtime import Caption, Captioner, EngineUnavailableError, InvalidImageError
from tests.conftest import cuda_usable, random_images
from tests.runtime.threads import assert_thread_safe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def captioner(varied_model_dir):
    return Captioner.load(varied_model_dir, threads=1)


@pytest.fixture(scope="module")
def images():
    return random_images(8, seed=11)


@pytest.fixture(scope="module")
def expected(captioner, images):
    return captioner.caption(images, beam_size=3)


def test_every_input_kind_gives_the_same_caption(captioner, images, expected, tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(images[0]).save(png)
    data = png.read_bytes()
    kinds = [str(png), png, data, bytearray(data), memoryview(data), io.BytesIO(data), Image.open(png), images[0]]
    for kind in kinds:
        [c] = captioner.caption(kind, beam_size=3)
        assert c.tokens == expected[0].tokens, type(kind).__name__
    # (N, H, W, 3) array and a list are batches
    assert [c.tokens for c in captioner.caption(images[:3], beam_size=3)] == [c.tokens for c in expected[:3]]
    assert [c.tokens for c in captioner.caption(list(images[:3]), beam_size=3)] == [c.tokens for c in expected[:3]]
    with open(png, "rb") as f:
        assert captioner.caption([f], beam_size=3)[0].tokens == expected[0].tokens


def test_read_image_then_caption_equals_caption(captioner, images, expected):
    """What a service does: decode first (read_image, with the Captioner's limits), caption the arrays."""
    data = io.BytesIO()
    Image.fromarray(images[1]).save(data, format="PNG")
    pixels = captioner.read_image(data.getvalue(), name="upload")
    assert pixels.shape == (captioner.model.image_size,) * 2 + (3,) and pixels.dtype == np.uint8
    assert captioner.caption([pixels], beam_size=3)[0].tokens == expected[1].tokens
    with pytest.raises(InvalidImageError, match="^upload:"):
        captioner.read_image(b"junk", name="upload")


def test_info_warmup_and_to_dict(captioner, expected):
    info = captioner.info()
    assert info["id"] == captioner.model.model_id and info["id"].startswith("model@")
    assert (info["engine"], info["provider"], info["precision"]) == ("ort", "CPUExecutionProvider", "fp32")
    assert info["vocab_size"] == len(captioner.vocab) and info["grid"] == captioner.model.grid
    captioner.warmup(batch_sizes=(1, 3))
    c = expected[0]
    assert c.to_dict() == {"caption": c.text, "tokens": c.tokens, "score": c.score, "finished": True, "error": None}
    bad = Caption("", [], float("nan"), None, "x.png: broken", False)
    assert bad.to_dict(attention=True) == {"caption": None, "tokens": [], "score": None, "finished": False,
                                           "error": "x.png: broken", "attention": None}


def test_caption_fields(captioner, expected):
    c = expected[0]
    assert isinstance(c, Caption)
    assert c.error is None and c.ok and c.finished
    assert c.text == " ".join(captioner.vocab.id2word[t] for t in c.tokens)
    assert captioner.vocab.start not in c.tokens and captioner.vocab.end not in c.tokens
    assert isinstance(c.score, float) and c.score < 0
    assert c.attention is None  # only when asked


def test_batch_size_does_not_change_results(captioner, images, expected):
    for batch in (1, 3, 8):
        assert [c.tokens for c in captioner.caption(images, beam_size=3, batch_size=batch)] == [c.tokens for c in expected]


def test_engine_batch_limit_splits_batches(varied_model_dir, images, expected):
    """An engine with a batch limit (TensorRT profiles) never gets more images than it allows."""
    cap = Captioner.load(varied_model_dir, threads=1)
    cap.engine.max_batch = 3
    sizes = []
    encode = cap.engine.encode
    cap.engine.encode = lambda x: sizes.append(len(x)) or encode(x)
    assert [c.tokens for c in cap.caption(images, beam_size=3, batch_size=16)] == [c.tokens for c in expected]
    assert sizes == [3, 3, 2]


def test_bad_images_do_not_stop_the_others(captioner, images, expected, tmp_path):
    missing = tmp_path / "missing.jpg"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    inputs = [images[0], b"\x89PNG\r\n\x1a\n broken", str(missing), images[1], str(text), np.zeros((5, 5), np.float32)]
    caps = captioner.caption(inputs, beam_size=3, batch_size=1)
    assert [c.error is None for c in caps] == [True, False, False, True, False, False]
    assert caps[0].tokens == expected[0].tokens and caps[3].tokens == expected[1].tokens
    for c in (caps[1], caps[2], caps[4], caps[5]):
        assert c.text == "" and c.tokens == [] and not c.finished and not c.ok
    assert "missing.jpg" in caps[2].error and "no such file" in caps[2].error
    assert "notes.png" in caps[4].error
    assert "uint8" in caps[5].error


def test_all_images_bad_and_empty_input(captioner):
    assert captioner.caption([]) == []
    [c] = captioner.caption(b"nope")
    assert c.error


@pytest.mark.parametrize("kwargs,message", [
    ({"beam_size": 11}, r"beam_size must be an integer between 1 and 10 \(the model's max_beam is 10\), got 11"),
    ({"beam_size": 0}, "beam_size must be an integer between 1 and 10"),
    ({"beam_size": 2.5}, "beam_size must be an integer"),
    ({"max_steps": 0}, "max_steps must be an integer >= 1"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"length_penalty": -1.0}, "length_penalty must be a finite number >= 0"),
    ({"length_penalty": float("nan")}, "length_penalty must be a finite number >= 0"),
])
def test_bad_arguments(captioner, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        captioner.caption(images[0], **kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"engine": "onnx"}, ValueError, "engine: unknown engine 'onnx'; choose one of ort, trt, torch"),
    ({"precision": "fp8"}, ValueError, "precision: unknown precision 'fp8'"),
    ({"device": "tpu"}, ValueError, "device: unknown device 'tpu'"),
    ({"threads": 0}, ValueError, "threads: expected a positive integer"),
    ({"providers": "tensorrt"}, ValueError, "providers='tensorrt' runs on the GPU: pass device='cuda'"),
    ({"providers": "openvino"}, ValueError, "providers: expected 'cpu', 'cuda' or 'tensorrt'"),
    ({"engine": "torch", "providers": "tensorrt"}, ValueError, "applies to engine='ort' only"),
    ({"bogus_option": 1}, ValueError, r"engine 'ort': unknown option\(s\) \['bogus_option'\]"),
])
def test_bad_load_arguments(varied_model_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        Captioner.load(varied_model_dir, **kwargs)


@pytest.mark.skipif(cuda_usable(), reason="a CUDA driver is present: the GPU path is tested in test_gpu.py")
@pytest.mark.parametrize("providers", [None, "tensorrt"])
def test_cuda_without_gpu_is_an_error_not_a_silent_cpu_fallback(varied_model_dir, providers):
    with pytest.raises(EngineUnavailableError, match=r"device='cuda': no NVIDIA driver on this machine \(libcuda\.so\.1"):
        Captioner.load(varied_model_dir, device="cuda", providers=providers)


def test_trt_engine_without_tensorrt_says_what_to_install(varied_model_dir):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(EngineUnavailableError) as info:
        Captioner.load(varied_model_dir, engine="trt", device="cuda")
    # the packages to install, by name, and what is missing on this machine
    message = str(info.value)
    assert re.search(r"pip install tensorrt-cu\d+ cuda-python", message), message
    assert "the tensorrt package cannot be imported" in message, message


def test_provider_reported(captioner):
    assert captioner.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in repr(captioner)
    assert captioner.engine.describe()["intra_op_num_threads"] == 1


def test_thread_safety_eight_threads(varied_model_dir):
    """One Captioner shared by 8 threads gives exactly the sequential results."""
    assert_thread_safe(Captioner.load(varied_model_dir, threads=1))


def test_close_and_context_manager(varied_model_dir, images):
    with Captioner.load(varied_model_dir, threads=1) as cap:
        assert cap.caption(images[0])[0].ok
    with pytest.raises(RuntimeError, match="closed"):
        cap.caption(images[0])


def test_import_is_torch_free_and_light(varied_model_dir):
    """captrt.runtime works with torch unimportable; no tensorrt/cuda/onnx/matplotlib is loaded."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        import numpy as np
        import captrt.runtime
        from captrt.runtime import Captioner, EngineUnavailableError
        cap = Captioner.load({str(varied_model_dir)!r}, threads=1)
        [c] = cap.caption(np.full((64, 64, 3), 128, np.uint8), beam_size=2, return_attention=True)
        assert c.ok and c.attention.shape[0] == len(c.tokens), c
        try:
            Captioner.load({str(varied_model_dir)!r}, engine="torch")
        except EngineUnavailableError as exc:
            assert "captrt[train]" in str(exc), exc
        else:
            raise AssertionError("engine='torch' loaded without torch")
        heavy = sorted(m for m in ("torch", "tensorrt", "cuda", "onnx", "matplotlib", "torchvision")
                       if sys.modules.get(m) is not None)
        assert not heavy, heavy
        print("ok", cap.provider)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok CPUExecutionProvider" in proc.stdout


def test_invalid_image_error_is_exported():
    assert issubclass(InvalidImageError, ValueError)
