"""The FastAPI application: routes, limits, metrics, and the model's life cycle.

    app = create_app(ServeConfig(model=Path("model_dir")))   # any ASGI server can run it
    uvicorn.run(app, host="127.0.0.1", port=8000)

The model loads and warms on a thread after start-up, so /healthz answers at once and /readyz turns
200 when captions can be served. Caption requests: body read under a cap -> images decoded on a
thread pool -> queued for the Batcher -> one batched beam search -> JSON (captrt.serve.pipeline, shared
with the Open Inference Protocol's /v2 routes of captrt.serve.v2).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from captrt.runtime import Captioner, ModelDir, ModelDirError
from captrt.serve.batcher import Batcher
from captrt.serve.config import ServeConfig
from captrt.serve.metrics import ServeMetrics
from captrt.serve.middleware import ServiceMiddleware
from captrt.serve.page import ui_router
from captrt.serve.pipeline import ServiceState, caption_uploads, guarded, parse_decode, run_batch
from captrt.serve.upload import BodyTooLargeError, ServeError, params_schema, read_uploads, too_large
from captrt.serve.v2 import is_v2, v2_error, v2_router

log = logging.getLogger("captrt.serve")
DEFAULT_WARM_BEAM = 5
ECHO_WORDS = 32  # words of suppress/prefix repeated in a response's params


def _error(status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """/v1's error body {"detail": ...}, or the protocol's {"error": ...} on /v2 paths."""
    if is_v2(path):
        return v2_error(status, detail, headers)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(config: ServeConfig, *, captioner: Captioner | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service as an ASGI app. captioner: serve this already-loaded one instead of loading
    config.model. on_fatal(message): called when loading fails (the CLI uses it to exit 1)."""
    config.validate()
    state = ServiceState(config, ServeMetrics())
    # FastAPIOffline: /docs and /redoc from assets shipped in the package, no CDN (works offline and under a CSP)
    app = FastAPIOffline(title="captrt", version=_version(), lifespan=_lifespan(state, captioner, on_fatal),
                         static_url="/docs/assets",
                         description="Show, Attend and Tell image captioning: batched beam search over ONNX Runtime / TensorRT.")
    app.add_middleware(ServiceMiddleware, metrics=state.metrics, max_body_bytes=config.max_body_bytes,
                       body_timeout=config.body_timeout)
    app.state.captrt = state
    if config.ui:
        app.include_router(ui_router())
    _add_error_handlers(app)
    check_key = _key_checker(config.api_key())
    _add_operational_routes(app, state, check_key)
    _add_caption_routes(app, state, check_key, captioner)
    app.include_router(v2_router(state, check_key=check_key, not_ready=lambda: _not_ready(state),
                                 model=_model_dir(config, captioner)))
    return app


# ----------------------------------------------------------------------------- the model's life cycle

def _install(state: ServiceState, cap: Captioner) -> None:
    """Warm `cap` on the batch sizes the service forms, then make it the served model (info, metrics)."""
    config, metrics = state.config, state.metrics
    cap.warmup(batch_sizes=sorted({1, config.max_batch}), beam_size=DEFAULT_WARM_BEAM)
    state.captioner = cap
    metrics.streams_busy.set_function(lambda: cap.slots.busy)  # searches holding a stream, read per scrape
    state.max_steps_cap = config.max_steps_cap or cap.model.max_steps
    state.info = {**cap.info(), "max_steps_cap": state.max_steps_cap, "max_batch": config.max_batch,
                  "image_formats": list(config.image_formats), "max_images_per_request": config.max_images,
                  "max_body_bytes": config.max_body_bytes}
    metrics.model.info({**{k: str(state.info[k]) for k in ("id", "engine", "provider", "precision")},
                        "verification": str(state.info["verification"]["status"])})


def _load(state: ServiceState, captioner: Captioner | None) -> None:
    """Load config.model (unless a captioner was given) and install it; runs on a thread."""
    config = state.config
    cap = captioner or Captioner.load(
        config.model, engine=config.engine, device=config.device, precision=config.precision,
        threads=config.threads, streams=config.streams, oversubscribe=config.oversubscribe,
        providers=config.providers, image_formats=config.image_formats,
        max_image_pixels=config.max_image_pixels, max_image_bytes=config.max_body_bytes,
        allow_unverified=config.allow_unverified)
    _install(state, cap)


def _lifespan(state: ServiceState, captioner: Captioner | None, on_fatal: Callable[[str], None] | None):
    """Start-up loads the model in the background (/healthz answers meanwhile) and starts the Batcher;
    shut-down drains and closes what start-up opened (a given captioner stays the caller's to close)."""
    config, metrics = state.config, state.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        async def load_then_start() -> None:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(None, _load, state, captioner)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, never a hang
                state.load_error = f"{type(exc).__name__}: {exc}"
                log.error("captrt serve: cannot load the model: %s", state.load_error)
                if on_fatal is not None:
                    on_fatal(state.load_error)
                return
            assert state.captioner is not None
            batcher = Batcher(run_batch(state.captioner), max_batch=config.max_batch,
                              max_wait_s=config.max_wait_s, capacity=config.queue, metrics=metrics,
                              streams=state.captioner.streams)  # up to S batches in flight, one per stream
            batcher.start()
            state.batcher = batcher
            metrics.ready.set(1)
            log.info("captrt serve: ready in %.1f s: %s", time.perf_counter() - started, state.captioner)
            choice = getattr(state.captioner, "precision_choice", None)
            if choice is not None:  # precision="auto": what it chose, and every candidate with why
                log.info("captrt serve: precision auto chose %s: %s; candidates: %s", choice.chosen, choice.reason,
                         "; ".join(f"{c['precision']} {c['status']}" + (f" {c['speedup']:.2f}x" if "speedup" in c
                                                                        else "") for c in choice.candidates))

        loader = loop.create_task(load_then_start())
        try:
            yield
        finally:
            metrics.ready.set(0)
            if not loader.done():
                await loader  # a load in progress finishes (threads cannot be interrupted), then closes
            if state.batcher is not None:
                await state.batcher.close()  # in-flight requests have drained by now (uvicorn waits)
            state.decode_pool.shutdown(wait=True)
            if state.captioner is not None and captioner is None:
                state.captioner.close()

    return lifespan


# ------------------------------------------------------------------------ errors, key, readiness

def _add_error_handlers(app: FastAPI) -> None:
    """Every error is one JSON body: /v1's {"detail"}, or the protocol's {"error"} on /v2 paths."""

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.detail, exc.headers, request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:  # unknown path, wrong method
        if is_v2(request.url.path):
            return _error(exc.status_code, str(exc.detail), exc.headers, request.url.path)
        return await http_exception_handler(request, exc)

    @app.exception_handler(BodyTooLargeError)
    async def body_too_large(request: Request, exc: BodyTooLargeError) -> JSONResponse:
        # read_uploads turns the cap into a 413 itself; this catches any other reader of the body
        return await serve_error(request, too_large(exc.limit))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log", path=request.url.path)


def _key_checker(api_key: str | None) -> Callable[[Request], None]:
    """check_key(request): ServeError 401 unless the request carries `api_key` (Authorization: Bearer, or
    X-API-Key), compared in constant time; passes everything when no key is configured."""

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:]
        given = None if given is None else given.strip()  # as the configured key (ServeConfig.api_key)
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ServeError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                             {"WWW-Authenticate": "Bearer"})

    return check_key


def _not_ready(state: ServiceState) -> ServeError:
    """The 503 of a request that came before the model is ready (or after it failed to load)."""
    if state.load_error is not None:
        return ServeError(503, f"model failed to load: {state.load_error}")
    return ServeError(503, "model is loading; retry shortly", {"Retry-After": "1"})


# ----------------------------------------------------------------------------------------- routes

def _add_operational_routes(app: FastAPI, state: ServiceState, check_key: Callable[[Request], None]) -> None:
    """/healthz, /readyz, /metrics: what an orchestrator and a scraper read."""
    config, metrics = state.config, state.metrics

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "loading, or failed to load"}})
    async def readyz(request: Request) -> JSONResponse:
        """Ready: the model is loaded and warmed; caption requests will be served."""
        if config.private_metrics:
            check_key(request)
        if not state.ready:
            return _error(503, _not_ready(state).detail)
        return JSONResponse({"status": "ready", "model": state.info["id"]})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus(request: Request) -> Response:
        """Prometheus text format."""
        if config.private_metrics:
            check_key(request)
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _add_caption_routes(app: FastAPI, state: ServiceState, check_key: Callable[[Request], None],
                        captioner: Captioner | None) -> None:
    """/v1/model and /v1/captions."""

    @app.get("/v1/model", tags=["captions"])
    async def model_info(request: Request) -> dict[str, Any]:
        """The served model's public facts and the engine/provider actually running."""
        check_key(request)
        if not state.ready:
            raise _not_ready(state)
        return state.info

    @app.post("/v1/captions", tags=["captions"], openapi_extra=_captions_openapi(*_limits(state.config, captioner)),
              responses={400: {"description": "unreadable image or malformed body"},
                         401: {"description": "missing or wrong API key"},
                         413: {"description": "body or image too large"},
                         415: {"description": "unsupported content or image type"},
                         422: {"description": "bad parameter"},
                         503: {"description": "queue full or model loading (see Retry-After)"},
                         504: {"description": "the request outlived --timeout-s"}})
    async def captions(request: Request) -> Response:
        """Caption one or several images (multipart files, or one raw image body)."""
        check_key(request)
        if not state.ready:
            raise _not_ready(state)
        started = time.perf_counter()
        return await guarded(state, lambda futures: _caption_request(request, state, futures, started), _error)


async def _caption_request(request: Request, state: ServiceState, futures: list, started: float) -> Response:
    """Read, decode, queue, await (or notice the client leaving), answer. `futures` is filled in place
    so the caller can cancel queued images on timeout."""
    query = request.query_params.multi_items()

    async def read() -> tuple[list, Any]:
        parse_decode(state, query, {})  # a bad query parameter is answered (422) before the body is read
        uploads, fields = await read_uploads(request, state.config)
        return uploads, parse_decode(state, query, fields)

    uploads, params, captions = await caption_uploads(request, state, read, futures)
    controls = dict(params.controls)
    hypotheses = controls.get("num_hypotheses", 1) > 1 or params.return_scores
    out = [{"name": upload.name, **cap.to_dict(attention=params.attention, hypotheses=hypotheses,
                                                scores=params.return_scores)}
           for upload, cap in zip(uploads, captions)]
    body = {"model": state.info["id"], "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "params": {"beam_size": params.beam_size, "max_steps": params.max_steps,
                       "attention": params.attention, "length_penalty": params.length_penalty,
                       **_echo(dict(params.controls))},
            "captions": out}
    return JSONResponse(body)


def _echo(controls: dict[str, Any]) -> dict[str, Any]:
    """The controls as the response repeats them: a long word list is cut to its first ECHO_WORDS
    words, with `<name>_count` saying how many there were (a request cannot make the answer huge)."""
    out = dict(controls)
    for name in ("suppress", "prefix"):
        words = out.get(name)
        if words is not None and len(words) > ECHO_WORDS:
            out[name], out[f"{name}_count"] = list(words[:ECHO_WORDS]), len(words)
    return out


def _captions_openapi(max_beam: int | None, max_steps: int | None) -> dict[str, Any]:
    image = {"type": "string", "format": "binary"}
    return {
        "parameters": params_schema(max_beam, max_steps),
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "description": "every file part is an image (any field name); the query parameters may "
                               "be sent as form fields instead (each name once per request)",
                "properties": {"image": {"type": "array", "items": image, "minItems": 1}}}},
            "image/jpeg": {"schema": image}, "image/png": {"schema": image}, "image/webp": {"schema": image},
        }},
    }


def _model_dir(config: ServeConfig, captioner: Captioner | None) -> ModelDir | None:
    """The served model's manifest before it loads (None: unreadable; the load reports it properly)."""
    try:
        return captioner.model if captioner is not None else ModelDir.load(config.model)
    except ModelDirError:
        return None


def _limits(config: ServeConfig, captioner: Captioner | None) -> tuple[int | None, int | None]:
    """(max_beam, max_steps cap) for the OpenAPI schema, from the manifest (the model loads later)."""
    model = _model_dir(config, captioner)
    if model is None:
        return None, config.max_steps_cap
    return model.max_beam, config.max_steps_cap or model.max_steps


def _version() -> str:
    from captrt import __version__

    return __version__
