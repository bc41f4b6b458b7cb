"""The standard benchmark suite (`make bench`): writes benchmarks/RESULTS.md and benchmarks/latency.png.

(a) A seed-sized model with random weights (ResNet-101, 14x14 grid, vocabulary 9490, 512 dims),
    exported once with fp32 + int8 graphs (cached in --work), benchmarked with ONNX Runtime fp32/int8,
    the runtime's torch engine and the reference search, batch 1/8, beam 1/5, 16 forced steps.
(b) The demo model (demo_out/model, made by `make demo`), real decoding of its test images.
(c) The suite model again, against its peers: ORT fp32 beside the reference search in PyTorch eager and
    with the encoder through torch.compile, streams 1 and 2 (captions compared), the options path, batch 1/4,
    beam 5, 16 forced steps, every row also as a % of this machine's fp32 floor.

    python benchmarks/run_suite.py            # full: warmup 2, 10 timed runs per configuration
    python benchmarks/run_suite.py --quick    # warmup 1, 3 timed runs: checks the pipeline, rough numbers

Timing is only meaningful on a quiet machine: the load average is recorded at start and end.
RESULTS.md is rewritten whole, except the service section that benchmarks/serve.py writes between
`<!-- serve:begin -->` and `<!-- serve:end -->` and the corpus section of benchmarks/batch.py
(`<!-- batch:begin -->` ... `<!-- batch:end -->`): they are carried over verbatim, at the end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from captrt.bench.suite_model import default_work

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUITE_A = {"engines": "ort,torch,reference", "precisions": "fp32,int8", "batches": "1,8", "beams": "1,5", "steps": 16}
SUITE_B = {"batches": "1,8", "beams": "1,5", "steps": None}
SUITE_C = {"engines": "ort,reference,torch-compile", "precisions": "fp32", "batches": "1,4", "beams": "5", "steps": 16,
           "streams": "1,2", "decoding": True}
RUNS = {"full": {"warmup": 2, "iters": 10, "max_seconds": 60.0}, "quick": {"warmup": 1, "iters": 3, "max_seconds": 15.0}}


def bench_command(model: Path, cfg: dict[str, Any], runs: dict[str, Any], json_out: Path, extra: str = "") -> str:
    """The `captrt bench` command line equivalent to one run_bench call."""
    parts = ["captrt", "bench", "--model", str(model), "--engine", cfg["engines"], "--precision", cfg["precisions"],
             "--batch", cfg["batches"], "--beam", cfg["beams"]]
    if cfg.get("steps"):
        parts += ["--steps", str(cfg["steps"])]
    if cfg.get("streams"):
        parts += ["--streams", str(cfg["streams"])]
    if cfg.get("decoding"):
        parts += ["--decoding"]
    parts += ["--warmup", str(runs["warmup"]), "--iters", str(runs["iters"]), "--max-seconds", f"{runs['max_seconds']:g}"]
    if extra:
        parts += shlex.split(extra)
    parts += ["--json", str(json_out)]
    return shlex.join(parts)


def run_suite_a(work: Path, runs: dict[str, Any], rebuild: bool) -> tuple[dict, dict, str]:
    from captrt.bench.bench import run_bench
    from captrt.bench.suite_model import suite_model_dir
    from captrt.runtime.model_dir import ModelDir

    print("[suite a] seed-sized model (exported once, cached in {})".format(work), file=sys.stderr, flush=True)
    model = suite_model_dir(work, rebuild=rebuild)
    json_out = work / "suite_a.json"
    # Random weights: int8 is written without meeting the quality budget, so it is benched "unverified".
    report = run_bench(model, **SUITE_A, **runs, json_out=json_out, allow_unverified=True)
    return report, ModelDir.load(model).manifest, bench_command(model, SUITE_A, runs, json_out, "--allow-unverified")


def run_suite_c(work: Path, runs: dict[str, Any]) -> tuple[dict, str]:
    """The suite model (already built by suite (a)) against its peers, with streams and the options path."""
    from captrt.bench.bench import run_bench
    from captrt.bench.suite_model import suite_model_dir

    print("[suite c] peers, streams and the options path on the suite model", file=sys.stderr, flush=True)
    model = suite_model_dir(work)
    json_out = work / "suite_c.json"
    report = run_bench(model, **SUITE_C, **runs, json_out=json_out)
    return report, bench_command(model, SUITE_C, runs, json_out)


def suite_c_lines(c: dict[str, Any], cmd: str) -> list[str]:
    """RESULTS.md's suite (c) section: how the rows were measured, the floor's definition, the summary, the table."""
    from captrt.bench.floor import FLOOR_DEFINITION
    from captrt.bench.report import floor_lines, format_markdown

    s = c["settings"]
    streams = ", ".join(map(str, s.get("streams") or [])) or "none"
    return ["## Suite (c): captrt against its peers, streams, the options path", "",
            f"The suite (a) model, {s['steps']} forced steps, beam {', '.join(map(str, s['beams']))}, batch "
            f"{', '.join(map(str, s['batches']))}, fp32, one run: every row takes its turn run by run on the same "
            "images. Peers: `reference` is the seed's per-image beam search in PyTorch eager under "
            "`torch.inference_mode()`; `torch-compile` is the same search with the encoder through "
            "`torch.compile(backend=\"inductor\", options={\"freezing\": True})`, compiled and warmed up before "
            "timing (the decoder steps stay eager: their shapes change as beams end). `streams SxT` rows "
            f"(S = {streams}; T = the cores // S) time `Captioner.load(streams=S, threads=T).caption(images, "
            "batch_size=N)` over one list of max(S) x 2 batches, which the Captioner spreads over its streams "
            "(the library's own path, as a caller of `caption()` gets it): images/s is the list over the call's "
            "wall time, and the captions of every S are compared image by image (`same captions`). `options` "
            "is ORT fp32 decoding with `num_hypotheses=3, return_scores=True, no_repeat_ngram_size=3, "
            "min_length=5` (the decoding controls' options path), beside its default row.", "",
            FLOOR_DEFINITION, "", f"command: `{cmd}`", "",
            "Summary (captrt against the strongest peer, the faster of reference and torch-compile):", "",
            *[f"- {line}" for line in c.get("summary") or []], "",
            format_markdown(c), "", *[f"- {line}" for line in floor_lines(c)],
            *[f"- skipped {k['engine']} {k['precision']}{(' ' + k['variant']) if k.get('variant') else ''}: "
              f"{k['reason']}" for k in c.get("skipped", [])], ""]


def run_suite_b(demo: Path, work: Path, runs: dict[str, Any]) -> tuple[dict | None, str]:
    """The demo model with real decoding; (None, why) when there is no demo model or it cannot run."""
    from captrt.bench.bench import run_bench
    from captrt.train.torch_engine import find_checkpoint
    from captrt.runtime.model_dir import ModelDir

    model = demo / "model"
    if not (model / "captrt.json").is_file():
        return None, f"skipped: {model} not found (run `make demo` first)"
    mdir = ModelDir.load(model)
    engines = ["ort"]
    note = ""
    try:
        find_checkpoint(mdir, None)
        engines += ["torch", "reference"]
    except ValueError as exc:  # ModelDirError: the training checkpoint is gone
        note = f"torch and reference left out: {exc}"
    dataset = demo / "synth" / "dataset_synth.json"
    images = dataset if dataset.is_file() else None
    cfg = {**SUITE_B, "engines": ",".join(engines), "precisions": ",".join(p for p in ("fp32", "int8") if p in mdir.graphs)}
    json_out = work / "suite_b.json"
    print(f"[suite b] demo model {model}, real decoding", file=sys.stderr, flush=True)
    report = run_bench(model, **cfg, **runs, images=images, json_out=json_out)
    extra = f"--images {shlex.quote(str(images))}" if images else ""
    return report, "\n".join(x for x in (note, "command: `" + bench_command(model, cfg, runs, json_out, extra) + "`") if x)


def machine_lines(report: dict[str, Any]) -> list[str]:
    m, v = report["machine"], report["versions"]
    return [f"- CPU: {m['cpu']} ({', '.join(m['cpu_flags']) or 'no AVX flags listed'})",
            f"- cores usable: {m['cores']} (logical CPUs {m['logical_cpus']}), memory {m['memory_gb']} GB",
            f"- {m['platform']}, Python {m['python']}",
            "- libraries: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- load average (1/5/15 min, counts the suite's own threads): {m['load_average']} at the start, "
            f"{m.get('load_average_end')} at the end; CPU used by other processes during the run: "
            f"{m.get('other_processes_cores')} cores"]


def write_results(path: Path, a: dict, manifest: dict, cmd_a: str, b: dict | None, b_note: str, quick: bool,
                  argv: list[str], plot: Path | None, profiles: list | None = None,
                  analysis: Path | None = None, c: dict | None = None, cmd_c: str = "") -> None:
    """analysis: a hand-written Markdown file (benchmarks/ANALYSIS.md) appended after the measured facts.
    c: suite (c)'s report (peers, streams, the options path), written after suite (b)."""
    from captrt.atomic import atomic_write_text
    from captrt.bench.profile import format_profile
    from captrt.bench.report import floor_lines, format_markdown
    from captrt.bench.targets import analysis_facts, evaluate_targets

    targets = evaluate_targets(a, manifest)
    cores = a["machine"]["cores"]
    others = [r["machine"].get("other_processes_cores") for r in (a, b, c) if r is not None]
    other = max((o for o in others if o is not None), default=None)
    busy = other is not None and other > 0.25  # a quarter of a core used by others all along
    model = a["model"]
    out = ["# captrt benchmark results", "",
           f"Generated by `benchmarks/run_suite.py` on {a['date']}" + (" with `--quick` (3 timed runs per "
           "configuration: rough numbers)" if quick else "") + ".", ""]
    if busy:
        out += [f"**Warning: the machine was busy**: other processes used {other:.2f} of the {cores} cores on "
                "average while the suite ran, so latencies are inflated and noisy. Re-run `make bench` on a quiet "
                "machine.", ""]
    out += ["## Machine", "", *machine_lines(a), "", "## Commands", "", "```",
            "make bench    # = " + shlex.join([".venv/bin/python", "benchmarks/run_suite.py", *argv]),
            "# suite (a), as one captrt bench call:", cmd_a,
            *(["# suite (c), peers, streams and the options path:", cmd_c] if c is not None else []), "```", ""]
    out += ["## Targets", "", "Suite (a), one run, batch 1 unless said, beam 5, 16 forced steps; end-to-end p50s.", "",
            "| target | goal | measured | status |", "|---|---|---|---|"]
    for t in targets:
        detail = t.detail + (f"; {t.note}" if t.note else "")
        out.append(f"| {t.name} | {t.goal} | {detail} | **{t.status}** |")
    out += ["", f"## Suite (a): seed-sized model, random weights, {a['settings']['steps']} forced steps", "",
            f"{model.get('backbone')}, {model['grid']}x{model['grid']} grid, vocabulary {model.get('vocab_size')}, "
            f"{model.get('decoder_dim')} dims, max_beam {model['max_beam']}; {a['settings']['threads']} threads; "
            f"images: {a['settings']['images']}. Steps are forced (`end=-1`: nothing completes), so every engine does "
            "the same work. `step` is the decoder step for the whole batch (reference: the seed's step, attention "
            "projection recomputed, for each image of the batch); `step/floor` divides it by the weight bytes one "
            "step reads over the measured read bandwidth. Percentiles are over timed runs after warm-up. All "
            "engines are loaded together and take turns run by run on the same images, so the ratios between "
            "them come from the same minutes (this machine's speed drifts by up to 2x over minutes); `engine MB` "
            "is what loading an engine added to the resident set, `peak RSS` the process's with all loaded.", "",
            format_markdown(a), "", *[f"- {line}" for line in floor_lines(a)], ""]
    if plot is not None:
        out += [f"![latency vs batch and beam]({plot.name})", ""]
    facts = analysis_facts(a, targets)
    if facts:
        out += ["## Analysis", "", "Measured facts for the missed targets (p50s from the run above):", "", *facts, ""]
    if profiles:
        out += ["## Profile (ONNX Runtime's profiler, suite (a) model, mean per run)", "",
                "Encoder at batch 1, decoder step at batch 1, beam 5; per operator type, the largest first. "
                "`session.run` is the wall time of one call, `kernels` the sum of its node times.", "",
                *[f"- {format_profile(p)}" for p in profiles], ""]
    if analysis is not None and analysis.is_file():
        out += [analysis.read_text(encoding="utf-8").strip(), ""]
    out += ["## Suite (b): demo model, real decoding", ""]
    if b is None:
        out += [b_note, ""]
    else:
        out += [f"Model {b['model']['path']} ({b['model'].get('backbone')}, grid {b['model']['grid']}, vocabulary "
                f"{b['model'].get('vocab_size')}); images: {b['settings']['images']}; real decoding up to "
                f"{b['model']['max_steps']} steps (the steps column is the mean a search ran).", "", b_note, "",
                format_markdown(b), "", *[f"- {line}" for line in floor_lines(b)], ""]
    if c is not None:
        out += suite_c_lines(c, cmd_c)
    atomic_write_text(path, with_serve_section("\n".join(out), path))


def with_serve_section(text: str, path: Path) -> str:
    """text plus the `benchmarks/serve.py` and `benchmarks/batch.py` sections of the RESULTS.md at path
    (if any), re-appended verbatim at the end: the suite rewrites the file but does not own them."""
    from captrt.bench.sections import PRESERVED, append_preserved

    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    for begin, end in PRESERVED:
        text = append_preserved(text, old, begin, end)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed runs per configuration")
    ap.add_argument("--work", type=Path, default=default_work(), help="where the suite model is cached")
    ap.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and latency.png go")
    ap.add_argument("--demo", type=Path, default=ROOT / "demo_out", help="`make demo`'s output directory")
    ap.add_argument("--rebuild", action="store_true", help="re-create and re-export the suite model")
    args = ap.parse_args(argv)
    runs = RUNS["quick" if args.quick else "full"]
    from captrt.bench.plot import plot_latency

    args.work.mkdir(parents=True, exist_ok=True)
    try:
        a, manifest, cmd_a = run_suite_a(args.work, runs, args.rebuild)
        from captrt.bench.profile import profile_graphs

        print("[profile] ONNX Runtime profiler on the suite (a) graphs", file=sys.stderr, flush=True)
        profiles = [p for prec in ("fp32", "int8") if prec in manifest.get("graphs", {})
                    for p in profile_graphs(a["model"]["path"], prec, runs=20 if not args.quick else 5,
                                            threads=a["settings"]["threads"])]
        c, cmd_c = run_suite_c(args.work, runs)
        b, b_note = run_suite_b(args.demo, args.work, runs)
    except (ValueError, RuntimeError, FileExistsError) as exc:  # clear errors from bench/export
        print(f"run_suite: error: {exc}", file=sys.stderr)
        return 2
    plot = plot_latency(a, args.out / "latency.png", title=f"captrt suite (a): {a['machine']['cpu']}, "
                        f"{a['settings']['threads']} threads, {a['settings']['steps']} forced steps")
    write_results(args.out / "RESULTS.md", a, manifest, cmd_a, b, b_note, args.quick, argv, plot, profiles,
                  HERE / "ANALYSIS.md", c, cmd_c)
    print(f"wrote {args.out / 'RESULTS.md'} and {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
