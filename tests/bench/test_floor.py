"""The fp32 floor's arithmetic: FLOPs of known graphs, the floor per image, % of floor, the peak's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from captrt.bench.floor import (MatmulPeak, conv_macs, floor_ms_per_image, gemm_macs, graph_flops, matmul_flops,
                                matmul_macs, measure_matmul_peak, pct_of_floor)

onnx = pytest.importorskip("onnx")


def test_macs_of_each_op():
    # Conv: out (1, 4, 8, 8) from weight (4, 3, 3, 3): 256 outputs x 27 products each
    assert conv_macs([1, 4, 8, 8], [4, 3, 3, 3]) == 256 * 27
    # grouped (depthwise) conv: weight (8, 1, 3, 3), each output sums 9 products
    assert conv_macs([2, 8, 4, 4], [8, 1, 3, 3]) == 2 * 8 * 16 * 9
    assert matmul_macs([2, 5, 4], [2, 5, 6]) == 2 * 5 * 6 * 4
    assert matmul_macs([4], [6]) == 6 * 4  # a vector times a matrix
    assert gemm_macs([3, 7], [3, 2]) == 3 * 2 * 7
    assert gemm_macs([7, 3], [3, 2], trans_a=True) == 3 * 2 * 7
    assert matmul_flops(2) == 16
    with pytest.raises(ValueError, match="conv"):
        conv_macs([1, 5, 8, 8], [4, 3, 3, 3])  # C_out mismatch
    with pytest.raises(ValueError, match="gemm"):
        gemm_macs([1, 2, 3], [1, 2])


def _known_graph(tmp_path):
    """image (batch, 3, 8, 8) -> Conv 3->4 (3x3, pad 1) -> Relu -> depthwise Conv (4 groups) -> Flatten ->
    Gemm (256 -> 10, transB) -> MatMul (10 -> 6); a batch dimension left symbolic."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w1"),
             numpy_helper.from_array(np.zeros((4, 1, 3, 3), np.float32), "w2"),
             numpy_helper.from_array(np.zeros((10, 256), np.float32), "g"),
             numpy_helper.from_array(np.zeros((10,), np.float32), "gb"),
             numpy_helper.from_array(np.zeros((10, 6), np.float32), "m")]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=4, name="dw"),
             helper.make_node("Flatten", ["c2"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g", "gb"], ["y0"], transB=1, name="fc"),
             helper.make_node("MatMul", ["y0", "m"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                              ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "known.onnx"
    onnx.save(model, str(path))
    return path


def test_graph_flops_of_a_known_graph(tmp_path):
    path = _known_graph(tmp_path)
    conv = 4 * 64 * 27 + 4 * 64 * 9  # conv1 + depthwise, per image
    gemm, mm = 10 * 256, 6 * 10
    for source in (path, path.read_bytes()):
        f = graph_flops(source)
        assert f.batch == 1 and f.unknown == [] and f.nodes == 4
        assert f.by_op == {"Conv": 2 * conv, "Gemm": 2 * gemm, "MatMul": 2 * mm}
        assert f.flops == 2 * (conv + gemm + mm)
        assert f.gflops == pytest.approx(f.flops / 1e9)
    assert graph_flops(path, batch=3).flops == 3 * graph_flops(path).flops  # the symbolic batch set to 3
    with pytest.raises(ValueError, match="batch"):
        graph_flops(path, batch=0)


def test_floor_per_image_arithmetic():
    # 10 GFLOP at 100 GFLOP/s = 100 ms; 16 steps x 50 MB at 25 GB/s (2 ms) = 32 ms, shared by a batch of 4 = 8 ms
    parts = floor_ms_per_image(10e9, 100.0, 50e6, 25.0, 16, batch=4)
    assert parts["encoder_ms"] == pytest.approx(100.0)
    assert parts["decoder_ms"] == pytest.approx(8.0)
    assert parts["total_ms"] == pytest.approx(108.0)
    assert floor_ms_per_image(10e9, 100.0, 50e6, 25.0, 16)["decoder_ms"] == pytest.approx(32.0)  # batch 1
    assert floor_ms_per_image(0, 1.0, 0, 1.0, 0)["total_ms"] == 0.0
    for bad in ({"peak_gflops": 0.0}, {"bandwidth_gbps": -1.0}, {"batch": 0}, {"steps_per_image": -1}):
        args = {"encoder_flops": 1.0, "peak_gflops": 1.0, "step_read_bytes": 1.0, "bandwidth_gbps": 1.0,
                "steps_per_image": 1, "batch": 1, **bad}
        with pytest.raises(ValueError):
            floor_ms_per_image(**args)


def test_pct_of_floor():
    # a 100 ms floor allows 10 img/s: 5 img/s is half of it, 10 img/s all of it
    assert pct_of_floor(5.0, 100.0) == pytest.approx(50.0)
    assert pct_of_floor(10.0, 100.0) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="positive"):
        pct_of_floor(1.0, 0.0)


def test_matmul_peak_bookkeeping():
    peak = MatmulPeak((64,), 2, {"numpy 64": 10.0, "onnxruntime 64": 12.5})
    assert peak.best == 12.5 and peak.best_of == "onnxruntime 64"
    measured = measure_matmul_peak((64, 96), threads=1, repeats=2)
    assert measured.sizes == (64, 96) and measured.threads == 1
    assert {"numpy 64", "numpy 96"} <= set(measured.gflops)
    assert set(measured.gflops) | {f"onnxruntime {n}" for n in (64, 96)} == \
        {f"{lib} {n}" for lib in ("numpy", "onnxruntime") for n in (64, 96)}
    assert "onnxruntime" in measured.errors or {"onnxruntime 64", "onnxruntime 96"} <= set(measured.gflops)
    assert all(v > 0 for v in measured.gflops.values()) and measured.best == max(measured.gflops.values())
    with pytest.raises(ValueError, match="sizes"):
        measure_matmul_peak((), repeats=1)
