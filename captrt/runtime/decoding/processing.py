"""Host side of the logit processing: each live slot's banned and penalized word ids for one step.

The step graph applies them where the logits are (docs/model-format.md, format version 2), before its
top-C selection, so the search over the candidates stays exact:
1. repetition penalty theta on every distinct word the hypothesis generated (prefix included):
   l / theta if l > 0 else l * theta;
2. -inf for banned words: suppress, <unk> (disable_unk), <end> while the hypothesis has fewer than
   min_length words, and each word that would repeat an n-gram (no_repeat_ngram_size);
3. log_softmax.
Lists are padded with V (the graph's padding column, always -inf), so every slot of a batch shares one
width and a slot's result never depends on the other slots'; a banned word is left out of the
penalized list (the graph writes both lists in one scatter).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from captrt.runtime.decoding.options import LogitRules
from captrt.runtime.engines.base import StepControls


def neutral_controls(n: int, k: int, vocab_size: int) -> StepControls:
    """Controls that change nothing (the default path): one padding id each, theta = 1."""
    return StepControls.neutral(n, k, vocab_size)


def neutral_feeds(n: int, k: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The control inputs of a format-2 step graph on the default path, for callers that run it directly."""
    return neutral_controls(n, k, vocab_size).feeds()


def step_controls(rules: LogitRules, seqs: np.ndarray) -> StepControls:
    """seqs: int64 (N, K, t), the words each slot generated so far -> this step's StepControls."""
    n, k, t = seqs.shape
    v = rules.vocab_size
    parts = []
    if rules.banned.size:
        parts.append(np.broadcast_to(rules.banned, (n, k, rules.banned.size)))
    if t < rules.min_length:
        parts.append(np.full((n, k, 1), rules.end, dtype=np.int64))
    g = rules.no_repeat_ngram_size
    if g and t >= g:
        windows = sliding_window_view(seqs, g, axis=2)  # (N, K, t-g+1, g): every n-gram of each slot
        context = seqs[:, :, t - g + 1:]  # (N, K, g-1): the words the next n-gram would start with
        match = (windows[..., :-1] == context[:, :, None, :]).all(axis=3)  # (N, K, t-g+1)
        parts.append(np.where(match, windows[..., -1], v))
    ban = np.concatenate(parts, axis=2) if parts else np.full((n, k, 1), v, dtype=np.int64)
    if rules.repetition_penalty != 1.0 and t:
        words = np.sort(seqs, axis=2)  # (N, K, t): repeats made adjacent, then padded out
        words[:, :, 1:][words[:, :, 1:] == words[:, :, :-1]] = v
        # Banned words are -inf whatever their penalty: leaving them out keeps the graph's one scatter exact.
        words[(words[:, :, :, None] == ban[:, :, None, :]).any(axis=3)] = v
        penalty = np.full(n, rules.repetition_penalty, dtype=np.float32)
    else:
        words, penalty = np.full((n, k, 1), v, dtype=np.int64), np.ones(n, dtype=np.float32)
    return StepControls(np.ascontiguousarray(ban, dtype=np.int64), np.ascontiguousarray(words, dtype=np.int64),
                        penalty)
