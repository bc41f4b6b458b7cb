"""The protocol's tensor codec: an inference request body in, a response body out.

A body is one JSON object, optionally followed by binary tensor data (the binary tensor data
extension): then the `Inference-Header-Content-Length` header gives the JSON's length and each
binary tensor's entry carries `parameters.binary_data_size`, its bytes following the JSON in the
order of the entries. Binary data is little-endian and row-major; a BYTES element is a 4-byte
unsigned length then its bytes; BOOL is one byte. In JSON, BYTES *inputs* are base64 strings (JSON
strings cannot carry raw file bytes) and BYTES *outputs* are the UTF-8 text itself (captions and
error messages are text).

Nothing here knows captions: the routes say which inputs exist (name -> datatype) and hand over
the output tensors. Every malformed body ends as a ProtocolError naming the part that is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
# Parameters that belong to the protocol, not to the model: binary_data_output (every output binary);
# content_type, MLServer's codec hint (its 'base64' is what JSON BYTES inputs are here), is accepted and unused.
REQUEST_PROTOCOL_PARAMS = ("binary_data_output", "content_type")
INPUT_PARAMS = ("binary_data_size", "content_type")
# Little-endian numpy types of the datatypes this service sends; BYTES is built by hand.
NUMPY_TYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "u1"}
_LENGTH = struct.Struct("<I")


class ProtocolError(Exception):
    """A request the protocol cannot accept: HTTP status (400 unless said) and a message naming the part."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class RequestedOutput:
    """One entry of the request's `outputs`: its name and whether it must come back binary (None: not said)."""

    name: str
    binary: bool | None = None


@dataclass
class InferRequest:
    """A parsed request: id, the request-level parameters, each input's BYTES elements, and the outputs
    asked for (None: all of them). binary_output: the request's `binary_data_output`."""

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, list[bytes]]
    outputs: list[RequestedOutput] | None
    binary_output: bool = False


@dataclass
class OutputTensor:
    """One response tensor: BYTES values are a flat list of bytes, the others a numpy array of `shape`."""

    name: str
    datatype: str
    shape: list[int]
    values: Any = field(repr=False)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request body, from the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not text.isdigit():
        raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length!r}")
    length = int(text)
    if length > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} ({length}) is larger than the body ({len(body)} bytes)")
    return body[:length], memoryview(body)[length:]


def parse_request(body: bytes, header_length: str | None, inputs: dict[str, str], *,
                  max_elements: int) -> InferRequest:
    """Parse and check one inference request. inputs: the model's input names -> datatype (each one
    required, BYTES only here). max_elements: the most elements an input may hold (413 beyond)."""
    head, binary = split_body(body, header_length)
    try:
        doc = json.loads(head)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested past the parser's depth
        where = f"the first {len(head)} bytes (the {HEADER_LENGTH})" if header_length is not None else "the body"
        raise ProtocolError(f"{where} must be a JSON inference request object: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"the inference request must be a JSON object, got {_kind(doc)}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id must be a string, got {_kind(request_id)}")
    parameters = _parameters(doc.get("parameters"), "parameters")
    binary_output = parameters.get("binary_data_output", False)
    for name in REQUEST_PROTOCOL_PARAMS:
        parameters.pop(name, None)
    if not isinstance(binary_output, bool):
        raise ProtocolError(f"parameters.binary_data_output must be true or false, got {binary_output!r}")
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ProtocolError("inputs must be a non-empty array of input tensors")
    offset = 0
    found: dict[str, list[bytes]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"inputs[{i}] must be an object with a string 'name'")
        name = entry["name"]
        if name not in inputs:
            raise ProtocolError(f"unknown input {name!r}; the model's inputs: {', '.join(inputs)}")
        if name in found:
            raise ProtocolError(f"input {name!r} is given more than once")
        found[name], offset = _input(entry, inputs[name], binary, offset, max_elements, sole=len(entries) == 1)
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data after the last input's "
                            "binary_data_size (the sizes must add up to the body after the JSON)")
    missing = [n for n in inputs if n not in found]
    if missing:
        raise ProtocolError(f"missing input(s) {', '.join(missing)}")
    return InferRequest(request_id, parameters, found, _outputs(doc.get("outputs")), binary_output)


def _input(entry: dict[str, Any], datatype: str, binary: memoryview, offset: int, max_elements: int, *,
           sole: bool) -> tuple[list[bytes], int]:
    """(elements, binary offset after this input) of one input entry. sole: the request's only input,
    which may omit binary_data_size when it holds one image: then the whole binary part is that image
    file, as OpenVINO Model Server reads it (no length prefix)."""
    name = entry["name"]
    what = f"input {name!r}"
    given = entry.get("datatype")
    if given != datatype:
        raise ProtocolError(f"{what}: datatype must be {datatype} (each element one encoded image file), got {given!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not _is_int(shape[0]) or shape[0] < 0:
        raise ProtocolError(f"{what}: shape must be [N] (N images), got {shape!r}")
    count = shape[0]
    if count == 0:
        raise ProtocolError(f"{what}: shape [0] holds no image")
    if count > max_elements:
        raise ProtocolError(f"{what}: {count} images in one request, more than the service's --max-images "
                            f"({max_elements}); split it", status=413)
    params = _parameters(entry.get("parameters"), f"{what} parameters")
    unknown = sorted(set(params) - set(INPUT_PARAMS))
    if unknown:
        raise ProtocolError(f"{what}: parameter(s) {', '.join(unknown)} not supported ({', '.join(INPUT_PARAMS)} are)")
    size = params.get("binary_data_size")
    if size is None:
        if "data" in entry:
            elements = [_base64(what, i, x) for i, x in enumerate(_flatten(what, entry["data"]))]
        elif sole and count == 1 and offset < len(binary):
            elements, offset = [bytes(binary[offset:])], len(binary)
        else:
            raise ProtocolError(f"{what}: no 'data' and no binary_data_size parameter")
    else:
        if "data" in entry:
            raise ProtocolError(f"{what}: both 'data' and binary_data_size are given; send one")
        if not _is_int(size) or size < 0:
            raise ProtocolError(f"{what}: binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(binary):
            raise ProtocolError(f"{what}: binary_data_size {size} runs past the end of the body (bytes "
                                f"{offset}..{offset + size} of the {len(binary)} after the JSON)")
        elements = _split_bytes(what, binary[offset:offset + size])
        offset += size
    if len(elements) != count:
        raise ProtocolError(f"{what}: shape {shape} says {count} element(s) but the data holds {len(elements)}")
    return elements, offset


def _split_bytes(what: str, data: memoryview) -> list[bytes]:
    """A binary BYTES tensor -> its elements (each a 4-byte little-endian length, then the bytes)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise ProtocolError(f"{what}: element {len(out)}'s 4-byte length is cut off by binary_data_size")
        (n,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise ProtocolError(f"{what}: element {len(out)} says {n} bytes but only {len(data) - pos} "
                                "remain in its binary_data_size")
        out.append(bytes(data[pos:pos + n]))
        pos += n
    return out


def _flatten(what: str, data: Any) -> Iterator[Any]:
    """The elements of a (possibly nested) JSON array in row-major order; a stack, not recursion, so
    that any nesting depth the JSON parser accepted is walked."""
    if not isinstance(data, list):
        raise ProtocolError(f"{what}: data must be an array, got {_kind(data)}")
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            yield x
        else:
            stack.pop()


def _base64(what: str, index: int, value: Any) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: element {index} must be a base64 string (JSON carries BYTES images "
                            f"base64-encoded), got {_kind(value)}")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what}: element {index} is not base64 (JSON carries BYTES images "
                            "base64-encoded, standard alphabet)") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be an object, got {_kind(value)}")
    return dict(value)


def _outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ProtocolError(f"outputs must be an array, got {_kind(value)}")
    out: list[RequestedOutput] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError(f"outputs[{i}] must be an object with a string 'name'")
        params = _parameters(entry.get("parameters"), f"output {entry['name']!r} parameters")
        unknown = sorted(set(params) - {"binary_data"})
        if unknown:
            raise ProtocolError(f"output {entry['name']!r}: parameter(s) {', '.join(unknown)} not supported "
                                "(only binary_data)")
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise ProtocolError(f"output {entry['name']!r}: binary_data must be true or false, got {binary!r}")
        out.append(RequestedOutput(entry["name"], binary))
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(x), "a number")


# ------------------------------------------------------------------------------------------ responses

def encode_response(header: dict[str, Any], outputs: Sequence[tuple[OutputTensor, bool]]) -> tuple[bytes, int | None]:
    """(body, JSON length or None). outputs: (tensor, binary?) in response order. Binary tensors follow
    the JSON in that order; the length is None when every tensor is in the JSON."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            blob = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    head = json.dumps({**header, "outputs": entries}, allow_nan=False, separators=(",", ":")).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _binary(tensor: OutputTensor) -> bytes:
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(v)) + v for v in tensor.values)
    return np.ascontiguousarray(tensor.values, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def _json_data(tensor: OutputTensor) -> list[Any]:
    """Flat row-major values; NaN and infinities (no JSON number) are null."""
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in tensor.values]
    flat = np.asarray(tensor.values).reshape(-1).tolist()
    if tensor.datatype == "FP32":
        return [x if math.isfinite(x) else None for x in flat]
    if tensor.datatype == "BOOL":
        return [bool(x) for x in flat]
    return flat
