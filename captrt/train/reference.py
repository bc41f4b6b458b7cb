"""The PyTorch reference beam search: the seed's `generate_image_caption`, one image at a time.

This is the correctness oracle (the runtime must match it token for token) and the speed baseline
users have today: like the seed, the attention module re-projects the features for every beam at
every step. Two deliberate differences from the seed, both documented in the README:
- `max_steps` is the number of decoder steps; the seed's `if step > 50: break` runs 51, so the
  seed is `max_steps=51`.
- when no hypothesis reaches <end>, the best live one is returned (the seed crashes on max([])).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captrt.runtime.beam import length_penalty_factor  # one definition, torch-free
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
