"""int8 variants with onnxruntime.quantization.

Both int8 graphs target ONNX Runtime's CPU provider (GPUs get the fp16 variant; TensorRT builds
its own int8 engines from fp32/fp16 graphs).

encoder.int8.onnx: static QDQ, per-channel symmetric int8 weights and asymmetric uint8 activations
(ONNX Runtime's fast x86 path: u8 x s8 dot products; symmetric int8 activations, which TensorRT
would require, ran ~2x slower here), calibrated on real images. Only the backbone is quantized
(every node up to the last Conv); the pooling matrices, the attention projection and init_h/init_c
stay fp32: they are ~2% of the work and feed every step. Fixed scales: an image's features do not
depend on its batch. On CPUs without VNNI (AVX2 only), u8 x s8 products can saturate (ONNX Runtime's
documented caveat; measured here, see quantize_decoder); captrt.export.int8_search can reduce weights
to 7 bits and returns layers that miss the quality budget to fp32.

decoder_step.int8.onnx: int8 weight MatMuls (decoder_attn, f_beta, the LSTM's two Gemms, fc) with
per-row activation scales, so a caption never depends on the other images (or beams) of its batch.
Activation x activation products (alpha @ features), the 1-wide full_attn, and softmax/log_softmax/
TopK stay fp32. Written as plain ONNX (Abs/ReduceMax/Div/Round/Clip/Cast + MatMulInteger + two Muls):
ONNX Runtime's own quantizers give either one activation scale per call over the whole batch
(quantize_dynamic: DynamicQuantizeLinear, the previous form) or calibrated fixed scales (static QDQ),
and MatMulInteger only takes a per-tensor activation zero point, hence symmetric rows stored as
uint8 + 128. Not TensorRT-parsable (MatMulInteger); the manifest records this per graph.

Measured (seed-sized step: 512 dims, vocabulary 9490, encoder_dim 2048, 14x14 grid; ORT 1.31 CPU,
2 threads, session_options of the runtime, AMD EPYC AVX2 without VNNI, machine shared with other
jobs: best median of 6 interleaved rounds, ms per step, K=5; "top word" = slots whose best word is
fp32's, random feeds, N=8):
    form                              N=1    N=8    top word   alone == in a batch of 8
    fp32                              5.05   27.5   -          yes
    dynamic (quantize_dynamic)        2.16   21.2   72%        no (logp differs by up to 1.4)
    per-row, u8 x u8 (chosen)         2.21   21.4   97-100%    yes, bit-exact
    per-row, u8 x s8 7-bit weights    2.52   20.5   97%        yes, bit-exact
    MatMulNBits 8-bit, accuracy 4     3.8    37.9   (activations per block of a row, but ORT 1.31
    MatMulNBits 8-bit, accuracy 0    43.6    73.1    has no fast 8-bit kernel for AVX2: slower than fp32)
The dynamic form's 72% is u8 x s8 saturation (the same graph with 7-bit weights: 97.5%). At N=8 the
step is dominated by the fp32 attention over the features (N*K*P*A and N*K*P*E), so int8 gains less.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from captrt.export.errors import ExportError


class ImageCalibrationReader:
    """onnxruntime CalibrationDataReader over uint8 images, one image per batch (bounded memory)."""

    def __init__(self, images: Iterable[np.ndarray], input_name: str = "image",
                 on_image: Callable[[], None] | None = None):
        self._iter: Iterator[np.ndarray] = iter(images)
        self._input = input_name
        self._on_image = on_image

    def get_next(self) -> dict[str, np.ndarray] | None:
        image = next(self._iter, None)
        if image is None:
            return None
        if self._on_image is not None:
            self._on_image()
        return {self._input: np.ascontiguousarray(image[None], dtype=np.uint8)}

    def rewind(self) -> None:  # part of the reader protocol; the calibrator reads once
        pass


def backbone_node_names(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes up to and including the last Conv (the ResNet), in graph order."""
    names = [n.name for n in model.graph.node]
    last_conv = max((i for i, n in enumerate(model.graph.node) if n.op_type == "Conv"), default=-1)
    if last_conv < 0:
        raise ExportError("encoder graph has no Conv nodes to quantize")
    if any(not name for name in names[: last_conv + 1]):
        raise ExportError("encoder graph has unnamed nodes; cannot select the backbone for quantization")
    return names[: last_conv + 1]


def quantize_encoder(model: onnx.ModelProto, images: Iterable[np.ndarray],
                     on_image: Callable[[], None] | None = None) -> onnx.ModelProto:
    """Static QDQ int8 encoder calibrated on `images` (uint8 (S, S, 3) arrays)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    keep = set(backbone_node_names(model))
    exclude = [n.name for n in model.graph.node if n.name not in keep]
    with tempfile.TemporaryDirectory(prefix="captrt-int8-") as tmp, quiet_quantization():
        src, dst = Path(tmp) / "encoder.onnx", Path(tmp) / "encoder.int8.onnx"
        onnx.save_model(model, str(src))
        try:
            quantize_static(
                str(src), str(dst), ImageCalibrationReader(images, on_image=on_image),
                quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )
        except ExportError:
            raise
        except Exception as exc:
            raise ExportError(f"int8 encoder quantization failed: {type(exc).__name__}: {exc}") from exc
        return onnx.load_model(str(dst))


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite Gemm(A, W, b) with constant W (alpha = beta = 1, no transA) as MatMul(A, W') + b."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in inits:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        w_name = node.input[1] + "__matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        if len(node.input) > 2 and node.input[2]:
            product = node.output[0] + "__matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [product], name=node.name + "_matmul"))
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [node.output[0]], name=node.name + "_matmul"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return model


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads any more (the weights a rewrite replaced)."""
    used = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes worth quantizing: a constant 2-D weight at least 8 wide (not full_attn's (A, 1))."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            if len(dims) == 2 and min(dims) >= 8:
                out.append(node.name)
    return out


ROW_LEVELS = 127  # per-row symmetric activations: q in [-127, 127], stored as uint8 q + 128
WEIGHT_LEVELS = {"u8s8": 63, "u8u8": 127}  # |w_q| per form; why 63 for u8s8: see quantize_decoder


def quantize_decoder(model: onnx.ModelProto, form: str = "u8u8") -> onnx.ModelProto:
    """int8 decoder step with per-row activation scales: exactly batch-independent (docstring at top).

    Each weight MatMul A (B, K) @ W (K, N) becomes, with s_row = max|A[b, :]| / 127 per row and
    s_col = max|W[:, n]| / L per column (L = WEIGHT_LEVELS[form]):
        q = uint8(round(A / s_row) + 128)                              (B, K), zero point 128
        y = float(MatMulInteger(q, W_q, 128, zp_w)) * s_row * s_col    (B, N)
    Every operation is row-wise and the integer product is exact, so a row's result does not
    depend on the other rows of the call (other beams, other images).

    form "u8u8" (default): uint8 weights (zero point 128, 8-bit per-column scales): no saturation
    on any x86 CPU. "u8s8": int8 weights limited to 7 bits (|w| <= 63): faster kernels, also
    saturation-free (255 * 63 * 2 < 2**15), but half the weight resolution. Full-range u8 x s8 is not
    offered: without VNNI (AVX2 only, e.g. this project's AMD EPYC machines) ONNX Runtime's u8s8
    kernels add pairs of products in int16 with saturation (vpmaddubsw), and measured here a 40x2560
    by 2560x2048 product of extreme values was off by 4e7.
    """
    if form not in WEIGHT_LEVELS:
        raise ValueError(f"form: expected one of {sorted(WEIGHT_LEVELS)}, got {form!r}")
    prepared = gemm_to_matmul(model)
    targets = set(weight_matmuls(prepared))
    if not targets:
        raise ExportError("decoder graph has no weight MatMuls to quantize")
    opset = next((o.version for o in prepared.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = {t.name: t for t in prepared.graph.initializer}
    rows: dict[str, tuple[str, str]] = {}  # activation name -> (uint8 tensor, per-row scale): shared by its MatMuls
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.array(128, np.uint8), "rowq_zp"),
        numpy_helper.from_array(np.array(ROW_LEVELS, np.float32), "rowq_levels"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32), "rowq_tiny"),
        numpy_helper.from_array(np.array(128.0, np.float32), "rowq_offset"),
        numpy_helper.from_array(np.array(1.0, np.float32), "rowq_lo"),
        numpy_helper.from_array(np.array(255.0, np.float32), "rowq_hi"),
    ]
    for node in prepared.graph.node:
        if node.name not in targets:
            new_nodes.append(node)
            continue
        a = node.input[0]
        if a not in rows:
            rows[a] = _row_quantize(a, opset, new_nodes)
        q, scale = rows[a]
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # (K, N)
        w_q, w_zp, w_scale = _quantize_weight(weight, WEIGHT_LEVELS[form], form)
        base = node.name
        new_inits += [numpy_helper.from_array(w_q, f"{base}_Wq"), numpy_helper.from_array(w_zp, f"{base}_Wzp"),
                      numpy_helper.from_array(w_scale, f"{base}_Wscale")]
        new_nodes += [
            helper.make_node("MatMulInteger", [q, f"{base}_Wq", "rowq_zp", f"{base}_Wzp"], [f"{base}_i32"],
                             name=f"{base}_int8"),
            helper.make_node("Cast", [f"{base}_i32"], [f"{base}_f32"], to=onnx.TensorProto.FLOAT,
                             name=f"{base}_cast"),
            helper.make_node("Mul", [f"{base}_f32", scale], [f"{base}_rows"], name=f"{base}_row_scale"),
            helper.make_node("Mul", [f"{base}_rows", f"{base}_Wscale"], [node.output[0]], name=f"{base}_col_scale"),
        ]
    del prepared.graph.node[:]
    prepared.graph.node.extend(new_nodes)
    prepared.graph.initializer.extend(new_inits)
    _drop_unused_initializers(prepared)
    try:
        onnx.checker.check_model(prepared)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"int8 decoder step is not a valid ONNX graph: {exc}") from exc
    return prepared


def _row_quantize(a: str, opset: int, nodes: list[onnx.NodeProto]) -> tuple[str, str]:
    """Nodes that quantize activation `a` (..., K) per row: -> (uint8 name, float scale name (..., 1))."""
    p = f"rowq_{a}"
    nodes.append(helper.make_node("Abs", [a], [f"{p}_abs"], name=f"{p}_abs"))
    if opset >= 18:  # ReduceMax takes axes as an input from opset 18
        axes = f"{p}_axes"
        nodes.append(helper.make_node("Constant", [], [axes], name=axes,
                                      value=numpy_helper.from_array(np.array([-1], np.int64))))
        nodes.append(helper.make_node("ReduceMax", [f"{p}_abs", axes], [f"{p}_max"], keepdims=1, name=f"{p}_max"))
    else:
        nodes.append(helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1,
                                      name=f"{p}_max"))
    nodes += [
        # An all-zero row gets the tiniest scale instead of 0: it quantizes to zeros, no division by 0.
        helper.make_node("Max", [f"{p}_max", "rowq_tiny"], [f"{p}_nz"], name=f"{p}_nz"),
        helper.make_node("Div", [f"{p}_nz", "rowq_levels"], [f"{p}_scale"], name=f"{p}_scale"),
        helper.make_node("Div", [a, f"{p}_scale"], [f"{p}_div"], name=f"{p}_div"),
        helper.make_node("Round", [f"{p}_div"], [f"{p}_round"], name=f"{p}_round"),
        helper.make_node("Add", [f"{p}_round", "rowq_offset"], [f"{p}_shift"], name=f"{p}_shift"),
        # |A / s| <= 127 by construction; the clip only guards float rounding at the boundary.
        helper.make_node("Clip", [f"{p}_shift", "rowq_lo", "rowq_hi"], [f"{p}_clip"], name=f"{p}_clip"),
        helper.make_node("Cast", [f"{p}_clip"], [f"{p}_u8"], to=onnx.TensorProto.UINT8, name=f"{p}_u8"),
    ]
    return f"{p}_u8", f"{p}_scale"


def _quantize_weight(weight: np.ndarray, levels: int, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, N) float -> (quantized (K, N), zero point (N,), scale (N,)), symmetric per column."""
    scale = np.abs(weight).max(axis=0) / levels
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale), -levels, levels).astype(np.int32)
    if form == "u8u8":
        return (q + 128).astype(np.uint8), np.full(weight.shape[1], 128, np.uint8), scale
    return q.astype(np.int8), np.zeros(weight.shape[1], np.int8), scale


def quantize_decoder_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The former int8 decoder: ONNX Runtime's dynamic quantization (one activation scale per call, over
    the whole batch, so captions depend on the batch; full-range u8 x s8, which saturates without
    VNNI). Kept for measurements only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = gemm_to_matmul(model)
    targets = weight_matmuls(prepared)
    if not targets:
        raise ExportError("decoder graph has no weight MatMuls to quantize")
    with tempfile.TemporaryDirectory(prefix="captrt-int8-") as tmp, quiet_quantization():
        src, dst = Path(tmp) / "decoder_step.onnx", Path(tmp) / "decoder_step.int8.onnx"
        onnx.save_model(prepared, str(src))
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=targets,
                         per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load_model(str(dst))


class quiet_quantization:
    """Silence onnxruntime.quantization's INFO/WARNING chatter: it logs to the root logger, and its
    histogram calibrators print to stdout, which is the export command's output."""

    def __enter__(self):
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        self._stdout = contextlib.redirect_stdout(io.StringIO())
        self._stdout.__enter__()

    def __exit__(self, *exc):
        self._stdout.__exit__(*exc)
        logging.disable(self._level)
        return False
