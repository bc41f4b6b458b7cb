"""NVIDIA's pip-installed CUDA, cuDNN and TensorRT libraries, made loadable before a GPU session starts,
and the first missing piece in plain words when one cannot start.

ONNX Runtime's CUDA provider library links the CUDA runtime, cuBLAS(Lt) and cuRAND by soname and opens
cuDNN and cuFFT later; its TensorRT provider links libnvinfer and libnvonnxparser. The dynamic loader
looks for none of them in site-packages, where pip wheels put them: CUDA 13 in one shared directory
(nvidia/cu13/lib), CUDA 12 one directory per component (nvidia/cublas/lib, nvidia/cuda_runtime/lib, ...),
cuDNN in nvidia/cudnn/lib, TensorRT in tensorrt_libs. `prepare` opens them once per process, in
dependency order, with RTLD_GLOBAL: every later lookup by soname (the provider library's, cuDNN's own
sub-libraries') then finds the copy already loaded. A copy the loader finds on its own (LD_LIBRARY_PATH,
the ldconfig cache) or one under CUDA_HOME / /usr/local/cuda wins over pip's: a CUDA the user set up is
used as it is. The driver (libcuda.so.1) never comes from pip: it is the one thing a GPU machine brings.

Linux only (sonames, /proc/self/maps); elsewhere everything reports missing and ONNX Runtime's own
error stands. Nothing here imports torch or the CUDA Python bindings.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import io
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

DRIVER = "libcuda.so.1"
NO_DRIVER = f"no NVIDIA driver on this machine ({DRIVER} cannot be loaded)"
_MODE = os.RTLD_NOW | os.RTLD_GLOBAL


@dataclass(frozen=True)
class CudaLibrary:
    """One library a GPU session needs: the file lib<stem>.so.<version>, where pip wheels put it
    (`dirs`, relative to site-packages) and the distribution that provides it."""

    title: str
    stem: str
    version: str
    dirs: tuple[str, ...]
    package: str
    required: bool = True  # False: only some kernels use it (cuFFT, NVRTC, TensorRT's plugins)

    @property
    def soname(self) -> str:
        return f"lib{self.stem}.so.{self.version}"

    @property
    def tensorrt(self) -> bool:
        return self.dirs == ("tensorrt_libs",)

    @property
    def install(self) -> str:
        return f"pip install '{self.package}=={self.version}.*'"


def wanted(cuda_major: int, cudnn_major: int = 9, tensorrt_major: int | None = None) -> list[CudaLibrary]:
    """What a CUDA-`cuda_major` build of ONNX Runtime loads, in load order (each after what it links)."""
    suffix = "" if cuda_major >= 13 else f"-cu{cuda_major}"  # CUDA 13's wheels dropped the suffix (not cuDNN's)
    shared = f"nvidia/cu{cuda_major}/lib"

    def cuda(title: str, stem: str, version: int, component: str, package: str, required: bool = True) -> CudaLibrary:
        return CudaLibrary(title, stem, str(version), (shared, f"nvidia/{component}/lib"), f"nvidia-{package}{suffix}",
                           required)

    libs = [cuda("the CUDA runtime", "cudart", cuda_major, "cuda_runtime", "cuda-runtime"),
            cuda("cuBLASLt", "cublasLt", cuda_major, "cublas", "cublas"),
            cuda("cuBLAS", "cublas", cuda_major, "cublas", "cublas"),
            cuda("cuFFT", "cufft", cuda_major - 1, "cufft", "cufft", required=False),  # 11 for CUDA 12, 12 for 13
            cuda("cuRAND", "curand", 10, "curand", "curand"),
            cuda("NVRTC", "nvrtc", cuda_major, "cuda_nvrtc", "cuda-nvrtc", required=False),
            CudaLibrary("cuDNN", "cudnn", str(cudnn_major), ("nvidia/cudnn/lib",), f"nvidia-cudnn-cu{cuda_major}")]
    if tensorrt_major is not None:
        trt, package = ("tensorrt_libs",), f"tensorrt-cu{cuda_major}"
        libs += [CudaLibrary("TensorRT", "nvinfer", str(tensorrt_major), trt, package),
                 CudaLibrary("TensorRT's plugins", "nvinfer_plugin", str(tensorrt_major), trt, package, required=False),
                 CudaLibrary("TensorRT's ONNX parser", "nvonnxparser", str(tensorrt_major), trt, package)]
    return libs


# ---------------------------------------------------------------------------------------- finding
def site_dirs() -> list[Path]:
    """Where NVIDIA's and TensorRT's wheels are installed: their distributions' site-packages (from
    the installed nvidia-* / tensorrt* metadata), then any sys.path entry holding an nvidia/ folder."""
    from importlib import metadata

    found = [Path(str(d.locate_file(""))) for d in metadata.distributions()
             if (d.name or "").lower().startswith(("nvidia-", "tensorrt"))]
    found += [Path(p) for p in sys.path if p and Path(p, "nvidia").is_dir()]
    return list(dict.fromkeys(p.resolve() for p in found if p.is_dir()))


def system_dirs() -> list[Path]:
    """A CUDA toolkit's library folders outside the loader's own search: CUDA_HOME, CUDA_PATH, /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return [Path(r, sub) for r in dict.fromkeys(r for r in roots if r) for sub in ("lib64", "lib")
            if Path(r, sub).is_dir()]


def find_in(lib: CudaLibrary, dirs: Sequence[Path]) -> Path | None:
    """The first of `dirs` (site-packages folders) holding lib's file in one of its wheel layouts."""
    return next((Path(d, sub, lib.soname) for d in dirs for sub in lib.dirs if Path(d, sub, lib.soname).is_file()),
                None)


def other_versions(lib: CudaLibrary, dirs: Sequence[Path]) -> list[Path]:
    """Copies of lib with another soname version in `dirs` (a CUDA 12 wheel when CUDA 13 is wanted...)."""
    prefix = f"lib{lib.stem}.so."
    subs = list(lib.dirs) + (["nvidia/*/lib"] if lib.dirs[0].startswith("nvidia/") else [])
    hits = {Path(f) for d in dirs for sub in subs for f in glob.glob(os.path.join(glob.escape(str(d)), sub,
                                                                                    glob.escape(prefix) + "*"))}
    return sorted(p for p in hits if p.name[len(prefix):].split(".")[0] not in ("", lib.version))


# ---------------------------------------------------------------------------------------- loading
@dataclass
class LibraryState:
    """How one library was found: source 'system' (the loader's own search or a CUDA toolkit folder),
    'pip' (a wheel in site-packages), 'onnxruntime' (onnxruntime.preload_dlls) or 'missing'."""

    library: CudaLibrary
    path: str | None = None
    source: str = "missing"
    error: str | None = None  # a file that exists but did not load (e.g. its own dependency is missing)


def mapped_paths() -> list[str]:
    """The files mapped into this process (the shared libraries loaded so far)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return list(dict.fromkeys(line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6))
    except OSError:
        return []


def _loaded_at(lib: CudaLibrary, paths: Sequence[str]) -> str | None:
    name = lib.soname
    return next((p for p in paths if os.path.basename(p) == name or os.path.basename(p).startswith(name + ".")), None)


def load(libs: Sequence[CudaLibrary], pip_dirs: Sequence[Path], toolkit_dirs: Sequence[Path] = ()) -> list[LibraryState]:
    """Open each library (RTLD_GLOBAL) in order: what the loader finds by soname, else a toolkit folder, else pip."""
    states = []
    for lib in libs:
        state = LibraryState(lib)
        try:
            ctypes.CDLL(lib.soname, mode=_MODE)
            state.source = "system"
        except OSError:
            files = [Path(d, lib.soname) for d in toolkit_dirs if Path(d, lib.soname).is_file()]
            pip = find_in(lib, pip_dirs)
            for path in files + ([pip] if pip else []):
                try:
                    ctypes.CDLL(str(path), mode=_MODE)
                except OSError as exc:
                    state.error = str(exc)
                    continue
                state.source, state.error = "system", None
                break
        states.append(state)
    _locate(states, pip_dirs)
    return states


def _locate(states: Sequence[LibraryState], pip_dirs: Sequence[Path]) -> None:
    paths = mapped_paths()
    roots = [str(d) + os.sep for d in pip_dirs]
    for s in states:
        if s.source != "missing":
            s.path = _loaded_at(s.library, paths)
            if s.source == "system" and s.path and any(s.path.startswith(r) for r in roots):
                s.source = "pip"


def onnxruntime_preload(states: Sequence[LibraryState], pip_dirs: Sequence[Path]) -> None:
    """Let onnxruntime.preload_dlls (ONNX Runtime >= 1.21; it knows its own build's wheel layout) try what
    is still missing; its printed complaints and warnings are dropped: `problem` says it in one line."""
    missing = [s for s in states if s.source == "missing"]
    if not missing:
        return
    try:
        import onnxruntime as ort

        preload = ort.preload_dlls
    except (ImportError, AttributeError):
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload(directory="")
        except Exception:  # noqa: BLE001 - a helper of last resort: its failure changes nothing
            return
    for s in missing:
        try:
            ctypes.CDLL(s.library.soname, mode=_MODE)
        except OSError:
            continue
        s.source, s.error = "onnxruntime", None
    _locate(missing, pip_dirs)


def driver() -> tuple[str | None, str | None]:
    """(path of libcuda.so.1, the newest CUDA version it supports), (None, None) without a driver."""
    try:
        lib = ctypes.CDLL(DRIVER, mode=_MODE)
    except OSError:
        return None, None
    version = ctypes.c_int(0)
    try:
        ok = lib.cuDriverGetVersion(ctypes.byref(version)) == 0
    except AttributeError:
        ok = False
    path = next((p for p in mapped_paths() if os.path.basename(p).startswith("libcuda.so")), DRIVER)
    return path, f"{version.value // 1000}.{version.value % 1000 // 10}" if ok and version.value else None
