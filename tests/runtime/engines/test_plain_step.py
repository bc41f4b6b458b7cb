"""The default path's plain step graph (captrt.runtime.engines.plain_step): cut from the format-2 step at load, it gives
the captions, scores and attention of the format-2 graph fed neutral controls, bit for bit, on ONNX Runtime and
OpenVINO, at beams 1/3/5 and batches 1/8; a step with any option still runs the format-2 graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from captrt.runtime import Captioner
from captrt.runtime.decoding.beam import beam_search
from captrt.runtime.engines import create_engine
from captrt.runtime.engines.ort import SessionEngine, cpu_session, session_options
from captrt.runtime.model_dir import DECODER_OUTPUTS, DECODER_STATE_INPUTS, ModelDir
from captrt.runtime.engines.plain_step import plain_step_graph
from tests.conftest import random_images

IMAGES = random_images(8, seed=21)


@pytest.fixture(scope="module")
def model(varied_model_dir):
    return ModelDir.load(varied_model_dir)


def format2_engine(model: ModelDir) -> SessionEngine:
    """ONNX Runtime over the directory's graphs as they are: the format-2 step fed neutral controls."""
    so = session_options(2)
    graphs = {g: cpu_session(model.read_graph("fp32", g), g, so) for g in ("encoder", "decoder_step")}
    return SessionEngine(graphs["encoder"], graphs["decoder_step"], model.max_beam, model=model)


def decode(engine, model: ModelDir, images: np.ndarray, beam: int):
    v = model.vocab
    return beam_search(engine, images, start=v.start, end=v.end, vocab_size=len(v), beam_size=beam, max_steps=20,
                       return_attention=True, return_scores=True, num_hypotheses=beam)


def assert_identical(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.tokens, g.finished, g.score) == (w.tokens, w.finished, w.score)
        np.testing.assert_array_equal(g.alphas, w.alphas)
        assert [(h.tokens, h.score, h.token_scores) for h in g.hypotheses] == \
            [(h.tokens, h.score, h.token_scores) for h in w.hypotheses]


def test_the_cut_has_format_one_inputs_and_outputs_and_no_processing(model):
    full = model.read_graph("fp32", "decoder_step")
    plain = onnx.load_from_string(plain_step_graph(full))
    onnx.checker.check_model(plain)
    whole = onnx.load_from_string(full)
    assert [i.name for i in plain.graph.input] == list(DECODER_STATE_INPUTS)
    assert [o.name for o in plain.graph.output] == list(DECODER_OUTPUTS)
    ops, before = [n.op_type for n in plain.graph.node], [n.op_type for n in whole.graph.node]
    assert "ScatterElements" in before and "ScatterElements" not in ops and "GatherElements" in ops  # h/c gathers
    assert len(ops) <= len(before) - 15  # the processing's ~20 nodes are gone
    assert plain_step_graph(plain.SerializeToString()) is None  # nothing left to cut (as for a format-1 graph)
    assert plain_step_graph(b"\x0a\x05junk!") is None and plain_step_graph(b"") is None


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_ort_plain_step_equals_the_format_two_graph(model, beam):
    plain, full = create_engine("ort", model, threads=2), format2_engine(model)
    assert plain.plain and not full.plain and not create_engine("ort", model, threads=2, plain_step=False).plain
    for batch in (1, 8):
        for s in range(0, len(IMAGES), batch if batch == 8 else 4):  # batch 1: a few images one by one
            images = IMAGES[s:s + batch]
            assert_identical(decode(plain, model, images, beam), decode(full, model, images, beam))
    assert not plain.controlled_open  # the default path never opened the format-2 graph


def test_options_still_run_the_processing_graph(model):
    with Captioner.load(model.path, threads=2) as cap:
        default = cap.caption(IMAGES[:4], beam_size=3, max_steps=20)
        assert not cap.engine.controlled_open
        word = cap.vocab.id2word[default[0].tokens[0]]
        suppressed = cap.caption(IMAGES[:4], beam_size=3, max_steps=20, suppress=[word], min_length=3)
        assert cap.engine.controlled_open  # opened on the first step with controls, then kept
        assert all(cap.vocab.word2id[word] not in c.tokens and len(c.tokens) >= 3 for c in suppressed)
        assert [c.tokens for c in cap.caption(IMAGES[:4], beam_size=3, max_steps=20)] == [c.tokens for c in default]


def test_openvino_plain_step_equals_the_format_two_graph(model):
    pytest.importorskip("openvino")
    plain = create_engine("openvino", model, threads=2, step_on="openvino", cache=False)
    assert plain.plain and plain.numerics()["graphs"]["decoder_step"]["backend"] == "openvino"
    full = create_engine("openvino", model, threads=2, step_on="openvino", cache=False, plain_step=False)
    assert not full.plain and full.numerics() == plain.numerics()  # the same numerics key: one verification
    for batch in (1, 8):
        images = IMAGES[:batch]
        assert_identical(decode(plain, model, images, 5), decode(full, model, images, 5))
