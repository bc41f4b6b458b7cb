"""The runtime's own BLEU-4 and CIDEr-D equal nltk's corpus_bleu and pycocoevalcap's Cider on random corpora."""

from __future__ import annotations

import random
import warnings

import pytest

from captrt.runtime.verification.text_metrics import cider_d, corpus_bleu4

WORDS = "a red blue green circle square on the left right top two three big small".split()


def _corpus(rng: random.Random) -> tuple[list, list]:
    def caption() -> list[str]:
        return [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]

    refs = [[caption() for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 25))]
    hyps = [caption() if rng.random() < 0.5 else list(rng.choice(r)) for r in refs]
    return refs, hyps


@pytest.mark.parametrize("seed", range(12))
def test_bleu4_and_cider_match_the_reference_implementations(seed):
    from nltk.translate.bleu_score import corpus_bleu
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = _corpus(random.Random(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_bleu = corpus_bleu(refs, hyps)
    expected_cider = Cider().compute_score({i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)},
                                           {i: [" ".join(h)] for i, h in enumerate(hyps)})[0]
    assert corpus_bleu4(refs, hyps) == pytest.approx(expected_bleu, abs=1e-12)
    assert cider_d(refs, hyps) == pytest.approx(expected_cider, abs=1e-9)


def test_identical_captions_score_the_same_and_errors_are_named():
    refs = [[["a", "red", "circle", "on", "the", "left"]], [["two", "blue", "squares", "at", "the", "top"]]]
    hyps = [r[0] for r in refs]
    assert corpus_bleu4(refs, hyps) == pytest.approx(1.0)
    assert cider_d(refs, hyps) > 0
    assert corpus_bleu4(refs, [["x"], ["y"]]) == 0.0
    with pytest.raises(ValueError, match="2 reference sets but 1 hypotheses"):
        corpus_bleu4(refs, hyps[:1])
    with pytest.raises(ValueError, match="no hypotheses"):
        cider_d([], [])
