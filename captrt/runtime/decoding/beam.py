"""Batched beam search in numpy: N images x K slots per step, token-identical to the reference.

Semantics follow captrt.train.reference.reference_beam_search (the oracle) exactly:
- step 1 runs one slot per image (all of the reference's k rows are equal) and keeps its top k words;
- later steps rank cand = top_score + logp (float32 adds, like the reference) over every live slot
  and keep the top k, k shrinking by one for every hypothesis that emits <end>;
- ties are broken like the reference's topk over the flattened (slot, word) index: (-score, slot, word);
- completed hypotheses go to a pool in completion order (step, then selection order); the answer is
  the first maximum of score / GNMT penalty (raw score by default), or the best live hypothesis when
  nothing completed within max_steps. num_hypotheses > 1 returns the pool sorted that way (stable),
  then the best live hypotheses (unfinished) if the pool is short.

With decoding controls (LogitRules) the step graph processes each slot's logits first (see
processing.py), and a prefix is forced word by word from <start> before the beam opens.

Fixed shapes: every step after the first has K = beam_size slots per image; slots of hypotheses that
ended are dead (masked with -inf, fed a dummy token). Images whose search is over leave the batch,
so N shrinks and the engine drops their features/att_proj/h/c rows.
"""

from __future__ import annotations

import numpy as np

from captrt.runtime.decoding.hypotheses import BeamResult, Hypothesis, length_penalty_factor
from captrt.runtime.decoding.options import LogitRules
from captrt.runtime.decoding.processing import step_controls
from captrt.runtime.decoding.trail import StepRecord, trace_attention
from captrt.runtime.engines.base import DecodeState, Engine


def _descending_key(scores: np.ndarray) -> np.ndarray:
    """uint64 keys (in the high 32 bits) that sort float32 scores in descending order (-inf last)."""
    # + 0.0 turns -0.0 into +0.0: equal scores must get equal keys, as they compare equal in topk.
    bits = np.ascontiguousarray(scores + np.float32(0.0), dtype=np.float32).view(np.uint32)
    ascending = np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))
    return (~ascending).astype(np.uint64) << np.uint64(32)


def _select(scores: np.ndarray, cand_ids: np.ndarray, keep: int):
    """Rank every image's candidates and return the first `keep` per image.

    scores: float32 (N, K, C) with dead slots at -inf; cand_ids int64 (N, K, C).
    Returns slot, word, score, flat candidate index (N, keep) in selection order; entries past an
    image's live count are padding. Order within an image: score descending, then slot, then word id
    -- the order of the flattened index slot * V + word that the reference's topk sees.
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
    return slot[rows, order], words[rows, order], flat[rows, order], order


class _Prefixed:
    """The search state after forcing a prefix: (N, 1) slots, the words, their scores, attention records."""

    def __init__(self, n: int, start: int):
        self.tokens = np.full((n, 1), start, dtype=np.int64)  # next step's input word per slot
        self.top = np.zeros((n, 1), dtype=np.float32)  # cumulative score
        self.seqs = np.zeros((n, 1, 0), dtype=np.int64)  # (N, 1, t) words so far
        self.token_scores = np.zeros((n, 1, 0), dtype=np.float32)
        self.trail: list[StepRecord] = []


def force_prefix(engine: Engine, state: DecodeState, prefix, rules: LogitRules | None, start: int,
                 want_alpha: bool) -> _Prefixed:
    """Run one step per prefix word with K = 1, scoring each forced word's processed log-prob."""
    n = state.batch
    out = _Prefixed(n, start)
    rows = np.arange(n)
    for word in prefix:
        controls = step_controls(rules, out.seqs) if rules is not None else None
        step = engine.step(state, out.tokens, np.zeros((n, 1), dtype=np.int64), want_alpha=want_alpha,
                           controls=controls, want_logp=True)
        logp = np.asarray(step.logp, dtype=np.float32)[rows, 0, word][:, None]  # (N, 1)
        out.top = out.top + logp  # float32 adds, like the reference
        out.seqs = np.concatenate([out.seqs, np.full((n, 1, 1), word, dtype=np.int64)], axis=2)
        out.token_scores = np.concatenate([out.token_scores, logp[:, :, None]], axis=2)
        out.tokens = np.full((n, 1), word, dtype=np.int64)
        if want_alpha:
            zero = np.zeros((n, 1), dtype=np.int64)
            out.trail.append(StepRecord(rows, zero, np.asarray(step.alpha, dtype=np.float32), zero))
    return out


def beam_search(engine: Engine, images: np.ndarray, *, start: int, end: int, vocab_size: int,
                beam_size: int = 5, max_steps: int = 50, length_penalty: float = 0.0,
                return_attention: bool = False, num_hypotheses: int = 1, rules: LogitRules | None = None,
                return_scores: bool = False) -> list[BeamResult]:
    """Caption a batch. images: uint8 (N, S, S, 3). Returns one BeamResult per image, in order.

    rules: the logit processing and prefix (None or inactive rules: the seed's search, exactly).
    """
    if not 1 <= beam_size <= engine.max_beam:
        raise ValueError(f"beam_size must be between 1 and {engine.max_beam} (the model's max_beam), got {beam_size}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 1 <= num_hypotheses <= beam_size:
        raise ValueError(f"num_hypotheses must be between 1 and beam_size={beam_size}, got {num_hypotheses}")
    if rules is not None and len(rules.prefix) >= max_steps:
        raise ValueError(f"a prefix of {len(rules.prefix)} words leaves no step of max_steps={max_steps}")
    total = images.shape[0]
    results: list[BeamResult | None] = [None] * total
    if total == 0:
        return []
    state = engine.encode(images)
    search = _Search(engine, results, start, end, vocab_size, beam_size, max_steps, length_penalty, return_attention,
                     num_hypotheses, rules, return_scores)
    search.run(state)
    return results  # type: ignore[return-value]


class _Search:
    """One batched search; `run` fills results[i] for every image of the state."""

    def __init__(self, engine: Engine, results: list, start: int, end: int, vocab_size: int, beam: int,
                 max_steps: int, length_penalty: float, want_alpha: bool, num_hypotheses: int,
                 rules: LogitRules | None, want_scores: bool):
        self.engine, self.results, self.start, self.end, self.vocab_size = engine, results, start, end, vocab_size
        self.beam, self.max_steps, self.length_penalty, self.want_alpha = beam, max_steps, length_penalty, want_alpha
        self.num_hypotheses = num_hypotheses
        self.rules = rules if rules is not None and (rules.active or rules.prefix) else None
        self.processing = self.rules is not None and self.rules.active
        self.want_scores = want_scores

    def run(self, state: DecodeState) -> None:
        engine, beam, end = self.engine, self.beam, self.end
        total = state.batch
        try:
            prefix = self.rules.prefix if self.rules is not None else ()
            forced = force_prefix(engine, state, prefix, self.rules, self.start, self.want_alpha)
            ids = np.arange(total)  # original index of each row still in the batch (stays ascending)
            live = np.full(total, beam, dtype=np.int64)  # hypotheses alive per image (the reference's k)
            top, tokens, seqs = forced.top, forced.tokens, forced.seqs  # (N, 1), (N, 1), (N, 1, t)
            tok = forced.token_scores  # (N, K, t) float32 processed log-prob of each word so far
            origin = np.zeros((total, 1), dtype=np.int64)
            # Attention is kept as per-step back-pointers and traced back only for the chosen hypothesis:
            # copying whole (N, K, t, P) histories every step would cost O(t^2).
            trail = forced.trail
            done: list[list[tuple[float, np.ndarray, np.ndarray, tuple[int, int]]]] = [[] for _ in range(total)]
            for step in range(len(prefix) + 1, self.max_steps + 1):
                # The default path calls step exactly as before the controls existed (no extra arguments).
                extra = {"controls": step_controls(self.rules, seqs)} if self.processing else {}
                out = engine.step(state, tokens, origin, want_alpha=self.want_alpha, **extra)
                cand_ids = np.asarray(out.cand_ids, dtype=np.int64)
                if cand_ids.size and (cand_ids.min() < 0 or cand_ids.max() >= self.vocab_size):
                    raise RuntimeError(f"the decoder produced word id {int(cand_ids.max())} outside the vocabulary "
                                       f"of {self.vocab_size} words: vocab.json does not match decoder_step.onnx")
                n, k = tokens.shape
                cand_logp = np.asarray(out.cand_logp, dtype=np.float32)
                if self.processing:  # a slot with every word banned has NaN log-probs: rank them as -inf
                    cand_logp = np.where(np.isnan(cand_logp), np.float32(-np.inf), cand_logp)
                scores = top[:, :, None] + cand_logp  # float32 adds, like the reference
                dead = np.arange(k)[None, :] >= live[:, None]
                scores[dead] = -np.inf
                slot, word, score, flat = _select(scores, cand_ids, beam)
                valid = np.arange(beam)[None, :] < live[:, None]
                rows = np.arange(n)[:, None]
                new_seqs = np.concatenate([seqs[rows, slot], word[:, :, None]], axis=2)  # (N, beam, t+1)
                new_tok = None
                if self.want_scores:
                    picked_logp = cand_logp.reshape(n, -1)[rows, flat]  # (N, beam)
                    new_tok = np.concatenate([tok[rows, slot], picked_logp[:, :, None]], axis=2)
                ended = valid & (word == end)
                for r, j in zip(*np.nonzero(ended)):  # row-major: per image, in selection order
                    scores_j = new_tok[r, j] if new_tok is not None else None
                    done[ids[r]].append((float(score[r, j]), new_seqs[r, j], scores_j, (step, int(j))))
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
                if new_tok is not None:
                    tok = np.zeros_like(new_tok)
                    tok[r_idx, p_idx] = new_tok[r_idx, j_idx]
                if self.want_alpha:  # the attention that produced each selected word is its parent slot's
                    trail.append(StepRecord(ids, slot, np.asarray(out.alpha, dtype=np.float32)[rows, slot], picked))
                over = (live == 0) | (step >= self.max_steps)
                for r in np.nonzero(over)[0]:
                    self.results[ids[r]] = self._finish(done[ids[r]], r, int(live[r]), seqs, top,
                                                        tok if new_tok is not None else None, step, picked,
                                                        trail, ids[r])
                if over.all():
                    return
                if over.any():
                    keep = np.nonzero(~over)[0].astype(np.int64)
                    state = engine.select(state, keep)
                    ids, live, top, seqs = ids[keep], live[keep], top[keep], seqs[keep]
                    tokens, origin = tokens[keep], origin[keep]
                    if new_tok is not None:
                        tok = tok[keep]
        finally:
            engine.release(state)  # the current state: select() may have replaced it

    def _finish(self, done, r: int, live: int, seqs, top, tok, step: int, picked, trail, image: int) -> BeamResult:
        """The image's hypotheses: the pool by ranking score (stable), then live slots in selection order."""
        ranked = [s / length_penalty_factor(len(seq), self.length_penalty) for s, seq, _, _ in done]
        order = sorted(range(len(done)), key=lambda i: -ranked[i])  # stable: first maximum first
        hyps: list[Hypothesis] = []
        picks: list[tuple[int, int, bool]] = []
        for i in order[:self.num_hypotheses]:
            score, seq, scores, pick = done[i]
            hyps.append(Hypothesis(seq[:-1].tolist(), score, True, None if scores is None else scores.tolist()))
            picks.append((*pick, True))
        for p in range(min(live, self.num_hypotheses - len(hyps))):
            scores = None if tok is None else tok[r, p].tolist()
            hyps.append(Hypothesis(seqs[r, p].tolist(), float(top[r, p]), False, scores))
            picks.append((step, int(picked[r, p]), False))
        alphas = None
        if trail and hyps:
            at_step, j, finished = picks[0]
            alphas = trace_attention(trail, image, at_step, j)
            if finished:
                alphas = alphas[:-1]  # <end>'s attention dropped
        return BeamResult.of(hyps, alphas)

