"""The TensorRT-10 operator checker on small hand-built graphs (the exported graphs are checked in
test_export_tiny.py and test_export_large.py)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from captrt.export.ops import TENSORRT10_OPS, op_histogram, tensorrt_problems


def _model(nodes, inits=(), opset=17, inputs=None, outputs=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _k(value, name="k"):
    return numpy_helper.from_array(np.array([value], dtype=np.int64), name)


def test_clean_step_like_graph_passes():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1),
             helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("LogSoftmax", ["s"], ["l"], axis=1),
             helper.make_node("TopK", ["l", "k"], ["y", "i"], axis=1)]
    assert tensorrt_problems(_model(nodes, [w, _k(4)])) == []


def test_unsupported_and_contrib_operators_are_named():
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "q"], ["m"]),
             helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")]
    problems = tensorrt_problems(_model(nodes))
    assert any("DynamicQuantizeLinear" in p and "unsupported" in p for p in problems)
    assert any("MatMulInteger" in p for p in problems)
    assert any("com.microsoft" in p for p in problems)


def test_lstm_operator_is_a_loop_and_refused_for_steps():
    nodes = [helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=4)]
    assert any("loop" in p for p in tensorrt_problems(_model(nodes)))
    assert tensorrt_problems(_model(nodes), allow_loops=True) == []


def test_topk_restrictions():
    computed_k = [helper.make_node("Shape", ["x"], ["shape"]),
                  helper.make_node("TopK", ["x", "shape"], ["y", "i"], axis=1)]
    assert any("K must be a constant" in p for p in tensorrt_problems(_model(computed_k)))
    huge = [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1)]
    assert any("3840" in p for p in tensorrt_problems(_model(huge, [_k(5000)])))
    unsorted = [helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=1, sorted=0)]
    assert any("sorted" in p for p in tensorrt_problems(_model(unsorted, [_k(3)])))


def test_quantize_zero_point_must_be_zero():
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp_bad = numpy_helper.from_array(np.array(3, np.int8), "zb")
    zp_ok = numpy_helper.from_array(np.array(0, np.int8), "zo")
    bad = [helper.make_node("QuantizeLinear", ["x", "s", "zb"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "s", "zb"], ["y"])]
    ok = [helper.make_node("QuantizeLinear", ["x", "s", "zo"], ["q"]),
          helper.make_node("DequantizeLinear", ["q", "s", "zo"], ["y"])]
    assert len(tensorrt_problems(_model(bad, [scale, zp_bad]))) == 2
    assert tensorrt_problems(_model(ok, [scale, zp_ok])) == []


def test_opset_range():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    assert any("opset" in p for p in tensorrt_problems(_model(nodes, opset=8)))
    assert any("opset" in p for p in tensorrt_problems(_model(nodes, opset=21)))
    assert tensorrt_problems(_model(nodes, opset=20)) == []


def test_allow_list_has_what_the_graphs_need_and_not_what_trt_lacks():
    needed = {"Conv", "Relu", "MaxPool", "Add", "MatMul", "Gemm", "Transpose", "Reshape", "Cast", "Div", "Sub",
              "ReduceSum", "GatherElements", "Gather", "Slice", "Sigmoid", "Tanh", "Mul", "Concat", "Softmax",
              "LogSoftmax", "TopK", "Expand", "Squeeze", "Unsqueeze", "Shape", "QuantizeLinear", "DequantizeLinear"}
    assert needed <= TENSORRT10_OPS
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"} & TENSORRT10_OPS


def test_op_histogram_counts_domains():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("FusedMatMul", ["b", "b"], ["y"], domain="com.microsoft")]
    assert op_histogram(_model(nodes)) == {"Relu": 2, "com.microsoft.FusedMatMul": 1}
