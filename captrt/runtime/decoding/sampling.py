"""Random sampling (sample=True): one draw per step and sample from the processed distribution.

Per step and live sample: x = logp / sampling_temperature in float64 (logp: the step graph's processed
log_softmax, so this is softmax(processed logits / T)); words sorted by x descending, ties by lower id;
the first sampling_topk kept (0 = all); words at -inf dropped; p = exp(x - max) normalized; with
sampling_topp < 1, the shortest head of that order whose cumulative p reaches sampling_topp, p
renormalized; u = one Generator.random() draw; the word is the first whose cumulative p exceeds u.

The random stream of sample s of an image is numpy's PCG64 seeded with
SeedSequence(entropy=seed, spawn_key=(w0, w1, w2, w3, s)), w0..w3 the first 16 bytes of the sha256 of
the image's decoded pixels (uint8 (S, S, 3), C order) read as little-endian uint32: an image's draws
depend on (image, options, seed) only, never on the batch or on the other images of a request.
seed=None draws fresh entropy (not reproducible).
"""

from __future__ import annotations

import hashlib

import numpy as np

from captrt.runtime.decoding.beam import force_prefix
from captrt.runtime.decoding.hypotheses import BeamResult, Hypothesis
from captrt.runtime.decoding.options import LogitRules
from captrt.runtime.decoding.processing import step_controls
from captrt.runtime.decoding.trail import StepRecord, trace_attention
from captrt.runtime.engines.base import Engine


def image_key(image: np.ndarray) -> tuple[int, ...]:
    """(w0, w1, w2, w3): the image's part of its random streams' spawn key."""
    digest = hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).digest()[:16]
    return tuple(int(w) for w in np.frombuffer(digest, dtype="<u4"))


def sample_generator(seed: int, key: tuple[int, ...], sample: int) -> np.random.Generator:
    """The random stream of sample `sample` of the image with `key` (see the module docstring)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=seed, spawn_key=(*key, sample))))


def draw(logp: np.ndarray, u: float, topk: int = 0, topp: float = 1.0, temperature: float = 1.0) -> int:
    """One word from logp (V,) float32 with uniform u in [0, 1), by the rule of the module docstring."""
    x = logp.astype(np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    if topk:
        order = order[:topk]
    order = order[np.isfinite(x[order])]
    if order.size == 0:  # every word banned: nothing can be drawn; <end> keeps the search finite
        return -1
    p = np.exp(x[order] - x[order[0]])
    p /= p.sum()
    if topp < 1.0:
        head = min(int(np.searchsorted(np.cumsum(p), topp, side="left")) + 1, order.size)
        order, p = order[:head], p[:head] / p[:head].sum()
    i = int(np.searchsorted(np.cumsum(p), u, side="right"))
    return int(order[min(i, order.size - 1)])


def sample_search(engine: Engine, images: np.ndarray, *, start: int, end: int, vocab_size: int,
                  num_samples: int = 1, max_steps: int = 50, rules: LogitRules | None = None,
                  sampling_topk: int = 0, sampling_topp: float = 1.0, sampling_temperature: float = 1.0,
                  seed: int | None = None, return_attention: bool = False,
                  return_scores: bool = False) -> list[BeamResult]:
    """num_samples independent samples per image (K slots that never reorder). Returns one BeamResult
    per image whose hypotheses are the samples in order (the caption is sample 0)."""
    if not 1 <= num_samples <= engine.max_beam:
        raise ValueError(f"num_hypotheses must be between 1 and {engine.max_beam} with sampling, got {num_samples}")
    prefix = rules.prefix if rules is not None else ()
    if len(prefix) >= max_steps:
        raise ValueError(f"a prefix of {len(prefix)} words leaves no step of max_steps={max_steps}")
    total = images.shape[0]
    if total == 0:
        return []
    if seed is None:
        seed = int(np.random.SeedSequence().entropy)
    streams = [[sample_generator(seed, image_key(im), s) for s in range(num_samples)] for im in images]
    results: list[BeamResult | None] = [None] * total
    state = engine.encode(images)
    try:
        forced = force_prefix(engine, state, prefix, rules, start, return_attention)
        k = num_samples
        processing = rules is not None and rules.active
        ids = np.arange(total)
        tokens = np.repeat(forced.tokens, k, axis=1)  # (N, K)
        top = np.repeat(forced.top, k, axis=1)  # (N, K) float32
        seqs = np.repeat(forced.seqs, k, axis=1)  # (N, K, t)
        tok = np.repeat(forced.token_scores, k, axis=1)  # (N, K, t)
        origin = np.zeros((total, k), dtype=np.int64)  # first step: every sample continues the one slot
        alive = np.ones((total, k), dtype=bool)
        ended_at = np.zeros((total, k), dtype=np.int64)  # the step that emitted <end>, 0 while alive
        trail = forced.trail
        same = np.broadcast_to(np.arange(k, dtype=np.int64), (total, k))
        for step in range(len(prefix) + 1, max_steps + 1):
            controls = step_controls(rules, seqs) if processing else None
            out = engine.step(state, tokens, origin, want_alpha=return_attention, controls=controls, want_logp=True)
            logp = np.asarray(out.logp, dtype=np.float32)  # (N, K, V)
            n = tokens.shape[0]
            words = np.full((n, k), end, dtype=np.int64)
            for r, s in zip(*np.nonzero(alive)):
                w = draw(logp[r, s], streams[ids[r]][s].random(), sampling_topk, sampling_topp, sampling_temperature)
                words[r, s] = end if w < 0 else w
            picked = np.where(alive, logp[np.arange(n)[:, None], np.arange(k)[None, :], words], np.float32(0))
            top = np.where(alive, top + picked, top)  # float32 adds, like the reference
            seqs = np.concatenate([seqs, words[:, :, None]], axis=2)
            tok = np.concatenate([tok, picked[:, :, None]], axis=2)
            if return_attention:
                parent = origin if step == len(prefix) + 1 else same[:n]
                trail.append(StepRecord(ids, parent, np.asarray(out.alpha, dtype=np.float32), same[:n]))
            ended = alive & (words == end)
            ended_at[ended] = step
            alive &= ~ended
            tokens, origin = words, same[:n].copy()
            over = ~alive.any(axis=1) | (step >= max_steps)
            for r in np.nonzero(over)[0]:
                results[ids[r]] = _result(seqs[r], top[r], tok[r] if return_scores else None, ended_at[r], trail,
                                          ids[r], step)
            if over.all():
                break
            if over.any():
                keep = np.nonzero(~over)[0].astype(np.int64)
                state = engine.select(state, keep)
                ids, top, seqs, tok = ids[keep], top[keep], seqs[keep], tok[keep]
                tokens, origin, alive, ended_at = tokens[keep], origin[keep], alive[keep], ended_at[keep]
    finally:
        engine.release(state)
    return results  # type: ignore[return-value]


def _result(seqs, top, tok, ended_at, trail, image: int, step: int) -> BeamResult:
    """seqs (K, t), top (K,), tok (K, t) or None, ended_at (K,) of one image -> its samples in order."""
    hyps = []
    for s in range(seqs.shape[0]):
        at = int(ended_at[s])
        length = at if at else step  # the words up to and including <end>, or all of them
        words = seqs[s, :length].tolist()
        finished = bool(at)
        scores = None if tok is None else tok[s, :length].tolist()
        hyps.append(Hypothesis(words[:-1] if finished else words, float(top[s]), finished, scores))
    alphas = None
    if trail:
        at = int(ended_at[0])
        alphas = trace_attention(trail, image, at if at else step, 0)
        if at:
            alphas = alphas[:-1]
    return BeamResult.of(hyps, alphas)
