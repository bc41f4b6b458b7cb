"""The request's `parameters` -> the decoding parameters, through the very parser of /v1.

The protocol's parameter values are JSON strings, numbers and booleans (and, here, lists of words
for suppress/prefix); /v1 reads the same options as query text. Each value is written as that text
(true/false, the number as Python prints it, the words space-joined) and handed to
captrt.serve.pipeline.parse_decode, so both protocols accept and refuse exactly the same options
with the same messages; the protocol answers a refused option with 400 (the /v1 route's 422).
"""

from __future__ import annotations

from typing import Any

from captrt.serve.batcher import DecodeParams
from captrt.serve.pipeline import ServiceState, parse_decode
from captrt.serve.upload import ServeError


def as_text(name: str, value: Any) -> str:
    """One parameter value in /v1's text form; ServeError 400 naming it for a value of no such form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list) and all(isinstance(w, str) for w in value):
        return " ".join(value)
    raise ServeError(400, f"parameter {name} must be a string, number, boolean or list of words, got "
                          f"{type(value).__name__ if value is not None else 'null'}")


def decode_params(state: ServiceState, parameters: dict[str, Any]) -> DecodeParams:
    """The request-level parameters (the protocol's own already removed) -> DecodeParams; 400 naming
    the parameter for anything /v1 would refuse."""
    fields = {name: as_text(name, value) for name, value in parameters.items()}
    try:
        return parse_decode(state, [], fields)
    except ServeError as exc:
        if exc.status == 422:
            raise ServeError(400, exc.detail, exc.headers) from None
        raise


def echo(params: DecodeParams) -> dict[str, Any]:
    """The decoding parameters a response ran with, as protocol parameter values (words space-joined)."""
    options = params.decoding()
    values = {"beam_size": options.beam_size, "max_steps": options.max_steps, "length_penalty": options.length_penalty,
              "attention": params.attention, **options.changed()}
    return {k: " ".join(v) if isinstance(v, (list, tuple)) else v for k, v in values.items() if v is not None}
