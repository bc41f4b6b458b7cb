"""int8 variants with onnxruntime.quantization.

Both int8 graphs target ONNX Runtime's CPU provider (GPUs get the fp16 variant; TensorRT builds
its own int8 engines from fp32/fp16 graphs).

encoder.int8.onnx: static QDQ, per-channel symmetric int8 weights and asymmetric uint8 activations
(ONNX Runtime's fast x86 path: u8 x s8 dot products; symmetric int8 activations, which TensorRT
would require, ran ~2x slower here), MinMax-calibrated on real images. Only the backbone is
quantized (every node up to the last Conv); the pooling matrices, the attention projection and
init_h/init_c stay fp32: they are ~2% of the work and feed every step. On CPUs without VNNI,
u8 x s8 products can saturate (ONNX Runtime's documented caveat); this machine class has VNNI.

decoder_step.int8.onnx: dynamic int8 (per-channel weights) for the weight MatMuls (decoder_attn, f_beta, the LSTM's two
Gemms, fc). ONNX Runtime's dynamic quantizer only handles MatMul, so Gemms are first rewritten
as MatMul + Add. Activation x activation products (alpha @ features), the 1-wide full_attn, and
softmax/log_softmax/TopK stay fp32. Dynamic quantization computes activation scales per call, so
the step needs no calibration; the price is that DynamicQuantizeLinear/MatMulInteger are ONNX
Runtime (CPU) operators that TensorRT does not parse -- the manifest records this per graph.
"""

from __future__ import annotations

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
    with tempfile.TemporaryDirectory(prefix="captrt-int8-") as tmp, _quiet():
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
    used = {name for n in nodes for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


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


def quantize_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 decoder step (weight MatMuls only)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = gemm_to_matmul(model)
    targets = weight_matmuls(prepared)
    if not targets:
        raise ExportError("decoder graph has no weight MatMuls to quantize")
    with tempfile.TemporaryDirectory(prefix="captrt-int8-") as tmp, _quiet():
        src, dst = Path(tmp) / "decoder_step.onnx", Path(tmp) / "decoder_step.int8.onnx"
        onnx.save_model(prepared, str(src))
        try:
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=targets,
                             per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                             extra_options={"MatMulConstBOnly": True})
        except Exception as exc:
            raise ExportError(f"int8 decoder quantization failed: {type(exc).__name__}: {exc}") from exc
        return onnx.load_model(str(dst))


class _quiet:
    """Silence onnxruntime.quantization's INFO/WARNING chatter (it logs to the root logger)."""

    def __enter__(self):
        self._level = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(self._level)
        return False
