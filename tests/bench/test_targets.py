"""Target judgement, analysis facts, Markdown and the plot, on a hand-made report (pure arithmetic)."""

from __future__ import annotations

import pytest

from captrt.bench.report import format_markdown, format_table
from captrt.bench.targets import analysis_facts, breakdown, evaluate_targets, int8_parity_note


def _stats(p50):
    return {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2, "mean": p50, "n": 10}


def _row(engine, precision, batch, beam, e2e, enc, step, first=None, floor=None):
    return {"engine": engine, "precision": precision, "provider": "CPUExecutionProvider", "device": "cpu",
            "batch": batch, "beam": beam, "steps": 16, "steps_mean": 16.0, "iters": 10, "warmup": 2,
            "encoder_ms": _stats(enc), "step_ms": _stats(step), "first_step_ms": _stats(first or step),
            "e2e_ms": {"per_batch": _stats(e2e), "per_image": _stats(e2e / batch)},
            "images_per_s": batch * 1e3 / e2e, "peak_rss_mb": 900.0, "peak_rss_scope": "config",
            "floor_ms": floor, "floor_ratio": None if floor is None else step / floor}


def _report(ort_e2e=80.0, int8_e2e=40.0, ref_e2e=400.0, step=1.5, b8_e2e=500.0):
    rows = [_row("ort", "fp32", 1, 5, ort_e2e, 50.0, step, 2.0, floor=1.2),
            _row("ort", "fp32", 8, 5, b8_e2e, 380.0, 6.0, 6.0, floor=1.2),
            _row("ort", "int8", 1, 5, int8_e2e, 16.0, 1.0, floor=0.4),
            _row("reference", "fp32", 1, 5, ref_e2e, 100.0, 15.0)]
    return {"results": rows, "skipped": [], "machine": {"cores": 2, "load_average": [0.1, 0.1, 0.1],
                                                         "load_average_end": [0.2, 0.1, 0.1]},
            "floor": {"bandwidth_gbps": {"1": 34.0, "2": 42.0},
                      "precisions": {"fp32": {"weight_bytes": 70e6, "read_bytes": 50e6, "gathered_bytes": {"e": 20e6},
                                              "bandwidth_gbps": 42.0, "threads": 2, "floor_ms": 1.2}}}}


def test_targets_met_and_missed():
    manifest = {"parity": {"int8": {"measured": True, "images": 50, "identical": 47, "beam_size": 5,
                                    "bleu4_change": -0.0031}}}
    t = {x.name.split(" (")[0]: x for x in evaluate_targets(_report(), manifest)}
    fp32 = t["ORT fp32 end to end vs reference"]
    assert fp32.value == pytest.approx(5.0) and fp32.status == "met"
    step = t["ORT fp32 decoder step vs memory floor"]
    assert step.value == pytest.approx(1.25) and step.status == "met"
    int8 = t["ORT int8 end to end vs reference"]
    assert int8.value == pytest.approx(10.0) and int8.status == "met"
    assert "47/50" in int8.note and "-0.0031" in int8.note
    batch = t["ORT fp32 throughput, batch 8 vs batch 1"]
    assert batch.value == pytest.approx((8e3 / 500) / (1e3 / 80)) and batch.status == "met"

    assert analysis_facts(_report(), evaluate_targets(_report(), manifest)) == []  # nothing missed: no analysis
    slow_report = _report(ort_e2e=200, int8_e2e=50, step=2.0, b8_e2e=2000)
    slow_targets = evaluate_targets(slow_report)
    slow = {x.name.split(" (")[0]: x.status for x in slow_targets}
    facts = "\n".join(analysis_facts(slow_report, slow_targets))
    assert "ort fp32, batch 1, beam 5: end to end 200.0 ms = encoder 50.0 ms (25%)" in facts
    assert "load average" in facts
    assert slow == {"ORT fp32 end to end vs reference": "missed", "ORT fp32 decoder step vs memory floor": "missed",
                    "ORT int8 end to end vs reference": "missed", "ORT fp32 throughput, batch 8 vs batch 1": "missed"}


def test_missing_configuration_is_not_measured():
    report = _report()
    report["results"] = [r for r in report["results"] if r["engine"] != "reference"]
    statuses = [t.status for t in evaluate_targets(report)]
    assert statuses[0] == "not measured" and statuses[2] == "not measured"
    assert int8_parity_note(None) == "no int8 parity report in captrt.json"


def test_breakdown_adds_up():
    b = breakdown(_row("ort", "fp32", 1, 5, e2e=80.0, enc=50.0, step=1.5, first=2.0))
    assert b["decoder_ms"] == pytest.approx(2.0 + 15 * 1.5)
    assert b["encoder_ms"] + b["decoder_ms"] + b["other_ms"] == pytest.approx(80.0)
    ref = breakdown(_row("reference", "fp32", 1, 5, e2e=400.0, enc=100.0, step=15.0))
    assert ref["decoder_ms"] == pytest.approx(16 * 15.0)


def test_markdown_table_and_plot(tmp_path):
    report = _report()
    md = format_markdown(report).splitlines()
    assert len(md) == 2 + len(report["results"]) and md[2].startswith("| ort | fp32 |")
    assert "1.25x" in md[2]  # step/floor column
    assert "memory floor fp32" in format_table(report)
    pytest.importorskip("matplotlib")
    from captrt.bench.plot import plot_latency

    path = plot_latency({**report, "settings": {"steps": 16}}, tmp_path / "latency.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
