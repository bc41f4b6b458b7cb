"""Where the time goes inside the graphs: ONNX Runtime's own profiler, summed per operator type.

ORT writes one JSON event per node execution ("cat": "Node", name "<node>_kernel_time", "dur" in
microseconds, "args.op_name"). Running the encoder at batch 1 and the decoder step at batch 1, beam
5 a few times and summing those events says which operators a miss is made of, without guessing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captrt.runtime.decoding.processing import neutral_feeds


@dataclass
class OpProfile:
    """Per-operator totals of one graph, averaged over `runs` calls."""

    graph: str
    precision: str
    runs: int
    call_us: float  # mean wall time of one session.run, from ORT's "model_run" events
    ops: dict[str, float] = field(default_factory=dict)  # op type -> mean µs per run
    nodes: dict[str, float] = field(default_factory=dict)  # node name -> mean µs per run

    @property
    def kernel_us(self) -> float:
        return sum(self.ops.values())

    def top_ops(self, n: int = 6) -> list[tuple[str, float]]:
        return sorted(self.ops.items(), key=lambda kv: -kv[1])[:n]


def summarize_events(events: list[dict[str, Any]], graph: str, precision: str, runs: int) -> OpProfile:
    """Sum ORT profile events per op type; the first (warm-up) run must already be excluded by the caller
    through `runs` counting only the timed calls that follow it."""
    ops: dict[str, float] = defaultdict(float)
    nodes: dict[str, float] = defaultdict(float)
    run_us: list[float] = []
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            run_us.append(float(ev["dur"]))
        elif ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            op = (ev.get("args") or {}).get("op_name", "?")
            ops[op] += float(ev["dur"])
            nodes[ev["name"][: -len("_kernel_time")]] += float(ev["dur"])
    timed = run_us[-runs:] if runs else run_us
    total_runs = max(len(run_us), 1)
    # every run executes the same nodes: divide the totals by the number of runs to get per-run figures
    return OpProfile(graph, precision, len(timed), float(np.mean(timed)) if timed else 0.0,
                     {k: v / total_runs for k, v in ops.items()}, {k: v / total_runs for k, v in nodes.items()})


def _profiled_session(data: bytes, threads: int, prefix: str):
    import onnxruntime as ort

    from captrt.runtime.engines.ort import session_options

    so = session_options(threads)
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


def _events(session) -> list[dict[str, Any]]:
    path = session.end_profiling()
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    finally:
        os.unlink(path)


def profile_graphs(model_dir: str | Path, precision: str = "fp32", *, batch: int = 1, beam: int = 5,
                   runs: int = 20, threads: int | None = None) -> tuple[OpProfile, OpProfile]:
    """Profile encoder.onnx at `batch` and decoder_step.onnx at (batch, beam) on the CPU provider.

    Profiling covers every run including the first (ORT cannot switch it on later), so the first,
    which allocates, is amortized over `runs`; use runs >= 20 for figures close to steady state."""
    from captrt.bench.machine import usable_cores
    from captrt.runtime.model_dir import ModelDir

    mdir = ModelDir.load(model_dir)
    mdir.require_precision(precision)
    threads = threads or usable_cores()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, mdir.image_size, mdir.image_size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        enc = _profiled_session(mdir.read_graph(precision, "encoder"), threads, str(Path(tmp) / "enc"))
        for _ in range(runs):
            features, att_proj, h0, c0 = enc.run(["features", "att_proj", "h0", "c0"], {"image": images})
        enc_prof = summarize_events(_events(enc), "encoder", precision, runs)
        dec = _profiled_session(mdir.read_graph(precision, "decoder_step"), threads, str(Path(tmp) / "dec"))
        h = np.repeat(h0[:, None, :], beam, axis=1)  # (N, K, H)
        c = np.repeat(c0[:, None, :], beam, axis=1)  # (N, K, H)
        feeds = {"tokens": rng.integers(1, mdir.vocab_size, size=(batch, beam), dtype=np.int64),
                 "origin": np.tile(np.arange(beam, dtype=np.int64), (batch, 1)), "h": h, "c": c,
                 "features": features, "att_proj": att_proj}
        if mdir.controls:  # format 2: the default path's neutral controls
            feeds.update(neutral_feeds(batch, beam, mdir.vocab_size))
        for _ in range(runs):
            dec.run(["h_out", "c_out", "alpha", "cand_logp", "cand_ids"], feeds)
        dec_prof = summarize_events(_events(dec), "decoder_step", precision, runs)
    return enc_prof, dec_prof


def format_profile(p: OpProfile, n: int = 6) -> str:
    """One Markdown line: run time, kernel time, and the largest operator types with their shares."""
    total = p.kernel_us or 1.0
    parts = ", ".join(f"{op} {us / 1000:.3f} ms ({us / total:.0%})" for op, us in p.top_ops(n))
    return (f"{p.graph} {p.precision}: session.run {p.call_us / 1000:.3f} ms, kernels {p.kernel_us / 1000:.3f} ms "
            f"({len(p.nodes)} nodes): {parts}")
