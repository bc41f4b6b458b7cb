"""The bench report's floor: this machine's fp32 floor measured for the run (captrt.bench.floor, and the read
bandwidth of captrt.bench.bandwidth for each precision's step weights), and each row's share of it."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from captrt.bench.bandwidth import floor_ms, measure_read_bandwidth, step_weight_bytes
from captrt.bench.floor import (DEFAULT_MATMUL_SIZES, describe_peak, floor_ms_per_image, graph_flops,
                                measure_matmul_peak, pct_of_floor)
from captrt.runtime.model_dir import ModelDir


def measure_floor(mdir: ModelDir, precisions: set[str], device: str, threads: int, bandwidth_mb: int,
                  log: Callable[[str], None], matmul_sizes: Sequence[int] = DEFAULT_MATMUL_SIZES) -> dict[str, Any]:
    """Read bandwidth (host memory) and each precision's decoder_step weight bytes -> floor_ms; the fp32
    encoder's FLOPs and the measured matmul peak -> the end-to-end floor's compute part ("compute")."""
    if device != "cpu":
        return {"note": "not computed on device='cuda' (the floor is for host-memory reads)", "precisions": {}}
    counts = sorted({1, threads})
    log(f"measuring read bandwidth ({bandwidth_mb} MB, {', '.join(map(str, counts))} thread(s))")
    bw = measure_read_bandwidth(bandwidth_mb, counts)
    gbps = bw[threads].gbps
    out: dict[str, Any] = {"bandwidth_gbps": {str(t): round(b.gbps, 2) for t, b in bw.items()},
                           "bandwidth_method": f"numpy max-reduce over {bandwidth_mb} MB, one chunk per thread, "
                                               "best of 5",
                           "bandwidth_threads_used": threads, "precisions": {}}
    for p in sorted(precisions | {"fp32"}):
        if p not in mdir.graphs:
            continue
        try:
            wb = step_weight_bytes(mdir.read_graph(p, "decoder_step"))
        except RuntimeError as exc:  # onnx missing
            out["precisions"][p] = {"floor_ms": None, "note": str(exc)}
            continue
        out["precisions"][p] = {"weight_bytes": wb.total, "read_bytes": wb.read, "gathered_bytes": wb.gathered,
                                "bandwidth_gbps": round(gbps, 2), "threads": threads,
                                "floor_ms": round(floor_ms(wb.read, gbps), 4)}
    out["compute"] = _compute_floor(mdir, threads, log, matmul_sizes)
    return out


def _compute_floor(mdir: ModelDir, threads: int, log: Callable[[str], None],
                   matmul_sizes: Sequence[int]) -> dict[str, Any]:
    """The fp32 encoder's FLOPs at batch 1 (from the graph's shapes) and this machine's fp32 matmul peak."""
    try:
        flops = graph_flops(mdir.read_graph("fp32", "encoder"), batch=1)
    except (RuntimeError, ValueError) as exc:  # onnx missing; no fp32 graphs
        return {"note": f"encoder FLOPs not counted: {exc}"}
    log(f"measuring the fp32 matmul peak ({', '.join(f'{n}x{n}' for n in matmul_sizes)}, numpy and onnxruntime)")
    peak = measure_matmul_peak(matmul_sizes, threads)
    return {"encoder_flops": flops.flops, "encoder_flops_by_op": flops.by_op, "encoder_nodes_counted": flops.nodes,
            "encoder_nodes_unknown": flops.unknown,
            "encoder_flops_method": "2 x multiply-adds of the fp32 encoder graph's Conv/MatMul/Gemm at batch 1 "
                                    "(ONNX shape inference)",
            **describe_peak(peak), "encoder_floor_ms": round(flops.flops / (peak.best * 1e9) * 1e3, 4)}


def attach_floor(rec: dict[str, Any], floor: dict[str, Any], device: str) -> None:
    """A row's floor_ms and floor_ratio (its step against its precision's step floor), e2e_floor_ms and pct_of_floor."""
    f = (floor.get("precisions") or {}).get(rec["precision"]) or {}
    step = rec["step_ms"].get("p50")
    fl = f.get("floor_ms")
    rec["floor_ms"] = fl
    rec["floor_ratio"] = round(step / fl, 3) if fl and step is not None and device == "cpu" else None
    # The end-to-end floor is fp32's for every row (int8 does less work and may pass 100%).
    compute, fp32 = floor.get("compute") or {}, (floor.get("precisions") or {}).get("fp32") or {}
    rec["e2e_floor_ms"] = rec["pct_of_floor"] = None
    if device == "cpu" and compute.get("peak_gflops") and fp32.get("read_bytes") and rec.get("steps_mean"):
        parts = floor_ms_per_image(compute["encoder_flops"], compute["peak_gflops"], fp32["read_bytes"],
                                   fp32["bandwidth_gbps"], rec["steps_mean"], rec["batch"])
        rec["e2e_floor_ms"] = {k: round(v, 4) for k, v in parts.items()}
        rec["pct_of_floor"] = round(pct_of_floor(rec["images_per_s"], parts["total_ms"]), 2)
