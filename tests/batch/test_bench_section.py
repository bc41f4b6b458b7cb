"""benchmarks/batch.py's RESULTS.md section: written in place (captrt.bench.sections.write_section, which every
benchmark script uses), and carried over by run_suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from captrt.bench.sections import BATCH_BEGIN, BATCH_END, SERVE_BEGIN, SERVE_END, extract_section, write_section

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_batch_section_is_replaced_in_place_and_survives_the_suite(tmp_path):
    batch = _load("captrt_batch_bench", "batch.py")
    assert batch.write_section is write_section  # the shared atomic writer, not a copy
    run_suite = _load("captrt_run_suite_b", "run_suite.py")
    path = tmp_path / "RESULTS.md"
    serve = f"{SERVE_BEGIN}\n## Service\nnumbers\n{SERVE_END}"
    path.write_text(f"# suite\n\n{serve}\n")
    write_section(path, f"{BATCH_BEGIN}\n## Corpus\nfirst\n{BATCH_END}", BATCH_BEGIN, BATCH_END)
    write_section(path, f"{BATCH_BEGIN}\n## Corpus\nsecond\n{BATCH_END}", BATCH_BEGIN, BATCH_END)
    assert path.read_text().count(BATCH_BEGIN) == 1 and "second" in path.read_text()
    text = run_suite.with_serve_section("# new suite\n", path)
    assert extract_section(text) == serve
    assert extract_section(text, BATCH_BEGIN, BATCH_END) == f"{BATCH_BEGIN}\n## Corpus\nsecond\n{BATCH_END}"
    assert text.startswith("# new suite\n")
