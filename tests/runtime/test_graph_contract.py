"""The graph contract (captrt.runtime.graph_contract) against what it describes: docs/model-format.md's tables,
the graphs the exporter writes (format 2, the plain step cut from it at load, format 1's step), and the
TensorRT shapes made from it (captrt.runtime.engines.trt_shapes: the profiles, the TensorRT EP's options made
from them, the engine I/O check and the workspace)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from captrt.runtime import graph_contract as gc
from captrt.runtime.engines import trt_shapes as ts
from captrt.runtime.errors import ModelDirError
from captrt.runtime.model_dir import FORMAT_VERSION, ModelDir
from captrt.runtime.engines.plain_step import plain_step_graph

DOC = Path(__file__).resolve().parents[2] / "docs" / "model-format.md"


@pytest.fixture(scope="module")
def model(varied_model_dir) -> ModelDir:
    return ModelDir.load(varied_model_dir)


@pytest.fixture(scope="module")
def format_one(varied_model_dir, tmp_path_factory) -> ModelDir:
    """The varied model's directory declared format 1 (for the profiles and workspace: no graph is read)."""
    d = tmp_path_factory.mktemp("format_one") / "model"
    shutil.copytree(varied_model_dir, d, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((d / "captrt.json").read_text())
    manifest["format_version"] = 1
    (d / "captrt.json").write_text(json.dumps(manifest))
    return ModelDir.load(d)


def actual_io(graph: onnx.ModelProto) -> dict[str, list[tuple[str, str, list[int | str]]]]:
    """{'inputs'|'outputs': [(name, numpy dtype name, [dim_param or dim_value per axis])]}, in the graph's order."""
    def describe(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return {"inputs": describe(graph.graph.input), "outputs": describe(graph.graph.output)}


def contract_io(name: str, version: int, sizes: dict[str, int]) -> dict[str, list[tuple[str, str, list[int | str]]]]:
    spec = gc.graph(name, version)
    return {side: [(t.name, t.dtype, t.dims(sizes)) for t in tensors]
            for side, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs))}


# ------------------------------------------------------------------ the contract itself and the docs page

def test_the_model_format_page_has_the_contracts_tables():
    text = DOC.read_text(encoding="utf-8")
    for graph in gc.GRAPHS:
        section = text.split(f"## {graph}.onnx\n", 1)[1].split("\n## ", 1)[0]
        rows = {}
        for line in section.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[0].split(" ")[0] in ("in", "out"):
                for name in re.findall(r"`(\w+)`", cells[0]):
                    rows[name] = (cells[0].split(" ")[0], cells[1], cells[2])
        spec = gc.graph(graph)
        want = {t.name: (side, t.dtype, "(" + ", ".join(a.letter if isinstance(a, gc.Dim) else str(a)
                                                        for a in t.shape) + ("," if len(t.shape) == 1 else "") + ")")
                for side, tensors in (("in", spec.inputs), ("out", spec.outputs)) for t in tensors}
        assert rows == want, graph
    # Format version 1: the step graph without exactly the tensors version 2 added.
    old = " ".join(text.split("## Format version 1\n", 1)[1].split())
    added = re.search(r"without the inputs (.*?) and without the output (`\w+`)", old)
    named = re.findall(r"`(\w+)`", added.group(1)), re.findall(r"`(\w+)`", added.group(2))
    assert named == (list(gc.CONTROL_INPUTS), [gc.LOGP_OUTPUT])
    assert [t.name for t in gc.FORMAT_GRAPHS["decoder_step"].inputs if t.version == 2] == list(gc.CONTROL_INPUTS)
    # The dynamic dimensions the page names, with the names the graphs carry.
    for dim in gc.DYNAMIC_DIMS:
        assert f"{dim.letter} `{dim.name}`" in " ".join(text.split())


def test_carried_tensors_agree_between_the_graphs():
    """What the decode carries from a graph to the step (one device buffer on TensorRT) has one dtype, and its
    shapes differ only where the state starts (h0: h at K_prev = 1) or moves on (h_out: the next step's h)."""
    enc, step = gc.graph("encoder"), gc.graph("decoder_step")
    for reader, (source, refill) in gc.CARRIED.items():
        r, s = step.tensor(reader), enc.tensor(source)
        assert r.dtype == s.dtype and [a for a in r.shape if a != gc.PREV_BEAMS] == list(s.shape)
        if refill is not None:
            o = step.tensor(refill)
            assert o.dtype == r.dtype and o.shape == tuple(gc.BEAMS if a == gc.PREV_BEAMS else a for a in r.shape)
    assert set(enc.output_names) == {source for source, _ in gc.CARRIED.values()}  # the step reads all of them


def test_the_plain_step_and_format_one_share_one_declaration():
    assert gc.graph(gc.PLAIN_STEP) == gc.graph("decoder_step", 1)
    assert gc.graph("decoder_step", 1).input_names == gc.DECODER_STATE_INPUTS
    assert gc.graph("decoder_step").input_names == gc.DECODER_STATE_INPUTS + gc.CONTROL_INPUTS
    assert gc.graph("decoder_step").output_names == gc.DECODER_OUTPUTS + (gc.LOGP_OUTPUT,)
    assert gc.graph("encoder", 1) == gc.graph("encoder")  # the encoder never changed
    for name in gc.GRAPHS:  # the exporter traces the latest tables and writes them as FORMAT_VERSION
        assert gc.graph(name, FORMAT_VERSION) == gc.graph(name)


# ------------------------------------------------------------------ the exported graphs

def test_format_two_graphs_are_the_contract(model):
    for name in gc.GRAPHS:
        graph = onnx.load_from_string(model.read_graph("fp32", name))
        assert actual_io(graph) == contract_io(name, 2, model.sizes), name


def test_the_plain_step_graph_is_the_contract(model):
    plain = onnx.load_from_string(plain_step_graph(model.read_graph("fp32", "decoder_step")))
    assert actual_io(plain) == contract_io(gc.PLAIN_STEP, 2, model.sizes)


def test_format_one_step_graph_is_the_contract(model, varied_checkpoint):
    from captrt.export.format1 import export_format_one_step
    from captrt.train.checkpoint import load_checkpoint
    from tests.runtime.reference_helpers import torch_threads

    with torch_threads(1):
        graph = export_format_one_step(load_checkpoint(varied_checkpoint).build_model(), model.max_beam, 18)
    assert actual_io(graph) == contract_io("decoder_step", 1, model.sizes)


# ------------------------------------------------------------------ TensorRT: profiles and workspace

BOUNDS = {"batch": "max_batch", "beams": "max_beam", "prev_beams": "max_beam", "banned": "ids", "penalized": "ids"}


@pytest.mark.parametrize("version", [1, 2])
def test_tensorrt_profiles_cover_exactly_the_contracts_inputs(model, format_one, version):
    md = model if version == 2 else format_one
    limits = {"max_batch": 12, "max_beam": md.max_beam, "ids": ts.MAX_CONTROL_IDS}
    profiles = ts.profiles_for_model(md, max_batch=12, opt_batch=3, opt_beam=2)
    assert set(profiles) == set(gc.GRAPHS)
    for name, profile in profiles.items():
        spec = gc.graph(name, version)
        assert list(profile) == list(spec.input_names)  # every input, in the graphs' order, nothing else
        for t in spec.inputs:
            lo, opt, hi = profile[t.name]
            assert len(lo) == len(opt) == len(hi) == len(t.shape)
            for axis, a, b, c in zip(t.shape, lo, opt, hi):
                if isinstance(axis, gc.Dim) and axis.dynamic:
                    assert a == 1 and a <= b <= c == limits[BOUNDS[axis.name]], (t.name, axis)
                else:  # fixed by captrt.json
                    assert a == b == c == (axis if isinstance(axis, int) else md.sizes[axis.name]), (t.name, axis)
    if version == 2:  # one name per shape: a dimension two inputs share has one range
        ranges = {}
        for t in gc.graph("decoder_step").inputs:
            for i, axis in enumerate(t.shape):
                if isinstance(axis, gc.Dim) and axis.dynamic:
                    shapes = tuple(s[i] for s in profiles["decoder_step"][t.name])
                    assert ranges.setdefault(axis.name, shapes) == shapes


def test_the_tensorrt_ep_options_name_the_contracts_inputs(model, tmp_path):
    from captrt.runtime.engines.ort import tensorrt_options

    shutil.copytree(model.path, tmp_path / "m", ignore=shutil.ignore_patterns("cache"))
    options = tensorrt_options(ModelDir.load(tmp_path / "m"), "fp32", max_batch=4, opt_batch=2, opt_beam=2)
    for name, graph in options.items():
        for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
            assert [entry.split(":")[0] for entry in graph[key].split(",")] == list(gc.graph(name).input_names)


def engine_io_of(version: int, **dtypes: str) -> dict[str, ts.IoTable]:
    """What engine_io reports for engines built from the contract's graphs (dtypes: TensorRT's own choices)."""
    io = {}
    for name in gc.GRAPHS:
        spec = gc.graph(name, version)
        io[name] = {t.name: (t in spec.inputs, np.dtype(dtypes.get(t.name, t.dtype)), tuple(-1 for _ in t.shape))
                    for t in spec.inputs + spec.outputs}  # -1: decided at run time
    return io


@pytest.mark.parametrize("version", [1, 2])
def test_the_tensorrt_workspace_holds_every_tensor_at_its_largest(model, format_one, version):
    md = model if version == 2 else format_one
    nb, kb, p, h, v = 7, md.max_beam, md.num_pixels, md.dims["decoder_dim"], md.vocab_size
    io = engine_io_of(version, cand_ids="int32")  # TensorRT may return TopK's indices as int32
    ts.check_engine_io(io, md.max_beam, version)
    buffers = ts.workspace_buffers(md, io, nb)
    want = {"image": ((nb, md.image_size, md.image_size, 3), "uint8"),
            "features": ((nb, p, md.dims["encoder_dim"]), "float32"),
            "att_proj": ((nb, p, md.dims["attention_dim"]), "float32"),
            "h_a": ((nb, kb, h), "float32"), "h_b": ((nb, kb, h), "float32"),  # h0 lands in h_a, h_out in either
            "c_a": ((nb, kb, h), "float32"), "c_b": ((nb, kb, h), "float32"),
            "tokens": ((nb, kb), "int64"), "origin": ((nb, kb), "int64"), "alpha": ((nb, kb, p), "float32"),
            "cand_logp": ((nb, kb, kb), "float32"), "cand_ids": ((nb, kb, kb), "int32")}
    if version == 2:
        want.update({"ban_ids": ((nb, kb, ts.MAX_CONTROL_IDS), "int64"),
                     "penalty_ids": ((nb, kb, ts.MAX_CONTROL_IDS), "int64"), "penalty": ((nb,), "float32"),
                     "logp": ((nb, kb, v + 1), "float32")})
    assert {name: (shape, dtype.name) for name, (shape, dtype) in buffers.items()} == want
    profile = ts.profiles_for_model(md, max_batch=nb)["decoder_step"]
    for name, (_, _, top) in profile.items():  # every input fits its buffer at the profile's largest shape
        assert buffers.get(name, buffers.get(f"{name}_a"))[0] == top


def test_engine_io_that_differs_from_the_contract_is_refused():
    io = engine_io_of(2)
    del io["decoder_step"]["logp"]
    with pytest.raises(ModelDirError, match="not the model format's"):
        ts.check_engine_io(io, 10, 2)
    ts.check_engine_io(engine_io_of(1), 10, 1)  # format 1 has no logp
    io = engine_io_of(2, h_out="float16")  # h_out is written where the next step reads h
    with pytest.raises(ModelDirError, match="encoder h0 / decoder_step h: dtypes differ"):
        ts.check_engine_io(io, 10, 2)
