"""How fast a precision is on this machine, beside its verification: what `precision="auto"` ranks by.

One measurement, used by the exporter for each variant it verified and by `captrt verify`: the
engine and the same engine in fp32 caption the first few parity images one at a time (batch 1,
beam 5, real decoding up to the parity set's max_steps), taking turns image by image so that
shared-CPU noise hits both, over a few rounds; the result is each one's median ms per image and the
median of the per-image ratios (each from two calls back to back on the same image), which holds on
a busy machine where absolute times drift by 2x over minutes.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from captrt.runtime.engines.base import Engine

SPEED_IMAGES = 8  # parity images timed per engine
SPEED_ROUNDS = 3  # passes over them
SPEED_BEAM = 5


def measure_speed(engine: "Engine", baseline: "Engine", images: np.ndarray, vocab: Any, *,
                  beam_size: int = SPEED_BEAM, max_steps: int = 50, count: int = SPEED_IMAGES,
                  rounds: int = SPEED_ROUNDS) -> dict[str, Any]:
    """{"ms_per_image", "fp32_ms_per_image", "speedup", "images", "batch", "beam", "measured_at"}: batch-1 end-to-end
    time of `engine` against `baseline` (the same engine in fp32) on up to `count` of `images` (module docstring)."""
    from captrt.runtime.decoding.beam import beam_search

    picked = images[:max(1, count)]
    beam = min(beam_size, engine.max_beam, baseline.max_beam)

    def once(e: "Engine", image: np.ndarray) -> float:
        t0 = time.perf_counter()
        beam_search(e, image[None], start=vocab.start, end=vocab.end, vocab_size=len(vocab), beam_size=beam,
                    max_steps=max_steps)
        return time.perf_counter() - t0

    once(engine, picked[0])  # warm-up: first runs allocate and pack weights
    once(baseline, picked[0])
    mine, theirs = [], []
    for r in range(max(1, rounds)):
        for i, image in enumerate(picked):
            first = (i + r) % 2 == 0  # A B, then B A: drift hits both
            pair = {}
            for e in ((engine, baseline) if first else (baseline, engine)):
                pair[e is engine] = once(e, image)
            mine.append(pair[True])
            theirs.append(pair[False])
    ms, base = 1e3 * statistics.median(mine), 1e3 * statistics.median(theirs)
    ratio = statistics.median(b / m for m, b in zip(mine, theirs))
    return {"ms_per_image": round(ms, 2), "fp32_ms_per_image": round(base, 2), "speedup": round(ratio, 3),
            "images": len(picked), "rounds": max(1, rounds), "batch": 1, "beam": beam, "max_steps": max_steps,
            "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def speed_against_fp32(engine: "Engine", model: Any, parity: Any, *, threads: int | None = None,
                       **engine_options: Any) -> dict[str, Any]:
    """measure_speed of `engine` against a fresh fp32 engine of the same kind on `model`'s parity images."""
    from captrt.runtime.engines import create_engine

    baseline = create_engine(engine.name, model, device=engine.device, precision="fp32", threads=threads,
                             **engine_options)
    try:
        return measure_speed(engine, baseline, parity.images, model.vocab, beam_size=parity.beam_size,
                             max_steps=parity.max_steps)
    finally:
        baseline.close()
