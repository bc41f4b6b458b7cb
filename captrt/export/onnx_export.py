"""torch.onnx export of one graph module, then constant folding, cleanup, checks and named dims.

Exporter choice: torch 2.14's default (dynamo) exporter. It traces our wrapper modules with
torch.export, keeps the dynamic dims (N, K, K_prev) as named symbols, and writes the LSTM cell as
Gemm/Sigmoid/Tanh. Its own opset is 18 (captrt's default, DEFAULT_OPSET); for a lower target it converts
the graph itself (onnx's version converter, with two warnings) and silently keeps 18 when that fails, so
the result's opset is checked here.
The graphs avoid the one operator whose opset-18 form does not convert (ReduceMean with an axes
input: the encoder writes its mean as sum / P).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch

from captrt.export.errors import ExportError
from captrt.runtime import graph_contract


def export_onnx(module: torch.nn.Module, args: tuple, *, input_names: Sequence[str], output_names: Sequence[str],
                dynamic_dims: Mapping[str, Mapping[int, str]], opset: int) -> onnx.ModelProto:
    """Trace `module` on `args` and return a folded, checked, shape-inferred single-file ModelProto.

    dynamic_dims: input name -> {axis: dim name}; the same name means the same symbolic size.
    """
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {
        name: {axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes.items()}
        for name, axes in dynamic_dims.items()
    }
    dynamic_shapes = {name: dynamic_shapes.get(name) for name in input_names}
    captured = io.StringIO()
    try:
        # The exporter prints step banners and warns about shared dim names: keep the user's terminal clean.
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(), args, dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, opset_version=opset, external_data=False,
                optimize=True, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; all mean "this module did not export"
        raise ExportError(f"torch.onnx could not export {type(module).__name__}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc
    model = program.model_proto
    if graph_opset(model) != opset:
        raise ExportError(f"{type(module).__name__}: torch.onnx could not produce opset {opset} "
                          f"(got {graph_opset(model)}); export with opset {graph_opset(model)} instead")
    model = optimize(model)
    name_dims(model, dynamic_dims, output_names)
    return check(model)


def export_graph(module: torch.nn.Module, args: tuple, name: str, opset: int,
                 version: int = graph_contract.LATEST_VERSION) -> onnx.ModelProto:
    """export_onnx of graph `name` ('encoder' | 'decoder_step') as model format `version` declares it: the
    tensor names and dynamic axes of captrt.runtime.graph_contract."""
    spec = graph_contract.graph(name, version)
    return export_onnx(module, args, input_names=spec.input_names, output_names=spec.output_names,
                       dynamic_dims=graph_contract.dynamic_axes(name, version), opset=opset)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and drop unused nodes/initializers with onnxscript's optimizer."""
    import onnxscript.optimizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = onnxscript.optimizer.optimize(model)
    return model


def graph_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("graph has no default-domain opset")


def name_dims(model: onnx.ModelProto, dynamic_dims: Mapping[str, Mapping[int, str]],
              output_names: Sequence[str]) -> None:
    """Make sure every dynamic input axis carries its name (the exporter may call it s0, s1...).

    Outputs that still carry an exporter-generated symbol are renamed through the same mapping.
    """
    rename: dict[str, str] = {}
    for value in model.graph.input:
        for axis, name in dynamic_dims.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param and dim.dim_param != name:
                rename[dim.dim_param] = name
            dim.ClearField("dim_value")
            dim.dim_param = name
    for value in list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full checker plus strict shape inference; errors become ExportError."""
    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(f"exported graph failed the ONNX checker/shape inference: {exc}") from None
    return inferred


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """One self-contained file: the runtime refuses graphs with external data."""
    size = model.ByteSize()
    if size >= 2**31:
        raise ExportError(f"{path}: graph is {size / 2**30:.2f} GiB, over protobuf's 2 GiB single-file limit")
    onnx.save_model(model, str(path), save_as_external_data=False)


def graph_io(model: onnx.ModelProto) -> dict[str, dict[str, tuple[str, list]]]:
    """{'inputs'|'outputs': {name: (dtype name, [dim or dim name])}} for reports and tests."""
    def describe(values):
        out = {}
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in tt.shape.dim]
            out[v.name] = (onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, dims)
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}
