"""The GPU's start-up, once per process: the CUDA/cuDNN (and TensorRT) libraries ONNX Runtime needs, loaded
from wherever they are (captrt.runtime.engines.cuda_libs), what was found (`CudaSetup.facts`, reported by
`captrt verify` and Captioner.info()), and, when a GPU session still cannot start, the first missing
piece in one line: the driver, a named library and the pip package that provides it, or a version mismatch.

    python -c "from captrt.runtime.engines.cuda_setup import check; print(check())"
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from captrt.runtime.engines import cuda_libs
from captrt.runtime.engines.cuda_libs import DRIVER, NO_DRIVER, CudaLibrary, LibraryState

CUDNN_MAJOR = 9  # what onnxruntime-gpu 1.18 and later are built against
TENSORRT_MAJOR = 10  # when the TensorRT provider library does not name its libnvinfer itself
ORT_DEFAULT_SEVERITY = 2  # ONNX Runtime's process-wide logger starts at "warning"
NO_DRIVER_ADVICE = (f"{NO_DRIVER}: a GPU machine needs NVIDIA's driver; CUDA and cuDNN come from pip "
                    "(make install). Or use device='cpu'")
_MISSING_SO = re.compile(r"(lib[\w.+-]+?\.so[\w.]*): cannot open shared object file")
_LOCK = threading.Lock()
_SETUPS: dict[bool, "CudaSetup"] = {}
_QUIET = threading.Lock()
_quiet_depth = 0


def _major(version: str | None) -> int | None:
    head = (version or "").split(".")[0]
    return int(head) if head.isdigit() else None


@dataclass
class CudaSetup:
    """What `prepare` found: ONNX Runtime's build, the driver, and each library's state in load order."""

    onnxruntime: str  # ONNX Runtime's version
    cuda: str  # the CUDA version it was built for, "" for a CPU-only build
    driver: str | None  # where libcuda.so.1 was loaded from, None: no driver
    driver_cuda: str | None  # the newest CUDA the driver supports ("12.8")
    libraries: list[LibraryState]
    site_dirs: list[Path]

    def problem(self) -> str | None:
        """The first piece missing for a GPU session, in words; None when everything needed was loaded."""
        if not self.cuda:
            return (f"the installed ONNX Runtime {self.onnxruntime} is a CPU-only build: pip uninstall onnxruntime "
                    "and pip install onnxruntime-gpu")
        if self.driver is None:
            return NO_DRIVER_ADVICE
        have, need = _major(self.driver_cuda), _major(self.cuda)
        if have is not None and need is not None and have < need:
            return (f"version mismatch: the NVIDIA driver here supports CUDA up to {self.driver_cuda}, but "
                    f"onnxruntime-gpu {self.onnxruntime} is built for CUDA {self.cuda}: update the driver, or install "
                    f"an onnxruntime-gpu built for CUDA {have}")
        missing = next((s for s in self.libraries if s.source == "missing" and s.library.required), None)
        return self.missing(missing.library) if missing else None

    def missing(self, lib: CudaLibrary) -> str:
        """Why `lib` is not loaded: another version installed, a file that does not load, or nothing found."""
        state = next((s for s in self.libraries if s.library == lib), None)
        others = cuda_libs.other_versions(lib, self.site_dirs)
        if others:
            return (f"version mismatch: {lib.title} here is {others[0].name} ({others[0].parent}), but "
                    f"onnxruntime-gpu {self.onnxruntime} (CUDA {self.cuda}) needs {lib.soname}: {lib.install}")
        if state is not None and state.error:
            return f"{lib.title} ({lib.soname}) is installed but does not load: {state.error}"
        if lib.tensorrt:
            return (f"{lib.title} ({lib.soname}) was not found: {lib.install}, or put TensorRT {lib.version}'s "
                    "libraries on LD_LIBRARY_PATH")
        return (f"{lib.title} ({lib.soname}) was not found: {lib.install} (make install brings it), or put "
                f"CUDA {self.cuda}'s libraries on LD_LIBRARY_PATH")

    def explain(self, loader_error: str) -> str | None:
        """A dynamic loader's 'libX: cannot open shared object file' in words, None for other errors."""
        m = _MISSING_SO.search(loader_error)
        if m is None:
            return None
        name = m.group(1)
        if name == DRIVER:
            return NO_DRIVER_ADVICE
        lib = next((s.library for s in self.libraries if s.library.soname == name), None)
        return self.missing(lib) if lib else f"{name} cannot be loaded ({loader_error.strip()})"

    def facts(self) -> dict[str, Any]:
        return {"onnxruntime_cuda": self.cuda or None, "driver": self.driver, "driver_cuda": self.driver_cuda,
                "libraries": {s.library.soname: {"source": s.source, "path": s.path, "package": s.library.package}
                              for s in self.libraries},
                "problem": self.problem(), "summary": self.summary()}

    def summary(self) -> str:
        """One line: the driver, then each library's source."""
        driver = f"driver CUDA {self.driver_cuda or '?'}" if self.driver else "no driver"
        libs = ", ".join(f"{s.library.stem} {s.source}" for s in self.libraries)
        return f"built for CUDA {self.cuda or '-'}; {driver}; {libs or 'no libraries needed'}"


def onnxruntime_build() -> tuple[str, str]:
    """(ONNX Runtime's version, the CUDA version it was built for or "")."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return "", ""
    return str(getattr(info, "__version__", "")), str(getattr(info, "cuda_version", "") or "")


def onnxruntime_cuda_major() -> int | None:
    """The CUDA major version ONNX Runtime was built for, None for a CPU-only build."""
    return _major(onnxruntime_build()[1])


def provider_library(kind: str) -> Path | None:
    """ONNX Runtime's provider library for kind 'cuda' or 'tensorrt' (None when this build has none)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = Path(ort.__file__).parent / "capi" / f"libonnxruntime_providers_{kind}.so"
    return path if path.is_file() else None


def tensorrt_major() -> int:
    """The libnvinfer major version the TensorRT provider library links (read from its dynamic strings)."""
    path = provider_library("tensorrt")
    try:
        found = re.search(rb"libnvinfer\.so\.(\d+)\x00", path.read_bytes()) if path else None
    except OSError:
        found = None
    return int(found.group(1)) if found else TENSORRT_MAJOR


def prepare(tensorrt: bool = False) -> CudaSetup:
    """Load what a CUDA (tensorrt: and TensorRT) session of ONNX Runtime needs, once per process, and report it."""
    with _LOCK:
        if tensorrt in _SETUPS:
            return _SETUPS[tensorrt]
        version, cuda = onnxruntime_build()
        major = _major(cuda)
        dirs = cuda_libs.site_dirs()
        libs = cuda_libs.wanted(major, CUDNN_MAJOR, tensorrt_major() if tensorrt else None) if major else []
        states = cuda_libs.load(libs, dirs, cuda_libs.system_dirs())
        if any(s.source == "missing" and s.library.required for s in states):
            cuda_libs.onnxruntime_preload(states, dirs)
        path, driver_cuda = cuda_libs.driver()
        setup = _SETUPS[tensorrt] = CudaSetup(version, cuda, path, driver_cuda, states, dirs)
        return setup


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """ONNX Runtime's process-wide log at 'fatal' while a GPU session is created: its multi-line provider
    warnings would precede the one line `diagnose` gives. Nested and concurrent uses share one raise;
    the last to leave restores ONNX Runtime's default (warning)."""
    global _quiet_depth
    import onnxruntime as ort

    with _QUIET:
        _quiet_depth += 1
        if _quiet_depth == 1:
            ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        with _QUIET:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)


def provider_load_error(kind: str) -> str | None:
    """What the dynamic loader says when it opens ONNX Runtime's provider library ('cuda' or 'tensorrt'),
    None when it opens. ONNX Runtime opens the same file when it starts the provider, so its first missing
    dependency is the one ONNX Runtime trips over."""
    path = provider_library(kind)
    if path is None:
        return f"this ONNX Runtime has no {kind} provider library (install onnxruntime-gpu)"
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
    except OSError as exc:
        return str(exc)
    return None


def device_problem() -> str | None:
    """Why the driver cannot run CUDA on a GPU here, None when it sees at least one."""
    try:
        lib = ctypes.CDLL(DRIVER)
    except OSError:
        return NO_DRIVER
    err = lib.cuInit(0)
    if err == 0:
        count = ctypes.c_int(0)
        err = lib.cuDeviceGetCount(ctypes.byref(count))
        if err == 0:
            return None if count.value > 0 else "the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)"
    name = ctypes.c_char_p()
    lib.cuGetErrorName(err, ctypes.byref(name))
    what = (name.value or b"").decode() or f"error {err}"
    if err == 100:  # CUDA_ERROR_NO_DEVICE
        return f"the NVIDIA driver sees no GPU ({what}; check CUDA_VISIBLE_DEVICES)"
    return f"the NVIDIA driver cannot start CUDA ({what})"


def diagnose(setup: CudaSetup, kind: str) -> str | None:
    """After ONNX Runtime failed to start its `kind` provider: the first missing piece, None if none is found."""
    why = setup.problem()
    if why:
        return why
    error = provider_load_error(kind)
    if error:
        return setup.explain(error) or error
    return device_problem()


def check(tensorrt: bool = False) -> str:
    """One line: whether ONNX Runtime's CUDA (tensorrt: TensorRT) provider can start here, and what it found."""
    setup = prepare(tensorrt)
    kind = "tensorrt" if tensorrt else "cuda"
    why = diagnose(setup, kind)
    return f"{kind}: {'not ready: ' + why if why else 'ready'} ({setup.summary()})"
