"""captrt.serve: the runtime's Captioner behind an HTTP service (FastAPI + uvicorn, `captrt[serve]`).

    from captrt.serve import ServeConfig, create_app, serve
    serve(ServeConfig(model=Path("model_dir"), max_batch=16))      # what `captrt serve` does
    app = create_app(ServeConfig(model=Path("model_dir")))          # or run the ASGI app yourself
    app = ray_app(ServeConfig(model=Path("model_dir")), replicas=2)  # a Ray Serve application (serve.run)

/v1/captions is the service's own API; /v2 speaks the Open Inference Protocol (KServe v2 REST with
binary tensors: captrt.serve.v2, docs/open-inference-protocol.md) over the same batcher and limits.
Built on the runtime's public API only (`captrt.runtime`: Captioner.load / read_image / caption /
info / warmup, ModelDir, the image errors);
imports no torch unless engine='torch' is asked for.
"""

from captrt.serve.config import ServeConfig
# Bound here, after its module loads, so `captrt.serve.ray_app` is the function (the module imports no Ray).
from captrt.serve.ray_app import ray_app

__all__ = ["ServeConfig", "create_app", "ray_app", "serve"]


def __getattr__(name: str):  # fastapi/uvicorn load on first use: `captrt --help` stays fast
    if name == "create_app":
        from captrt.serve.app import create_app

        return create_app
    if name == "serve":
        from captrt.serve.server import serve

        return serve
    raise AttributeError(name)
