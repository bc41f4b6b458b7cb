"""Decoding controls against the PyTorch reference (captrt.train.reference.reference_decode), on the
demo-sized model: every option alone and combined, beams 1/3/5, batch 1 and a mixed batch of 8."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from captrt.runtime import Captioner
from captrt.runtime.decoding import DecodingOptionError, DecodingOptions
from tests.conftest import random_images
from tests.runtime.reference_helpers import torch_threads

OPTION_SETS = [
    {},
    {"num_hypotheses": 3, "return_scores": True},
    {"suppress": ["a", "red"]},
    {"disable_unk": True},
    {"min_length": 12},
    {"repetition_penalty": 1.8},
    {"no_repeat_ngram_size": 2},
    {"prefix": ["two", "small"]},
    {"prefix": ["a"], "min_length": 5, "suppress": ["blue"], "repetition_penalty": 1.3, "no_repeat_ngram_size": 3,
     "num_hypotheses": 2, "length_penalty": 0.6, "return_scores": True, "disable_unk": True},
]
SAMPLING = {"sample": True, "beam_size": 1, "seed": 7, "num_hypotheses": 3, "sampling_topk": 5, "sampling_topp": 0.9,
            "sampling_temperature": 0.8, "min_length": 2, "return_scores": True}


@pytest.fixture(scope="module")
def demo(demo_sized_export):
    import torch

    from captrt.train.checkpoint import load_checkpoint
    from captrt.train.model import normalize_uint8

    model_dir, _ = demo_sized_export
    ckpt = load_checkpoint(model_dir.parent / "demo.pt")
    net = ckpt.build_model()
    images = random_images(8, seed=3)
    with torch_threads(1), torch.no_grad():
        feats = [f[None] for f in net.encoder(normalize_uint8(torch.from_numpy(images)))]
    with Captioner.load(model_dir) as cap:
        yield cap, net, ckpt.vocab, images, feats


def reference(demo, options: dict):
    from captrt.train.reference import reference_decode

    _, net, vocab, images, feats = demo
    opts = DecodingOptions.build(**options).check(vocab, max_beam=10)
    with torch_threads(1):
        return [reference_decode(net, im, vocab, opts, features=f) for im, f in zip(images, feats)]


def same(got, want) -> None:
    """Hypotheses equal the reference's token for token, finished flags and scores (float32 noise)."""
    assert [(h.tokens, h.finished) for h in got.hypotheses] == [(h.tokens, h.finished) for h in want]
    assert (got.tokens, got.finished) == (want[0].tokens, want[0].finished)
    for h, r in zip(got.hypotheses, want):
        assert h.score == pytest.approx(r.score, abs=1e-3)
        if h.token_scores is not None:
            assert h.token_scores == pytest.approx(r.token_scores, abs=1e-3)


def float32_sum(values) -> np.float32:
    total = np.float32(0.0)
    for v in values:
        total = np.float32(total + np.float32(v))
    return total


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o) or "default")
def test_options_match_the_reference_at_beams_1_3_5_alone_and_in_a_batch(demo, options):
    cap, _, _, images, _ = demo
    for beam in (1, 3, 5):
        if options.get("num_hypotheses", 1) > beam:
            continue
        kw = {**options, "beam_size": beam}
        want = reference(demo, kw)
        batched = cap.caption(list(images), batch_size=8, **kw)  # a mixed batch: images end at different steps
        for got, ref in zip(batched, want):
            same(got, ref)
        for i in (0, 5):  # batch 1: the same hypotheses as in the batch
            [alone] = cap.caption(images[i], **kw)
            same(alone, want[i])
        if kw.get("return_scores"):
            for c in batched:
                for h in c.hypotheses:  # in order, in float32: exactly the score
                    assert float32_sum(h.token_scores) == np.float32(h.score)
                    assert len(h.token_scores) == len(h.tokens) + h.finished


def test_options_change_captions_as_documented(demo):
    cap, _, vocab, images, _ = demo
    plain = cap.caption(list(images), beam_size=3, num_hypotheses=3)
    assert all(len(c.hypotheses) == 3 and c.hypotheses[0].tokens == c.tokens for c in plain)
    a, red = vocab.word2id["a"], vocab.word2id["red"]
    for c in cap.caption(list(images), beam_size=3, suppress=["a", "red"], disable_unk=True):
        assert not {a, red, vocab.unk} & set(c.tokens)
    for c in cap.caption(list(images), beam_size=3, min_length=12):
        assert len(c.tokens) >= 12
    for c in cap.caption(list(images), beam_size=3, no_repeat_ngram_size=2):
        grams = list(zip(c.tokens, c.tokens[1:]))
        assert len(grams) == len(set(grams))
    for c in cap.caption(list(images), beam_size=3, prefix=["two", "small"]):
        assert c.text.startswith("two small")


def test_sampling_matches_the_reference_and_never_depends_on_the_batch(demo):
    cap, _, _, images, _ = demo
    want = reference(demo, SAMPLING)
    batched = cap.caption(list(images), **SAMPLING)
    for got, ref in zip(batched, want):
        same(got, ref)
    assert cap.caption(list(images), **SAMPLING)[3].hypotheses == batched[3].hypotheses  # reproducible
    reordered = cap.caption(list(images[::-1][:5]), batch_size=2, **SAMPLING)  # other company, other batches
    for got, ref in zip(reordered, want[::-1][:5]):
        same(got, ref)
    [alone] = cap.caption(images[6], **SAMPLING)
    same(alone, want[6])
    other = cap.caption(list(images), **{**SAMPLING, "seed": 8})
    assert [c.tokens for c in other] != [c.tokens for c in batched]
    samples = [tuple(h.tokens) for c in batched for h in c.hypotheses]
    assert len(set(samples)) > len(images)  # the n samples of an image are not copies of each other


def test_sampling_with_topk_1_is_greedy(demo):
    cap, _, _, images, _ = demo
    greedy = cap.caption(list(images), beam_size=1, return_scores=True)
    sampled = cap.caption(list(images), beam_size=1, sample=True, sampling_topk=1, seed=1, return_scores=True)
    assert [(c.tokens, c.score, c.token_scores) for c in sampled] == [(c.tokens, c.score, c.token_scores) for c in greedy]


def test_unseeded_sampling_still_decodes(demo):
    cap, _, _, images, _ = demo
    [c] = cap.caption(images[0], beam_size=1, sample=True, sampling_topp=0.5)
    assert c.ok and c.tokens


@pytest.mark.parametrize("kwargs,field,message", [
    ({"suppress": ["zebra"]}, "suppress", "'zebra' is not in the model's vocabulary"),
    ({"prefix": ["<end>"]}, "prefix", "special token"),
    ({"suppress": ["<unk>"]}, "suppress", "special token"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "must be a finite number >= 0.001 and <= 1000"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", ">= 0.001"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty", ">= 0.001"),  # 0 in float32: infinite logits
    ({"beam_size": 3, "num_hypotheses": 4}, "num_hypotheses", "at most beam_size"),
    ({"sample": True, "beam_size": 3}, "beam_size", "must be 1 with sample=True"),
    ({"min_length": 50}, "min_length", "below max_steps=50"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", ">= 0"),
    ({"beam_size": 1, "sample": True, "sampling_topp": 1.5}, "sampling_topp", "<= 1"),
    ({"beam_size": 1, "sample": True, "sampling_temperature": 0}, "sampling_temperature", ">= 0.001"),
    ({"beam_size": 1, "sample": True, "sampling_topk": -2}, "sampling_topk", ">= 0"),
    ({"prefix": ["a"] * 50}, "prefix", "leave no step"),
    ({"prefix": ["a", "a"], "no_repeat_ngram_size": 1}, "prefix", "repeats an n-gram"),
    ({"seed": "x"}, "seed", "must be an integer"),
])
def test_bad_values_name_the_field(demo, kwargs, field, message):
    cap, _, _, images, _ = demo
    with pytest.raises(DecodingOptionError, match=message) as info:
        cap.caption(images[0], **kwargs)
    assert info.value.field == field and str(info.value).startswith(field)


def test_an_old_format_directory_captions_and_refuses_the_new_options(demo, demo_sized_export, tmp_path):
    """A format-1 directory (its step graph without control inputs, exported from the same weights)
    decodes the default path and n-best as before (tokens exactly, scores to float32 rounding), and names
    re-export for the rest."""
    import hashlib

    from captrt.export.format1 import export_format_one_step
    from captrt.export.onnx_export import save_onnx

    cap, net, _, images, _ = demo
    model_dir, _ = demo_sized_export

    old = tmp_path / "old"
    shutil.copytree(model_dir, old, ignore=shutil.ignore_patterns("cache"))
    save_onnx(export_format_one_step(net, 10, 18), old / "decoder_step.onnx")
    manifest = json.loads((old / "captrt.json").read_text())
    manifest["format_version"] = 1
    manifest["graphs"]["fp32"]["decoder_step"]["sha256"] = hashlib.sha256((old / "decoder_step.onnx").read_bytes()).hexdigest()
    (old / "captrt.json").write_text(json.dumps(manifest))
    with Captioner.load(old) as legacy:
        assert not legacy.engine.controls
        kw = {"beam_size": 3, "num_hypotheses": 2, "return_scores": True}
        got, want = legacy.caption(list(images), **kw), cap.caption(list(images), **kw)
        assert [[(h.tokens, h.finished) for h in c.hypotheses] for c in got] == \
            [[(h.tokens, h.finished) for h in c.hypotheses] for c in want]
        for c, w in zip(got, want):  # format 2's log_softmax adds a -inf column: the last bit may move
            for h, x in zip(c.hypotheses, w.hypotheses):
                assert h.score == pytest.approx(x.score, abs=1e-4)
                assert h.token_scores == pytest.approx(x.token_scores, abs=1e-4)
        for options in ({"suppress": ["a"]}, {"prefix": ["a"]}, {"sample": True, "beam_size": 1}):
            with pytest.raises(DecodingOptionError, match="format version 1.*re-export it with `captrt export`"):
                legacy.caption(images[0], **options)
