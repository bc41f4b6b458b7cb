"""Unit tests of the batched search on a table-driven engine (exact, hand-checkable log-probs).

Parity with the PyTorch reference on real models is in test_parity.py / test_no_end.py; here the
corner cases are pinned down with numbers chosen by hand: ties, dead slots, the completion pool.
"""

from __future__ import annotations

import numpy as np
import pytest

from captrt.runtime.decoding.beam import _select, beam_search, length_penalty_factor
from captrt.runtime.engines.base import DecodeState, Engine, StepOutput

START, END, V = 5, 4, 6


class MarkovEngine(Engine):
    """log p(next word | last word) from a (V, V) table; same for every image and slot.

    A real engine of the interface (state = nothing but the batch size), so the search's
    bookkeeping is checked against numbers computed by hand.
    """

    name = "markov"

    def __init__(self, logp: np.ndarray, max_beam: int = 4):
        self.table = np.asarray(logp, dtype=np.float32)
        self._max_beam = max_beam
        self.steps: list[tuple[int, int]] = []  # (N, K) of every step: the batch must shrink

    @property
    def provider(self):
        return "table"

    @property
    def max_beam(self):
        return self._max_beam

    def encode(self, images):
        return DecodeState(batch=len(images), beams=1)

    def step(self, state, tokens, origin, *, want_alpha=False):
        n, k = tokens.shape
        assert state.batch == n and (origin < state.beams).all()
        self.steps.append((n, k))
        rows = self.table[tokens]  # (N, K, V)
        ids = np.argsort(-rows, axis=2, kind="stable")[:, :, :self._max_beam]  # ties: lower id first
        logp = np.take_along_axis(rows, ids, axis=2)
        state.beams = k
        alpha = np.full((n, k, 4), 0.25, np.float32) if want_alpha else None
        return StepOutput(logp, ids.astype(np.int64), alpha)

    def select(self, state, rows):
        state.batch = len(rows)
        return state


def search(engine, n=1, **kw):
    return beam_search(engine, np.zeros((n, 8, 8, 3), np.uint8), start=START, end=END, vocab_size=V, **kw)


def chain_table(**edges) -> np.ndarray:
    t = np.full((V, V), -20.0, np.float32)
    for key, value in edges.items():
        a, b = (int(x) for x in key[1:].split("_"))
        t[a, b] = value
    return t


def test_select_orders_ties_by_slot_then_word():
    scores = np.array([[[-1.0, -2.0], [-1.0, -1.0]]], np.float32)  # slot 0: words 3, 1; slot 1: words 2, 0
    ids = np.array([[[3, 1], [2, 0]]])
    slot, word, score, _ = _select(scores, ids, 3)
    # -1.0 three times: (slot 0, word 3), (slot 1, word 0), (slot 1, word 2) in (slot, word) order
    assert slot.tolist() == [[0, 1, 1]] and word.tolist() == [[3, 0, 2]]
    assert score.tolist() == [[-1.0, -1.0, -1.0]]


def test_select_never_picks_dead_slots_before_live_ones():
    scores = np.array([[[-np.inf, -np.inf], [-np.inf, -np.inf]]], np.float32)
    scores[0, 0, 0] = -3.0
    ids = np.array([[[1, 2], [1, 2]]])
    slot, word, _, _ = _select(scores, ids, 2)
    assert slot[0, 0] == 0 and word[0, 0] == 1
    assert slot[0, 1] == 0  # the -inf tie goes to the live slot 0 first, not to dead slot 1


def test_greedy_chain_and_scores():
    # start -> 1 (-0.1) -> 2 (-0.2) -> end (-0.3); everything else -20
    t = chain_table(w5_1=-0.1, w1_2=-0.2, w2_4=-0.3)
    [r] = search(MarkovEngine(t), beam_size=1, return_attention=True)
    assert r.tokens == [1, 2] and r.finished
    assert r.score == pytest.approx(-0.6, abs=1e-6)
    assert r.alphas.shape == (2, 4)


def test_completion_pool_keeps_earlier_finished_hypothesis():
    # beam 2: step 1 picks 1 (-1.0) and end (-1.5): "" completes with -1.5.
    # Then 1 -> 2 (-1) -> end (-1): total -3.0 < -1.5, so the empty caption wins on raw score.
    t = chain_table(w5_1=-1.0, w5_4=-1.5, w1_2=-1.0, w2_4=-1.0, w1_3=-5.0)
    [r] = search(MarkovEngine(t), beam_size=2)
    assert r.tokens == [] and r.finished and r.score == pytest.approx(-1.5)
    # With a strong GNMT length penalty the 2-word caption wins: -3.0 / ((5+3)/6)^a vs -1.5 / ((5+1)/6)^a
    [r] = search(MarkovEngine(t), beam_size=2, length_penalty=3.0)
    assert -3.0 / length_penalty_factor(3, 3.0) > -1.5 / length_penalty_factor(1, 3.0)
    assert r.tokens == [1, 2]


def test_nothing_completes_returns_best_live_hypothesis():
    t = chain_table(w5_1=-0.5, w1_1=-0.5, w5_2=-0.6, w2_2=-0.1)
    [r] = search(MarkovEngine(t), beam_size=2, max_steps=6)
    # 2,2,2,... scores -0.6 - 0.1*5 = -1.1 beats 1,1,... = -3.0
    assert not r.finished and r.tokens == [2] * 6 and r.score == pytest.approx(-1.1, abs=1e-6)


def test_finished_images_leave_the_batch():
    # every image: start -> end at once with beam 1, so the batch is done after one step
    t = chain_table(w5_4=-0.1, w5_1=-0.2, w1_1=-0.1)
    engine = MarkovEngine(t)
    out = search(engine, n=3, beam_size=1, max_steps=10)
    assert [r.tokens for r in out] == [[], [], []]
    assert engine.steps == [(3, 1)]
    # beam 2: "" completes at step 1, the other hypothesis (1, 1, ...) never ends -> runs to max_steps
    engine = MarkovEngine(t)
    out = search(engine, n=2, beam_size=2, max_steps=4)
    assert engine.steps == [(2, 1), (2, 2), (2, 2), (2, 2)]
    assert all(r.tokens == [] and r.finished for r in out)


def test_candidate_ids_outside_vocabulary_are_reported():
    class Bad(MarkovEngine):
        def step(self, state, tokens, origin, *, want_alpha=False):
            out = super().step(state, tokens, origin)
            out.cand_ids[...] = V + 3
            return out

    with pytest.raises(RuntimeError, match="outside the vocabulary of 6 words"):
        search(Bad(chain_table(w5_1=-1.0)), beam_size=1)


def test_beam_larger_than_candidates_is_refused():
    with pytest.raises(ValueError, match="beam_size must be between 1 and 4"):
        search(MarkovEngine(chain_table(w5_1=-1.0)), beam_size=5)


def test_empty_batch():
    assert beam_search(MarkovEngine(chain_table()), np.zeros((0, 8, 8, 3), np.uint8), start=START, end=END,
                       vocab_size=V, beam_size=2) == []


def test_select_matches_lexsort_order_on_random_ties():
    """The fast single-key sort gives exactly the (-score, slot, word) order, -0.0 == 0.0 included."""
    rng = np.random.default_rng(0)
    values = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, -2.25, -1e-30, 5.0], np.float32)
    for _ in range(300):
        n, k, c = (int(x) for x in rng.integers(1, 6, size=3))
        scores = rng.choice(values, size=(n, k, c))
        ids = rng.integers(0, 30, (n, k, c))
        keep = int(rng.integers(1, k * c + 1))
        slot, word, score, _ = _select(scores, ids, keep)
        slots = np.broadcast_to(np.arange(k)[None, :, None], (n, k, c)).reshape(n, -1)
        for r in range(n):
            o = np.lexsort((ids.reshape(n, -1)[r], slots[r], -scores.reshape(n, -1)[r]))[:keep]
            assert slot[r].tolist() == slots[r][o].tolist()
            assert word[r].tolist() == ids.reshape(n, -1)[r][o].tolist()
