"""The OpenAPI description of the /v2 routes: the protocol's JSON objects as schemas.

The request schemas are no stricter than the parser (captrt.serve.v2.tensors), so that whatever
breaks them is refused by it too; what only the model decides (input and output names, base64
elements, decoding parameters) is checked by the routes, not the schema.
"""

from __future__ import annotations

from typing import Any

from captrt.serve.v2.tensors import HEADER_LENGTH

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_VALUE = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
_PARAMETERS = {"type": ["object", "null"], "additionalProperties": {
    "anyOf": [*_VALUE["anyOf"], {"type": "array", "items": {"type": "string"}}]},
    "description": "decoding options with the library's names (beam_size, num_hypotheses, return_scores, "
                   "suppress, ..., seed, max_steps, length_penalty, attention), as /v1 takes them; and "
                   "binary_data_output (true: every output binary unless its own binary_data says otherwise)"}
_DATA = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"},
                                              {"type": "array"}]},
         "description": "row-major elements; for the BYTES input 'image', each a base64-encoded image file"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
INFER_REQUEST = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": ["string", "null"]},  # null reads as absent, as clients that serialize unset fields send it
        "parameters": _PARAMETERS,
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "shape", "datatype"],
            "properties": {"name": {"type": "string"}, "shape": _SHAPE, "datatype": {"type": "string"},
                           "parameters": {"type": ["object", "null"], "additionalProperties": False, "properties": {
                               "binary_data_size": {"type": ["integer", "null"], "minimum": 0},
                               "content_type": {}}},
                           "data": _DATA}}},
        "outputs": {"type": ["array", "null"], "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"},
                           "parameters": {"type": ["object", "null"], "additionalProperties": False, "properties": {
                               "binary_data": {"type": ["boolean", "null"]}}}}}},
    },
}
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"],
           "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                          "shape": {"type": "array", "items": {"type": "integer"}},
                          "parameters": {"type": "object"}, "data": {"type": "array"}}}
INFER_RESPONSE = {"type": "object", "required": ["model_name", "outputs"],
                  "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                                 "id": {"type": "string"}, "parameters": {"type": "object"},
                                 "outputs": {"type": "array", "items": _TENSOR}}}
SERVER_METADATA = {"type": "object", "required": ["name", "version", "extensions"],
                   "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                  "extensions": {"type": "array", "items": {"type": "string"}}}}
MODEL_METADATA = {"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                  "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                                 "platform": {"type": "string"}, "inputs": {"type": "array", "items": _TENSOR},
                                 "outputs": {"type": "array", "items": _TENSOR}}}
LIVE = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
MODEL_READY = {"type": "object", "required": ["name", "ready"],
               "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}


def responses(ok: dict[str, Any], *codes: int, binary: bool = False) -> dict[int | str, Any]:
    """The documented answers of a route: 200 with `ok` (and binary tensors when `binary`), each code
    in `codes` with the protocol's error object."""
    said = {400: "malformed request (the message names the part)", 401: "missing or wrong API key",
            404: "unknown model name or version", 413: "body too large or too many images",
            415: "unsupported Content-Encoding or image type", 503: "model loading or queue full (see Retry-After)",
            504: "the request outlived --timeout-s"}
    content = {"application/json": {"schema": ok}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary", "description": (
            f"the JSON response ({HEADER_LENGTH} bytes) followed by the binary outputs")}}
    out: dict[int | str, Any] = {200: {"description": "OK", "content": content}}
    for code in codes:
        out[code] = {"description": said[code], "content": {"application/json": {"schema": ERROR}}}
    return out


def infer_extra() -> dict[str, Any]:
    """The infer route's request body and its optional binary-extension header."""
    return {
        "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False, "schema": {"type": "integer",
                        "minimum": 0}, "description": "binary tensor data extension: the JSON's length in bytes"}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": INFER_REQUEST},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description": (
                f"the JSON request ({HEADER_LENGTH} bytes) followed by binary tensors: each BYTES element a "
                "4-byte little-endian length and the image file")}}}},
    }
