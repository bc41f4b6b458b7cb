"""Finding and loading pip's CUDA/cuDNN/TensorRT libraries before a GPU session, and the one-line errors.

The finder runs on fake site-packages trees of each wheel layout (empty files: nothing is loaded). On this
machine (no NVIDIA driver; CUDA 13 and cuDNN 9 from pip wheels) the real start-up runs in fresh processes
with torch unimportable, so nothing else loads the libraries first: after the preload, ONNX Runtime's CUDA
provider library misses only the driver, and `captrt caption --device cuda` says so in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from captrt.runtime.engines import cuda_libs
from captrt.runtime.engines.cuda_libs import CudaLibrary, LibraryState, find_in, other_versions, wanted
from captrt.runtime.engines.cuda_setup import NO_DRIVER_ADVICE, CudaSetup
from tests.conftest import random_images

ROOT = Path(__file__).resolve().parents[3]

CUDA13 = ["nvidia/cu13/lib/libcudart.so.13", "nvidia/cu13/lib/libcublasLt.so.13", "nvidia/cu13/lib/libcublas.so.13",
          "nvidia/cu13/lib/libcufft.so.12", "nvidia/cu13/lib/libcurand.so.10", "nvidia/cu13/lib/libnvrtc.so.13",
          "nvidia/cudnn/lib/libcudnn.so.9"]
CUDA12 = ["nvidia/cuda_runtime/lib/libcudart.so.12", "nvidia/cublas/lib/libcublasLt.so.12",
          "nvidia/cublas/lib/libcublas.so.12", "nvidia/cufft/lib/libcufft.so.11", "nvidia/curand/lib/libcurand.so.10",
          "nvidia/cuda_nvrtc/lib/libnvrtc.so.12", "nvidia/cudnn/lib/libcudnn.so.9"]
TENSORRT10 = ["tensorrt_libs/libnvinfer.so.10", "tensorrt_libs/libnvinfer_plugin.so.10",
              "tensorrt_libs/libnvonnxparser.so.10"]


def fake_site(root: Path, files: list[str], extra: tuple[str, ...] = ()) -> Path:
    """A site-packages folder holding empty files at the wheels' paths (plus decoys that must be ignored)."""
    for rel in [*files, *extra]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def setup_of(libs: list[CudaLibrary], found: dict[str, Path], dirs: list[Path], *, cuda: str = "13.0",
             driver: str | None = "/usr/lib/libcuda.so.1", driver_cuda: str | None = "13.0") -> CudaSetup:
    """What prepare() would report had it loaded exactly the libraries in `found` (no loading here)."""
    states = [LibraryState(lib, str(found[lib.soname]), "pip") if lib.soname in found else LibraryState(lib)
              for lib in libs]
    return CudaSetup("1.31.1", cuda, driver, driver_cuda, states, dirs)


@pytest.mark.parametrize("major,files", [(13, CUDA13), (12, CUDA12)])
def test_each_wheel_layout_gives_the_right_files_in_load_order(tmp_path, major, files):
    other = "nvidia/cu12/lib/libcudart.so.12" if major == 13 else "nvidia/cu13/lib/libcudart.so.13"
    site = fake_site(tmp_path / "site-packages", files, extra=(other, "nvidia/cu13/lib/libcufftw.so.12"))
    libs = wanted(major)
    # dependency order: the runtime, cuBLASLt before cuBLAS (which links it), ..., cuDNN last
    assert [lib.stem for lib in libs] == ["cudart", "cublasLt", "cublas", "cufft", "curand", "nvrtc", "cudnn"]
    found = [find_in(lib, [tmp_path / "elsewhere", site]) for lib in libs]
    assert found == [site / f for f in files]
    assert [lib.required for lib in libs] == [True, True, True, False, True, False, True]
    suffix = "" if major == 13 else "-cu12"
    assert [lib.package for lib in libs] == [f"nvidia-cuda-runtime{suffix}", f"nvidia-cublas{suffix}",
                                             f"nvidia-cublas{suffix}", f"nvidia-cufft{suffix}",
                                             f"nvidia-curand{suffix}", f"nvidia-cuda-nvrtc{suffix}",
                                             f"nvidia-cudnn-cu{major}"]
    setup = setup_of(libs, dict(zip((lib.soname for lib in libs), found)), [site], cuda=f"{major}.0",
                     driver_cuda=f"{major}.4")
    assert setup.problem() is None


def test_a_missing_cudnn_is_named_with_its_package(tmp_path):
    site = fake_site(tmp_path / "site", CUDA13[:-1])  # everything but cuDNN
    libs = wanted(13)
    found = {lib.soname: p for lib in libs if (p := find_in(lib, [site])) is not None}
    assert find_in(libs[-1], [site]) is None and len(found) == len(libs) - 1
    problem = setup_of(libs, found, [site]).problem()
    assert problem == ("cuDNN (libcudnn.so.9) was not found: pip install 'nvidia-cudnn-cu13==9.*' (make install "
                       "brings it), or put CUDA 13.0's libraries on LD_LIBRARY_PATH")
    # the dynamic loader's own words become the same line
    assert setup_of(libs, found, [site]).explain(
        "libcudnn.so.9: cannot open shared object file: No such file or directory") == problem


def test_optional_libraries_do_not_block_and_the_first_missing_required_one_is_named(tmp_path):
    site = fake_site(tmp_path / "site", [f for f in CUDA13 if "cufft" not in f and "cublas" not in f])
    libs = wanted(13)
    found = {lib.soname: p for lib in libs if (p := find_in(lib, [site])) is not None}
    problem = setup_of(libs, found, [site]).problem()
    assert problem.startswith("cuBLASLt (libcublasLt.so.13) was not found: pip install 'nvidia-cublas==13.*'")


def test_a_cuda_12_wheel_under_a_cuda_13_build_is_a_version_mismatch(tmp_path):
    site = fake_site(tmp_path / "site", CUDA12)
    libs = wanted(13)
    found = {lib.soname: p for lib in libs if (p := find_in(lib, [site])) is not None}
    assert set(found) == {"libcurand.so.10", "libcudnn.so.9"}  # the same sonames in both CUDA versions
    assert other_versions(libs[0], [site]) == [site / "nvidia/cuda_runtime/lib/libcudart.so.12"]
    problem = setup_of(libs, found, [site]).problem()
    assert problem.startswith("version mismatch: the CUDA runtime here is libcudart.so.12 (")
    assert problem.endswith("but onnxruntime-gpu 1.31.1 (CUDA 13.0) needs libcudart.so.13: "
                            "pip install 'nvidia-cuda-runtime==13.*'")


def test_the_driver_comes_first_then_its_version():
    libs = wanted(13)
    assert setup_of(libs, {}, [], driver=None, driver_cuda=None).problem() == NO_DRIVER_ADVICE
    assert NO_DRIVER_ADVICE.startswith("no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded)")
    old = setup_of(libs, {}, [], driver_cuda="12.4").problem()
    assert old.startswith("version mismatch: the NVIDIA driver here supports CUDA up to 12.4, but onnxruntime-gpu "
                          "1.31.1 is built for CUDA 13.0: update the driver")
    assert setup_of(libs, {}, [], cuda="").problem().startswith("the installed ONNX Runtime 1.31.1 is a CPU-only build")
    assert setup_of(libs, {}, []).explain("libcuda.so.1: cannot open shared object file: No such file") \
        == NO_DRIVER_ADVICE
    assert setup_of(libs, {}, []).explain("undefined symbol: foo") is None


def test_tensorrt_wheels_and_a_tensorrt_of_another_major(tmp_path):
    site = fake_site(tmp_path / "site", CUDA13 + TENSORRT10)
    libs = wanted(13, tensorrt_major=10)
    assert [lib.stem for lib in libs[-3:]] == ["nvinfer", "nvinfer_plugin", "nvonnxparser"]
    assert [find_in(lib, [site]) for lib in libs[-3:]] == [site / f for f in TENSORRT10]
    newer = fake_site(tmp_path / "newer", CUDA13 + [f.replace(".so.10", ".so.11") for f in TENSORRT10])
    found = {lib.soname: p for lib in libs if (p := find_in(lib, [newer])) is not None}
    problem = setup_of(libs, found, [newer]).problem()
    assert problem.startswith("version mismatch: TensorRT here is libnvinfer.so.11")
    assert problem.endswith("needs libnvinfer.so.10: pip install 'tensorrt-cu13==10.*'")


def test_site_dirs_come_from_the_installed_wheels_and_sys_path(tmp_path, monkeypatch):
    site = fake_site(tmp_path / "site", CUDA13)
    monkeypatch.setattr(sys, "path", [*sys.path, str(site), str(tmp_path / "no-such-dir")])
    dirs = cuda_libs.site_dirs()
    assert site.resolve() in dirs and (tmp_path / "no-such-dir") not in dirs
    assert len(dirs) == len(set(dirs))


# ------------------------------------------------------------------ the real start-up on this machine
def _no_driver() -> bool:
    return cuda_libs.driver()[0] is None


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=180)


@pytest.mark.skipif(not _no_driver(), reason="an NVIDIA driver is installed: the GPU tests cover this")
def test_after_the_preload_the_cuda_provider_misses_only_the_driver():
    done = _run("""
        import json, sys
        sys.modules["torch"] = None  # nothing but captrt loads the CUDA libraries
        from captrt.runtime.engines import cuda_setup
        setup = cuda_setup.prepare()
        print(json.dumps({"facts": setup.facts(), "provider": cuda_setup.provider_load_error("cuda")}))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    libs = out["facts"]["libraries"]
    if not out["facts"]["onnxruntime_cuda"]:
        pytest.skip("ONNX Runtime here is a CPU-only build")
    major = out["facts"]["onnxruntime_cuda"].split(".")[0]
    assert list(libs)[:3] == [f"libcudart.so.{major}", f"libcublasLt.so.{major}", f"libcublas.so.{major}"], libs
    for soname, lib in libs.items():  # every library found and loaded, from a real file
        assert lib["source"] in ("pip", "system") and Path(lib["path"]).is_file(), (soname, lib)
    assert out["provider"].startswith("libcuda.so.1: cannot open shared object file"), out["provider"]
    assert out["facts"]["driver"] is None and out["facts"]["problem"] == NO_DRIVER_ADVICE


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("cuda_cli") / "blobs.png"
    Image.fromarray(random_images(1, seed=5)[0]).save(path)
    return path


def _caption(model_dir: Path, image: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "captrt", "caption", str(image), "--model", str(model_dir), *args],
                          capture_output=True, text=True, env=env, timeout=180)


@pytest.mark.skipif(not _no_driver(), reason="an NVIDIA driver is installed: the GPU tests cover this")
@pytest.mark.parametrize("providers", [(), ("--providers", "tensorrt")])
def test_caption_on_cuda_without_a_driver_prints_one_line_naming_it(varied_model_dir, image_file, providers):
    done = _caption(varied_model_dir, image_file, "--device", "cuda", *providers)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr  # no ONNX Runtime warnings before it
    assert lines[0].startswith("captrt: device='cuda': no NVIDIA driver on this machine (libcuda.so.1"), lines
    assert "libcublas" not in lines[0] and "libcudnn" not in lines[0]


def test_caption_on_the_cpu_prints_no_onnx_runtime_warnings(varied_model_dir, image_file):
    done = _caption(varied_model_dir, image_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{image_file}\t")
    assert done.stderr == ""


@pytest.mark.skipif(not _no_driver(), reason="an NVIDIA driver is installed: the script then runs for real")
def test_the_gpu_check_script_says_in_one_line_that_there_is_no_gpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stdout.splitlines() == [f"gpu_check: no usable GPU here: {NO_DRIVER_ADVICE}"]
