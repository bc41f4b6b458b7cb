"""int8 encoders from one calibration per method: QDQ graphs for any set of layers kept in fp32.

Calibration (running the augmented fp32 graph over the calibration images) is the expensive part, so
each method runs once and its tensor ranges are kept in ONNX Runtime's calibration cache (JSON, in a
temporary directory); every later build with that method (another set of fp32 layers) reuses it
through quantize_static(calibration_cache_path=...).

Weights are 7-bit by default (reduce_range): on CPUs without VNNI (AVX2 only, like this project's AMD
EPYC machines) ONNX Runtime's u8 x s8 kernels add pairs of products in int16 with saturation
(vpmaddubsw); 7-bit weights cannot saturate (255 * 63 * 2 < 2**15), so the graph computes the same
everywhere, and what the search measures here is what a VNNI machine runs (up to rounding).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from captrt.export.errors import ExportError
from captrt.export.quantize import ImageCalibrationReader, backbone_node_names, quiet_quantization

# name -> (onnxruntime CalibrationMethod name, calibration extra_options). Asymmetric ranges throughout:
# activations are uint8 with a zero point, and most are post-ReLU (a symmetric range wastes half of it).
CALIBRATIONS: dict[str, tuple[str, dict]] = {
    "minmax": ("MinMax", {}),
    "percentile-99.999": ("Percentile", {"CalibPercentile": 99.999, "CalibTensorRangeSymmetric": False}),
    "entropy": ("Entropy", {"CalibTensorRangeSymmetric": False}),
}


class EncoderQuantizer:
    """Static QDQ int8 encoders of one fp32 encoder: calibrate once per method, build per fp32-layer set.

    Only the backbone (every node up to the last Conv) is quantized, as in quantize.quantize_encoder.
    Use as a context manager (or call close()) to remove the calibration caches.
    """

    def __init__(self, encoder: onnx.ModelProto, images: np.ndarray, *, reduce_range: bool = True):
        """images: uint8 (M, S, S, 3) calibration images."""
        self.encoder = encoder
        self.images = np.ascontiguousarray(images, dtype=np.uint8)
        self.reduce_range = reduce_range
        self.backbone = backbone_node_names(encoder)
        self._tail = [n.name for n in encoder.graph.node if n.name not in set(self.backbone)]
        self._tmp = tempfile.TemporaryDirectory(prefix="captrt-int8-search-")
        self._src = Path(self._tmp.name) / "encoder.onnx"
        onnx.save_model(encoder, str(self._src))
        self._quantized: list[str] | None = None

    def __enter__(self) -> "EncoderQuantizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def build(self, calibration: str, fp32_nodes: Sequence[str] = (), *,
              keep_activations: bool = False) -> onnx.ModelProto:
        """The int8 encoder with `calibration`'s ranges and the backbone nodes `fp32_nodes` left in fp32.

        keep_activations: keep the Relus that QDQ otherwise folds into the preceding quantization (then a
        Conv writes the Relu's output name, pre-ReLU values): the same numbers, but every tensor name
        means what it means in the fp32 graph, which the per-tensor error ranking needs."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if calibration not in CALIBRATIONS:
            raise ValueError(f"calibration: expected one of {sorted(CALIBRATIONS)}, got {calibration!r}")
        method, calib_options = CALIBRATIONS[calibration]
        cache = Path(self._tmp.name) / f"ranges-{calibration}.json"
        reader = None if cache.is_file() else ImageCalibrationReader(list(self.images))
        dst = Path(self._tmp.name) / "encoder.int8.onnx"
        with quiet_quantization():
            try:
                quantize_static(
                    str(self._src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=self.reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=self._tail + list(fp32_nodes), calibrate_method=getattr(CalibrationMethod, method),
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "QDQKeepRemovableActivations": keep_activations, **calib_options},
                    calibration_cache_path=str(cache))
            except Exception as exc:
                raise ExportError(f"int8 encoder quantization ({calibration}) failed: {type(exc).__name__}: "
                                  f"{exc}") from exc
        return float_inputs(onnx.load_model(str(dst)), fp32_nodes, self.encoder)

    def quantized_nodes(self) -> list[str]:
        """Backbone nodes that full int8 quantizes (those that read a DequantizeLinear), in graph order:
        the candidates to return to fp32."""
        if self._quantized is None:
            self._quantized = quantized_node_names(self.build("minmax"))
        return list(self._quantized)


def quantized_node_names(model: onnx.ModelProto) -> list[str]:
    """Nodes of a QDQ graph, other than Q/DQ, with an input produced by a DequantizeLinear."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_outputs for i in n.input)]


def float_inputs(model: onnx.ModelProto, fp32_nodes: Sequence[str], reference: onnx.ModelProto) -> onnx.ModelProto:
    """Feed the `fp32_nodes` float activations: bypass DequantizeLinear(QuantizeLinear(x)) in front of them.

    Why: quantize_static's nodes_to_exclude leaves a node's own weights in fp32 but still quantizes its
    input when the producer is quantized (a Conv's output gets Q/DQ whoever reads it), so an outlier
    that crushes that input would stay. Q/DQ pairs still read by quantized nodes are kept; the others go.
    QDQ folds a Relu into the quantization before it (the Conv then writes the Relu's tensor name with
    pre-ReLU values); where the fp32 graph (`reference`) makes that tensor with a Relu, one is put back.
    """
    if not fp32_nodes:
        return model
    producers = {o: n for n in model.graph.node for o in n.output}
    ref_ops = {o: n.op_type for n in reference.graph.node for o in n.output}
    wanted = set(fp32_nodes)
    added: dict[str, str] = {}
    for node in list(model.graph.node):
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            x = q.input[0]
            if ref_ops.get(x) == "Relu" and producers.get(x) is not None and producers[x].op_type != "Relu":
                if x not in added:
                    added[x] = f"{x}_fp32_relu"
                    pos = list(model.graph.node).index(producers[x]) + 1
                    model.graph.node.insert(pos, helper.make_node("Relu", [x], [added[x]], name=added[x]))
                x = added[x]
            node.input[k] = x
    # Drop what nothing reads any more (the bypassed Q/DQ pairs), until nothing changes.
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        keep = [n for n in model.graph.node if any(o in read for o in n.output)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    read = {i for n in model.graph.node for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


def layer_label(encoder: onnx.ModelProto, node_name: str) -> str:
    """'node_Conv_81 (resnet.4.0.conv2.weight)': a node and the weight that says which layer it is."""
    inits = {t.name for t in encoder.graph.initializer}
    for node in encoder.graph.node:
        if node.name == node_name:
            weights = [i for i in node.input if i in inits]
            return f"{node_name} ({weights[0]})" if weights else node_name
    return node_name
