"""Caption metrics: hand-checked BLEU against pycocoevalcap and nltk, METEOR's JVM lifecycle, results file.

Only one real METEOR JVM is started (module fixture, ~10 s); the other caption_metrics calls run with
an empty PATH, which is the genuine "Java missing" path (METEOR -> NaN with a warning).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import threading
import time

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu

from captrt.train.metrics import (
    NLTK_BLEU_KEY,
    _MeteorProcess,
    caption_metrics,
    corpus_bleu4,
    write_coco_results,
)

KEYS = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", NLTK_BLEU_KEY}


def w(s: str) -> list[str]:
    return s.split()


# Image 1: clipping and a brevity penalty.
#   refs  r1 = "the cat sat on the mat" (6 words), r2 = "there is a cat on the mat" (7 words)
#   hyp   "the the the cat" (c = 4)
#   unigrams: the x3 clipped to 2 (max count of "the" in one ref, r1), cat x1 -> 1      p1 = 3/4
#   bigrams:  "the the" x2 (in no ref) -> 0, "the cat" x1 (r1) -> 1                     p2 = 1/3
#   trigrams "the the the", "the the cat": 0/2; 4-gram "the the the cat": 0/1
#   closest ref length to 4: |6-4| = 2 < |7-4| = 3 -> r = 6;  BP = exp(1 - r/c) = exp(-1/2)
#   BLEU-1 = exp(-1/2) * 3/4,   BLEU-2 = exp(-1/2) * sqrt(3/4 * 1/3) = exp(-1/2) / 2
# Image 2: a closest-length tie.
#   refs  "a dog runs fast" (4), "a brown dog runs very fast" (6);  hyp "a dog runs very fast" (c = 5)
#   |4-5| = |6-5|: both nltk and pycocoevalcap ('closest') break the tie towards the SHORTER ref,
#   r = 4 < c -> BP = 1 (taking 6 would give exp(1 - 6/5)).  unigrams 5/5, bigrams 4/4
#   ("a dog", "dog runs" in ref 1; "runs very", "very fast" in ref 2) -> BLEU-1 = BLEU-2 = 1.
#   trigrams 3/3 ("a dog runs", "dog runs very", "runs very fast"); 4-grams 1/2 ("dog runs very fast").
# Corpus {1, 2}: clipped counts and lengths are summed before dividing (no per-image averaging):
#   p1 = (3+5)/(4+5) = 8/9, p2 = (1+4)/(3+4) = 5/7, p3 = (0+3)/(2+3) = 3/5, p4 = (0+1)/(1+2) = 1/3
#   c = 4+5 = 9, r = 6+4 = 10 -> BP = exp(1 - 10/9) = exp(-1/9)
REFS = {1: [w("the cat sat on the mat"), w("there is a cat on the mat")],
        2: [w("a dog runs fast"), w("a brown dog runs very fast")]}
HYPS = {1: w("the the the cat"), 2: w("a dog runs very fast")}
BP = math.exp(-1 / 9)
CORPUS_BLEU = {1: BP * 8 / 9, 2: BP * math.sqrt(8 / 9 * 5 / 7),
               4: BP * (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25}
# pycocoevalcap divides (matches + 1e-15) / (guesses + 1e-9) and the length ratio likewise, so it is
# only ~1e-9 relatively off the exact value; nltk works with exact Fractions.
PYCOCO_REL = 1e-6


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """A PATH on which there is no java: the real 'Java missing' situation, not a stub."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def metrics_without_java(refs, hyps) -> dict[str, float]:
    with pytest.warns(RuntimeWarning, match="METEOR"):
        out = caption_metrics(refs, hyps)
    assert set(out) == KEYS and math.isnan(out["METEOR"])
    return out


def _children() -> list[tuple[int, str]]:
    """(pid, command) of this process's live children, from /proc."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            comm, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if int(rest[1]) == os.getpid():
                kids.append((int(d), comm))
    return kids


# ---------------------------------------------------------------------------------------- BLEU by hand
def test_bleu_hand_checked_single_image(no_java):
    refs, hyps = {1: REFS[1]}, {1: HYPS[1]}
    out = metrics_without_java(refs, hyps)
    assert out["BLEU-1"] == pytest.approx(math.exp(-0.5) * 3 / 4, rel=PYCOCO_REL)
    assert out["BLEU-2"] == pytest.approx(math.exp(-0.5) / 2, rel=PYCOCO_REL)
    # nltk's definition gives the same numbers exactly.
    assert corpus_bleu([REFS[1]], [HYPS[1]], weights=(1.0,)) == pytest.approx(math.exp(-0.5) * 3 / 4, rel=1e-12)
    assert corpus_bleu([REFS[1]], [HYPS[1]], weights=(0.5, 0.5)) == pytest.approx(math.exp(-0.5) / 2, rel=1e-12)
    # No 3-/4-gram match: nltk (unsmoothed) gives ~0 (it substitutes float_info.min for the precision),
    # pycocoevalcap's 1e-15 epsilon gives a tiny but positive BLEU-4. The two conventions differ here.
    assert corpus_bleu4([REFS[1]], [HYPS[1]]) < 1e-60
    assert out[NLTK_BLEU_KEY] < 1e-60
    assert 0 < out["BLEU-4"] < 1e-6


def test_bleu_closest_length_tie_goes_to_shorter_reference(no_java):
    out = metrics_without_java({2: REFS[2]}, {2: HYPS[2]})
    assert out["BLEU-1"] == pytest.approx(1.0, rel=PYCOCO_REL)
    assert out["BLEU-2"] == pytest.approx(1.0, rel=PYCOCO_REL)
    assert corpus_bleu([REFS[2]], [HYPS[2]], weights=(1.0,)) == 1.0


def test_bleu_hand_checked_corpus(no_java):
    out = metrics_without_java(REFS, HYPS)
    for n in (1, 2, 4):
        assert out[f"BLEU-{n}"] == pytest.approx(CORPUS_BLEU[n], rel=PYCOCO_REL), n
    refs, hyps = [REFS[1], REFS[2]], [HYPS[1], HYPS[2]]
    assert corpus_bleu(refs, hyps, weights=(1.0,)) == pytest.approx(CORPUS_BLEU[1], rel=1e-12)
    assert corpus_bleu(refs, hyps, weights=(0.5, 0.5)) == pytest.approx(CORPUS_BLEU[2], rel=1e-12)
    assert corpus_bleu4(refs, hyps) == pytest.approx(CORPUS_BLEU[4], rel=1e-12)
    assert out[NLTK_BLEU_KEY] == pytest.approx(CORPUS_BLEU[4], rel=1e-12)
    # Corpus BLEU is not the mean of the per-image BLEUs (image 1 alone is 0.4549, image 2 alone is 1).
    assert out["BLEU-1"] != pytest.approx((math.exp(-0.5) * 3 / 4 + 1) / 2, rel=1e-3)


# --------------------------------------------------------------------------- identical and empty captions
def test_identical_hypothesis_scores_perfectly(no_java):
    # Disjoint vocabularies, so every n-gram has idf log(3/1) > 0 and CIDEr's cosines are all 1.
    caps = {10: w("a man riding a red bike"), 11: w("two dogs play in the snow"), 12: w("pizza on a plate")}
    out = metrics_without_java({k: [v] for k, v in caps.items()}, caps)
    assert out["BLEU-4"] == pytest.approx(1.0, rel=PYCOCO_REL)
    assert out[NLTK_BLEU_KEY] == 1.0
    assert out["ROUGE-L"] == pytest.approx(1.0)
    assert math.isfinite(out["CIDEr"]) and out["CIDEr"] == pytest.approx(10.0)


def test_cider_of_a_single_image_is_zero(no_java):
    # CIDEr's idf comes from the evaluated images: with one image every n-gram has idf 0 (documented).
    out = metrics_without_java({1: [w("a cat on a mat")]}, {1: w("a cat on a mat")})
    assert out["CIDEr"] == 0.0 and out["BLEU-4"] == pytest.approx(1.0, rel=PYCOCO_REL)


def test_all_empty_hypotheses_score_zero(no_java):
    out = metrics_without_java(REFS, {1: [], 2: []})
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", NLTK_BLEU_KEY):
        assert out[key] == pytest.approx(0.0, abs=1e-12), key
    assert corpus_bleu4([REFS[1]], [[]]) == 0.0


# ------------------------------------------------------------------------------------------- bad input
def test_mismatched_ids_raise(no_java):
    with pytest.raises(ValueError, match=r"1 only in references \(e.g. 2\).*1 only in hypotheses \(e.g. 3\)"):
        caption_metrics(REFS, {1: HYPS[1], 3: HYPS[2]})
    with pytest.raises(ValueError, match="different image ids"):
        caption_metrics(REFS, {1: HYPS[1]})
    with pytest.raises(ValueError, match="empty"):
        caption_metrics({}, {})


@pytest.mark.parametrize("refs, hyps, msg", [
    ({1: [w("a cat")]}, {1: "a cat"}, r"hypotheses\[1\]: expected a list of word tokens"),
    ({1: [w("a cat")]}, {1: ["a cat"]}, r"hypotheses\[1\]: bad token 'a cat'"),
    ({1: [w("a cat")]}, {1: ["a", 3]}, r"hypotheses\[1\]: bad token 3"),
    ({1: []}, {1: w("a cat")}, r"references\[1\]: expected a non-empty list"),
    ({1: [[]]}, {1: w("a cat")}, r"references\[1\]\[0\]: caption has no words"),
    ({"x": ["a cat"]}, {"x": w("a cat")}, r"references\['x'\]\[0\]: expected a list of word tokens"),
])
def test_malformed_captions_raise(no_java, refs, hyps, msg):
    with pytest.raises(ValueError, match=msg):
        caption_metrics(refs, hyps)


def test_corpus_bleu4_checks_lengths():
    with pytest.raises(ValueError, match="2 reference sets but 1 hypotheses"):
        corpus_bleu4([REFS[1], REFS[2]], [HYPS[1]])
    with pytest.raises(ValueError, match="no hypotheses"):
        corpus_bleu4([], [])


def test_spice_without_corenlp_raises_clearly():
    from captrt.train.metrics import _spice_dir

    if all((_spice_dir() / "lib" / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models")):
        pytest.skip("CoreNLP jars are installed here, SPICE can run")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="SPICE needs"):
        caption_metrics(REFS, HYPS, spice=True)
    assert time.monotonic() - t0 < 5  # refused before any scoring (or JVM start)


# ------------------------------------------------------------------------------------------------ METEOR
@pytest.fixture(scope="module")
def java_metrics():
    """caption_metrics with the real METEOR JVM, on the hand corpus plus an image with an empty caption."""
    if shutil.which("java") is None:
        pytest.skip("java is not on PATH")
    refs = {**REFS, 3: [w("a red bus on a street")]}
    hyps = {**HYPS, 3: []}
    before = {pid for pid, _ in _children()}
    out = caption_metrics(refs, hyps)
    leftover = [(pid, comm) for pid, comm in _children() if pid not in before]
    threads = [t.name for t in threading.enumerate() if t.name == "meteor-watchdog"]
    return out, leftover, threads


def test_meteor_partial_match_in_unit_interval(java_metrics):
    out, _, _ = java_metrics
    assert set(out) == KEYS
    assert 0 < out["METEOR"] <= 1
    assert all(math.isfinite(v) for v in out.values())


def test_meteor_jvm_is_closed(java_metrics):
    _, leftover, threads = java_metrics
    assert leftover == [] and threads == []


def test_java_does_not_change_other_metrics(java_metrics, no_java):
    out, _, _ = java_metrics
    without = metrics_without_java({**REFS, 3: [w("a red bus on a street")]}, {**HYPS, 3: []})
    for key in KEYS - {"METEOR"}:
        assert out[key] == without[key], key


def _fake_java(tmp_path, body: str) -> str:
    path = tmp_path / "java"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_meteor_hung_jvm_is_killed(tmp_path):
    # A 'java' that never answers: the watchdog must kill it and the call must fail, not hang.
    proc = _MeteorProcess(_fake_java(tmp_path, "exec sleep 60"), stall_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="no output for 1 s, killed"):
        with proc:
            proc.score([["a cat"]], ["a cat"])
    assert time.monotonic() - t0 < 10
    assert proc._proc.poll() is not None


def test_meteor_crashing_jvm_reports_stderr(tmp_path):
    proc = _MeteorProcess(_fake_java(tmp_path, "echo 'Error: Unable to access jarfile' >&2; exit 1"))
    with pytest.raises(RuntimeError, match="exit code 1.*Unable to access jarfile"):
        with proc:
            proc.score([["a cat"]], ["a cat"])


# ------------------------------------------------------------------------------------------ results file
def test_results_file_round_trip(tmp_path):
    path = tmp_path / "out" / "results.json"
    ids = [391895, np.int64(522418), "img_7"]
    caps = ["a man riding a bike", "a woman with a knife", ""]
    write_coco_results(path, ids, caps)
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert rows == [{"image_id": 391895, "caption": "a man riding a bike"},
                    {"image_id": 522418, "caption": "a woman with a knife"},
                    {"image_id": "img_7", "caption": ""}]
    assert type(rows[1]["image_id"]) is int
    assert os.listdir(path.parent) == ["results.json"]  # the temp file was renamed, not left behind
    # Overwriting replaces the whole file.
    write_coco_results(path, [1], ["a cat"])
    assert json.loads(path.read_text(encoding="utf-8")) == [{"image_id": 1, "caption": "a cat"}]


def test_results_file_loads_in_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    path = tmp_path / "results.json"
    write_coco_results(path, [1, 2], ["a cat on a mat", "a dog"])
    gt = COCO()
    gt.dataset = {"images": [{"id": 1}, {"id": 2}],
                  "annotations": [{"id": 9, "image_id": 1, "caption": "a cat"},
                                  {"id": 8, "image_id": 2, "caption": "a dog"}]}
    gt.createIndex()
    res = gt.loadRes(str(path))
    assert sorted(res.getImgIds()) == [1, 2]
    assert res.imgToAnns[2][0]["caption"] == "a dog"


@pytest.mark.parametrize("ids, caps, msg", [
    ([1, 2], ["a"], "2 image ids but 1 captions"),
    ([1, 1], ["a", "b"], "image id 1 appears twice"),
    ([1], [["a", "cat"]], r"captions\[0\] must be a str"),
    ([1.5], ["a"], r"image_ids\[0\]: image id must be an int or str"),
])
def test_results_file_bad_input(tmp_path, ids, caps, msg):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match=msg):
        write_coco_results(path, ids, caps)
    assert not path.exists() and os.listdir(tmp_path) == []
