"""The TensorRT engine's shapes, read from the graph contract (captrt.runtime.graph_contract): the optimization
profiles (every input of a graph, its dynamic dimensions over the ranges an engine is built for), the check of
a built engine's I/O, and the device buffers of one decode. Pure Python: no tensorrt, no CUDA.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from captrt.checks import check_int
from captrt.runtime import graph_contract
from captrt.runtime.errors import ModelDirError

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
IoTable = dict[str, tuple[bool, Any, tuple[int, ...]]]  # name -> (is_input, numpy dtype, shape, -1 = dynamic)
# Longest ban_ids / penalty_ids list per slot a TensorRT profile admits (suppress + n-gram bans, or the
# distinct words of a hypothesis): the engine refuses longer lists with a message naming the option.
MAX_CONTROL_IDS = 256
SIDES = ("_a", "_b")  # the two buffers of a state every step rewrites: a step reads one and writes the other
REWRITTEN = tuple(reader for reader, (_, refill) in graph_contract.CARRIED.items() if refill)  # h, c


def dim_ranges(*, max_batch: int, max_beam: int, opt_batch: int | None = None,
               opt_beam: int | None = None) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every dynamic dimension of the graphs (captrt.runtime.graph_contract), covering batch
    1..max_batch and beam 1..max_beam; K and K_prev range independently (K_prev = 1 at the first step, h0/c0).
    The control id lists (format version 2) run from 1 to MAX_CONTROL_IDS, optimized for 1 (the default path's
    padding). opt_batch defaults to min(8, max_batch), opt_beam to min(5, max_beam) (the usual beam width)."""
    for name, value in (("max_beam", max_beam), ("max_batch", max_batch)):
        check_int(name, value, expected=True)
    ob = min(8, max_batch) if opt_batch is None else opt_batch
    ok = min(5, max_beam) if opt_beam is None else opt_beam
    if not isinstance(ob, int) or not 1 <= ob <= max_batch:
        raise ValueError(f"opt_batch: expected an integer in 1..max_batch={max_batch}, got {opt_batch!r}")
    if not isinstance(ok, int) or not 1 <= ok <= max_beam:
        raise ValueError(f"opt_beam: expected an integer in 1..max_beam={max_beam}, got {opt_beam!r}")
    ids = (1, 1, MAX_CONTROL_IDS)
    return {graph_contract.BATCH.name: (1, ob, max_batch), graph_contract.BEAMS.name: (1, ok, max_beam),
            graph_contract.PREV_BEAMS.name: (1, ok, max_beam), graph_contract.BANNED.name: ids,
            graph_contract.PENALIZED.name: ids}


def graph_profiles(sizes: Mapping[str, int], ranges: Mapping[str, tuple[int, int, int]], *,
                   version: int = graph_contract.LATEST_VERSION) -> dict[str, Profile]:
    """One optimization profile per graph: every input of the contract (format `version`), its fixed dimensions
    from `sizes` (graph_contract.sizes) and its dynamic ones over `ranges` (dim_ranges)."""
    for name, value in sizes.items():
        check_int(name, value, expected=True)
    at = [{**sizes, **{dim: r[i] for dim, r in ranges.items()}} for i in range(3)]  # min, opt, max
    return {name: {t.name: (t.resolve(at[0]), t.resolve(at[1]), t.resolve(at[2]))
                   for t in graph_contract.graph(name, version).inputs} for name in graph_contract.GRAPHS}


def profiles_for_model(model: Any, *, max_batch: int, opt_batch: int | None = None,
                       opt_beam: int | None = None) -> dict[str, Profile]:
    """graph_profiles() with the dimensions of a captrt.runtime.model_dir.ModelDir."""
    ranges = dim_ranges(max_batch=max_batch, max_beam=model.max_beam, opt_batch=opt_batch, opt_beam=opt_beam)
    return graph_profiles(model.sizes, ranges, version=model.format_version)


def check_engine_io(io: Mapping[str, IoTable], max_beam: int, version: int = graph_contract.LATEST_VERSION) -> None:
    """Names as in the model format (of `version`); tensors that share a device buffer (graph_contract.CARRIED)
    agree on dtype; C == max_beam."""
    for graph, table in io.items():
        want = graph_contract.graph(graph, version)
        ins = {n for n, v in table.items() if v[0]}
        if ins != set(want.input_names) or set(table) - ins != set(want.output_names):
            raise ModelDirError(f"{graph}: TensorRT engine has I/O {sorted(table)}, not the model format's")
    enc, dec = io["encoder"], io["decoder_step"]
    for b, (a, c) in graph_contract.CARRIED.items():
        kinds = {enc[a][1], dec[b][1]} | ({dec[c][1]} if c else set())
        if len(kinds) != 1:  # one device buffer is written as one tensor and read as the other
            raise ModelDirError(f"encoder {a} / decoder_step {b}: dtypes differ {sorted(map(str, kinds))}")
    shape = dec["cand_logp"][2]  # -1 = decided at run time (step() checks it via get_tensor_shape)
    if len(shape) != 3 or shape[-1] not in (-1, max_beam):
        raise ModelDirError(f"decoder_step: cand_logp has shape {shape}; expected (N, K, C = max_beam = {max_beam})")


def workspace_buffers(model: Any, io: Mapping[str, IoTable],
                      max_batch: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every device buffer of one decode, name -> (shape, dtype), at the profile's max shapes, in the engines'
    dtypes (io: engine_io per graph). One buffer per tensor of the two graphs (graph_contract), except that a
    tensor the decode carries into the step (graph_contract.CARRIED) lives in the buffer of the step input that
    reads it, and a state every step rewrites (h, c) has two, NAME_a and NAME_b, which steps read and write in
    turn. The encoder's h0/c0 (N, H) land in h_a/c_a: in memory they already are h/c at K_prev = 1."""
    top = {dim: r[2] for dim, r in dim_ranges(max_batch=max_batch, max_beam=model.max_beam).items()}
    at = {**model.sizes, **top}
    step = graph_contract.graph("decoder_step", model.format_version)
    home = {src: reader for reader, sources in graph_contract.CARRIED.items() for src in (reader, *sources) if src}
    buffers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name in graph_contract.GRAPHS:
        spec = graph_contract.graph(name, model.format_version)
        for t in spec.inputs + spec.outputs:
            if t.name in home:  # shaped and typed as the step input that reads it (check_engine_io: same dtype)
                reader = home[t.name]
                shape, dtype = step.tensor(reader).resolve(at), io["decoder_step"][reader][1]
                names = [reader + side for side in SIDES] if reader in REWRITTEN else [reader]
            else:
                shape, dtype, names = t.resolve(at), io[name][t.name][1], [t.name]
            for buffer in names:
                buffers.setdefault(buffer, (shape, dtype))
    return buffers
