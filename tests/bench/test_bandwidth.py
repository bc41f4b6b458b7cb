"""The memory-floor arithmetic: weight bytes of a known graph, bandwidth bookkeeping, floor_ms."""

from __future__ import annotations

import numpy as np
import pytest

from captrt.bench.bandwidth import (Bandwidth, floor_ms, measure_array, measure_read_bandwidth, read_once,
                                    step_weight_bytes)

onnx = pytest.importorskip("onnx")


def _known_graph(tmp_path):
    """tokens -> Gather(table) -> MatMul(w) + bias(fp16 -> cast) ; w also Gathered; one tensor in float_data."""
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")  # 160 B, Gather only
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")  # 48 B, MatMul and Gather
    bias16 = numpy_helper.from_array(np.ones(3, np.float16), "bias16")  # 6 B
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0], raw=False)  # 12 B, float_data
    const = helper.make_node("Constant", [], ["k8"], value=numpy_helper.from_array(np.ones(5, np.int8)))  # 5 B
    nodes = [
        helper.make_node("Gather", ["table", "tokens"], ["emb"], axis=0),
        helper.make_node("MatMul", ["emb", "w"], ["y0"]),
        helper.make_node("Gather", ["w", "tokens"], ["wrow"], axis=0),
        helper.make_node("Cast", ["bias16"], ["bias"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["y0", "bias"], ["y1"]),
        helper.make_node("Mul", ["y1", "scale"], ["y"]),
        const,
    ]
    graph = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("tokens", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("wrow", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("k8", TensorProto.INT8, [5])],
                              initializer=[table, w, bias16, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "known.onnx"
    onnx.save(model, str(path))
    return path


def test_step_weight_bytes_of_a_known_graph(tmp_path):
    path = _known_graph(tmp_path)
    for source in (path, path.read_bytes()):
        wb = step_weight_bytes(source)
        assert wb.by_name == {"table": 160, "w": 48, "bias16": 6, "scale": 12, "k8": 5}
        assert wb.total == 231
        assert wb.gathered == {"table": 160}  # w is also read whole by MatMul: it counts
        assert wb.read == 71


def test_floor_ms_arithmetic():
    assert floor_ms(50_000_000, 40.0) == pytest.approx(1.25)  # 50 MB at 40 GB/s
    assert floor_ms(0, 1.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        floor_ms(1, 0.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_read_once_reads_every_chunk(threads):
    a = np.zeros(3_000_001, np.float32)
    for where in (0, 1_500_000, len(a) - 1):  # first, middle and last chunk
        a[:] = 0
        a[where] = 7.0
        _, found = read_once(a, threads)
        assert found == 7.0


def test_bandwidth_is_bytes_over_seconds():
    a = np.ones(1 << 20, np.float32)  # 4 MiB
    bw = measure_array(a, threads=2, repeats=3)
    assert bw.nbytes == a.nbytes and bw.seconds > 0 and bw.checksum == 1.0
    assert bw.gbps == pytest.approx(a.nbytes / bw.seconds / 1e9)
    assert Bandwidth(1, 2_000_000_000, 0.5, 0.0).gbps == pytest.approx(4.0)


def test_measure_read_bandwidth_small_array():
    res = measure_read_bandwidth(size_mb=4, threads=(1, 2), repeats=2)
    assert set(res) == {1, 2}
    for t, bw in res.items():
        assert bw.threads == t and bw.nbytes == 4 << 20 and bw.gbps > 0
        assert bw.checksum == 2.0  # the planted maximum in the last element was read


def test_bad_arguments():
    with pytest.raises(ValueError, match="threads"):
        read_once(np.ones(4, np.float32), 0)
    with pytest.raises(ValueError, match="1-D"):
        read_once(np.ones((2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="size"):
        measure_read_bandwidth(size_mb=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_array(np.ones(4, np.float32), 1, repeats=0)
