"""The PyTorch reference beam search: the seed's `generate_image_caption`, one image at a time.

This is the correctness oracle (the runtime must match it token for token) and the speed baseline
users have today: like the seed, the attention module re-projects the features for every beam at
every step. Two deliberate differences from the seed, both documented in docs/training.md:
- `max_steps` is the number of decoder steps; the seed's `if step > 50: break` runs 51, so the
  seed is `max_steps=51`.
- when no hypothesis reaches <end>, the best live one is returned (the seed crashes on max([])).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captrt.runtime.decoding.hypotheses import length_penalty_factor  # one definition, torch-free
from captrt.train.model import CaptionModel


@dataclass
class ReferenceResult:
    tokens: list[int]  # generated ids without <start> and <end>
    score: float  # cumulative log-probability of the chosen sequence (incl. <end> when finished)
    finished: bool  # False when max_steps ended the search with no <end>
    alphas: torch.Tensor  # (T, P): attention that produced each token in `tokens`


@torch.no_grad()
def reference_beam_search(model: CaptionModel, image: torch.Tensor, start: int, end: int, beam_size: int = 5,
                          max_steps: int = 50, length_penalty: float = 0.0) -> ReferenceResult:
    """image: normalized (3, S, S) float tensor. Follows the seed step by step."""
    encoder_out = model.encoder(image.unsqueeze(0))  # (1, P, E)
    return reference_beam_search_features(model.decoder, encoder_out, start, end, beam_size, max_steps, length_penalty)


@torch.no_grad()
def reference_beam_search_features(decoder, encoder_out: torch.Tensor, start: int, end: int, beam_size: int = 5,
                                   max_steps: int = 50, length_penalty: float = 0.0) -> ReferenceResult:
    """The same search from precomputed encoder features (1, P, E) (used by validation during training)."""
    if beam_size < 1 or max_steps < 1:
        raise ValueError("beam_size and max_steps must be >= 1")
    k = beam_size
    num_pixels, encoder_dim = encoder_out.shape[1:]
    vocab_size = decoder.vocab_size
    encoder_out = encoder_out.expand(k, num_pixels, encoder_dim)  # (k, P, E)
    prev_words = torch.full((k,), start, dtype=torch.long)  # (k,)
    seqs = prev_words.unsqueeze(1)  # (k, 1)
    seq_alphas = torch.zeros(k, 0, num_pixels)  # (k, t, P)
    top_scores = torch.zeros(k, 1)  # (k, 1)
    done_seqs: list[list[int]] = []
    done_alphas: list[torch.Tensor] = []
    done_scores: list[float] = []
    h, c = decoder.init_hidden_state(encoder_out)  # (k, H)
    step = 1
    while True:
        h, c, logits, alpha = decoder.step(prev_words, encoder_out, None, h, c)
        scores = top_scores.expand_as(logits) + F.log_softmax(logits, dim=1)  # (s, V)
        if step == 1:
            top_scores_flat, top_words = scores[0].topk(k, 0, True, True)  # all rows are equal
        else:
            top_scores_flat, top_words = scores.view(-1).topk(k, 0, True, True)
        prev_inds = torch.div(top_words, vocab_size, rounding_mode="floor")  # (s,)
        next_words = top_words % vocab_size  # (s,)
        seqs = torch.cat([seqs[prev_inds], next_words.unsqueeze(1)], dim=1)  # (s, step + 1)
        seq_alphas = torch.cat([seq_alphas[prev_inds], alpha[prev_inds].unsqueeze(1)], dim=1)
        incomplete = [i for i, w in enumerate(next_words.tolist()) if w != end]
        complete = [i for i in range(len(next_words)) if i not in incomplete]
        for i in complete:
            done_seqs.append(seqs[i].tolist())
            done_alphas.append(seq_alphas[i])
            done_scores.append(float(top_scores_flat[i]))
        k -= len(complete)
        if k == 0 or step >= max_steps:
            break
        seqs, seq_alphas = seqs[incomplete], seq_alphas[incomplete]
        keep = prev_inds[incomplete]
        h, c, encoder_out = h[keep], c[keep], encoder_out[keep]
        top_scores = top_scores_flat[incomplete].unsqueeze(1)
        prev_words = next_words[incomplete]
        step += 1

    if done_seqs:
        ranked = [s / length_penalty_factor(len(q) - 1, length_penalty) for s, q in zip(done_scores, done_seqs)]
        best = ranked.index(max(ranked))
        seq, alphas, score, finished = done_seqs[best], done_alphas[best], done_scores[best], True
        tokens, alphas = seq[1:-1], alphas[:-1]  # drop <start> and <end> (and <end>'s attention)
    else:
        # Nothing completed within max_steps: the live beams are sorted, the first is the best.
        best = incomplete[0]
        seq, alphas, score, finished = seqs[best].tolist(), seq_alphas[best], float(top_scores_flat[best]), False
        tokens = seq[1:]
    return ReferenceResult(tokens=tokens, score=score, finished=finished, alphas=alphas)


# ---- every decoding option, written plainly: the oracle for captrt.runtime.decoding ------------------------


@dataclass
class ReferenceHypothesis:
    tokens: list[int]  # generated ids without <start>/<end>, prefix included
    score: float  # float32 sum of token_scores, in order
    finished: bool
    token_scores: list[float]  # processed log-prob of each word, then of <end> when finished


def _processed_logp(logits: torch.Tensor, histories: list[list[int]], opts, vocab) -> torch.Tensor:
    """logits (s, V), each row's generated words -> processed log_softmax (s, V), one row at a time."""
    out = logits.clone()
    theta = torch.tensor(opts.repetition_penalty, dtype=torch.float32)
    for row, words in enumerate(histories):
        line = out[row]
        if opts.repetition_penalty != 1.0:
            for w in set(words):
                line[w] = line[w] / theta if line[w] > 0 else line[w] * theta
        banned = {vocab.word2id[w] for w in opts.suppress}
        if opts.disable_unk:
            banned.add(vocab.unk)
        if len(words) < opts.min_length:
            banned.add(vocab.end)
        n = opts.no_repeat_ngram_size
        if n and len(words) >= n:
            context = words[len(words) - n + 1:]
            for i in range(len(words) - n + 1):
                if words[i:i + n - 1] == context:
                    banned.add(words[i + n - 1])
        for w in banned:
            line[w] = float("-inf")
    return F.log_softmax(out, dim=1)


@torch.no_grad()
def reference_decode(model: CaptionModel, pixels, vocab, opts, features: torch.Tensor | None = None
                     ) -> list[ReferenceHypothesis]:
    """pixels: uint8 (S, S, 3) array; opts: captrt.runtime.decoding.DecodingOptions (checked);
    features: model.encoder's (1, P, E) for these pixels, if already computed.
    Returns num_hypotheses hypotheses: the seed's beam search over processed log-probs, or samples."""
    import numpy as np

    from captrt.train.model import normalize_uint8

    enc = features if features is not None else model.encoder(
        normalize_uint8(torch.from_numpy(np.ascontiguousarray(pixels))[None]))  # (1, P, E)
    dec = model.decoder
    h, c = dec.init_hidden_state(enc)
    prev, words, scores = vocab.start, [], []
    total = torch.zeros((), dtype=torch.float32)
    for w in (vocab.word2id[t] for t in opts.prefix):  # forced words, scored
        h, c, logits, _ = dec.step(torch.tensor([prev]), enc, None, h, c)
        lp = _processed_logp(logits, [words], opts, vocab)[0, w]
        total, prev = total + lp, w
        words, scores = words + [w], scores + [float(lp)]
    if opts.sample:
        return [_reference_sample(dec, enc, h, c, prev, list(words), list(scores), total, pixels, vocab, opts, s)
                for s in range(opts.num_hypotheses)]
    return _reference_beam(dec, enc, h, c, prev, words, scores, total, vocab, opts)


def _reference_beam(dec, enc, h, c, prev, prefix, prefix_scores, total, vocab, opts) -> list[ReferenceHypothesis]:
    k = opts.beam_size
    enc = enc.expand(k, *enc.shape[1:])
    h, c = h.expand(k, -1), c.expand(k, -1)
    prev_words = torch.full((k,), prev, dtype=torch.long)
    seqs = [list(prefix) for _ in range(k)]
    seq_scores = [list(prefix_scores) for _ in range(k)]
    top_scores = torch.full((k, 1), float(total), dtype=torch.float32)
    done: list[ReferenceHypothesis] = []
    step, first = len(prefix) + 1, True
    while True:
        h, c, logits, _ = dec.step(prev_words, enc, None, h, c)
        logp = _processed_logp(logits, seqs, opts, vocab)
        scores = top_scores.expand_as(logp) + logp
        if first:
            top_flat, top_words = scores[0].topk(k, 0, True, True)
        else:
            top_flat, top_words = scores.view(-1).topk(k, 0, True, True)
        parents = (top_words // logp.shape[1]).tolist()
        nexts = (top_words % logp.shape[1]).tolist()
        new_seqs = [seqs[p] + [w] for p, w in zip(parents, nexts)]
        new_scores = [seq_scores[p] + [float(logp[p, w])] for p, w in zip(parents, nexts)]
        incomplete = [i for i, w in enumerate(nexts) if w != vocab.end]
        for i, w in enumerate(nexts):
            if w == vocab.end:
                done.append(ReferenceHypothesis(new_seqs[i][:-1], float(top_flat[i]), True, new_scores[i]))
        k -= len(nexts) - len(incomplete)
        if k == 0 or step >= opts.max_steps:
            break
        seqs = [new_seqs[i] for i in incomplete]
        seq_scores = [new_scores[i] for i in incomplete]
        keep = torch.tensor([parents[i] for i in incomplete])
        h, c, enc = h[keep], c[keep], enc[keep]
        top_scores = top_flat[incomplete].unsqueeze(1)
        prev_words = torch.tensor([nexts[i] for i in incomplete])
        step, first = step + 1, False
    ranked = [d.score / length_penalty_factor(len(d.tokens) + 1, opts.length_penalty) for d in done]
    pool = [done[i] for i in sorted(range(len(done)), key=lambda i: -ranked[i])]
    pool += [ReferenceHypothesis(new_seqs[i], float(top_flat[i]), False, new_scores[i]) for i in incomplete]
    return pool[:opts.num_hypotheses]


def _reference_sample(dec, enc, h, c, prev, words, scores, total, pixels, vocab, opts, sample) -> ReferenceHypothesis:
    """One sample, one word at a time, with the random stream docs/decoding.md ("What a step computes") documents."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).digest()
    key = [int.from_bytes(digest[4 * i:4 * i + 4], "little") for i in range(4)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy=opts.seed, spawn_key=(*key, sample))))
    for _ in range(len(words) + 1, opts.max_steps + 1):
        h, c, logits, _ = dec.step(torch.tensor([prev]), enc, None, h, c)
        logp = _processed_logp(logits, [words], opts, vocab)[0]
        x = logp.double() / opts.sampling_temperature
        order = torch.sort(x, descending=True, stable=True).indices
        if opts.sampling_topk:
            order = order[:opts.sampling_topk]
        order = order[torch.isfinite(x[order])]
        p = torch.exp(x[order] - x[order[0]])
        p = p / p.sum()
        if opts.sampling_topp < 1.0:
            reached = (torch.cumsum(p, 0) >= opts.sampling_topp).nonzero()
            head = int(reached[0]) + 1 if len(reached) else len(p)
            order, p = order[:head], p[:head] / p[:head].sum()
        above = (torch.cumsum(p, 0) > rng.random()).nonzero()
        w = int(order[int(above[0]) if len(above) else len(order) - 1])
        total = total + logp[w]
        scores.append(float(logp[w]))
        if w == vocab.end:
            return ReferenceHypothesis(words, float(total), True, scores)
        words, prev = words + [w], w
    return ReferenceHypothesis(words, float(total), False, scores)
