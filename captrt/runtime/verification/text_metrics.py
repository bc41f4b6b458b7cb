"""Corpus BLEU-4 and CIDEr-D in plain Python: the quality budget is judged where the model runs.

The runtime verifies a precision on the machine at hand (captrt.runtime.verification.verify) without nltk or
pycocoevalcap, so both metrics are written here from their definitions:

- BLEU-4 (Papineni et al. 2002), corpus level: clipped n-gram matches summed over the corpus for
  n = 1..4, geometric mean of the four precisions, brevity penalty against the reference length
  closest to each hypothesis (ties: the shorter). No smoothing: equal to nltk's corpus_bleu
  (method0, including its rule that a caption shorter than n contributes one n-gram to the
  denominator) and so to the seed's metric; a corpus with no 4-gram match scores 0.
- CIDEr-D (Vedantam et al. 2015, as the COCO caption evaluation computes it): tf-idf n-gram vectors
  (n = 1..4) with idf over the given images' references, clipped cosine similarity, a Gaussian
  length penalty (sigma 6), averaged over n and over references, times 10. The length the penalty
  compares is the COCO code's (it counts the caption's bigrams), so scores match the published ones.

Captions are lists of words (already tokenized); the tests check both against nltk/pycocoevalcap.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

Words = Sequence[str]


def _ngrams(words: Words, n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu4(references: Sequence[Sequence[Words]], hypotheses: Sequence[Words]) -> float:
    """BLEU-4 of hypotheses[i] against references[i] (>= 1 word list each), corpus level, in [0, 1]."""
    if len(references) != len(hypotheses):
        raise ValueError(f"corpus_bleu4: {len(references)} reference sets but {len(hypotheses)} hypotheses")
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses):
        if not refs:
            raise ValueError("corpus_bleu4: every hypothesis needs at least one reference")
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)  # elementwise max: the clip of each n-gram
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 1)  # nltk counts a too-short caption as 1 n-gram
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def cider_d(references: Sequence[Sequence[Words]], hypotheses: Sequence[Words], sigma: float = 6.0) -> float:
    """CIDEr-D of the corpus (mean over images); idf from these images' references. Needs >= 2 images to mean much."""
    if len(references) != len(hypotheses):
        raise ValueError(f"cider_d: {len(references)} reference sets but {len(hypotheses)} hypotheses")
    if not hypotheses:
        raise ValueError("cider_d: no hypotheses to score")
    ref_grams = [[_all_ngrams(r) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for grams in ref_grams:  # an n-gram counts once per image, whatever its references say
        doc_freq.update(set().union(*grams) if grams else set())
    log_images = math.log(float(len(references)))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[n][gram] = weight
            norm[n] += weight * weight
            if n == 1:  # the COCO code's "length": its bigram count (kept so scores are comparable)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, grams in zip(hypotheses, ref_grams):
        vh, nh, lh = vector(_all_ngrams(hyp))
        total = [0.0] * 4
        for g in grams:
            vr, nr, lr = vector(g)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(w, vr[n].get(gram, 0.0)) * vr[n].get(gram, 0.0) for gram, w in vh[n].items())
                if nh[n] != 0 and nr[n] != 0:
                    dot /= nh[n] * nr[n]
                total[n] += dot * penalty
        scores.append(10.0 * (sum(total) / 4) / max(len(grams), 1))
    return sum(scores) / len(scores)


def _all_ngrams(words: Words) -> Counter:
    out: Counter = Counter()
    for n in range(1, 5):
        out.update(_ngrams(list(words), n))
    return out
