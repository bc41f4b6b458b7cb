"""A model whose <end> never wins (end_bias -1e4): every search runs to max_steps with nothing completed."""

from __future__ import annotations

import pytest

from captrt.runtime import Captioner
from tests.conftest import random_images
from tests.runtime.reference_helpers import reference_results

BEAMS = (1, 3, 5, 10)


@pytest.fixture(scope="module")
def images():
    return random_images(8, seed=5)


@pytest.fixture(scope="module")
def captioner(endless_model_dir):
    return Captioner.load(endless_model_dir, threads=1)


@pytest.mark.parametrize("max_steps", [50, 7])
def test_best_live_hypothesis_matches_reference(captioner, endless_checkpoint, images, max_steps):
    reference = reference_results(endless_checkpoint, images, BEAMS, max_steps=max_steps)
    for beam in BEAMS:
        caps = captioner.caption(images, beam_size=beam, max_steps=max_steps, batch_size=4, return_attention=True)
        for i, (c, ref) in enumerate(zip(caps, reference[beam])):
            assert not ref.finished
            assert c.tokens == ref.tokens, f"image {i}, beam {beam}"
            assert not c.finished and c.error is None
            assert len(c.tokens) == max_steps  # every step's word, no <end>
            assert c.score == pytest.approx(ref.score, abs=1e-3)
            assert c.attention.shape[0] == max_steps
    assert len({tuple(c.tokens) for c in caps}) > 1  # the images still get different captions
