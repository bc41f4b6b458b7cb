"""The bench summary: caption comparisons between rows that must agree, and captrt against the strongest peer."""

from __future__ import annotations

import pytest

from captrt.bench.summary import captions_cell, compare_captions, count_differing, strongest_peer, summary_lines


def _row(engine, ips, *, variant=None, precision="fp32", batch=1, beam=5, tokens=None, **extra):
    return {"engine": engine, "precision": precision, "variant": variant, "batch": batch, "beam": beam,
            "images_per_s": ips, "_tokens": tokens, **extra}


def test_count_differing():
    a = [[[1, 2], [3]], [[4]]]
    assert count_differing(a, [[[1, 2], [3]], [[4]]]) == (3, 0)
    assert count_differing(a, [[[1, 2], [9]], [[4]]]) == (3, 1)
    assert count_differing(a, [None, [[5]]]) == (1, 1)  # a run without tokens is not compared
    assert count_differing([[[1]]], [[[1], [2]]]) == (2, 2)  # different image counts: all differ


def test_compare_captions_streams_and_torch_compile():
    same = [[[1, 2], [3, 4]], [[5], [6]]]
    recs = [_row("ort", 10, variant="streams", streams=2, threads=1, tokens=same),
            _row("ort", 9, variant="streams", streams=1, threads=2, tokens=same),
            _row("ort", 8, variant="streams", streams=4, threads=1, tokens=[[[1, 2], [3, 4]], [[5], [7]]]),
            _row("openvino", 8, variant="streams", streams=1, threads=2, tokens=same),
            _row("reference", 1, tokens=[[[1]], [[2]]]),
            _row("torch-compile", 2, tokens=[[[1]], [[3]]]),
            _row("ort", 12, tokens=same)]
    compare_captions(recs)
    ort = [r for r in recs if r["engine"] == "ort" and r["variant"] == "streams"]
    for r in ort:  # every streams row of ort fp32 carries the group's verdict, against S=1
        assert r["captions"] == {"across_streams": [1, 2, 4], "images": 4, "differing": 1, "identical": False}
    assert captions_cell(ort[0]) == "1/4 differ"
    [ov] = [r for r in recs if r["engine"] == "openvino"]
    assert ov["captions"]["across_streams"] == [1] and not ov["captions"]["identical"]
    assert captions_cell(ov) == "(one S)"
    [tc] = [r for r in recs if r["engine"] == "torch-compile"]
    assert tc["captions"] == {"compared_with": "reference", "images": 2, "differing": 1, "identical": False}
    assert "captions" not in recs[-1] and captions_cell(recs[-1]) == "-"
    good = [_row("ort", 1, variant="streams", streams=1, threads=2, tokens=same),
            _row("ort", 1, variant="streams", streams=2, threads=1, tokens=same)]
    compare_captions(good)
    assert good[0]["captions"]["identical"] and captions_cell(good[1]) == "= S1"


def test_strongest_peer_and_summary_lines():
    rows = [_row("ort", 8.0), _row("reference", 2.0), _row("torch-compile", 4.0),
            _row("ort", 10.0, variant="streams", streams=2, threads=1,
                 captions={"across_streams": [1, 2], "images": 8, "differing": 0, "identical": True}),
            _row("ort", 9.0, variant="streams", streams=1, threads=2,
                 captions={"across_streams": [1, 2], "images": 8, "differing": 0, "identical": True}),
            _row("ort", 6.0, variant="options", options={"num_hypotheses": 3, "max_steps": 16}),
            _row("ort", 30.0, precision="int8"),  # not exact fp32: never "the fastest captrt fp32 row"
            _row("torch-compile", 5.0, batch=4, captions={"compared_with": "reference", "images": 4, "differing": 0,
                                                          "identical": True}),
            _row("ort", 20.0, batch=4)]
    assert strongest_peer(rows[:3])["engine"] == "torch-compile"
    lines = summary_lines({"results": rows, "skipped": []})
    first = lines[0]
    assert first.startswith("batch 1, beam 5: strongest peer torch-compile 4.00 img/s (reference 2.00)")
    assert "captrt ort fp32 8.00 img/s = 2.00x the strongest peer, 4.00x reference" in first
    assert "fastest captrt fp32 row (ort fp32 streams 2x1) 10.00 img/s = 2.50x the strongest peer" in first
    assert any("captions across streams 1, 2: identical" in line for line in lines)
    assert any("options path (num_hypotheses=3) on ort fp32: 6.00 img/s = 75% of the default row's" in line
               for line in lines)
    b4 = [line for line in lines if line.startswith("batch 4")]
    assert "strongest peer torch-compile 5.00 img/s; captrt ort fp32 20.00 img/s = 4.00x the strongest peer" in b4[0]
    assert "reference" not in b4[0]  # no reference row at batch 4: no ratio against it
    assert any("torch-compile captions vs reference: identical" in line for line in b4)
    none = summary_lines({"results": [_row("ort", 1.0)],
                          "skipped": [{"engine": "torch-compile", "precision": "fp32", "reason": "no compiler"}]})
    assert none == ["batch 1, beam 5: no peer row (reference / torch-compile) in this run",
                    "torch-compile not run: no compiler"]


@pytest.mark.parametrize("variant,cell", [(None, "default"), ("options", "options")])
def test_run_cell(variant, cell):
    from captrt.bench.report import run_cell

    assert run_cell({"variant": variant}) == cell
    assert run_cell({"variant": "streams", "streams": 2, "threads": 1}) == "streams 2x1"
