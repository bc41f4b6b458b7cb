"""fp16 variants of the exported graphs, without onnxconverter-common.

Mixed precision in the spirit of autocast: every float node runs in fp16 except
- numerically sensitive operators (softmax, log_softmax, TopK, reductions),
- the logit processing of the decoding controls (from ban_ids/penalty_ids/penalty to log_softmax), and
- the LSTM cell state: everything reachable from the `c` input through pointwise/movement
  operators (gather by origin, f*c + i*g, tanh(c), o*tanh(c)) stays fp32, so the state does
  not accumulate fp16 rounding step after step.
Graph inputs and outputs keep their fp32 types (the model-format contract is the same for every
precision); Casts are inserted wherever a tensor crosses between the two regions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16

KEEP_FP32_OPS = frozenset({"Softmax", "LogSoftmax", "TopK", "ReduceSum", "ReduceMean", "ReduceMax", "Exp", "Log"})
# Operators through which "fp32-ness" spreads from a state input (pointwise and data movement).
STATE_OPS = frozenset({"GatherElements", "Gather", "Reshape", "Mul", "Add", "Sub", "Tanh", "Sigmoid",
                       "Identity", "Squeeze", "Unsqueeze", "Slice", "Expand"})
# The logit processing (format 2's decoding controls): everything the control inputs reach on the way to
# LogSoftmax stays fp32, so the processed logits are the fp32 graph's (fc's fp16 output cast exactly).
CONTROL_OPS = STATE_OPS | frozenset({"ScatterElements", "Where", "Div", "Greater", "Concat"})
# Inputs whose type does not matter to the operator (it reads only the shape).
TYPE_AGNOSTIC_INPUTS = {"Shape": (0,), "Size": (0,)}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        types[v.name] = v.type.tensor_type.elem_type
    return types


def fp32_nodes(model: onnx.ModelProto, state_inputs: tuple[str, ...],
               control_inputs: tuple[str, ...] = ()) -> set[int]:
    """Indices of nodes that stay fp32: KEEP_FP32_OPS, the region that STATE_OPS reach from
    state_inputs and from those operators' outputs, and the region CONTROL_OPS reach from control_inputs."""
    keep = {i for i, n in enumerate(model.graph.node) if n.op_type in KEEP_FP32_OPS}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    # Grow from the state inputs and from the outputs of the kept operators (so that, e.g., the
    # Reshape after TopK does not round cand_logp to fp16 just before the output).
    frontier = list(state_inputs) + [out for i in keep for out in model.graph.node[i].output]
    for start, ops in ((frontier, STATE_OPS), (list(control_inputs), CONTROL_OPS)):
        seen: set[str] = set()
        while start:
            tensor = start.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for i in consumers.get(tensor, []):
                node = model.graph.node[i]
                if node.op_type in ops:
                    keep.add(i)
                    start.extend(node.output)
    return keep


def convert_to_fp16(model: onnx.ModelProto, state_inputs: tuple[str, ...] = (),
                    control_inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """Return an fp16 copy of `model` (fp32 I/O, fp32 islands as described in the module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    types = _elem_types(model)
    graph = model.graph
    keep32 = fp32_nodes(model, state_inputs, control_inputs)
    precision = {i: (FLOAT if i in keep32 else FLOAT16) for i in range(len(graph.node))}

    # Float initializers: converted in place when only fp16 nodes read them, duplicated when both do.
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, set()).add(precision[i])
    current: dict[str, int] = {}  # float tensor -> its dtype in the new graph
    fp16_copy: dict[str, str] = {}
    new_inits = []
    for init in graph.initializer:
        if init.data_type != FLOAT:
            new_inits.append(init)
            continue
        wants = readers.get(init.name, {FLOAT})
        if wants == {FLOAT16}:
            new_inits.append(_to_fp16(init, init.name))
            current[init.name] = FLOAT16
        else:
            new_inits.append(init)
            current[init.name] = FLOAT
            if FLOAT16 in wants:
                fp16_copy[init.name] = init.name + "__fp16"
                new_inits.append(_to_fp16(init, fp16_copy[init.name]))
    for v in graph.input:
        if v.type.tensor_type.elem_type == FLOAT:
            current[v.name] = FLOAT

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def as_type(name: str, dtype: int) -> str:
        if current.get(name, dtype) == dtype:
            return name
        if dtype == FLOAT16 and name in fp16_copy:
            return fp16_copy[name]
        key = (name, dtype)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if dtype == FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=dtype, name=f"cast_{casts[key]}"))
            current[casts[key]] = dtype
        return casts[key]

    for i, node in enumerate(graph.node):
        dtype = precision[i]
        agnostic = TYPE_AGNOSTIC_INPUTS.get(node.op_type, ())
        for j, name in enumerate(node.input):
            if name and name in current and j not in agnostic:
                node.input[j] = as_type(name, dtype)
        _retype_attributes(node, dtype)
        for name in node.output:
            if types.get(name) in (FLOAT, FLOAT16):
                current[name] = dtype if node.op_type != "Cast" else _cast_target(node)
        nodes.append(node)

    # Outputs keep their declared fp32 type: route fp16 results through a final Cast.
    for out in graph.output:
        if current.get(out.name) == FLOAT16:
            inner = out.name + "__fp16"
            for node in nodes:
                node.output[:] = [inner if n == out.name else n for n in node.output]
                node.input[:] = [inner if n == out.name else n for n in node.input]
            nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"cast_{out.name}_fp32"))

    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _to_fp16(init: onnx.TensorProto, name: str) -> onnx.TensorProto:
    arr = numpy_helper.to_array(init).astype(np.float32)
    if np.isfinite(arr).all() and np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError(f"initializer {init.name}: values exceed fp16's range ({np.abs(arr).max():.3g})")
    return numpy_helper.from_array(arr.astype(np.float16), name)


def _cast_target(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _retype_attributes(node: onnx.NodeProto, dtype: int) -> None:
    """Inside the fp16 region, float-typed attributes (Cast targets, constants) become fp16."""
    if dtype != FLOAT16:
        return
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16
        elif node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_fp16(attr.t, attr.t.name))
