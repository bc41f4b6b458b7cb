"""The decoding option table written out for people and for schemas, from DecodingOptions' metadata.

`options_markdown` is the table in docs/decoding.md (a test keeps the page equal to it);
`option_json_schema` is one option's JSON schema (the service's OpenAPI parameters).
"""

from __future__ import annotations

import re
from typing import Any

from captrt.runtime.decoding.options import SEED_MAX, SPECS, DecodingOptions, OptionSpec, option_fields

_LIMIT_WORDS = {"max_beam": "the model's max_beam", "max_steps_cap": "the caller's cap",
                "beam_size": "beam_size (with sample: max_beam)", "max_steps": "max_steps - 1"}
_KIND_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "words": "words"}


def bounds_text(spec: OptionSpec) -> str:
    """'1 .. the model's max_beam', '> 0 .. 1', '>= 0', '' for unbounded kinds."""
    if spec.low is None:
        return ""
    low = f"{'> ' if spec.above else ''}{_number_text(spec.low)}"
    high = _LIMIT_WORDS[spec.limit] if spec.limit else (_number_text(spec.high) if spec.high is not None else None)
    return f"{low} .. {high}" if high is not None else f">= {low}"


def _number_text(value: float) -> str:
    return "2^63 - 1" if value == SEED_MAX else f"{value:g}"


def _markdown(text: str) -> str:
    """Special tokens such as <unk> as code, so that a page does not read them as HTML tags."""
    return re.sub(r"(<[a-z]+>)", r"`\1`", text)


def _default_text(value: Any) -> str:
    if value is None:
        return "none (fresh entropy)"
    if isinstance(value, tuple):
        return "none" if not value else " ".join(value)
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def options_markdown() -> str:
    """The option table: name, type, default, bounds, needs format 2, splits service batches, meaning."""
    rows = ["| option | type | default | bounds | format 2 | splits batches | meaning |",
            "|---|---|---|---|---|---|---|"]
    default = DecodingOptions()
    for f in option_fields():
        spec: OptionSpec = f.metadata["spec"]
        rows.append(f"| `{f.name}` | {_KIND_TYPES[spec.kind]} | {_default_text(getattr(default, f.name))} | "
                    f"{bounds_text(spec)} | {'yes' if spec.graph else ''} | {'yes' if spec.splits_batch else 'no'} | "
                    f"{_markdown(spec.help)} |")
    return "\n".join(rows) + "\n"


def option_json_schema(name: str, limits: dict[str, int | None] | None = None) -> dict[str, Any]:
    """One option's JSON schema. limits: values of the dynamic bounds the caller knows (e.g.
    {'max_beam': 10, 'max_steps_cap': 50}); a bound it does not know is left open."""
    spec = SPECS[name]
    schema: dict[str, Any] = {"type": {"words": "string"}.get(spec.kind, _KIND_TYPES[spec.kind])}
    if spec.kind in ("int", "float") and spec.low is not None:
        low = int(spec.low) if spec.kind == "int" else spec.low
        schema["exclusiveMinimum" if spec.above else "minimum"] = low
        high = (limits or {}).get(spec.limit) if spec.limit else spec.high
        if spec.limit == "beam_size":  # at most beam_size, itself at most max_beam
            high = (limits or {}).get("max_beam")
        if high is not None:
            schema["maximum"] = int(high) if spec.kind == "int" else high
    if spec.kind == "words":
        schema["description"] = "space-separated words"
    return schema
