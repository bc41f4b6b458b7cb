"""The FastAPI application: routes, limits, metrics, and the model's life cycle.

    app = create_app(ServeConfig(model=Path("model_dir")))   # any ASGI server can run it
    uvicorn.run(app, host="127.0.0.1", port=8000)

The model loads and warms on a thread after start-up, so /healthz answers at once and /readyz turns
200 when captions can be served. Caption requests: body read under a cap -> images decoded on a
thread pool -> queued for the Batcher -> one batched beam search -> JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from captrt.runtime import (Caption, Captioner, ImageTooLargeError, InvalidImageError, ModelDir, ModelDirError,
                            UnsupportedImageFormatError)
from captrt.runtime.streams import usable_cores
from captrt.serve.batcher import Batcher, BatcherClosedError, DecodeParams, QueueFullError
from captrt.serve.config import ServeConfig
from captrt.serve.metrics import ServeMetrics, route_label
from captrt.serve.page import ui_router
from captrt.serve.upload import (BodyTooLargeError, ServeError, Upload, error_status, params_schema,
                                 parse_params, read_uploads, too_large)

log = logging.getLogger("captrt.serve")
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response": metrics only
DEFAULT_WARM_BEAM = 5


class ServiceState:
    """What the routes share: config, metrics, and (once loaded) the captioner and its batcher."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics):
        self.config = config
        self.metrics = metrics
        self.captioner: Captioner | None = None
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] = {}
        self.load_error: str | None = None
        self.max_steps_cap = config.max_steps_cap or 0
        self.decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads or usable_cores(),
                                              thread_name_prefix="captrt-decode")

    @property
    def ready(self) -> bool:
        return self.batcher is not None


class ServiceMiddleware:
    """Pure ASGI: per-request metrics (status, latency, in flight), the body cap on the receive
    channel (a body is refused while it streams in, whoever reads it), and an X-Request-ID on every
    response (the client's own, when it sent a sane one, else a new one) to match logs to requests."""

    def __init__(self, app: Any, metrics: ServeMetrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_label(scope["path"])
        request_id = _request_id(scope)
        status = 500
        received = 0
        started = time.perf_counter()
        limit = self.max_body_bytes

        async def capped_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id)]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, capped_receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _request_id(scope: dict) -> bytes:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and 0 < len(value) <= 128 and all(33 <= c < 127 for c in value):
            return value
    return uuid.uuid4().hex.encode()


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _decode(captioner: Captioner, upload: Upload) -> tuple[np.ndarray | None, str | None, str | None]:
    """-> (pixels, error, reason); runs on the decode pool."""
    try:
        return captioner.read_image(upload.data, name=upload.name), None, None
    except UnsupportedImageFormatError as exc:
        return None, str(exc), "format"
    except ImageTooLargeError as exc:
        return None, str(exc), "too_large"
    except InvalidImageError as exc:
        return None, str(exc), "unreadable"


def _run_batch(captioner: Captioner) -> Callable[[list[np.ndarray], DecodeParams], list[Caption]]:
    def run(pixels: list[np.ndarray], p: DecodeParams) -> list[Caption]:
        return captioner.caption_with(pixels, p.decoding(), return_attention=p.attention, batch_size=len(pixels))
    return run


async def _until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(config: ServeConfig, *, captioner: Captioner | None = None,
               on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service as an ASGI app. captioner: serve this already-loaded one instead of loading
    config.model. on_fatal(message): called when loading fails (the CLI uses it to exit 1)."""
    config.validate()
    api_key = config.api_key()
    metrics = ServeMetrics()
    state = ServiceState(config, metrics)

    def install(cap: Captioner) -> None:
        cap.warmup(batch_sizes=sorted({1, config.max_batch}), beam_size=DEFAULT_WARM_BEAM)
        state.captioner = cap
        metrics.streams_busy.set_function(lambda: cap.slots.busy)  # searches holding a stream, read per scrape
        state.max_steps_cap = config.max_steps_cap or cap.model.max_steps
        state.info = {**cap.info(), "max_steps_cap": state.max_steps_cap, "max_batch": config.max_batch,
                      "image_formats": list(config.image_formats), "max_images_per_request": config.max_images,
                      "max_body_bytes": config.max_body_bytes}
        metrics.model.info({**{k: str(state.info[k]) for k in ("id", "engine", "provider", "precision")},
                            "verification": str(state.info["verification"]["status"])})

    def load() -> None:
        cap = captioner or Captioner.load(
            config.model, engine=config.engine, device=config.device, precision=config.precision,
            threads=config.threads, streams=config.streams, oversubscribe=config.oversubscribe,
            providers=config.providers, image_formats=config.image_formats,
            max_image_pixels=config.max_image_pixels, max_image_bytes=config.max_body_bytes,
            allow_unverified=config.allow_unverified)
        install(cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        async def load_then_start() -> None:
            started = time.perf_counter()
            try:
                await loop.run_in_executor(None, load)
            except Exception as exc:  # noqa: BLE001 - any load failure is reported, never a hang
                state.load_error = f"{type(exc).__name__}: {exc}"
                log.error("captrt serve: cannot load the model: %s", state.load_error)
                if on_fatal is not None:
                    on_fatal(state.load_error)
                return
            assert state.captioner is not None
            batcher = Batcher(_run_batch(state.captioner), max_batch=config.max_batch,
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

    app = FastAPI(title="captrt", version=_version(), lifespan=lifespan,
                  description="Show, Attend and Tell image captioning: batched beam search over ONNX Runtime / TensorRT.")
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body_bytes=config.max_body_bytes)
    app.state.captrt = state
    if config.ui:
        app.include_router(ui_router())

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, exc.detail, exc.headers)

    @app.exception_handler(BodyTooLargeError)
    async def body_too_large(request: Request, exc: BodyTooLargeError) -> JSONResponse:
        # read_uploads turns the cap into a 413 itself; this catches any other reader of the body
        return await serve_error(request, too_large(exc.limit))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ServeError(401, "missing or wrong API key (send 'Authorization: Bearer KEY' or 'X-API-Key: KEY')",
                             {"WWW-Authenticate": "Bearer"})

    def not_ready() -> ServeError:
        if state.load_error is not None:
            return ServeError(503, f"model failed to load: {state.load_error}")
        return ServeError(503, "model is loading; retry shortly", {"Retry-After": "1"})

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Alive: the process answers (the model may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"description": "loading, or failed to load"}})
    async def readyz() -> JSONResponse:
        """Ready: the model is loaded and warmed; caption requests will be served."""
        if not state.ready:
            return _error(503, not_ready().detail)
        return JSONResponse({"status": "ready", "model": state.info["id"]})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus text format."""
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/model", tags=["captions"])
    async def model_info(request: Request) -> dict[str, Any]:
        """The served model's public facts and the engine/provider actually running."""
        check_key(request)
        if not state.ready:
            raise not_ready()
        return state.info

    @app.post("/v1/captions", tags=["captions"], openapi_extra=_captions_openapi(*_limits(config, captioner)),
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
            raise not_ready()
        started = time.perf_counter()
        futures: list[asyncio.Future] = []
        try:
            return await asyncio.wait_for(_caption_request(request, state, futures, started), config.timeout_s)
        except asyncio.TimeoutError:
            return _error(504, f"request took longer than the {config.timeout_s:g} s limit")
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            if futures and state.batcher is not None:
                state.batcher.cancel([f for f in futures if not f.done()])

    return app


async def _caption_request(request: Request, state: ServiceState, futures: list, started: float) -> Response:
    """Read, decode, queue, await (or notice the client leaving), answer. `futures` is filled in place
    so the caller can cancel queued images on timeout."""
    config, captioner, batcher = state.config, state.captioner, state.batcher
    assert captioner is not None and batcher is not None
    loop = asyncio.get_running_loop()
    query = request.query_params.multi_items()

    def parse(fields: dict[str, str]) -> DecodeParams:
        return parse_params(query, fields, max_beam=captioner.max_beam, max_steps_cap=state.max_steps_cap,
                            check=lambda p: captioner.check_options(p.decoding(), max_steps=state.max_steps_cap))

    with batcher.incoming():  # the batcher may wait for this request's images while it is read
        parse({})  # a bad query parameter is answered (422) before the body is read
        uploads, fields = await read_uploads(request, config)
        params = parse(fields)
        decoded = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, _decode, captioner, u)
                                         for u in uploads))
        good = [pixels for pixels, _, _ in decoded if pixels is not None]
        for _, _, reason in decoded:
            if reason is not None:
                state.metrics.image_errors.labels(reason).inc()
        if not good:
            kinds = [reason for _, _, reason in decoded]
            raise ServeError(error_status(kinds), "; ".join(err for _, err, _ in decoded if err))
        try:
            futures.extend(batcher.submit(good, params))
        except QueueFullError as exc:
            raise ServeError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosedError as exc:
            raise ServeError(503, str(exc), {"Retry-After": "1"}) from None
    results = asyncio.gather(*futures)
    watcher = loop.create_task(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if results not in done:  # the client left: drop its queued images, answer nobody
        results.cancel()
        raise ClientDisconnect()
    try:
        captions = results.result()
    except Exception as exc:  # the engine failed on this batch: a server fault, said plainly
        log.error("captioning failed: %s", exc)
        return _error(500, f"captioning failed: {type(exc).__name__}: {exc}")
    out: list[dict[str, Any]] = []
    controls = dict(params.controls)
    hypotheses = controls.get("num_hypotheses", 1) > 1 or params.return_scores
    it = iter(captions)
    for upload, (pixels, err, _) in zip(uploads, decoded):
        cap: Caption = next(it) if pixels is not None else Caption("", [], float("nan"), None, err, False)
        out.append({"name": upload.name, **cap.to_dict(attention=params.attention, hypotheses=hypotheses,
                                                        scores=params.return_scores)})
    body = {"model": state.info["id"], "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "params": {"beam_size": params.beam_size, "max_steps": params.max_steps,
                       "attention": params.attention, "length_penalty": params.length_penalty,
                       **dict(params.controls)},
            "captions": out}
    return JSONResponse(body)


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


def _limits(config: ServeConfig, captioner: Captioner | None) -> tuple[int | None, int | None]:
    """(max_beam, max_steps cap) for the OpenAPI schema, from the manifest (the model loads later)."""
    try:
        model = captioner.model if captioner is not None else ModelDir.load(config.model)
    except ModelDirError:
        return None, config.max_steps_cap  # the load reports it properly
    return model.max_beam, config.max_steps_cap or model.max_steps


def _version() -> str:
    from captrt import __version__

    return __version__
