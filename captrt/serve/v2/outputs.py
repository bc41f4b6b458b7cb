"""The model's tensors in the protocol: what each input and output holds, which outputs a request
gets, and the captions of a batch as output tensors.

One request of N images gives, by default: caption BYTES [N]; score FP32 [N]; finished BOOL [N];
tokens INT64 [N, T] (-1 after each caption's end); error BYTES [N] (empty where the image was
captioned). With num_hypotheses n > 1 also hypotheses BYTES [N, n] and hypothesis_scores FP32 [N, n];
with return_scores, token_scores FP32 [N, n, T'] (NaN after each hypothesis' end); with attention,
attention FP32 [N, T, G, G] (NaN after each caption's end). A request's `outputs` list picks a subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from captrt.serve.v2.tensors import OutputTensor, ProtocolError, RequestedOutput

INPUT = "image"
INPUT_DESCRIPTION = ("one encoded image file per element (JPEG, PNG or WEBP, the service's allow-list and size "
                     "caps): the raw file bytes with the binary tensor data extension, the file base64-encoded "
                     "(standard alphabet) in JSON data")


@dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str
    dims: int  # rank, batch dimension included
    description: str


OUTPUTS = (
    OutputSpec("caption", "BYTES", 1, "the caption, UTF-8 words joined by spaces ('' where the image has an error)"),
    OutputSpec("score", "FP32", 1, "the caption's log-probability (NaN where the image has an error)"),
    OutputSpec("finished", "BOOL", 1, "false when max_steps ended the search before <end>"),
    OutputSpec("tokens", "INT64", 2, "word ids of the caption, -1 after its end"),
    OutputSpec("error", "BYTES", 1, "why the image could not be captioned; '' where it was"),
    OutputSpec("hypotheses", "BYTES", 2, "the num_hypotheses best captions, best first (sampling: draw order)"),
    OutputSpec("hypothesis_scores", "FP32", 2, "each hypothesis' log-probability"),
    OutputSpec("token_scores", "FP32", 3, "with return_scores: each hypothesis' per-word log-probabilities "
                                          "(then <end>'s when finished), NaN after"),
    OutputSpec("attention", "FP32", 4, "with attention: the caption's (T, grid, grid) attention maps, NaN after its end"),
)
SPECS = {o.name: o for o in OUTPUTS}
BASE = ("caption", "score", "finished", "tokens", "error")


def tensor_metadata(grid: int | None) -> dict[str, list[dict[str, Any]]]:
    """The metadata's inputs and outputs: name, datatype, shape (-1: variable) and a description."""
    def shape(spec: OutputSpec) -> list[int]:
        if spec.name == "attention" and grid:
            return [-1, -1, grid, grid]
        return [-1] * spec.dims

    return {"inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1],
                        "parameters": {"description": INPUT_DESCRIPTION}}],
            "outputs": [{"name": o.name, "datatype": o.datatype, "shape": shape(o),
                         "parameters": {"description": o.description}} for o in OUTPUTS]}


def select_outputs(requested: list[RequestedOutput] | None, binary_default: bool, *, hypotheses: int,
                   scores: bool, attention: bool) -> list[tuple[str, bool]]:
    """(name, binary?) of each output to send, in order: the request's list, or every output these
    decoding parameters produce. An output the parameters do not produce is a ProtocolError naming both."""
    needs = {"token_scores": ("return_scores", scores), "attention": ("attention", attention)}
    if requested is None:
        names = list(BASE) + (["hypotheses", "hypothesis_scores"] if hypotheses > 1 else [])
        names += [n for n, (_, on) in needs.items() if on]
        return [(n, binary_default) for n in names]
    out: list[tuple[str, bool]] = []
    for r in requested:
        if r.name not in SPECS:
            raise ProtocolError(f"unknown output {r.name!r}; the model's outputs: {', '.join(SPECS)}")
        if any(r.name == n for n, _ in out):
            raise ProtocolError(f"output {r.name!r} is requested more than once")
        if r.name in needs and not needs[r.name][1]:
            raise ProtocolError(f"output {r.name!r} needs the parameter {needs[r.name][0]}=true")
        out.append((r.name, binary_default if r.binary is None else r.binary))
    return out


def output_tensors(captions: Sequence[Any], names: Sequence[str], *, hypotheses: int, grid: int) -> dict[str, OutputTensor]:
    """The named outputs of N captions (captrt.runtime.Caption, an error Caption for an unreadable image);
    hypotheses: num_hypotheses; grid: the model's attention grid."""
    n_img = len(captions)
    out: dict[str, OutputTensor] = {}

    def put(name: str, shape: list[int], values: Any) -> None:
        out[name] = OutputTensor(name, SPECS[name].datatype, shape, values)

    hyps = [list(c.hypotheses[:hypotheses]) if c.error is None else [] for c in captions]
    for name in names:
        if name == "caption":
            put(name, [n_img], [c.text.encode() if c.error is None else b"" for c in captions])
        elif name == "score":
            put(name, [n_img], np.array([c.score for c in captions], np.float32))
        elif name == "finished":
            put(name, [n_img], np.array([bool(c.finished) for c in captions], np.bool_))
        elif name == "error":
            put(name, [n_img], [(c.error or "").encode() for c in captions])
        elif name == "tokens":
            put(name, *_padded([list(c.tokens) for c in captions], np.int64, -1))
        elif name == "hypotheses":
            put(name, [n_img, hypotheses],
                [h[k].text.encode() if k < len(h) else b"" for h in hyps for k in range(hypotheses)])
        elif name == "hypothesis_scores":
            scores = np.full((n_img, hypotheses), np.nan, np.float32)
            for i, h in enumerate(hyps):
                scores[i, :len(h)] = [x.score for x in h]
            put(name, [n_img, hypotheses], scores)
        elif name == "token_scores":
            rows = [[list(h[k].token_scores or []) if k < len(h) else [] for k in range(hypotheses)] for h in hyps]
            width = max((len(r) for per in rows for r in per), default=0)
            values = np.full((n_img, hypotheses, width), np.nan, np.float32)
            for i, per in enumerate(rows):
                for k, r in enumerate(per):
                    values[i, k, :len(r)] = r
            put(name, [n_img, hypotheses, width], values)
        elif name == "attention":
            maps = [c.attention if c.error is None and c.attention is not None else None for c in captions]
            steps = max((m.shape[0] for m in maps if m is not None), default=0)
            values = np.full((n_img, steps, grid, grid), np.nan, np.float32)
            for i, m in enumerate(maps):
                if m is not None:
                    values[i, :m.shape[0]] = m
            put(name, [n_img, steps, grid, grid], values)
    return out


def _padded(rows: list[list[int]], dtype: Any, fill: int) -> tuple[list[int], np.ndarray]:
    width = max((len(r) for r in rows), default=0)
    values = np.full((len(rows), width), fill, dtype)
    for i, r in enumerate(rows):
        values[i, :len(r)] = r
    return [len(rows), width], values
