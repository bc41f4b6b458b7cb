"""Timed rounds of one (batch, beam) configuration, and each runner's record of them.

Every runner is loaded before timing starts and the runners take turns round by round on the same
images: this machine's speed drifts by 2x over minutes, and ratios between engines are only fair when
taken side by side. max_seconds bounds each runner's share once MIN_ITERS_IN_BUDGET rounds are in.
"""

from __future__ import annotations

import gc
from typing import Any, Sequence

import numpy as np

from captrt.bench.measure import PeakRss, now_ms, summarize
from captrt.bench.runners import PEERS

MIN_ITERS_IN_BUDGET = 3


def measure_rounds(runners: Sequence[Any], pool: np.ndarray, batch: int, beam: int, steps: int | None, warmup: int,
             iters: int, max_seconds: float | None, device: str) -> list[dict[str, Any]]:
    """Warm up every runner, then time up to `iters` rounds of one (batch, beam) configuration in
    which each runner runs once, in turn, on the same images. max_seconds bounds each runner's share."""
    def take(i: int, n: int) -> np.ndarray:  # run i's n images of a cyclic walk through the image pool
        idx = (np.arange(n) + i * n) % len(pool)
        return np.ascontiguousarray(pool[idx])

    def run(runner: Any, i: int) -> Any:
        n = runner.images_per_run(batch) if hasattr(runner, "images_per_run") else batch
        if getattr(runner, "variant", None) == "streams":  # a list of n images in batches of `batch`
            return runner.run(take(i, n), beam, steps, batch=batch)
        return runner.run(take(i, n), beam, steps)

    gc.collect()
    samples: list[list[Any]] = [[] for _ in runners]
    with PeakRss() as rss:
        for i in range(warmup):
            for runner in runners:
                run(runner, i)
        started = now_ms()
        for i in range(iters):
            for runner, got in zip(runners, samples):
                got.append(run(runner, warmup + i))
            spent = now_ms() - started
            if (max_seconds is not None and i + 1 >= MIN_ITERS_IN_BUDGET
                    and spent > max_seconds * 1e3 * len(runners)):
                break
        seed_steps = [r.seed_step_ms(take(0, batch), beam, min(warmup, 2), max(3 * len(got), 5))
                      for r, got in zip(runners, samples)]
    return [make_record(r, got, seed, batch, beam, steps, warmup, device, rss)
            for r, got, seed in zip(runners, samples, seed_steps)]


def make_record(runner: Any, samples: list[Any], seed_steps: list[float] | None, batch: int, beam: int,
            steps: int | None, warmup: int, device: str, rss: PeakRss) -> dict[str, Any]:
    """One configuration's figures for one runner."""
    variant = getattr(runner, "variant", None)
    e2e = [s.e2e_ms for s in samples]
    step_ms = seed_steps if seed_steps is not None else [t for s in samples for t in s.step_ms]
    first = [t for s in samples for t in s.first_step_ms]
    per_image = [n for s in samples for n in s.steps_per_image]
    images = len(samples[0].steps_per_image) if samples and samples[0].steps_per_image else batch
    rec: dict[str, Any] = {
        "engine": runner.name, "precision": runner.precision, "variant": variant,
        "device": device if runner.name not in PEERS else "cpu",
        "provider": runner.provider, "batch": batch, "beam": beam, "steps": steps,
        "steps_mean": round(float(np.mean(per_image)), 2) if per_image else None,
        "iters": len(samples), "warmup": warmup,
        "encoder_ms": summarize([s.encoder_ms for s in samples if s.encoder_ms is not None]),
        "step_ms": summarize(step_ms),
        "step_timing": "seed step (decoder.step recomputing att_proj + log_softmax + topk) for each image of the batch"
                       if seed_steps is not None else "engine.step calls inside the search, steps 2..T",
        "first_step_ms": summarize(first),
        "e2e_ms": {"per_batch": summarize(e2e), "per_image": summarize([t / images for t in e2e])},
        "images_per_s": round(images * 1e3 / float(np.median(e2e)), 3),
        # every engine is resident during the configuration: the peak is the process's with all engines
        # loaded; rss_load_mb (set by the caller) is what creating this engine added
        "peak_rss_mb": rss.mb, "peak_rss_scope": rss.scope,
        "_tokens": [s.tokens for s in samples],  # for compare_captions; dropped before the report
    }
    if variant == "streams":
        # One run is one caption() call over `images` images in batches of `batch`: per_batch is that call.
        rec["e2e_ms"] = {"per_call": rec["e2e_ms"]["per_batch"], "per_batch": summarize([]),
                         "per_image": rec["e2e_ms"]["per_image"]}
        rec.update(streams=runner.streams, threads=runner.threads, images_per_run=images,
                   step_timing="not timed apart (the streams' steps overlap)",
                   measured_as=f"Captioner.load(streams={runner.streams}, threads={runner.threads}).caption(list of "
                               f"{images} images, batch_size={batch}): the list's {images // batch} batches spread "
                               f"over the streams; images/s = {images} / wall time of the call")
    elif variant == "options":
        rec["options"] = dict(getattr(runner, "used", {}) or {})
    return rec
