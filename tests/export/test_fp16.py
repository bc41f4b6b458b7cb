"""The fp16 converter on a small step-like graph: fp32 I/O, fp32 islands, numerics close to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from captrt.export.fp16 import convert_to_fp16
from captrt.export.parity import make_session


def _step_like_graph(seed: int = 0) -> onnx.ModelProto:
    """x (B, 8), c (B, 8) -> c_out = sigmoid(x W) * c + tanh(x W), logp/ids = TopK(LogSoftmax(tanh(c_out) V), 3)."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    v = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "v")
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    shape = numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Sigmoid", ["xw"], ["f"]),
        helper.make_node("Tanh", ["xw"], ["g"]),
        helper.make_node("Mul", ["f", "c"], ["fc"]),
        helper.make_node("Add", ["fc", "g"], ["c_out"]),
        helper.make_node("Tanh", ["c_out"], ["h"]),
        helper.make_node("MatMul", ["h", "v"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["logp"], axis=1),
        helper.make_node("TopK", ["logp", "k"], ["top", "ids"], axis=1),
        helper.make_node("Reshape", ["top", "shape"], ["cand_logp"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "step",
        [helper.make_tensor_value_info("x", f32, ["B", 8]), helper.make_tensor_value_info("c", f32, ["B", 8])],
        [helper.make_tensor_value_info("c_out", f32, ["B", 8]), helper.make_tensor_value_info("cand_logp", f32, None),
         helper.make_tensor_value_info("ids", TensorProto.INT64, None)],
        initializer=[w, v, k, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _node_types(model: onnx.ModelProto) -> dict[str, int]:
    """Output dtype of every node (by op type + first output name)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {n.output[0]: types.get(n.output[0]) for n in inferred.graph.node}


def test_fp16_keeps_io_and_sensitive_ops_fp32():
    model = _step_like_graph()
    half = convert_to_fp16(model, state_inputs=("c",))
    onnx.checker.check_model(half, full_check=True)
    assert [(o.name, o.type.tensor_type.elem_type) for o in half.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output]
    types = _node_types(half)
    by_op = {n.op_type: n.output[0] for n in half.graph.node if n.op_type != "Cast"}
    assert types[by_op["LogSoftmax"]] == TensorProto.FLOAT
    assert types["top"] == TensorProto.FLOAT
    assert types["fc"] == TensorProto.FLOAT  # f * c: the cell state stays fp32
    assert types["xw"] == TensorProto.FLOAT16  # the weight products run in fp16
    assert types["logits"] == TensorProto.FLOAT16
    weights = {i.name: i.data_type for i in half.graph.initializer}
    assert weights["w"] == TensorProto.FLOAT16 and weights["v"] == TensorProto.FLOAT16
    # No Cast should sit between TopK and the output: cand_logp is never rounded to fp16.
    producers = {o: n for n in half.graph.node for o in n.output}
    assert producers["cand_logp"].op_type == "Reshape"


def test_fp16_numerics_close_to_fp32():
    model = _step_like_graph(1)
    rng = np.random.default_rng(2)
    feed = {"x": rng.normal(size=(4, 8)).astype(np.float32), "c": rng.normal(size=(4, 8)).astype(np.float32)}
    ref = make_session(model.SerializeToString()).run(None, feed)
    got = make_session(convert_to_fp16(model, ("c",)).SerializeToString()).run(None, feed)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-2)
    np.testing.assert_allclose(got[1], ref[1], atol=5e-2)
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32


def test_fp16_refuses_out_of_range_weights():
    model = _step_like_graph()
    big = numpy_helper.from_array(np.full((8, 8), 1e6, np.float32), "w")
    model.graph.initializer[0].CopyFrom(big)
    with pytest.raises(ValueError, match="fp16's range"):
        convert_to_fp16(model)
