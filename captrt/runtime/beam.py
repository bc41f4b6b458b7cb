"""Batched beam search in numpy: N images x K slots per step, token-identical to the reference.

Semantics follow captrt.train.reference.reference_beam_search (the oracle) exactly:
- step 1 runs one slot per image (all of the reference's k rows are equal) and keeps its top k words;
- later steps rank cand = top_score + logp (float32 adds, like the reference) over every live slot
  and keep the top k, k shrinking by one for every hypothesis that emits <end>;
- ties are broken like the reference's topk over the flattened (slot, word) index: (-score, slot, word);
- completed hypotheses go to a pool in completion order (step, then selection order); the answer is
  the first maximum of score / GNMT penalty (raw score by default), or the best live hypothesis when
  nothing completed within max_steps.

Fixed shapes: every step after the first has K = beam_size slots per image; slots of hypotheses that
ended are dead (masked with -inf, fed a dummy token). Images whose search is over leave the batch,
so N shrinks and the engine drops their features/att_proj/h/c rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from captrt.runtime.engines.base import DecodeState, Engine


@dataclass
class BeamResult:
    tokens: list[int]  # generated word ids without <start>/<end>
    score: float  # cumulative log-probability (incl. <end> when finished), as float32 -> float
    finished: bool  # False when max_steps ended the search before any hypothesis emitted <end>
    alphas: np.ndarray | None  # (T, P) float32 attention of each token in `tokens`, if asked


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha; 1 when alpha == 0 (the raw score)."""
    return ((5.0 + length) / 6.0) ** alpha if alpha else 1.0


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint64 keys (in the high 32 bits) that sort float32 scores in descending order (-inf last)."""
    # + 0.0 turns -0.0 into +0.0: equal scores must get equal keys, as they compare equal in topk.
    bits = np.ascontiguousarray(scores + np.float32(0.0), dtype=np.float32).view(np.uint32)
    ascending = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (~ascending).astype(np.uint64) << np.uint64(32)


def _select(scores: np.ndarray, cand_ids: np.ndarray, keep: int):
    """Rank every image's candidates and return the first `keep` per image.

    scores: float32 (N, K, C) with dead slots at -inf; cand_ids int64 (N, K, C).
    Returns slot, word, score (N, keep) in selection order; entries past an image's live count are padding.
    Order within an image: score descending, then slot, then word id -- the order of the flattened
    index slot * V + word that the reference's topk sees.
    """
    n, k, c = scores.shape
    slot = np.broadcast_to(np.arange(k, dtype=np.int64)[None, :, None], (n, k, c)).reshape(n, -1)
    words = cand_ids.reshape(n, -1)
    flat = scores.reshape(n, -1)
    if k < (1 << 12) and (words.size == 0 or int(words.max()) < (1 << 20)):
        # One uint64 key per candidate (score | slot | word) and one sort: ~5x faster than lexsort.
        key = _descending_key(flat) | (slot.astype(np.uint64) << np.uint64(20)) | words.astype(np.uint64)
        order = np.argsort(key, axis=1, kind="stable")[:, :keep]
    else:  # huge vocabulary or beam: the same order with lexsort (last key is primary)
        row = np.broadcast_to(np.arange(n)[:, None], flat.shape)
        order = np.lexsort((words.ravel(), slot.ravel(), -flat.ravel(), row.ravel())).reshape(n, -1)
        order = order[:, :keep] - (np.arange(n) * k * c)[:, None]
    rows = np.arange(n)[:, None]
    return slot[rows, order], words[rows, order], flat[rows, order]


def beam_search(engine: Engine, images: np.ndarray, *, start: int, end: int, vocab_size: int,
                beam_size: int = 5, max_steps: int = 50, length_penalty: float = 0.0,
                return_attention: bool = False) -> list[BeamResult]:
    """Caption a batch. images: uint8 (N, S, S, 3). Returns one BeamResult per image, in order."""
    if not 1 <= beam_size <= engine.max_beam:
        raise ValueError(f"beam_size must be between 1 and {engine.max_beam} (the model's max_beam), got {beam_size}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    total = images.shape[0]
    results: list[BeamResult | None] = [None] * total
    if total == 0:
        return []
    state = engine.encode(images)
    _search(engine, state, results, start, end, vocab_size, beam_size, max_steps, length_penalty, return_attention)
    return results  # type: ignore[return-value]


def _search(engine: Engine, state: DecodeState, results: list, start: int, end: int, vocab_size: int, beam: int,
            max_steps: int, length_penalty: float, want_alpha: bool) -> None:
    """Fill results[i] for every image of `state`; the engine releases the (last) state at the end."""
    total = state.batch
    ids = np.arange(total)  # original index of each row still in the batch (stays ascending)
    live = np.full(total, beam, dtype=np.int64)  # hypotheses alive per image (the reference's k)
    top = np.zeros((total, 1), dtype=np.float32)  # cumulative score per slot (-inf when dead)
    tokens = np.full((total, 1), start, dtype=np.int64)
    origin = np.zeros((total, 1), dtype=np.int64)
    seqs = np.zeros((total, 1, 0), dtype=np.int64)  # (N, K, t) words generated so far per slot
    # Attention is kept as per-step back-pointers and traced back only for the chosen hypothesis:
    # copying whole (N, K, t, P) histories every step would cost O(t^2).
    trail: list[_StepRecord] = []
    done: list[list[tuple[float, np.ndarray, tuple[int, int]]]] = [[] for _ in range(total)]
    try:
        for step in range(1, max_steps + 1):
            out = engine.step(state, tokens, origin, want_alpha=want_alpha)
            cand_ids = np.asarray(out.cand_ids, dtype=np.int64)
            if cand_ids.size and (cand_ids.min() < 0 or cand_ids.max() >= vocab_size):
                raise RuntimeError(f"the decoder produced word id {int(cand_ids.max())} outside the vocabulary "
                                   f"of {vocab_size} words: vocab.json does not match decoder_step.onnx")
            n, k = tokens.shape
            scores = top[:, :, None] + np.asarray(out.cand_logp, dtype=np.float32)  # float32 adds, like the reference
            dead = np.arange(k)[None, :] >= live[:, None]
            scores[dead] = -np.inf
            slot, word, score = _select(scores, cand_ids, beam)
            valid = np.arange(beam)[None, :] < live[:, None]
            rows = np.arange(n)[:, None]
            new_seqs = np.concatenate([seqs[rows, slot], word[:, :, None]], axis=2)  # (N, beam, t+1)
            ended = valid & (word == end)
            for r, j in zip(*np.nonzero(ended)):  # row-major: per image, in selection order
                done[ids[r]].append((float(score[r, j]), new_seqs[r, j], (step, int(j))))
            cont = valid & ~ended
            live = cont.sum(axis=1)
            # Compact the continuing hypotheses into slots 0..live-1 in selection order.
            r_idx, j_idx = np.nonzero(cont)
            p_idx = (np.cumsum(cont, axis=1) - 1)[r_idx, j_idx]
            tokens = np.full((n, beam), end, dtype=np.int64)  # dead slots: any valid id, their output is masked
            origin = np.zeros((n, beam), dtype=np.int64)
            top = np.full((n, beam), -np.inf, dtype=np.float32)
            picked = np.full((n, beam), -1, dtype=np.int64)  # slot p of the next step <- selection j
            tokens[r_idx, p_idx] = word[r_idx, j_idx]
            origin[r_idx, p_idx] = slot[r_idx, j_idx]
            top[r_idx, p_idx] = score[r_idx, j_idx]
            picked[r_idx, p_idx] = j_idx
            seqs = np.zeros_like(new_seqs)
            seqs[r_idx, p_idx] = new_seqs[r_idx, j_idx]
            if want_alpha:  # the attention that produced each selected word is its parent slot's
                trail.append(_StepRecord(ids, slot, np.asarray(out.alpha, dtype=np.float32)[rows, slot], picked))
            over = (live == 0) | (step >= max_steps)
            for r in np.nonzero(over)[0]:
                live_pick = (step, int(picked[r, 0]))  # slot 0: the best live hypothesis, if any
                results[ids[r]] = _finish(done[ids[r]], seqs[r, 0], top[r, 0], live_pick, trail, ids[r],
                                          length_penalty)
            if over.all():
                return
            if over.any():
                keep = np.nonzero(~over)[0].astype(np.int64)
                state = engine.select(state, keep)
                ids, live, top, seqs = ids[keep], live[keep], top[keep], seqs[keep]
                tokens, origin = tokens[keep], origin[keep]
    finally:
        engine.release(state)  # the current state: select() may have replaced it


class _StepRecord:
    """One step's back-pointers: rows' image ids (ascending), selected parent slots and their
    attention (N, beam[, P]) by selection index, and which selection each next-step slot holds."""

    __slots__ = ("ids", "slot", "alpha", "picked")

    def __init__(self, ids: np.ndarray, slot: np.ndarray, alpha: np.ndarray, picked: np.ndarray):
        self.ids, self.slot, self.alpha, self.picked = ids, slot, alpha, picked

    def row(self, image: int) -> int:
        return int(np.searchsorted(self.ids, image))


def _trace_attention(trail: list[_StepRecord], image: int, step: int, j: int) -> np.ndarray:
    """(step, P) attention of the hypothesis selected as j at `step`, following parents back to step 1."""
    out = []
    for u in range(step, 0, -1):
        rec = trail[u - 1]
        r = rec.row(image)
        out.append(rec.alpha[r, j])
        if u > 1:
            prev = trail[u - 2]
            j = int(prev.picked[prev.row(image), rec.slot[r, j]])
    return np.stack(out[::-1])


def _finish(done, live_seq, live_score, live_pick, trail, image, length_penalty) -> BeamResult:
    if done:
        ranked = [s / length_penalty_factor(len(seq), length_penalty) for s, seq, _ in done]
        score, seq, (step, j) = done[ranked.index(max(ranked))]
        alphas = _trace_attention(trail, image, step, j)[:-1] if trail else None  # <end>'s attention dropped
        return BeamResult(seq[:-1].tolist(), score, True, alphas)
    # Nothing completed: slot 0 is the first live hypothesis in selection order, the best one.
    alphas = _trace_attention(trail, image, *live_pick) if trail else None
    return BeamResult(live_seq.tolist(), float(live_score), False, alphas)
