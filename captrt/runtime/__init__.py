"""captrt.runtime: torch-free inference (numpy, onnxruntime, pillow).

    from captrt.runtime import Captioner
    captioner = Captioner.load("model_dir")          # engine="ort" | "trt" | "torch"
    for c in captioner.caption(["a.jpg", "b.png"], beam_size=5):
        print(c.text, c.score)

Importing this package loads numpy, onnxruntime and pillow only; TensorRT/CUDA bindings are imported
by the engine that needs them and torch only by engine="torch".
"""

from captrt.runtime.captioner import Caption, Captioner
from captrt.runtime.errors import EngineUnavailableError, ModelDirError, UnverifiedPrecisionError
from captrt.runtime.model_dir import ModelDir
from captrt.runtime.preprocess import ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError

__all__ = ["Caption", "Captioner", "EngineUnavailableError", "ImageTooLargeError", "InvalidImageError", "ModelDir",
           "ModelDirError", "UnsupportedImageFormatError", "UnverifiedPrecisionError"]
