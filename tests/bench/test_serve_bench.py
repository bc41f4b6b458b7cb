"""benchmarks/serve.py's pure parts and its client's (captrt.bench.load): pooling rounds, Prometheus parsing,
targets, the RESULTS.md section (and run_suite's preservation of it). No server is started; nothing asserts on time."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from captrt.bench import load
from captrt.bench.sections import (SERVE_BEGIN, SERVE_END, append_preserved, extract_section, replace_section,
                                   write_section)
from captrt.bench.serve_process import metric_value

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


serve = _load("captrt_serve_bench", "serve.py")
run_suite = _load("captrt_run_suite", "run_suite.py")

METRICS = """# HELP captrt_batch_size Images per batched engine call
# TYPE captrt_batch_size histogram
captrt_batch_size_bucket{le="1.0"} 2.0
captrt_batch_size_bucket{le="+Inf"} 7.0
captrt_batch_size_count 7.0
captrt_batch_size_sum 61.0
# HELP captrt_images_captioned_total Images the engine captioned
# TYPE captrt_images_captioned_total counter
captrt_images_captioned_total 61.0
# HELP captrt_inference_seconds Wall time of one batched engine call
# TYPE captrt_inference_seconds histogram
captrt_inference_seconds_bucket{le="+Inf"} 7.0
captrt_inference_seconds_count 7.0
captrt_inference_seconds_sum 1.2
captrt_requests_total{method="POST",route="/v1/captions",status="200"} 61.0
"""


def _round(mode, latencies, seconds, errors=None, requests=None):
    r = load.RoundResult(mode, 32, requests=requests or len(latencies) + sum((errors or {}).values()),
                          ok=len(latencies), seconds=seconds, latencies_ms=list(latencies))
    r.errors = Counter(errors or {})
    return r


def _section(body: str) -> str:
    return f"{SERVE_BEGIN}\n## Service\n\n{body}\n{SERVE_END}"


def test_summarize_mode_pools_rounds():
    a = _round("on", [10.0, 20.0, 30.0], 2.0, errors={"503": 1})
    b = _round("on", [40.0, 50.0], 3.0)
    batch = {"batches": 3, "batched_images": 5, "mean_batch": 1.67, "server_images": 5}
    row = load.summarize_mode("on", 16, 32, [a, b], batch, {"ReadTimeout": 1})
    pooled = [10.0, 20.0, 30.0, 40.0, 50.0]
    for q in (50, 90, 99):
        assert row["latency_ms"][f"p{q}"] == pytest.approx(float(np.percentile(pooled, q)))
    assert row["requests"] == 6 and row["ok"] == 5 and row["seconds"] == 5.0
    assert row["requests_per_s"] == pytest.approx(6 / 5) and row["images_per_s"] == pytest.approx(1.0)
    assert row["errors"] == 1 and row["error_kinds"] == {"503": 1} and row["warmup_errors"] == {"ReadTimeout": 1}
    assert row["mean_batch"] == 1.67 and row["round_images_per_s"] == [1.5, pytest.approx(0.67)]


def test_summarize_mode_without_successes():
    row = load.summarize_mode("off", 1, 8, [_round("off", [], 1.0, errors={"ConnectError": 4})],
                               load.batch_delta(load.batch_counters(""), load.batch_counters("")))
    assert row["latency_ms"]["p50"] is None and row["images_per_s"] == 0 and row["errors"] == 4
    assert row["mean_batch"] is None
    assert "| - | - | - | 4 | - |" in serve.format_table([row])


def test_parse_metric_and_batch_delta():
    assert metric_value(METRICS, "captrt_batch_size_sum") == 61.0
    assert metric_value(METRICS, "captrt_batch_size_count") == 7.0
    assert metric_value(METRICS, "captrt_batch_size") is None  # only whole sample names match
    assert metric_value(METRICS, "captrt_requests_total") is None  # labelled samples are not this one
    before = load.batch_counters("captrt_batch_size_count 2.0\ncaptrt_batch_size_sum 2.0\n"
                                  "captrt_images_captioned_total 2.0\ncaptrt_inference_seconds_sum 0.02\n")
    delta = load.batch_delta(before, load.batch_counters(METRICS))
    assert delta == {"batches": 5, "batched_images": 59, "mean_batch": 11.8, "server_images": 59,
                     "engine_ms_per_image": 20.0}  # (1.2 - 0.02) s over 59 images


def test_classify_answers():
    good = b'{"captions": [{"name": "a.jpg", "caption": "x", "error": null}]}'
    assert load.classify(200, good) is None
    assert load.classify(503, b"{}") == "503"
    assert load.classify(200, b"not json") == "200 with a bad body"
    assert load.classify(200, b'{"captions": [{"error": "unreadable"}]}') == "200 with a caption error"


def test_round_order_is_abba():
    assert [serve.round_order(i) for i in range(4)] == [("on", "off"), ("off", "on"), ("on", "off"), ("off", "on")]


def _row(mode, ips, p50, p99, rounds=(1.0, 1.0), errors=0):
    return {"mode": mode, "concurrency": 32, "images_per_s": ips, "errors": errors,
            "latency_ms": {"p50": p50, "p90": p50, "p99": p99}, "round_images_per_s": list(rounds)}


def test_targets_met_missed_and_not_measured():
    met = serve.evaluate_targets([_row("on", 30.0, 100.0, 250.0, (30.0, 30.0)), _row("off", 20.0, 150.0, 200.0,
                                                                                     (20.0, 25.0))])
    assert [t["status"] for t in met] == ["met", "met"]
    assert met[0]["value"] == 1.5 and "1.20x..1.50x" in met[0]["measured"] and met[1]["value"] == 2.5
    missed = serve.evaluate_targets([_row("on", 21.0, 100.0, 400.0, errors=2), _row("off", 20.0, 150.0, 200.0)])
    assert [t["status"] for t in missed] == ["missed", "missed"]
    assert all("errors: ON 2, OFF 0" in t["measured"] for t in missed)
    absent = serve.evaluate_targets([_row("on", 21.0, 100.0, 400.0)])
    assert [t["status"] for t in absent] == ["not measured", "not measured"]


def test_replace_section_replaces_in_place_or_appends():
    old = "# results\n\nintro\n\n" + _section("old numbers") + "\n\n## after\n"
    new = replace_section(old, _section("new numbers"))
    assert "new numbers" in new and "old numbers" not in new and new.endswith("## after\n")
    assert new.count(SERVE_BEGIN) == 1 and new.startswith("# results\n\nintro\n\n" + SERVE_BEGIN)
    appended = replace_section("# results\n\nsuite table\n", _section("x"))
    assert appended == "# results\n\nsuite table\n\n" + _section("x") + "\n"
    assert replace_section("", _section("x")) == _section("x") + "\n"
    assert replace_section(appended, _section("x")) == appended  # idempotent
    broken = "text\n" + SERVE_BEGIN + " but no end\n"  # malformed: leave it, append a whole section
    assert replace_section(broken, _section("x")).endswith(_section("x") + "\n")
    with pytest.raises(ValueError, match="must start with"):
        replace_section("text", "## no markers")


def test_write_section_file_round_trip(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, _section("first"))  # no file yet
    assert path.read_text() == _section("first") + "\n"
    path.write_text("# suite\n\ntable\n\n" + path.read_text())
    write_section(path, _section("second"))
    assert path.read_text() == "# suite\n\ntable\n\n" + _section("second") + "\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "RESULTS.md"]  # no temporary left behind


def test_run_suite_preserves_the_serve_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    assert run_suite.with_serve_section("# suite\n", path) == "# suite\n"  # no file yet
    kept = _section("service numbers\n| a | b |")
    path.write_text("# old suite\n\nold table\n\n" + kept + "\n")
    text = run_suite.with_serve_section("# new suite\n\nnew table\n", path)
    assert text == "# new suite\n\nnew table\n\n" + kept + "\n"
    assert extract_section(text) == kept
    assert append_preserved(text, path.read_text()) == text  # never duplicated
    path.write_text("# old suite without a service section\n")
    assert run_suite.with_serve_section("# new\n", path) == "# new\n"


def test_serve_section_renders_with_markers():
    rows = [{**load.summarize_mode(m, mb, 32, [_round(m, [100.0, 120.0], 1.0)],
                                    {"batches": 1, "batched_images": 2, "mean_batch": 2.0, "server_images": 2}),
             "concurrency": 32} for m, mb in (("on", 16), ("off", 1))]
    report = {"date": "2026-01-01T00:00:00+00:00", "command": "python benchmarks/serve.py --quick",
              "model": {"path": "m", "id": "model@x"},
              "settings": {"rounds": 1, "round_seconds": 1.0, "max_requests": 10, "quick": True,
                           "concurrency": [32], "beam": 5, "precision": "fp32", "max_batch": 16, "images": "i"},
              "machine": {"cpu": "cpu", "cores": 2, "logical_cpus": 2, "memory_gb": 1.0, "platform": "p",
                          "python": "3", "load_average": [0, 0, 0], "load_average_end": [0, 0, 0],
                          "other_cores_before": 0.0, "other_processes_cores": 1.5},
              "versions": {"captrt": "0"}, "results": rows, "targets": serve.evaluate_targets(rows),
              "servers": {"on": {"cmd": ["captrt", "serve"], "exit_code": 0, "killed": False},
                          "off": {"cmd": ["captrt", "serve"], "exit_code": 0, "killed": False}}}
    text = serve.serve_section(report)
    assert text.startswith(SERVE_BEGIN) and text.endswith(SERVE_END)
    assert "machine was busy" in text and "server exit codes after SIGTERM: ON 0, OFF 0" in text
    assert replace_section("", text).count(SERVE_END) == 1


def test_load_uploads_from_a_directory(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"jpeg bytes")
    (tmp_path / "a.PNG").write_bytes(b"png bytes")
    (tmp_path / "notes.txt").write_text("not an image")
    uploads, what = load.load_uploads(tmp_path)
    assert [(u.name, u.data, u.content_type) for u in uploads] == [("a.PNG", b"png bytes", "image/png"),
                                                                  ("b.jpg", b"jpeg bytes", "image/jpeg")]
    with pytest.raises(ValueError, match="no such file"):
        load.load_uploads(tmp_path / "missing")


def test_missing_model_exits_2_with_one_line(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make demo" in err and "--model" in err
