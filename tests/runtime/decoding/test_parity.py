"""Token parity of the ONNX Runtime engine's batched beam search with the PyTorch reference.

The oracle is captrt.train.reference (one image at a time, the seed's algorithm). The grid of
beams x batch sizes reuses each image's real encoder.onnx output (computed once) so that 60 images
x 12 configurations stay fast; the decoder steps and the search run for real every time. The
Captioner end-to-end tests below encode for real.
"""

from __future__ import annotations

import numpy as np
import pytest

from captrt.runtime import Captioner
from captrt.runtime.decoding.beam import beam_search
from captrt.runtime.engines import create_engine
from captrt.runtime.engines.base import Engine
from captrt.runtime.engines.ort import HostState
from captrt.runtime.model_dir import ModelDir
from tests.conftest import random_images
from tests.runtime.reference_helpers import reference_results

BEAMS = (1, 3, 5, 10)
BATCHES = (1, 4, 16)
N_IMAGES = 52


class CachedEncoderEngine(Engine):
    """The ORT engine with encode() served from a table of its own earlier encoder outputs."""

    name = "ort-cached"

    def __init__(self, inner, images: np.ndarray):
        super().__init__(inner.model)
        self.inner = inner
        self.rows = {}
        for s in range(0, len(images), 16):
            st = inner.encode(images[s:s + 16])
            for j in range(st.batch):
                self.rows[images[s + j].tobytes()] = (st.features[j], st.att_proj[j], st.h[j], st.c[j])

    @property
    def provider(self):
        return self.inner.provider

    def encode(self, images):
        parts = [self.rows[img.tobytes()] for img in images]
        f, a, h, c = (np.stack(x) for x in zip(*parts))
        return HostState(batch=len(images), beams=1, features=f, att_proj=a, h=h, c=c)

    def step(self, state, tokens, origin, *, want_alpha=False):
        return self.inner.step(state, tokens, origin, want_alpha=want_alpha)

    def select(self, state, rows):
        return self.inner.select(state, rows)


@pytest.fixture(scope="module")
def images():
    return random_images(N_IMAGES, seed=7)


@pytest.fixture(scope="module")
def reference(varied_checkpoint, images):
    return reference_results(varied_checkpoint, images, BEAMS)


@pytest.fixture(scope="module")
def model(varied_model_dir):
    return ModelDir.load(varied_model_dir)


@pytest.fixture(scope="module")
def cached_engine(model, images):
    return CachedEncoderEngine(create_engine("ort", model, threads=2), images)


def run_search(engine, model, images, beam, batch, **kw):
    v = model.vocab
    out = []
    for s in range(0, len(images), batch):
        out += beam_search(engine, images[s:s + batch], start=v.start, end=v.end, vocab_size=len(v),
                           beam_size=beam, **kw)
    return out


def test_models_are_interesting(reference):
    """The test model must exercise the search: varied lengths, captions differing per image."""
    for beam in BEAMS:
        lengths = [len(r.tokens) for r in reference[beam]]
        assert all(r.finished for r in reference[beam])
        assert len(set(lengths)) >= 8, lengths
        assert len({tuple(r.tokens) for r in reference[beam]}) >= N_IMAGES * 0.8
    # Wider beams find different (better-scoring) captions for some images.
    assert sum(a.tokens != b.tokens for a, b in zip(reference[1], reference[5])) >= 5


@pytest.mark.parametrize("beam", BEAMS)
@pytest.mark.parametrize("batch", BATCHES)
def test_token_parity(cached_engine, model, images, reference, beam, batch):
    results = run_search(cached_engine, model, images, beam, batch, return_attention=True)
    assert len(results) == N_IMAGES
    for i, (r, ref) in enumerate(zip(results, reference[beam])):
        assert r.tokens == ref.tokens, f"image {i}, beam {beam}, batch {batch}"
        assert r.finished == ref.finished
        assert r.score == pytest.approx(ref.score, abs=1e-3)
        assert r.alphas.shape == (len(r.tokens), model.num_pixels)
        np.testing.assert_allclose(r.alphas, ref.alphas.numpy(), atol=1e-4)
        np.testing.assert_allclose(r.alphas.sum(axis=1), 1.0, atol=1e-5)


def test_length_penalty_parity(cached_engine, model, images, varied_checkpoint):
    ref = reference_results(varied_checkpoint, images[:16], (5,), length_penalty=1.0)[5]
    plain = run_search(cached_engine, model, images[:16], 5, 8)
    results = run_search(cached_engine, model, images[:16], 5, 8, length_penalty=1.0)
    assert [r.tokens for r in results] == [r.tokens for r in ref]
    # The penalty must matter on this model (longer captions win somewhere), or the test proves nothing.
    assert any(a.tokens != b.tokens for a, b in zip(results, plain))


def test_max_steps_parity(cached_engine, model, images, varied_checkpoint):
    """A small max_steps cuts some searches before any <end>: best live hypothesis, finished False."""
    ref = reference_results(varied_checkpoint, images[:16], (3,), max_steps=4)[3]
    results = run_search(cached_engine, model, images[:16], 3, 16, max_steps=4)
    assert [(r.tokens, r.finished) for r in results] == [(r.tokens, r.finished) for r in ref]
    assert {r.finished for r in results} == {True, False}


@pytest.mark.parametrize("beam,batch", [(5, 4), (3, 16)])
def test_captioner_end_to_end_parity(varied_model_dir, images, reference, beam, batch):
    """The whole path: uint8 arrays -> preprocess -> encoder.onnx -> search, no cached encodes."""
    captioner = Captioner.load(varied_model_dir, threads=2)
    caps = captioner.caption(images[:20], beam_size=beam, batch_size=batch, return_attention=True)
    for i, (c, ref) in enumerate(zip(caps, reference[beam][:20])):
        assert c.error is None
        assert c.tokens == ref.tokens, f"image {i}"
        assert c.text == " ".join(captioner.vocab.decode(ref.tokens))
        assert c.finished
        assert c.attention.shape == (len(c.tokens), model_grid(captioner), model_grid(captioner))
        assert c.attention.dtype == np.float32
        np.testing.assert_allclose(c.attention.sum(axis=(1, 2)), 1.0, atol=1e-5)


def model_grid(captioner):
    return captioner.model.grid
