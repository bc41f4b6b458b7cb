"""run_bench's extra rows on the tiny exported model (tests/bench/conftest.py): streams (captions identical
across S), the options path, the torch-compile peer (or why it could not run), the fp32 floor per row.

No timing assertions: only what ran, the arithmetic between the reported fields, and the captions.
"""

from __future__ import annotations

import json

import pytest

from captrt.bench import run_bench
from captrt.bench.floor import floor_ms_per_image, pct_of_floor
from captrt.bench.machine import usable_cores

pytest.importorskip("torch")
FAST = {"warmup": 0, "iters": 2, "bandwidth_mb": 8, "matmul_sizes": (128,), "progress": False}


def _fits(s: int, t: int | None = None) -> bool:
    cores = usable_cores()
    return s * (t if t is not None else max(1, cores // s)) <= cores


def test_streams_and_options_rows_with_the_floor(tiny_model, capsys):
    report = run_bench(tiny_model, engines="ort,reference", batches="1,2", beams="5", steps=3, streams="1,2",
                       decoding=True, **FAST)
    cores = usable_cores()
    assert report["settings"]["streams"] == [1, 2] and report["settings"]["decoding"]["num_hypotheses"] == 3
    rows = report["results"]
    for batch in (1, 2):
        here = [r for r in rows if r["batch"] == batch]
        assert [(r["engine"], r["variant"]) for r in here if r["variant"] is None] == [("ort", None), ("reference", None)]
        [opt] = [r for r in here if r["variant"] == "options"]
        # min_length 5 is capped below the 3 forced steps; num_hypotheses 3 fits beam 5
        assert opt["options"]["num_hypotheses"] == 3 and opt["options"]["return_scores"] is True
        assert opt["options"]["no_repeat_ngram_size"] == 3 and opt["options"]["min_length"] == 2
        assert opt["steps_mean"] == 3.0 and opt["step_ms"]["n"] == 2 * 2
        streams = sorted((r for r in here if r["variant"] == "streams"), key=lambda r: r["streams"])
        want = [s for s in (1, 2) if _fits(s)]
        assert [r["streams"] for r in streams] == want
        for r in streams:
            assert r["threads"] == max(1, cores // r["streams"])
            assert r["images_per_run"] == batch * 2 * 2  # max S x 2 batches of `batch`, the same list for every S
            assert r["steps_mean"] == 3.0  # forced steps through the Captioner too
            assert r["encoder_ms"]["p50"] is None and r["e2e_ms"]["per_batch"]["p50"] is None
            per_call = r["e2e_ms"]["per_call"]
            assert per_call["n"] == 2
            assert r["images_per_s"] == pytest.approx(r["images_per_run"] * 1e3 / per_call["p50"], rel=1e-3)
            assert r["e2e_ms"]["per_image"]["p50"] == pytest.approx(per_call["p50"] / r["images_per_run"], rel=1e-3)
            assert f"streams={r['streams']}" in r["measured_as"]
            if len(want) > 1:  # the captions of every S, run by run and image by image
                assert r["captions"] == {"across_streams": want, "images": 2 * r["images_per_run"], "differing": 0,
                                         "identical": True}
        for s in (1, 2):
            if not _fits(s):
                assert any(k.get("variant", "").startswith(f"streams {s}x") for k in report["skipped"])
    compute, fp32 = report["floor"]["compute"], report["floor"]["precisions"]["fp32"]
    assert compute["encoder_flops"] > 0 and compute["encoder_nodes_unknown"] == []
    assert compute["peak_gflops"] == max(compute["gflops"].values())
    for r in rows:  # % of floor: images/s against the fp32 floor of this batch and step count
        parts = floor_ms_per_image(compute["encoder_flops"], compute["peak_gflops"], fp32["read_bytes"],
                                   fp32["bandwidth_gbps"], r["steps_mean"], r["batch"])
        assert r["e2e_floor_ms"]["total_ms"] == pytest.approx(parts["total_ms"], rel=1e-3)
        # The row keeps 2 decimals: the tolerance is that rounding (0.005), or 0.1% where that is more.
        assert r["pct_of_floor"] == pytest.approx(pct_of_floor(r["images_per_s"], parts["total_ms"]), rel=1e-3,
                                                  abs=0.005)
        assert "_tokens" not in r
    summary = report["summary"]
    assert summary[0].startswith("batch 1, beam 5: strongest peer reference") and "captrt ort fp32" in summary[0]
    if len([s for s in (1, 2) if _fits(s)]) > 1:
        assert any("captions across streams 1, 2: identical" in line for line in summary)
    assert sum("options path" in line for line in summary) == 2
    printed = capsys.readouterr().out
    assert "% of floor" in printed and "same captions" in printed and "streams 1x" in printed
    assert "fp32 matmul peak" in printed and "summary: batch 2, beam 5" in printed
    json.dumps(report)  # the report stays JSON
    _check_suite_c_section(report)


def _check_suite_c_section(report):
    """benchmarks/run_suite.py's suite (c) section renders this report: the floor's definition, the summary,
    the table with the new columns; its command line carries --streams and --decoding."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "run_suite.py"
    spec = importlib.util.spec_from_file_location("captrt_run_suite_c", path)
    run_suite = importlib.util.module_from_spec(spec)
    sys.modules["captrt_run_suite_c"] = run_suite
    spec.loader.exec_module(run_suite)
    cmd = run_suite.bench_command(Path("m"), run_suite.SUITE_C, run_suite.RUNS["quick"], Path("c.json"))
    assert "--engine ort,reference,torch-compile" in cmd and "--streams 1,2" in cmd and "--decoding" in cmd
    text = "\n".join(run_suite.suite_c_lines(report, cmd))
    assert text.startswith("## Suite (c)") and "It is a floor" in text and "strongest peer" in text
    assert "| % of floor |" in text and "| same captions |" in text and "streams 1x" in text
    assert f"command: `{cmd}`" in text


def test_threads_given_and_oversubscription_skipped(tiny_model):
    cores = usable_cores()
    report = run_bench(tiny_model, engines="ort", batches="2", beams="2", steps=2, streams=f"1,{cores + 1}",
                       threads=1, print_table=False, **FAST)
    streams = [r for r in report["results"] if r["variant"] == "streams"]
    assert [(r["streams"], r["threads"]) for r in streams] == [(1, 1)]  # --threads applies to every stream
    [skip] = [s for s in report["skipped"] if s.get("variant") == f"streams {cores + 1}x1"]
    assert "exceeds" in skip["reason"] and "usable cores" in skip["reason"]
    with pytest.raises(ValueError, match="streams"):
        run_bench(tiny_model, engines="ort", streams="0", **FAST)


def test_options_row_needs_ort_fp32(tiny_model):
    report = run_bench(tiny_model, engines="reference", batches="1", beams="2", steps=2, decoding=True,
                       print_table=False, **FAST)
    assert [r["variant"] for r in report["results"]] == [None]
    assert any(s.get("variant") == "options" and "ort fp32" in s["reason"] for s in report["skipped"])


def test_torch_compile_that_fails_says_why(tiny_model, monkeypatch):
    """A machine where torch.compile cannot run (no C++ compiler, ...): the row is skipped with the reason,
    the bench goes on, and the summary names the reference as the strongest peer."""
    import torch

    def broken(*args, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    report = run_bench(tiny_model, engines="ort,reference,torch-compile", batches="1", beams="2", steps=2,
                       print_table=False, **FAST)
    assert [r["engine"] for r in report["results"]] == ["ort", "reference"]
    [skip] = [s for s in report["skipped"] if s["engine"] == "torch-compile"]
    assert "torch.compile (inductor, freezing) failed" in skip["reason"] and "C++ compiler" in skip["reason"]
    assert report["summary"][0].startswith("batch 1, beam 2: strongest peer reference")
    assert any(line.startswith("torch-compile not run: torch.compile") for line in report["summary"])


def test_reference_runs_under_inference_mode(tiny_model, monkeypatch):
    import torch

    from captrt.bench import runners
    from captrt.train import reference

    seen = []
    real = reference.reference_beam_search_features

    def spy(*args, **kwargs):
        seen.append(torch.is_inference_mode_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "reference_beam_search_features", spy)
    from captrt.runtime.model_dir import ModelDir

    runner = runners.make_runner("reference", ModelDir.load(tiny_model), precision="fp32", device="cpu", threads=1)
    sample = runner.run(__import__("tests.conftest", fromlist=["random_images"]).random_images(2), 2, 2)
    assert seen == [True, True] and len(sample.tokens) == 2 and sample.steps_per_image == [2, 2]


@pytest.mark.slow
def test_torch_compile_row_or_its_reason(tiny_model):
    """The real torch.compile (a minute on 2 cores when inductor's cache is cold): a row beside reference with
    its captions compared, or a skipped entry saying why."""
    report = run_bench(tiny_model, engines="reference,torch-compile", batches="1", beams="3", steps=3,
                       print_table=False, **FAST)
    rows = {r["engine"]: r for r in report["results"]}
    if "torch-compile" not in rows:
        [skip] = [s for s in report["skipped"] if s["engine"] == "torch-compile"]
        assert skip["reason"].startswith("torch.compile")
        return
    tc = rows["torch-compile"]
    assert tc["provider"] == "torch:cpu" and tc["quality"]["status"] == "peer" and tc["steps_mean"] == 3.0
    assert tc["captions"]["compared_with"] == "reference" and tc["captions"]["images"] == 2
    assert tc["captions"]["identical"]  # same weights, same search; freezing only folds BatchNorm


def test_captrt_bench_streams_and_decoding_flags(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from captrt.cli import app

    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_model), "--engine", "ort", "--batch", "1", "--beam",
                                   "3", "--steps", "2", "--warmup", "0", "--iters", "1", "--streams", "1",
                                   "--decoding", "--json", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["variant"], r.get("streams")) for r in rows] == [(None, None), ("options", None), ("streams", 1)]
    bad = CliRunner().invoke(app, ["bench", "--model", str(tiny_model), "--streams", "1,x"])
    assert bad.exit_code == 2 and "streams" in bad.output and "Traceback" not in bad.output
