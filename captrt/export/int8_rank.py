"""Rank the quantized layers of an int8 encoder by the error each one adds (per-tensor error vs fp32).

ONNX Runtime's qdq_loss_debug compares every activation of a QDQ graph with the float graph's; this
is the same measurement reduced to one number per quantized node:

    harm(node) = rel_err(node's output) - max(rel_err(node's float inputs))
    rel_err(t) = sum((t_int8 - t_fp32)^2) / sum(t_fp32^2)   over the images, QDQ graph vs fp32 graph

i.e. how much relative squared error appears across the node: its input's quantization (the Q/DQ
pair in front of it, which goes when the node returns to fp32) plus its weights'. Both graphs run
with the tensors as extra outputs, which keeps ONNX Runtime from fusing Q/DQ into integer kernels:
the QDQ graph then computes fake-quantized float, equal to the integer kernels up to rounding when
weights are 7-bit (no saturation, see int8_calibrate).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper


def rank_nodes(fp32: onnx.ModelProto, qdq: onnx.ModelProto, images: np.ndarray,
               candidates: Sequence[str]) -> list[tuple[str, float]]:
    """(node, harm) for each candidate quantized node, most harmful first. images: uint8 (M, S, S, 3)."""
    producers = {o: n for n in qdq.graph.node for o in n.output}
    fp32_tensors = {o for n in fp32.graph.node for o in n.output}

    def float_source(name: str) -> str:
        """The float tensor behind a DequantizeLinear(QuantizeLinear(x)) chain (x itself otherwise)."""
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return name

    by_name = {n.name: n for n in qdq.graph.node}
    plan: dict[str, tuple[list[str], list[str]]] = {}
    for name in candidates:
        node = by_name.get(name)
        if node is None:
            continue
        inputs = [s for s in (float_source(i) for i in node.input if i) if s in fp32_tensors]
        outputs = [o for o in node.output if o in fp32_tensors]
        if outputs:
            plan[name] = (inputs, outputs)
    tensors = sorted({t for ins, outs in plan.values() for t in ins + outs})
    err, power = np.zeros(len(tensors)), np.zeros(len(tensors))
    s_fp32, s_qdq = _with_outputs(fp32, tensors), _with_outputs(qdq, tensors)
    for image in images:  # one image at a time: ResNet activations of a batch would take GBs
        feed = {"image": np.ascontiguousarray(image[None], dtype=np.uint8)}
        ref, got = s_fp32.run(tensors, feed), s_qdq.run(tensors, feed)
        for j, (r, g) in enumerate(zip(ref, got)):
            r64 = r.astype(np.float64)
            err[j] += float(np.square(g.astype(np.float64) - r64).sum())
            power[j] += float(np.square(r64).sum())
    rel = {t: err[j] / max(power[j], 1e-30) for j, t in enumerate(tensors)}
    ranked = [(name, max(rel[o] for o in outs) - max((rel[i] for i in ins), default=0.0))
              for name, (ins, outs) in plan.items()]
    return sorted(ranked, key=lambda kv: -kv[1])


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]):
    from captrt.export.parity import make_session

    m = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return make_session(m.SerializeToString())
