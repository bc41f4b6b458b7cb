"""captrt.serve.v2: the Open Inference Protocol (KServe v2 REST + Triton's binary tensor data
extension) on `captrt serve`, so tritonclient, KServe and MLServer clients work unchanged.

routes.py: the /v2 routes; tensors.py: the body codec (JSON and binary tensors); outputs.py: the
model's tensors (inputs, outputs, captions -> tensors); params.py: request parameters -> /v1's
option parser; metadata.py: server and model metadata; openapi.py: the schemas.
"""

from captrt.serve.v2.routes import is_v2, v2_error, v2_router

__all__ = ["is_v2", "v2_error", "v2_router"]
