"""The ORT-profiler summary used in benchmarks/RESULTS.md."""

from __future__ import annotations

import pytest

from captrt.bench.profile import format_profile, profile_graphs, summarize_events


def test_summarize_events_sums_per_op_and_per_run():
    events = [{"cat": "Session", "name": "model_run", "dur": 900},
              {"cat": "Node", "name": "fc_kernel_time", "dur": 500, "args": {"op_name": "Gemm"}},
              {"cat": "Node", "name": "fc_fence_before", "dur": 7, "args": {"op_name": "Gemm"}},
              {"cat": "Node", "name": "topk_kernel_time", "dur": 100, "args": {"op_name": "TopK"}},
              {"cat": "Session", "name": "model_run", "dur": 700},
              {"cat": "Node", "name": "fc_kernel_time", "dur": 300, "args": {"op_name": "Gemm"}},
              {"cat": "Node", "name": "topk_kernel_time", "dur": 100, "args": {"op_name": "TopK"}}]
    p = summarize_events(events, "decoder_step", "fp32", runs=1)
    assert p.ops == {"Gemm": 400.0, "TopK": 100.0}
    assert p.nodes == {"fc": 400.0, "topk": 100.0}
    assert p.call_us == 700.0 and p.runs == 1
    assert p.top_ops(1) == [("Gemm", 400.0)]
    assert "Gemm 0.400 ms (80%)" in format_profile(p)


def test_profile_graphs_on_an_exported_model(tmp_path):
    pytest.importorskip("torch")
    from captrt.export.exporter import export_model
    from tests.conftest import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt")
    export_model(ckpt, tmp_path / "model", max_beam=5, parity_count=1, progress=False)
    enc, dec = profile_graphs(tmp_path / "model", "fp32", batch=2, beam=3, runs=3, threads=1)
    assert enc.graph == "encoder" and dec.graph == "decoder_step"
    assert enc.call_us > 0 and dec.call_us > 0
    assert "Conv" in enc.ops and "TopK" in dec.ops
    assert 0 < dec.kernel_us <= dec.call_us * 1.5
    with pytest.raises(ValueError, match="int8"):
        profile_graphs(tmp_path / "model", "int8", runs=1)
