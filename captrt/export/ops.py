"""Which ONNX operators TensorRT 10 can parse, and a checker for exported graphs.

Source: onnx-tensorrt's docs/operators.md ("Supported ONNX Operators", TensorRT 10.x, rows marked
Y), which is the operator list NVIDIA's TensorRT documentation links to. Operators that TensorRT 10
rejects and that ONNX Runtime's tools like to emit are listed separately so the checker can say
why: e.g. quantize_dynamic's DynamicQuantizeLinear/MatMulInteger and QLinear* operators.
TensorRT 10.0 parses opsets 9 to 20 (later 10.x releases accept up to 24); the checker uses 9..20
so that a graph works with every TensorRT 10 release.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

TENSORRT_MIN_OPSET, TENSORRT_MAX_OPSET = 9, 20

# Default-domain operators marked supported ("Y") in onnx-tensorrt's operators.md for TensorRT 10.
TENSORRT10_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Marked "N" in the same table; named here so the checker's message can be specific.
TENSORRT10_UNSUPPORTED = frozenset("""
ConvInteger DynamicQuantizeLinear MatMulInteger QLinearConv QLinearMatMul Multinomial
Compress ConcatFromSequence SplitToSequence SequenceAt SequenceConstruct SequenceEmpty SequenceErase
SequenceInsert SequenceLength SequenceMap Unique MaxRoiPool MaxUnpool Det DFT BitShift Bernoulli
Optional OptionalGetElement OptionalHasElement StringNormalizer TfIdfVectorizer Col2Im CenterCropPad
""".split())

# Operators that become TensorRT loops; allowed by the parser, but a decoder step must not contain
# them (an engine with loops may enqueue synchronously, see docs/model-format.md's step design).
LOOP_OPS = frozenset({"LSTM", "GRU", "RNN", "Loop", "Scan"})

TOPK_MAX_K = 3840  # TensorRT: "K input must be less than 3840"


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def _opset(model: onnx.ModelProto) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def tensorrt_problems(model: onnx.ModelProto, *, allow_loops: bool = False) -> list[str]:
    """Everything in `model` that TensorRT 10's ONNX parser would reject; empty when it is clean.

    Checks: opset range, operator allow-list (default domain only; no contrib ops), the per-operator
    restrictions our graphs could trip over (TopK's K constant, < 3840 and sorted; Squeeze/Unsqueeze/
    Reduce* axes constant; Q/DQ zero points zero), and (unless allow_loops) no loop operators.
    """
    problems: list[str] = []
    opset = _opset(model)
    if opset is None or not TENSORRT_MIN_OPSET <= opset <= TENSORRT_MAX_OPSET:
        problems.append(f"opset {opset} outside TensorRT 10's range {TENSORRT_MIN_OPSET}..{TENSORRT_MAX_OPSET}")
    consts = _constants(model)
    for node in model.graph.node:
        where = f"node {node.name or '?'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: operator domain {node.domain!r} is not parsed by TensorRT")
            continue
        if node.op_type not in TENSORRT10_OPS:
            why = "marked unsupported" if node.op_type in TENSORRT10_UNSUPPORTED else "not in the supported list"
            problems.append(f"{where}: {why} for TensorRT 10")
            continue
        if node.op_type in LOOP_OPS and not allow_loops:
            problems.append(f"{where}: becomes a TensorRT loop; write the cell out as Gemm/Sigmoid/Tanh")
        problems.extend(_restrictions(node, where, consts))
    return problems


def _restrictions(node: onnx.NodeProto, where: str, consts: dict[str, onnx.TensorProto]) -> list[str]:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    out: list[str] = []
    if node.op_type == "TopK":
        if len(node.input) < 2 or node.input[1] not in consts:
            out.append(f"{where}: K must be a constant")
        else:
            k = int(numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
            if k >= TOPK_MAX_K:
                out.append(f"{where}: K={k} must be less than {TOPK_MAX_K}")
        if attrs.get("sorted", 1) != 1:
            out.append(f"{where}: sorted must be 1")
    elif node.op_type in ("Squeeze", "Unsqueeze") or node.op_type.startswith("Reduce"):
        if len(node.input) > 1 and node.input[1] and node.input[1] not in consts:
            out.append(f"{where}: axes must be a constant")
    elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zp = consts.get(node.input[2])
            if zp is None or numpy_helper.to_array(zp).any():
                out.append(f"{where}: zero point must be a constant zero (symmetric quantization)")
            elif zp.data_type == onnx.TensorProto.UINT8:
                out.append(f"{where}: uint8 quantization; TensorRT quantizes to int8 (uint8 is I/O only)")
    return out


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count}, for reports."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
