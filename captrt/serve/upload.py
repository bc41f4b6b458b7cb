"""Reading a caption request: the body (capped while it streams in), its images and its parameters.

Everything a client can get wrong ends as a ServeError with the HTTP status and a message that names
the part or field; nothing here decodes pixels (that happens on the decode pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.message import Message
from typing import Any, Callable, Iterable, Mapping

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from captrt.runtime.decoding import DecodingOptions
from captrt.runtime.decoding.options import SCALE_MAX, SCALE_MIN
from captrt.serve.batcher import DecodeParams
from captrt.serve.config import RAW_CONTENT_TYPES, ServeConfig

# The decoding controls take the names of Captioner.caption's keyword arguments (README "Decoding controls").
CONTROL_INTS = ("num_hypotheses", "min_length", "no_repeat_ngram_size", "sampling_topk", "seed")
CONTROL_FLOATS = ("repetition_penalty", "sampling_topp", "sampling_temperature")
CONTROL_FLAGS = ("return_scores", "disable_unk", "sample")
CONTROL_WORDS = ("suppress", "prefix")  # space-separated words
PARAMS = ("beam_size", "max_steps", "attention", "length_penalty") + CONTROL_INTS + CONTROL_FLOATS + CONTROL_FLAGS \
    + CONTROL_WORDS
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

    beam_size 1..max_beam (default min(5, max_beam)); max_steps 1..cap (default cap);
    attention true/false (default false); length_penalty >= 0 (GNMT alpha, default 0); the decoding
    controls as Captioner.caption takes them. check: validates the result against the model
    (Captioner.check_options), raising ValueError with the field's name first.
    """
    given: dict[str, list[str]] = {}
    for key, value in list(query) + list(fields.items()):
        given.setdefault(key, []).append(value)
    unknown = sorted(set(given) - set(PARAMS))
    if unknown:
        raise ServeError(422, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(PARAMS)}")
    raw = {k: _one(k, v).strip() for k, v in given.items()}

    def integer(name: str, default: int, high: int, hint: str) -> int:
        if name not in raw:
            return default
        text = raw[name]
        if not text.lstrip("+").isdigit() or not 1 <= int(text) <= high:
            raise ServeError(422, f"{name} must be an integer between 1 and {high}{hint}, got {text!r}")
        return int(text)

    beam = integer("beam_size", min(DEFAULT_BEAM, max_beam), max_beam, f" (the model's max_beam is {max_beam})")
    steps = integer("max_steps", max_steps_cap, max_steps_cap, " (the service's cap)")
    attention = _flag("attention", raw["attention"]) if "attention" in raw else False
    penalty = 0.0
    if "length_penalty" in raw:
        try:
            penalty = float(raw["length_penalty"])
        except ValueError:
            penalty = -1.0
        if not math.isfinite(penalty) or penalty < 0 or penalty > 10:
            raise ServeError(422, f"length_penalty must be a number between 0 and 10, got {raw['length_penalty']!r}")
    controls: dict[str, Any] = {}
    for name in CONTROL_INTS:
        if name in raw:
            if not raw[name].lstrip("+-").isdigit():
                raise ServeError(422, f"{name} must be an integer, got {raw[name]!r}")
            controls[name] = int(raw[name])
    for name in CONTROL_FLOATS:
        if name in raw:
            try:
                controls[name] = float(raw[name])
            except ValueError:
                raise ServeError(422, f"{name} must be a number, got {raw[name]!r}") from None
    for name in CONTROL_FLAGS:  # true/false only, as OpenAPI writes booleans
        if name in raw:
            controls[name] = _flag(name, raw[name], strict=True)
    for name in CONTROL_WORDS:
        if name in raw:
            controls[name] = raw[name]  # space-separated: DecodingOptions.build splits it
    changed = DecodingOptions.build(**controls).changed()  # only what differs from the defaults: hashable, comparable
    params = DecodeParams(beam, steps, attention, penalty, tuple(sorted(changed.items())))
    if check is not None:
        try:
            check(params)
        except ValueError as exc:
            raise ServeError(422, str(exc)) from None
    return params


def _flag(name: str, text: str, strict: bool = False) -> bool:
    flag = text.lower()
    if flag not in (("true", "false") if strict else _TRUE | _FALSE):
        raise ServeError(422, f"{name} must be true or false, got {text!r}")
    return flag in _TRUE


def error_status(kinds: Iterable[str]) -> int:
    """The status of a request whose every image failed: one shared reason decides, else 400."""
    statuses = {"format": 415, "too_large": 413}
    found = {statuses.get(k, 400) for k in kinds}
    return found.pop() if len(found) == 1 else 400


def params_schema(max_beam: int | None = None, max_steps: int | None = None) -> list[dict[str, Any]]:
    """OpenAPI query parameters (form fields of the same names are accepted too), with the model's
    limits when they are known."""
    def bounded(maximum: int | None) -> dict[str, Any]:
        return {"type": "integer", "minimum": 1, **({"maximum": maximum} if maximum else {})}

    return [
        {"name": "beam_size", "in": "query", "required": False, "schema": bounded(max_beam),
         "description": "beam width, 1..the model's max_beam (default 5)"},
        {"name": "max_steps", "in": "query", "required": False, "schema": bounded(max_steps),
         "description": "most words per caption, 1..the service's cap (default: the cap)"},
        {"name": "attention", "in": "query", "required": False, "schema": {"type": "boolean"},
         "description": "return the (T, grid, grid) attention maps"},
        {"name": "length_penalty", "in": "query", "required": False,
         "schema": {"type": "number", "minimum": 0, "maximum": 10},
         "description": "GNMT alpha among completed hypotheses (0 = raw log-probability)"},
        *({"name": name, "in": "query", "required": False, "schema": schema, "description": text}
          for name, schema, text in _CONTROL_DOCS),
    ]


_CONTROL_DOCS = (  # README "Decoding controls" has the exact semantics
    ("num_hypotheses", {"type": "integer", "minimum": 1},
     "hypotheses per image (<= beam_size; with sample=true, independent samples); returned as 'hypotheses'"),
    ("return_scores", {"type": "boolean"}, "per-word log-probabilities ('token_scores')"),
    ("suppress", {"type": "string"}, "space-separated words never generated"),
    ("disable_unk", {"type": "boolean"}, "never generate <unk>"),
    ("min_length", {"type": "integer", "minimum": 0}, "<end> is banned until a caption has this many words"),
    ("repetition_penalty", {"type": "number", "minimum": SCALE_MIN, "maximum": SCALE_MAX},
     "CTRL penalty on words already generated (1 = off)"),
    ("no_repeat_ngram_size", {"type": "integer", "minimum": 0}, "no n-gram occurs twice in a caption (0 = off)"),
    ("prefix", {"type": "string"}, "space-separated words every caption starts with"),
    ("sample", {"type": "boolean"}, "random sampling instead of beam search (beam_size must be 1)"),
    ("sampling_topk", {"type": "integer", "minimum": 0}, "sample among the k most likely words (0 = all)"),
    ("sampling_topp", {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "nucleus sampling threshold"),
    ("sampling_temperature", {"type": "number", "minimum": SCALE_MIN, "maximum": SCALE_MAX}, "sampling temperature"),
    ("seed", {"type": "integer", "minimum": 0}, "makes sampling reproducible (per image: never depends on the batch)"),
)
