"""captrt.runtime: torch-free inference (numpy, onnxruntime, pillow).

    from captrt.runtime import Captioner
    captioner = Captioner.load("model_dir")          # engine="ort" | "trt" | "torch"
    for c in captioner.caption(["a.jpg", "b.png"], beam_size=5):
        print(c.text, c.score)

Using this package loads numpy, onnxruntime and pillow only; TensorRT/CUDA bindings are imported
by the engine that needs them and torch only by engine="torch".
"""

from __future__ import annotations

import importlib
from typing import Any

# Names load on first use (PEP 562): `import captrt.runtime.decoding.options` (the command line's option
# table) then costs no engine, pillow or captioner import, and `captrt --help` stays fast.
_HOMES = {"Caption": "captioner", "Captioner": "captioner", "EngineUnavailableError": "errors",
          "ModelDirError": "errors", "UnverifiedPrecisionError": "errors", "ModelDir": "model_dir",
          "ImageTooLargeError": "preprocess", "InvalidImageError": "preprocess",
          "UnsupportedImageFormatError": "preprocess"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'captrt.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"captrt.runtime.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
