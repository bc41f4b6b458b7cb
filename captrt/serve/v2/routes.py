"""The /v2 routes: the Open Inference Protocol (KServe v2 REST, with Triton's binary tensor data
extension) beside /v1, on the same app, batcher, key, limits and metrics.

    GET  /v2                                   server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready     probes (no key, as /healthz and /readyz)
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Errors are {"error": "..."}: 400 for a malformed body or a refused decoding option (naming it),
401, 404 for another model name or version, 413, 503 with Retry-After while loading or when the
queue is full, 504 past --timeout-s.
"""

from __future__ import annotations

import inspect
import zlib
from typing import Annotated, Any, Awaitable, Callable

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, Response

from captrt.runtime import ModelDir
from captrt.serve.pipeline import ServiceState, caption_uploads, guarded
from captrt.serve.upload import BodyTooLargeError, ServeError, Upload, check_content_length, too_large
from captrt.serve.v2 import openapi as doc
from captrt.serve.v2.metadata import ModelIdentity, model_metadata, server_metadata
from captrt.serve.v2.outputs import INPUT, output_tensors, select_outputs
from captrt.serve.v2.params import decode_params, echo
from captrt.serve.v2.tensors import HEADER_LENGTH, ProtocolError, encode_response, parse_request

TAGS = ["open inference protocol (v2)"]
_WBITS = {"gzip": 31, "deflate": 15}  # tritonclient's deflate is the zlib format


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The protocol's error object."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def v2_router(state: ServiceState, *, check_key: Callable[[Request], None], not_ready: Callable[[], ServeError],
              model: ModelDir | None) -> APIRouter:
    """The routes over the service's state; check_key and not_ready are /v1's (same key, same 503)."""
    config = state.config
    identity = ModelIdentity.of(model, config.model, config.model_name)
    router = APIRouter(tags=TAGS)

    def model_route(request: Request, name: str, version: str | None) -> None:
        check_key(request)
        identity.check(name, version)

    async def server(request: Request) -> JSONResponse:
        """Server metadata: name, version and the extensions spoken (binary_tensor_data)."""
        return JSONResponse(server_metadata())

    async def live(request: Request) -> JSONResponse:
        """Alive: the process answers (the model may still be loading)."""
        return JSONResponse({"live": True})

    async def ready(request: Request) -> JSONResponse:
        """Ready: the model is loaded and warmed (503 with Retry-After while it loads)."""
        if not state.ready:
            raise not_ready()
        return JSONResponse({"ready": True})

    async def metadata(request: Request, name: str, version: str | None = None) -> JSONResponse:
        """The model's metadata: name, versions, platform, and each input and output with its datatype,
        shape (-1: variable) and what it holds."""
        model_route(request, name, version)
        if not state.ready:
            raise not_ready()
        return JSONResponse(model_metadata(identity, state.info))

    async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
        """The model is loaded and warmed (503 with Retry-After while it loads)."""
        model_route(request, name, version)
        if not state.ready:
            raise not_ready()
        return JSONResponse({"name": identity.name, "ready": True})

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        """Caption the images of the BYTES input 'image' (JSON tensors with base64 files, or binary tensors
        after the JSON); decoding options as request parameters; the outputs asked for (all by default)."""
        model_route(request, name, version)
        if not state.ready:
            raise not_ready()
        return await guarded(state, lambda futures: _infer(request, state, identity, futures), v2_error)

    def add(path: str, endpoint: Callable[..., Awaitable[Response]], summary: str, responses: dict[Any, Any],
            method: str = "GET", **extra: Any) -> None:
        for versioned in (False, True) if "{name}" in path else (False,):
            route = path.replace("{name}", "{name}/versions/{version}") if versioned else path
            router.add_api_route(route, _bind(endpoint, identity, versioned), methods=[method], summary=summary,
                                 name=f"{endpoint.__name__}{'_version' if versioned else ''}",
                                 responses=responses, **extra)

    add("/v2", server, "Server metadata", doc.responses(doc.SERVER_METADATA))
    add("/v2/health/live", live, "Server live", doc.responses(doc.LIVE))
    add("/v2/health/ready", ready, "Server ready", doc.responses(doc.READY, 503))
    add("/v2/models/{name}", metadata, "Model metadata", doc.responses(doc.MODEL_METADATA, 401, 404, 503))
    add("/v2/models/{name}/ready", model_ready, "Model ready", doc.responses(doc.MODEL_READY, 401, 404, 503))
    add("/v2/models/{name}/infer", infer, "Inference", doc.responses(doc.INFER_RESPONSE, 400, 401, 404, 413, 415,
                                                                       503, 504, binary=True),
        method="POST", openapi_extra=doc.infer_extra())
    return router


def _bind(endpoint: Callable[..., Awaitable[Response]], identity: ModelIdentity,
          versioned: bool) -> Callable[..., Awaitable[Response]]:
    """The handler FastAPI reads: name (and version) from the path, documented as the one model served
    (an enum of one), so clients and schema-driven tools reach the model rather than a 404."""
    if endpoint.__code__.co_argcount == 1:
        return endpoint

    async def handler(request: Request, **path: str) -> Response:
        return await endpoint(request, path["name"], path.get("version"))

    def param(name: str, value: str | None, what: str) -> inspect.Parameter:
        schema = Path(description=what, json_schema_extra={"enum": [value]} if value else None)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[str, schema])

    params = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
              param("name", identity.name, "the model's name (--model-name)")]
    if versioned:
        params.append(param("version", identity.version, "the model's version: the hash part of its /v1 id"))
    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__doc__ = endpoint.__doc__
    handler.__name__ = endpoint.__name__
    return handler


async def _infer(request: Request, state: ServiceState, identity: ModelIdentity, futures: list) -> Response:
    """Parse the body, caption its images through the shared pipeline, answer with the outputs asked for."""
    config = state.config
    asked: dict[str, Any] = {}

    async def read() -> tuple[list[Upload], Any]:
        body = await _read_body(request, config.max_body_bytes)
        try:
            req = parse_request(body, request.headers.get(HEADER_LENGTH), {INPUT: "BYTES"},
                                max_elements=config.max_images)
        except ProtocolError as exc:
            raise ServeError(exc.status, exc.message) from None
        params = decode_params(state, req.parameters)
        options = params.decoding()
        try:
            asked["outputs"] = select_outputs(req.outputs, req.binary_output, hypotheses=options.num_hypotheses,
                                              scores=options.return_scores, attention=params.attention)
        except ProtocolError as exc:
            raise ServeError(exc.status, exc.message) from None
        asked.update(id=req.id, hypotheses=options.num_hypotheses)
        return [Upload(f"{INPUT}[{i}]", data) for i, data in enumerate(req.inputs[INPUT])], params

    _, params, captions = await caption_uploads(request, state, read, futures)
    names = asked["outputs"]
    tensors = output_tensors(captions, [n for n, _ in names], hypotheses=asked["hypotheses"],
                             grid=state.info["grid"])
    header = {"model_name": identity.name, "model_version": identity.version,
              "id": asked["id"] if asked["id"] is not None else request.state.request_id,
              "parameters": echo(params)}
    body, json_length = encode_response(header, [(tensors[n], binary) for n, binary in names])
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)})


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body under the service's cap (413), decompressed when the client compressed it
    (gzip/deflate, as tritonclient can: the cap holds for the decompressed bytes too)."""
    check_content_length(request, limit)
    try:
        body = await request.body()
    except BodyTooLargeError as exc:
        raise too_large(exc.limit) from None
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        raise ServeError(415, f"Content-Encoding {encoding!r} is not accepted (gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=_WBITS[encoding])
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ServeError(400, f"body: not valid {encoding} data ({exc})") from None
    if len(plain) > limit:
        raise too_large(limit)
    if not inflater.eof:
        raise ServeError(400, f"body: the {encoding} data is cut off")
    return plain
