"""Engine registry: engines are imported lazily, so `import captrt.runtime` never pulls tensorrt, openvino or torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from captrt.checks import check_int
from captrt.runtime.engines.base import DEVICES, ENGINES, PRECISIONS, DecodeState, Engine, StepOutput
from captrt.runtime.errors import EngineUnavailableError
from captrt.runtime.model_dir import ENGINE_PRECISIONS

if TYPE_CHECKING:
    from captrt.runtime.model_dir import ModelDir

__all__ = ["DEVICES", "ENGINE_PRECISIONS", "ENGINES", "PRECISIONS", "DecodeState", "Engine", "StepOutput", "create_engine"]

# engine name -> (module, class name). The torch engine lives in captrt.train: captrt.runtime itself
# never imports torch, so services can embed it with numpy, onnxruntime and pillow alone.
_REGISTRY = {
    "ort": ("captrt.runtime.engines.ort", "OrtEngine"),
    "trt": ("captrt.runtime.engines.trt", "TrtEngine"),
    "torch": ("captrt.train.torch_engine", "TorchEngine"),
    "openvino": ("captrt.runtime.engines.openvino", "OpenVinoEngine"),
}

_INSTALL_HINT = {
    "trt": "the TensorRT engine needs an NVIDIA GPU with CUDA, the `tensorrt` Python package "
           "(pip install tensorrt) and the CUDA Python bindings (pip install cuda-python)",
    "torch": "the torch engine needs PyTorch: pip install 'captrt[train]'",
    "openvino": "the OpenVINO engine needs OpenVINO: pip install 'captrt[openvino]'",
}


def create_engine(name: str, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32",
                  threads: int | None = None, **options: Any) -> Engine:
    """Build engine `name` for `model`. Unknown names/devices/precisions are ValueErrors; a backend
    that cannot run here is an EngineUnavailableError saying what to install."""
    if name not in _REGISTRY:
        raise ValueError(f"engine: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise ValueError(f"device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    engines = ENGINE_PRECISIONS.get(precision)
    if engines is not None and name not in engines:
        raise ValueError(f"precision {precision!r} is an engine precision of engine {' / '.join(map(repr, engines))} "
                         f"(it runs the fp32 graphs in {precision}), not of engine {name!r}: use --engine {engines[0]}")
    check_int("threads", threads, allow_none=True, expected=True, what="a positive integer or None")
    module_name, cls_name = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINT.get(name, "")
        raise EngineUnavailableError(f"engine {name!r} is not available: {exc}. {hint}".strip()) from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise EngineUnavailableError(f"engine {name!r} is not available: {module_name} has no {cls_name}")
    return cls(model, device=device, precision=precision, threads=threads, **options)
