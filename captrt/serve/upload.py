"""Reading a caption request: the body (capped while it streams in), its images and its parameters.

Everything a client can get wrong ends as a ServeError with the HTTP status and a message that names
the part or field; nothing here decodes pixels (that happens on the decode pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from typing import Any, Callable, Iterable, Mapping

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from captrt.runtime.decoding import DecodingOptionError, DecodingOptions
from captrt.runtime.decoding.option_docs import option_json_schema
from captrt.runtime.decoding.options import SPECS, option_names, parse_option_text
from captrt.serve.batcher import DecodeParams
from captrt.serve.config import RAW_CONTENT_TYPES, ServeConfig

# The parameters take the names of Captioner.caption's keyword arguments (docs/decoding.md).
PARAMS = option_names() + ("attention",)
DEFAULT_BEAM = 5
_TRUE = {"1", "true", "yes", "on"}  # attention's spellings (kept as they were)
_FALSE = {"0", "false", "no", "off"}
_MAX_FIELD_BYTES = 64 * 1024  # non-file form fields are parameters: a few bytes each


class ServeError(Exception):
    """A client error: HTTP status, a message for the client, optional headers (Retry-After, ...)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


class BodyTooLargeError(Exception):
    """Raised from the ASGI receive channel once a body passes the cap (see app.ServiceMiddleware)."""

    def __init__(self, limit: int):
        super().__init__(f"request body larger than the {limit}-byte limit")
        self.limit = limit


@dataclass
class Upload:
    """One uploaded image, still encoded. name: the part's file name (or field name), 'body' for raw."""

    name: str
    data: bytes


def too_large(limit: int) -> ServeError:
    return ServeError(413, f"request body larger than the {limit}-byte limit ({limit // (1024 * 1024)} MiB)")


def check_content_length(request: Request, limit: int) -> None:
    """Refuse from the header alone when the client announces too much (before reading a byte)."""
    value = request.headers.get("content-length")
    if value is None:
        return  # chunked: the cap is enforced while reading
    if not value.strip().isdigit():
        raise ServeError(400, f"Content-Length header is not a number: {value!r}")
    if int(value) > limit:
        raise too_large(limit)


async def read_uploads(request: Request, config: ServeConfig) -> tuple[list[Upload], dict[str, str]]:
    """-> (images in request order, form fields). multipart/form-data: every file part is an image,
    text fields are parameters. image/jpeg|png|webp: the body is one image."""
    check_content_length(request, config.max_body_bytes)
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if mime == "multipart/form-data":
            return await _read_multipart(request, config)
        if mime in RAW_CONTENT_TYPES:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
            if not body:
                raise ServeError(400, "body: empty request body (expected one image)")
            return [Upload("body", bytes(body))], {}
    except BodyTooLargeError as exc:
        raise too_large(exc.limit) from None
    shown = mime or "none"
    raise ServeError(415, f"Content-Type {shown!r} is not accepted: send multipart/form-data with image "
                          f"files, or one image as {', '.join(RAW_CONTENT_TYPES)}")


class _ClosingDelimiter:
    """Watches a multipart body stream in for its closing delimiter (`--BOUNDARY--`). The multipart
    parser accepts a body that simply stops, and drops the part it was in: without this, a body cut
    off mid-part would read as one with fewer (or no) images."""

    def __init__(self, content_type: str, receive: Callable):
        header = Message()
        header["content-type"] = content_type
        boundary = header.get_param("boundary")
        self.delimiter = f"--{boundary}--".encode() if isinstance(boundary, str) and boundary else None
        self.found = self.delimiter is None  # no boundary: the parser itself refuses the body
        self.tail = b""
        self.inner = receive

    async def receive(self) -> dict:
        message = await self.inner()
        if not self.found and message["type"] == "http.request":
            window = self.tail + message.get("body", b"")
            self.found = self.delimiter in window
            self.tail = window[-(len(self.delimiter) - 1):]
        return message


async def _read_multipart(request: Request, config: ServeConfig) -> tuple[list[Upload], dict[str, str]]:
    closing = _ClosingDelimiter(request.headers.get("content-type", ""), request.receive)
    try:
        form = await Request(request.scope, closing.receive).form(
            max_files=config.max_images, max_fields=len(PARAMS) * 2, max_part_size=_MAX_FIELD_BYTES)
    except HTTPException as exc:  # starlette's wrapping of a multipart parse error
        if str(exc.detail).startswith("Too many files"):
            raise ServeError(413, f"more than {config.max_images} images in one request (the service's "
                                  "--max-images); split it") from None
        raise ServeError(400, f"malformed multipart body: {exc.detail}") from None
    try:
        if not closing.found:
            raise ServeError(400, "malformed multipart body: it ends before its closing boundary "
                                  "(cut off in the middle of a part?)")
        uploads: list[Upload] = []
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                uploads.append(Upload(value.filename or key or f"part{len(uploads)}", data))
            elif key in fields:
                raise ServeError(422, f"{key}: given more than once")
            else:
                fields[key] = value
    finally:
        await form.close()
    if not uploads:
        raise ServeError(400, "no image in the multipart body (send files as parts, e.g. curl -F image=@photo.jpg)")
    return uploads, fields


def _one(name: str, values: list[str]) -> str:
    if len(values) > 1:
        raise ServeError(422, f"{name}: given more than once")
    return values[0]


def parse_params(query: Iterable[tuple[str, str]], fields: Mapping[str, str], *, max_beam: int,
                 max_steps_cap: int, check: Callable[[DecodeParams], None] | None = None) -> DecodeParams:
    """Query parameters and form fields -> DecodeParams; 422 naming the field for anything wrong.

    The decoding options are DecodingOptions' fields, read by its one strict text parser and checked by
    its one validation (docs/decoding.md has the table); the service's own defaults: beam_size
    min(5, max_beam), max_steps the service's cap. attention: true/false (default false). check:
    validates the result against the model (Captioner.check_options), raising ValueError with the
    field's name first.
    """
    given: dict[str, list[str]] = {}
    for key, value in list(query) + list(fields.items()):
        given.setdefault(key, []).append(value)
    unknown = sorted(set(given) - set(PARAMS))
    if unknown:
        raise ServeError(422, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(PARAMS)}")
    raw = {k: _one(k, v) for k, v in given.items()}
    attention = _flag("attention", raw.pop("attention").strip()) if "attention" in raw else False
    try:
        values = {name: parse_option_text(name, text) for name, text in raw.items()}
        values.setdefault("beam_size", min(DEFAULT_BEAM, max_beam))
        values.setdefault("max_steps", max_steps_cap)
        options = DecodingOptions.build(**values).check(None, max_beam=max_beam, max_steps=max_steps_cap)
    except DecodingOptionError as exc:
        raise ServeError(422, str(exc)) from None
    params = DecodeParams.of(options, attention)
    if check is not None:
        try:
            check(params)
        except ValueError as exc:
            raise ServeError(422, str(exc)) from None
    return params


def _flag(name: str, text: str) -> bool:
    """attention's spellings; the decoding options' booleans are the option table's (true/false only)."""
    flag = text.lower()
    if flag not in _TRUE | _FALSE:
        raise ServeError(422, f"{name} must be true or false, got {text!r}")
    return flag in _TRUE


def error_status(kinds: Iterable[str]) -> int:
    """The status of a request whose every image failed: one shared reason decides, else 400."""
    statuses = {"format": 415, "too_large": 413}
    found = {statuses.get(k, 400) for k in kinds}
    return found.pop() if len(found) == 1 else 400


def params_schema(max_beam: int | None = None, max_steps: int | None = None) -> list[dict[str, Any]]:
    """OpenAPI query parameters (form fields of the same names are accepted too): every decoding option
    from its table, with the model's limits when they are known, and attention."""
    limits = {"max_beam": max_beam, "max_steps_cap": max_steps}
    params = [{"name": name, "in": "query", "required": False, "schema": option_json_schema(name, limits),
               "description": SPECS[name].help} for name in option_names()]
    params.insert(2, {"name": "attention", "in": "query", "required": False, "schema": {"type": "boolean"},
                      "description": "return the (T, grid, grid) attention maps"})
    return params
