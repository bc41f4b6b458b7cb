"""captrt.bench: latency, throughput, memory and the decoder step's memory floor, per engine.

    from captrt.bench import run_bench
    report = run_bench("model_dir", engines="ort,torch,reference", precisions="fp32,int8",
                       batches="1,8", beams="1,5", steps=16, json_out="bench.json")

Heavy modules (onnxruntime, torch, onnx) load on use: importing this package is cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_bench", "format_table", "format_markdown", "measure_read_bandwidth", "step_weight_bytes", "floor_ms"]


def __getattr__(name: str) -> Any:  # lazy: `captrt --help` must not import onnxruntime
    if name == "run_bench":
        from captrt.bench.bench import run_bench

        return run_bench
    if name in ("format_table", "format_markdown"):
        from captrt.bench import report

        return getattr(report, name)
    if name in ("measure_read_bandwidth", "step_weight_bytes", "floor_ms"):
        from captrt.bench import bandwidth

        return getattr(bandwidth, name)
    raise AttributeError(f"module 'captrt.bench' has no attribute {name!r}")
