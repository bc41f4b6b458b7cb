"""End-to-end speed of int8 candidates at batch 1, each measured the same way, in one interleaved run.

One run of a configuration: the encoder on one image (batch 1), then `steps` decoder steps at N=1 and
K=beams, each step fed the previous step's best words, with the runtime's session options and the
step graph the runtime's default path runs (captrt.runtime.engines.plain_step: cut without its decoding
controls when the cut applies). `steps` is what a real caption takes (the exporter passes the fp32
captions' mean length + 1 on the tuning images). The configurations take turns run by run, so
shared-CPU noise hits all of them alike; the result is the median ms per configuration.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import onnx

from captrt.runtime.decoding.processing import neutral_feeds
from captrt.runtime.model_dir import CONTROL_INPUTS, DECODER_OUTPUTS, LOGP_OUTPUT

STEPS = 10  # decoder steps per run when the caller knows no caption length
BEAMS = 5
REPEATS = 5


def step_feeds(session: Any, n: int, k: int) -> dict[str, np.ndarray]:
    """The neutral control inputs of a step session (format 2), or {} when it has none (format 1, plain)."""
    if not set(CONTROL_INPUTS) <= {i.name for i in session.get_inputs()}:
        return {}
    vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == LOGP_OUTPUT) - 1  # V + 1 columns
    return neutral_feeds(n, k, int(vocab))


def measure_configurations(configs: dict[str, tuple[onnx.ModelProto, onnx.ModelProto]], image: np.ndarray, *,
                           steps: int = STEPS, beams: int = BEAMS, repeats: int = REPEATS,
                           threads: int | None = None) -> dict[str, float]:
    """Median ms of encoder(1 image) + `steps` decoder steps (N=1, K=beams) per configuration name ->
    (encoder, decoder_step). A graph shared by several configurations gets one session."""
    import onnxruntime as ort

    from captrt.runtime.engines.ort import session_options
    from captrt.runtime.engines.plain_step import plain_step_graph

    so = session_options(threads)
    sessions: dict[int, Any] = {}

    def session(graph: onnx.ModelProto, step: bool) -> Any:
        if id(graph) not in sessions:
            data = graph.SerializeToString()
            if step:
                data = plain_step_graph(data) or data  # what the runtime's default path runs
            sessions[id(graph)] = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        return sessions[id(graph)]

    pairs = {name: (session(enc, False), session(dec, True)) for name, (enc, dec) in configs.items()}
    feed = np.ascontiguousarray(image[None], dtype=np.uint8)

    def once(enc_s: Any, dec_s: Any) -> float:
        t0 = time.perf_counter()
        features, att_proj, h, c = enc_s.run(["features", "att_proj", "h0", "c0"], {"image": feed})
        h, c = np.repeat(h[:, None], beams, 1), np.repeat(c[:, None], beams, 1)
        tokens, origin = np.ones((1, beams), np.int64), np.zeros((1, beams), np.int64)
        controls = step_feeds(dec_s, 1, beams)  # the default path's (none for a plain or format-1 graph)
        for _ in range(steps):
            h, c, _, _, ids = dec_s.run(list(DECODER_OUTPUTS), {"tokens": tokens, "origin": origin, "h": h, "c": c,
                                                                "features": features, "att_proj": att_proj, **controls})
            tokens, origin = np.ascontiguousarray(ids[:, :, 0]), np.arange(beams, dtype=np.int64)[None]
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in pairs}
    for e, d in pairs.values():  # warm-up: first runs allocate and pack weights
        once(e, d)
    for _ in range(repeats):
        for k, (e, d) in pairs.items():
            times[k].append(once(e, d))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def measure_speedup(encoder: onnx.ModelProto, decoder: onnx.ModelProto, enc8: onnx.ModelProto,
                    dec8: onnx.ModelProto, image: np.ndarray, *, steps: int = STEPS, beams: int = BEAMS,
                    repeats: int = REPEATS, threads: int | None = None) -> dict[str, float]:
    """{"fp32": ms, "int8": ms}: one int8 pair against fp32 (measure_configurations)."""
    return measure_configurations({"fp32": (encoder, decoder), "int8": (enc8, dec8)}, image, steps=steps,
                                  beams=beams, repeats=repeats, threads=threads)
