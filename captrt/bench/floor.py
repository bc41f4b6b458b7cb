"""The end-to-end fp32 floor of one image on this machine: the encoder's FLOPs at the measured matmul peak,
plus the decoder steps' weight reads at the measured read bandwidth.

    floor ms per image = encoder FLOPs / peak FLOP/s  +  steps per image x step read bytes / bandwidth / batch

- encoder FLOPs: 2 x the multiply-adds of every Conv, MatMul and Gemm of the fp32 encoder graph at batch 1,
  from its shapes (ONNX shape inference with the batch dimension set to 1): a Conv does
  out_elements x (C_in / groups) x kernel_elements multiply-adds, a MatMul out_elements x K, a Gemm M x N x K.
  Everything else (ReLU, adds, pooling, the image's normalization) is left out.
- peak FLOP/s: the best of large square fp32 matmuls (1024 and 2048) in numpy (its BLAS, all its threads) and
  in ONNX Runtime (MLAS, `threads` intra-op threads), best of `repeats` runs each: what dense fp32 work
  reaches here.
- a decoder step must read its weights once (captrt.bench.bandwidth: the initializers less the tables only
  gathered by word id); a batch of B images shares each step's reads, hence the division by the batch.

It is a floor: every term is work the search must do, each at the fastest rate measured for that kind of
work, and everything else (the decoder's arithmetic, the encoder's activations, the beam search on the host,
Python) is counted as free. Nothing can caption faster in fp32 on this machine without skipping work
(fewer FLOPs, e.g. Winograd convolutions, or fewer weight bytes, e.g. int8); int8 rows are compared with the
same fp32 floor and may exceed 100%. The peak is a measured one, not the datasheet's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# What RESULTS.md and docs/benchmarks.md say the floor is (the module doc has the details).
FLOOR_DEFINITION = (
    "`% of floor` is a row's images/s over this machine's fp32 floor for that row's batch and step count: per image, "
    "the fp32 encoder graph's FLOPs (2 x the multiply-adds of its Conv/MatMul/Gemm nodes at batch 1, counted from "
    "the graph's shapes) over the measured fp32 matmul peak (the best of 1024x1024 and 2048x2048 fp32 matmuls in "
    "numpy and ONNX Runtime on all cores), plus, per decoder step, the step graph's fp32 weight bytes (less the "
    "tables only gathered by word id) over the measured read bandwidth, divided by the batch (a batch shares each "
    "step's weight reads), times the steps per image. It is a floor: each term is work the search must do at the "
    "fastest rate measured here for that kind of work, and everything else (the decoder's arithmetic, activations, "
    "the beam search on the host, Python) is counted as free, so nothing can caption faster on this machine in fp32 "
    "without skipping work (fewer FLOPs, e.g. Winograd convolutions, or fewer bytes, e.g. int8: int8 rows are "
    "held to the same fp32 floor and may pass 100%). The peak is measured, not the datasheet's; a disturbed "
    "measurement lowers it and so raises every row's percentage.")
DEFAULT_MATMUL_SIZES = (1024, 2048)  # 2.1 and 17.2 GFLOP per product: ~0.02-0.3 s each on 2 cores
COUNTED_OPS = ("Conv", "MatMul", "Gemm")


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def conv_macs(out_shape: Sequence[int], weight_shape: Sequence[int]) -> int:
    """Multiply-adds of a Conv: every output element sums (C_in / groups) x kernel elements products.
    weight_shape is (C_out, C_in / groups, k1, k2, ...), so that is out elements x prod(weight[1:])."""
    if len(weight_shape) < 3 or len(out_shape) != len(weight_shape) or out_shape[1] != weight_shape[0]:
        raise ValueError(f"conv: output {list(out_shape)} does not match weight {list(weight_shape)}")
    return _prod(out_shape) * _prod(weight_shape[1:])


def matmul_macs(a_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Multiply-adds of numpy-style MatMul: every output element is a dot product of length K = a's last dim."""
    if not a_shape:
        raise ValueError("matmul: a scalar operand")
    return _prod(out_shape) * int(a_shape[-1])


def gemm_macs(a_shape: Sequence[int], out_shape: Sequence[int], trans_a: bool = False) -> int:
    """Multiply-adds of Gemm: Y (M, N) = A (M, K) B (K, N) (A given as (K, M) with transA)."""
    if len(a_shape) != 2 or len(out_shape) != 2:
        raise ValueError(f"gemm: expected 2-D A and Y, got {list(a_shape)} and {list(out_shape)}")
    k = a_shape[0] if trans_a else a_shape[1]
    return _prod(out_shape) * int(k)


@dataclass
class GraphFlops:
    """FLOPs (2 x multiply-adds) of a graph's Conv/MatMul/Gemm nodes at one batch size."""

    batch: int
    flops: int
    by_op: dict[str, int] = field(default_factory=dict)  # op type -> FLOPs
    nodes: int = 0  # nodes counted
    unknown: list[str] = field(default_factory=list)  # counted ops whose shapes could not be inferred

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _static(model, batch: int):
    """A copy of `model` whose graph inputs have every symbolic dimension (the batch) set to `batch`."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        for d in inp.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = batch
    return m


def graph_flops(graph: str | Path | bytes, batch: int = 1) -> GraphFlops:
    """Count the FLOPs of an ONNX graph (a path or serialized bytes) at `batch` (see the module doc).

    Needs the `onnx` package. Nodes whose shapes shape inference cannot give are listed in `unknown`
    (and not counted: the count is then low, which keeps a floor a floor)."""
    try:
        import onnx
        from onnx import shape_inference
    except ImportError as exc:
        raise RuntimeError(f"the compute floor needs the onnx package (pip install 'captrt[train]'): {exc}") from None
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    model = onnx.load_from_string(bytes(graph)) if isinstance(graph, (bytes, bytearray)) else onnx.load(str(graph))
    inferred = shape_inference.infer_shapes(_static(model, batch), data_prop=True)
    g = inferred.graph
    shapes: dict[str, list[int] | None] = {}

    def note(vi) -> None:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            return
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        shapes[vi.name] = None if any(d is None for d in dims) else dims

    for vi in (*g.input, *g.value_info, *g.output):
        note(vi)
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    out = GraphFlops(batch=batch, flops=0)
    for node in g.node:
        if node.op_type not in COUNTED_OPS:
            continue
        a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        try:
            if a is None or y is None or (node.op_type == "Conv" and w is None):
                raise ValueError("shape not inferred")
            if node.op_type == "Conv":
                macs = conv_macs(y, w)
            elif node.op_type == "MatMul":
                macs = matmul_macs(a, y)
            else:
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                macs = gemm_macs(a, y, trans_a)
        except ValueError:
            out.unknown.append(node.name or node.output[0])
            continue
        out.flops += 2 * macs
        out.by_op[node.op_type] = out.by_op.get(node.op_type, 0) + 2 * macs
        out.nodes += 1
    return out


@dataclass
class MatmulPeak:
    """The best fp32 FLOP/s measured by square n x n matmuls, per library and size."""

    sizes: tuple[int, ...]
    threads: int
    gflops: dict[str, float]  # "numpy 2048" -> best GFLOP/s of that library at that size
    errors: dict[str, str] = field(default_factory=dict)  # library -> why it was not measured

    @property
    def best(self) -> float:
        return max(self.gflops.values())

    @property
    def best_of(self) -> str:
        return max(self.gflops, key=self.gflops.get)


def matmul_flops(n: int) -> int:
    """FLOPs of an (n, n) x (n, n) matmul: n^2 dot products of n multiply-adds."""
    return 2 * n ** 3


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: thread pools start, pages are touched
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def _ort_matmul_session(n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from captrt.runtime.engines.ort import session_options

    spec = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b", "c")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])


_lock = threading.Lock()


def measure_matmul_peak(sizes: Sequence[int] = DEFAULT_MATMUL_SIZES, threads: int | None = None,
                        repeats: int = 5) -> MatmulPeak:
    """Best-of-`repeats` GFLOP/s of n x n fp32 matmuls (each n in `sizes`) in numpy (its BLAS threads) and in
    ONNX Runtime (`threads` intra-op threads, default all usable cores); the peak is the best of all.
    A library that cannot run is listed in `errors` (numpy always runs)."""
    from captrt.bench.machine import usable_cores

    sizes = tuple(int(n) for n in sizes)
    if not sizes or min(sizes) < 1 or repeats < 1:
        raise ValueError(f"matmul peak: sizes and repeats must be >= 1, got sizes={sizes}, repeats={repeats}")
    threads = threads or usable_cores()
    rng = np.random.default_rng(0)
    gflops: dict[str, float] = {}
    errors: dict[str, str] = {}
    with _lock:  # two measurements at once would halve each other
        for n in sizes:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            gflops[f"numpy {n}"] = round(matmul_flops(n) / _best_seconds(lambda: a @ b, repeats) / 1e9, 2)
            if "onnxruntime" in errors:
                continue
            try:
                sess = _ort_matmul_session(n, threads)
            except Exception as exc:  # noqa: BLE001 - onnx/onnxruntime missing or refusing: numpy's figure stands
                errors["onnxruntime"] = f"{type(exc).__name__}: {exc}"
                continue
            feeds = {"a": a, "b": b}
            gflops[f"onnxruntime {n}"] = round(matmul_flops(n) / _best_seconds(lambda: sess.run(None, feeds),
                                                                                 repeats) / 1e9, 2)
    return MatmulPeak(sizes, threads, gflops, errors)


def floor_ms_per_image(encoder_flops: float, peak_gflops: float, step_read_bytes: float, bandwidth_gbps: float,
                       steps_per_image: float, batch: int = 1) -> dict[str, float]:
    """The floor's parts in ms per image: {"encoder_ms", "decoder_ms", "total_ms"} (see the module doc)."""
    if peak_gflops <= 0 or bandwidth_gbps <= 0:
        raise ValueError(f"peak and bandwidth must be positive, got {peak_gflops} GFLOP/s, {bandwidth_gbps} GB/s")
    if batch < 1 or steps_per_image < 0 or encoder_flops < 0 or step_read_bytes < 0:
        raise ValueError("floor: batch must be >= 1 and flops, bytes and steps >= 0")
    encoder = encoder_flops / (peak_gflops * 1e9) * 1e3
    decoder = steps_per_image * step_read_bytes / (bandwidth_gbps * 1e9) * 1e3 / batch
    return {"encoder_ms": encoder, "decoder_ms": decoder, "total_ms": encoder + decoder}


def pct_of_floor(images_per_s: float, floor_ms: float) -> float:
    """Measured images/s as a percentage of the floor's images/s (1000 / floor ms per image)."""
    if floor_ms <= 0:
        raise ValueError(f"floor must be positive, got {floor_ms} ms")
    return 100.0 * images_per_s * floor_ms / 1e3


def describe_peak(peak: MatmulPeak) -> dict[str, Any]:
    """The report's record of a peak measurement."""
    sizes = ", ".join(f"{n}x{n}" for n in peak.sizes)
    return {"peak_gflops": peak.best, "peak_of": peak.best_of, "gflops": dict(peak.gflops),
            "errors": dict(peak.errors), "peak_method": f"fp32 matmuls {sizes} in numpy (its BLAS threads) and ONNX "
            f"Runtime ({peak.threads} intra-op threads), best of 5 runs each, the best of all"}
