"""The IO-binding path of the ORT engine (state kept in OrtValues between steps).

On the GPU it keeps h/c/features/att_proj on the device. Its logic (pointer views for contiguous
row runs, re-uploads otherwise, h0 reshaped in place) is run here on the CPU with the same code
(io_binding=True); the CUDA and TensorRT-EP tests skip unless a GPU is usable.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from captrt.runtime import Captioner
from captrt.runtime.engines.trt_build import MAX_CONTROL_IDS
from captrt.runtime.engines.ort_cuda import DeviceTensor
from tests.conftest import cuda_usable, random_images


gpu = pytest.mark.skipif(not cuda_usable(), reason="needs an NVIDIA GPU with the CUDA driver")


@pytest.fixture(scope="module")
def images():
    return random_images(12, seed=17)


def test_device_tensor_rows_views_and_copies():
    base = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    t = DeviceTensor.wrap(ort.OrtValue.ortvalue_from_numpy(base.copy(), "cpu", 0))
    view = t.rows(np.array([1, 2, 3]), "cpu", 0)
    assert view.owner is t.owner and view.offset == 6 and view.shape == (3, 2, 3)  # no copy
    np.testing.assert_array_equal(view.to_host(), base[1:4])
    np.testing.assert_array_equal(view.rows(np.array([1, 2]), "cpu", 0).to_host(), base[2:4])  # view of a view
    copy = t.rows(np.array([0, 2, 4]), "cpu", 0)
    assert copy.owner is not t.owner and copy.offset == 0
    np.testing.assert_array_equal(copy.to_host(), base[[0, 2, 4]])
    flat = t.reshape(5, 6)
    np.testing.assert_array_equal(flat.to_host(), base.reshape(5, 6))


@pytest.mark.parametrize("beam,batch", [(1, 12), (3, 5), (5, 4), (10, 12)])
def test_io_binding_matches_plain_run(varied_model_dir, images, beam, batch):
    plain = Captioner.load(varied_model_dir, threads=1)
    bound = Captioner.load(varied_model_dir, threads=1, io_binding=True)
    assert bound.engine.describe()["io_binding"] and not plain.engine.describe()["io_binding"]
    a = plain.caption(images, beam_size=beam, batch_size=batch, return_attention=True)
    b = bound.caption(images, beam_size=beam, batch_size=batch, return_attention=True)
    for x, y in zip(a, b):
        assert x.tokens == y.tokens and x.score == y.score
        np.testing.assert_array_equal(x.attention, y.attention)
    # Without attention the alpha output stays on the "device" and is never copied down.
    assert [c.tokens for c in bound.caption(images, beam_size=beam, batch_size=batch)] == [c.tokens for c in a]


@gpu
@pytest.mark.gpu
def test_cuda_matches_cpu(varied_model_dir, images):
    cpu = Captioner.load(varied_model_dir)
    cuda = Captioner.load(varied_model_dir, device="cuda")
    assert cuda.provider == "CUDAExecutionProvider"
    found = cuda.info()["numerics"]["cuda_libraries"]  # what the start-up loaded, and from where
    assert found["driver"] and found["problem"] is None, found
    assert {"libcublasLt.so.13", "libcudnn.so.9"} <= set(found["libraries"]) or found["onnxruntime_cuda"] != "13.0"
    from captrt.runtime.engines.cuda_setup import check

    assert check().startswith("cuda: ready ("), check()
    for beam in (1, 5, 10):
        a = cpu.caption(images, beam_size=beam, batch_size=4)
        b = cuda.caption(images, beam_size=beam, batch_size=4)
        assert sum(x.tokens == y.tokens for x, y in zip(a, b)) >= len(images) - 1


def tensorrt_ep_missing() -> str | None:
    """Why ONNX Runtime's TensorRT execution provider cannot run here, or None when it can: the provider
    must be in this onnxruntime build and the TensorRT 10 runtime importable. Decided before loading,
    so that a load that fails where TensorRT is present is a failure, not a skip."""
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no TensorrtExecutionProvider"
    try:
        import tensorrt  # noqa: F401  (its wheel loads libnvinfer, which the provider links)
    except ImportError as exc:
        return f"the TensorRT runtime is not installed ({exc})"
    return None


@gpu
@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_execution_provider(varied_model_dir, images):
    missing = tensorrt_ep_missing()
    if missing:
        pytest.skip(f"TensorRT EP unavailable: {missing}")
    cap = Captioner.load(varied_model_dir, device="cuda", providers="tensorrt")
    assert cap.provider == "TensorrtExecutionProvider"
    cpu = Captioner.load(varied_model_dir)
    a = cpu.caption(images, beam_size=5, batch_size=4)
    b = cap.caption(images, beam_size=5, batch_size=4)
    assert sum(x.tokens == y.tokens for x, y in zip(a, b)) >= len(images) - 1
    assert any((varied_model_dir / "cache").rglob("*"))  # engines cached under MODEL_DIR/cache


def test_tensorrt_ep_options(varied_model_dir, tmp_path):
    """Profiles cover batch 1..max_batch and beam 1..max_beam for every input; caches under MODEL_DIR/cache."""
    import shutil

    from captrt.runtime.engines.ort import tensorrt_options
    from captrt.runtime.model_dir import ModelDir

    shutil.copytree(varied_model_dir, tmp_path / "m")
    md = ModelDir.load(tmp_path / "m")
    opts = tensorrt_options(md, "fp16", max_batch=16, opt_batch=8, opt_beam=5)
    enc, dec = opts["encoder"], opts["decoder_step"]
    assert enc["trt_profile_min_shapes"] == "image:1x256x256x3"
    assert enc["trt_profile_max_shapes"] == "image:16x256x256x3"
    h, p, e, a = md.dims["decoder_dim"], md.num_pixels, md.dims["encoder_dim"], md.dims["attention_dim"]
    assert dec["trt_profile_min_shapes"] == (f"tokens:1x1,origin:1x1,h:1x1x{h},c:1x1x{h},features:1x{p}x{e},"
                                             f"att_proj:1x{p}x{a},ban_ids:1x1x1,penalty_ids:1x1x1,penalty:1")
    assert dec["trt_profile_opt_shapes"] == (f"tokens:8x5,origin:8x5,h:8x5x{h},c:8x5x{h},features:8x{p}x{e},"
                                             f"att_proj:8x{p}x{a},ban_ids:8x5x1,penalty_ids:8x5x1,penalty:8")
    assert dec["trt_profile_max_shapes"] == \
        (f"tokens:16x10,origin:16x10,h:16x10x{h},c:16x10x{h},features:16x{p}x{e},att_proj:16x{p}x{a},"
         f"ban_ids:16x10x{MAX_CONTROL_IDS},penalty_ids:16x10x{MAX_CONTROL_IDS},penalty:16")
    assert enc["trt_profile_opt_shapes"] == "image:8x256x256x3"
    # clamped to what the model allows
    small = tensorrt_options(md, "fp32", max_batch=4, opt_batch=8, opt_beam=50)["decoder_step"]
    assert small["trt_profile_opt_shapes"].startswith("tokens:4x10,")
    for o in (enc, dec):
        assert o["trt_fp16_enable"] is True and o["trt_int8_enable"] is False
        assert o["trt_engine_cache_enable"] and o["trt_timing_cache_enable"]
        assert o["trt_engine_cache_path"] == str(tmp_path / "m" / "cache" / "ort-trt-fp16")
    assert (tmp_path / "m" / "cache" / "ort-trt-fp16").is_dir()
