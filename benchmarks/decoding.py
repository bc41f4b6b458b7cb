"""Decoding controls: what the format-2 step graph costs on the default path, and what each option costs.

    python benchmarks/decoding.py                               # seed-sized suite model -> RESULTS.md
    python benchmarks/decoding.py --model demo --reps 2 --no-write   # demo-sized, fast: checks the pipeline
    python benchmarks/decoding.py --model DIR                   # any model directory with its checkpoint

One run, one process, the same images throughout, real decoding (up to the model's max_steps), fp32:
(a) The default path (beam 5) on the format-2 graphs against format-1 graphs of the same weights, for
    ONNX Runtime (ort) and OpenVINO (openvino, both graphs in OpenVINO: its default fp32 placement runs
    the step in ONNX Runtime, which the ort row already measures). The format-1 step graph is the step
    as it was before the controls (no ban_ids/penalty_ids/penalty inputs, no logp output, no
    processing ops), traced from the same checkpoint with the exporter's export_onnx and written into a
    copy of the model directory with format_version 1 and its new sha256. Both directories are loaded
    at once and take turns rep by rep (A B, then B A: drift hits both); per-image end-to-end ms at
    batch 1 and 4, the ratio new/old (target <= 1.03), the decoder step alone (N images x K=5 slots),
    and whether the captions (tokens and scores) are identical.
(b) The cost of each option against the default path on the format-2 graphs (ort), every
    configuration taking turns rep by rep: num_hypotheses=3 + return_scores, suppress (3 words),
    disable_unk, min_length=8, repetition_penalty=1.2, no_repeat_ngram_size=3, a 2-word prefix, all of
    these combined, and sample=True with sampling_topp=0.9 (beam 1, against the beam-1 default). The
    words are taken from the default captions of the same images, so the options change the search.
    Options that change the captions' length change the work too: the mean caption length is listed.

--model: `seed` (default) is the benchmark suite's seed-sized random-weight model (ResNet-101, 14x14
grid, vocabulary 9490; captrt.bench.suite_model, cached in --work and shared with run_suite.py);
`demo` a demo-sized random-weight model (ResNet-18, 8x8 grid, 256 dims, vocabulary 61), built once in
--work: fast, for checking the pipeline, not the reference measurement; anything else is a model
directory whose checkpoint can be found (captrt.train.torch_engine.find_checkpoint), e.g.
`demo_out/model` from `make demo` (trained: captions of realistic lengths; its format-1 copy goes to
--work, by default beside the directory). Random-weight models rarely emit <end>, so their captions
run to max_steps: the option costs are then per-step costs at equal work (see the `words` column).

The section goes between `<!-- decoding:begin -->` and `<!-- decoding:end -->` in RESULTS.md; a run
on anything but the seed model says so in its heading. Timings are only meaningful on a quiet
machine: the CPU time other processes used during the run is recorded beside the numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from captrt.bench.sections import DECODING_BEGIN, DECODING_END, write_section  # run_suite.py keeps this section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TARGET = 1.03  # format 2 over format 1 on the default path, per image
BEAM = 5
OLD_DIR = "model-format1"
DEMO_SETTINGS = {"recipe": 1, "vocab_size": 61, "backbone": "resnet18", "enc_size": 8, "attention_dim": 256,
                 "embed_dim": 256, "decoder_dim": 256, "max_beam": 10, "parity_count": 4}


# -- models ---------------------------------------------------------------------------------------------

def demo_model_dir(work: Path, rebuild: bool = False) -> Path:
    """WORK/model: a demo-sized random-weight model (fp32 only), exported once and reused."""
    from captrt.bench.suite_model import make_random_checkpoint
    from captrt.export.exporter import export_model
    from captrt.hashing import sha256_file

    work.mkdir(parents=True, exist_ok=True)
    ckpt, out, stamp_path = work / "demo.pt", work / "model", work / "stamp.json"
    if not rebuild and stamp_path.is_file() and ckpt.is_file() and (out / "captrt.json").is_file():
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        if stamp.get("settings") == DEMO_SETTINGS and stamp.get("checkpoint_sha256") == sha256_file(ckpt):
            return out
    s = DEMO_SETTINGS
    make_random_checkpoint(ckpt, vocab_size=s["vocab_size"], backbone=s["backbone"], enc_size=s["enc_size"],
                           attention_dim=s["attention_dim"], embed_dim=s["embed_dim"], decoder_dim=s["decoder_dim"])
    export_model(ckpt, out, max_beam=s["max_beam"], parity_count=s["parity_count"], overwrite=True, progress=True)
    stamp_path.write_text(json.dumps({"settings": DEMO_SETTINGS, "checkpoint_sha256": sha256_file(ckpt)}, indent=1),
                          encoding="utf-8")
    return out


def format_one_step_graph(checkpoint: Path, max_beam: int, opset: int):
    """The step graph as format version 1 had it, traced from `checkpoint` like the exporter traces it."""
    from captrt.export.format1 import export_format_one_step
    from captrt.train.checkpoint import load_checkpoint

    return export_format_one_step(load_checkpoint(checkpoint).build_model().eval(), max_beam, opset)


def format_one_copy(model: Path, out: Path, log: Callable[[str], None]) -> Path:
    """out: a copy of `model` (fp32 graphs only) whose step graph is format version 1's, same weights.

    Reused when it was made from the same captrt.json (its sha256 is recorded in the copy's manifest)."""
    from captrt.export.onnx_export import save_onnx
    from captrt.runtime.model_dir import ModelDir
    from captrt.train.torch_engine import find_checkpoint

    mdir = ModelDir.load(model)
    if (out / "captrt.json").is_file():
        try:
            if json.loads((out / "captrt.json").read_text(encoding="utf-8")).get("benchmark_source") == \
                    mdir.manifest_sha256:
                return out
        except (OSError, json.JSONDecodeError):
            pass
    if mdir.format_version < 2:
        raise SystemExit(f"decoding: {model} is already format version {mdir.format_version}; give a format-2 "
                         "directory (re-export it with `captrt export`)")
    checkpoint = find_checkpoint(mdir, None)
    log(f"format-1 step graph from {checkpoint} (same weights) -> {out}")
    graph = format_one_step_graph(checkpoint, mdir.max_beam, int(mdir.manifest.get("opset", 17)))
    if out.exists():
        shutil.rmtree(out)
    keep = {mdir.graphs["fp32"][g]["file"] for g in ("encoder", "decoder_step")}
    shutil.copytree(model, out, ignore=lambda d, names: [n for n in names if n == "cache" or (
        Path(d).resolve() == model.resolve() and n.endswith(".onnx") and n not in keep)])
    step = out / mdir.graphs["fp32"]["decoder_step"]["file"]
    save_onnx(graph, step)
    manifest = json.loads((model / "captrt.json").read_text(encoding="utf-8"))
    manifest["format_version"] = 1
    manifest["graphs"] = {"fp32": manifest["graphs"]["fp32"]}
    manifest["graphs"]["fp32"]["decoder_step"]["sha256"] = hashlib.sha256(step.read_bytes()).hexdigest()
    for key in ("parity", "refused"):
        if isinstance(manifest.get(key), dict):
            manifest[key] = {p: v for p, v in manifest[key].items() if p == "fp32"}
    manifest["verification"] = []  # records of the format-2 graphs; fp32 on the CPU needs none
    manifest["benchmark_source"] = mdir.manifest_sha256  # readers ignore unknown keys
    (out / "captrt.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


def resolve_model(name: str, work: Path | None, rebuild: bool, log: Callable[[str], None]) -> tuple[Path, Path, str]:
    """(model directory, work directory, label)."""
    if name == "seed":
        from captrt.bench.suite_model import default_work, suite_model_dir

        work = work or default_work()
        log(f"seed-sized suite model (exported once, cached in {work})")
        return suite_model_dir(work, rebuild=rebuild), work, "seed"
    if name == "demo":
        from captrt.bench.suite_model import default_work

        work = work or default_work().parent / "bench-decoding-demo"
        log(f"demo-sized random-weight model (exported once, cached in {work})")
        return demo_model_dir(work, rebuild=rebuild), work, "demo"
    path = Path(name)
    if not (path / "captrt.json").is_file():
        raise SystemExit(f"decoding: --model {name}: expected seed, demo or a model directory")
    return path, work or path.parent / "bench-decoding", "dir"


# -- timing ---------------------------------------------------------------------------------------------

def timed_captions(cap, images: np.ndarray, batch: int, options: dict[str, Any]) -> tuple[float, list]:
    """(ms per image, captions) of every image, captioned `batch` at a time."""
    from captrt.bench.measure import now_ms

    out = []
    t0 = now_ms()
    for i in range(0, len(images), batch):
        out += cap.caption(list(images[i:i + batch]), batch_size=batch, **options)
    return (now_ms() - t0) / len(images), out


def step_ms(engine, images: np.ndarray, iters: int) -> float:
    """Median ms of one decoder step, default path, len(images) images x BEAM slots."""
    from captrt.bench.measure import now_ms

    n = len(images)
    state = engine.encode(images)
    try:
        tokens = np.full((n, BEAM), 1, dtype=np.int64)
        engine.step(state, tokens, np.zeros((n, BEAM), dtype=np.int64))  # K_prev 1 -> K
        origin = np.ascontiguousarray(np.broadcast_to(np.arange(BEAM, dtype=np.int64), (n, BEAM)))
        times = []
        for _ in range(iters):
            t0 = now_ms()
            engine.step(state, tokens, origin)
            times.append(now_ms() - t0)
    finally:
        engine.release(state)
    return statistics.median(times)


def same_captions(a: list, b: list) -> tuple[bool, float]:
    """(tokens and finished flags equal, max |score difference|)."""
    equal = [(x.tokens, x.finished) for x in a] == [(y.tokens, y.finished) for y in b]
    diff = max((abs(x.score - y.score) for x, y in zip(a, b)), default=0.0)
    return equal, float(diff)


def format_comparison(new_dir: Path, old_dir: Path, images: np.ndarray, engines: list[str], batches: list[int],
                      reps: int, threads: int | None, log) -> tuple[list[dict], list[dict]]:
    from captrt.runtime import Captioner
    from captrt.runtime.errors import EngineUnavailableError

    rows, skipped = [], []
    for engine in engines:
        extra = {"encoder_on": "openvino", "step_on": "openvino"} if engine == "openvino" else {}
        try:
            new = Captioner.load(new_dir, engine=engine, threads=threads, **extra)
            old = Captioner.load(old_dir, engine=engine, threads=threads, **extra)
        except (EngineUnavailableError, ImportError) as exc:
            log(f"skipping {engine}: {exc}")
            skipped.append({"engine": engine, "reason": str(exc)})
            continue
        try:
            assert new.engine.controls and not old.engine.controls, "format 2 vs format 1 expected"
            for batch in batches:
                opts = {"beam_size": BEAM}
                _, want = timed_captions(new, images, batch, opts)  # warm-up, and the captions compared
                _, got = timed_captions(old, images, batch, opts)
                identical, score_diff = same_captions(want, got)
                times = {"new": [], "old": []}
                for r in range(reps):
                    for which in (("new", "old") if r % 2 == 0 else ("old", "new")):
                        ms, _ = timed_captions(new if which == "new" else old, images, batch, opts)
                        times[which].append(ms)
                steps = {"new": [], "old": []}
                for r in range(max(reps, 3)):
                    for which in (("new", "old") if r % 2 == 0 else ("old", "new")):
                        steps[which].append(step_ms((new if which == "new" else old).engine, images[:batch], 20))
                row = {"engine": engine, "provider": new.provider, "batch": batch,
                       "old_ms": statistics.median(times["old"]), "new_ms": statistics.median(times["new"]),
                       "paired_ratio": statistics.median(n / o for n, o in zip(times["new"], times["old"])),
                       "old_step_ms": statistics.median(steps["old"]), "new_step_ms": statistics.median(steps["new"]),
                       "identical": identical, "max_score_diff": score_diff,
                       "words": float(np.mean([len(c.tokens) for c in want])), "reps": reps}
                row["ratio"] = row["new_ms"] / row["old_ms"]
                log(f"{engine} batch {batch}: format 1 {row['old_ms']:.1f} ms/image, format 2 {row['new_ms']:.1f} "
                    f"(x{row['ratio']:.3f}, paired x{row['paired_ratio']:.3f}); step {row['old_step_ms']:.2f} -> "
                    f"{row['new_step_ms']:.2f} ms; captions {'identical' if identical else 'DIFFER'}")
                rows.append(row)
        finally:
            new.close()
            old.close()
    return rows, skipped


def option_sets(cap, images: np.ndarray) -> list[tuple[str, dict[str, Any], str]]:
    """(label, keyword arguments, baseline label) per configuration; words from the default captions."""
    from captrt.vocab import SPECIALS

    vocab = cap.vocab
    captions = cap.caption(list(images), beam_size=BEAM)
    words = [vocab.id2word[t] for c in captions for t in c.tokens]
    starts = Counter(tuple(vocab.id2word[t] for t in c.tokens[:2]) for c in captions if len(c.tokens) >= 2)
    prefix = list(starts.most_common(1)[0][0]) if starts else []
    frequent = [w for w, _ in Counter(words).most_common() if w not in prefix]
    spare = [w for w in vocab.word2id if w not in SPECIALS and w not in prefix and w not in frequent]
    suppress = (frequent + spare)[:3]
    if not prefix:
        prefix = [w for w in spare if w not in suppress][:2]
    beam = {"beam_size": BEAM}
    each = [("num_hypotheses=3, return_scores", {"num_hypotheses": 3, "return_scores": True}),
            (f"suppress {' '.join(suppress)}", {"suppress": suppress}),
            ("disable_unk", {"disable_unk": True}),
            ("min_length=8", {"min_length": 8}),
            ("repetition_penalty=1.2", {"repetition_penalty": 1.2}),
            ("no_repeat_ngram_size=3", {"no_repeat_ngram_size": 3}),
            (f"prefix \"{' '.join(prefix)}\"", {"prefix": prefix})]
    combined: dict[str, Any] = {}
    for _, kw in each:
        combined.update(kw)
    out = [("default", beam, "default")]
    out += [(label, {**beam, **kw}, "default") for label, kw in each]
    out += [("all of the above", {**beam, **combined}, "default"),
            ("default, beam 1", {"beam_size": 1}, "default, beam 1"),
            ("sample, sampling_topp=0.9, seed 7", {"beam_size": 1, "sample": True, "sampling_topp": 0.9, "seed": 7},
             "default, beam 1")]
    return out


def option_costs(model: Path, images: np.ndarray, batches: list[int], reps: int, threads: int | None,
                 log) -> list[dict]:
    from captrt.runtime import Captioner

    rows = []
    with Captioner.load(model, engine="ort", threads=threads) as cap:
        configs = option_sets(cap, images)
        for batch in batches:
            words = {}
            for label, kw, _ in configs:  # warm-up; each configuration's mean caption length
                _, caps = timed_captions(cap, images, batch, kw)
                words[label] = float(np.mean([len(c.tokens) for c in caps]))
            times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
            for r in range(reps):
                order = configs if r % 2 == 0 else configs[::-1]
                for label, kw, _ in order:
                    times[label].append(timed_captions(cap, images, batch, kw)[0])
            for label, kw, base in configs:
                ms = statistics.median(times[label])
                paired = statistics.median(t / b for t, b in zip(times[label], times[base]))
                rows.append({"options": label, "kwargs": kw, "baseline": base, "batch": batch, "ms": ms,
                             "ratio": paired, "words": words[label], "reps": reps})
                log(f"ort batch {batch} {label}: {ms:.1f} ms/image (x{paired:.3f} of {base}), "
                    f"{words[label]:.1f} words")
    return rows


# -- report ---------------------------------------------------------------------------------------------

def verdict(rows: list[dict]) -> str:
    if not rows:
        return "not measured"
    worst = max(rows, key=lambda r: r["paired_ratio"])
    differ = [r for r in rows if not r["identical"]]
    ok = worst["paired_ratio"] <= TARGET
    text = (f"**{'meets' if ok else 'misses'}** the <= {TARGET:.2f}x target on the default path: worst format 2 / "
            f"format 1 {worst['paired_ratio']:.3f}x ({worst['engine']}, batch {worst['batch']})")
    if differ:
        where = ", ".join(f"{r['engine']} batch {r['batch']}" for r in differ)
        text += f"; **captions differ** for {where}"
    else:
        text += "; captions identical everywhere"
    return text + "."


def section(report: dict[str, Any]) -> str:
    m, mod = report["machine"], report["model"]
    label = {"seed": "seed-sized model", "demo": "demo-sized model: a pipeline check, not the reference "
             "measurement", "dir": f"model {mod['path']}"}[report["kind"]]
    out = [DECODING_BEGIN, f"## Decoding controls: their cost ({label})", "",
           f"`{report['command']}` on {report['date']}: {m['cpu']} "
           f"({', '.join(m.get('cpu_flags') or []) or 'no AVX flags listed'}), {m['cores']} cores, "
           f"{report['threads']} threads; load average {m['load_average']} at the start, {m['load_average_end']} "
           f"at the end; other processes used {m['other_processes_cores']} cores during the run. Model: "
           f"{mod.get('backbone')}, grid {mod['grid']}, vocabulary {mod.get('vocab_size')}, "
           f"{mod.get('decoder_dim')} dims, max_beam {mod['max_beam']}"
           f"{', random weights' if report['kind'] != 'dir' else ''}; fp32; {report['images']}; real decoding up "
           f"to {mod['max_steps']} steps; medians of {report['reps']} timed reps after one warm-up, configurations "
           "taking turns rep by rep.", ""]
    busy = m.get("other_processes_cores")
    if busy is not None and busy > 0.25:
        out += [f"**Warning: the machine was busy** (other processes: {busy:.2f} cores on average): the ratios "
                "are noisy. Re-run on a quiet machine.", ""]
    out += ["### Default path: format 2 against format 1 (same weights, beam 5)", "",
            "Format 1: the step graph before the decoding controls (no ban_ids/penalty_ids/penalty inputs, no "
            "logp output, no processing ops), traced from the same checkpoint. `paired` is the median of the "
            "per-rep ratios (both formats timed back to back); `step` one decoder step of the batch (N images x "
            "5 slots) alone; `captions`: tokens and finished flags of every image, and the largest score "
            "difference.", "",
            "| engine | batch | format 1 ms/image | format 2 ms/image | format 2 / 1 | paired | step ms, format 1 "
            "| step ms, format 2 | captions |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["format"]:
        same = ("identical" if r["identical"] else "**differ**") + (
            f" (scores within {r['max_score_diff']:.1e})" if r["max_score_diff"] else " (scores equal)")
        out.append(f"| {r['engine']} ({r['provider']}) | {r['batch']} | {r['old_ms']:.1f} | {r['new_ms']:.1f} | "
                   f"{r['ratio']:.3f}x | {r['paired_ratio']:.3f}x | {r['old_step_ms']:.3f} | {r['new_step_ms']:.3f} "
                   f"| {same} |")
    for s in report["skipped"]:
        out.append(f"- not run: {s['engine']}: {s['reason']}")
    out += ["", verdict(report["format"]), "", "### Each option against the default path (ort, format 2)", "",
            "`x default` is the median of the per-rep ratios to the configuration named in `against` (timed in "
            "the same rep). Options that lengthen or shorten the captions change the work: `words` is the mean "
            "caption length (prefix included).", "",
            "| options | batch | ms/image | against | x default | words |", "|---|---|---|---|---|---|"]
    for r in report["options"]:
        out.append(f"| {r['options']} | {r['batch']} | {r['ms']:.1f} | {r['baseline']} | {r['ratio']:.3f}x "
                   f"| {r['words']:.1f} |")
    out += ["", DECODING_END]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="seed", help="seed (default), demo, or a model directory")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per configuration (default 5)")
    ap.add_argument("--images", type=int, default=8, help="synthetic scenes decoded per rep (default 8)")
    ap.add_argument("--batches", default="1,4", help="comma list of batch sizes (default 1,4)")
    ap.add_argument("--engines", default="ort,openvino", help="part (a)'s engines (default ort,openvino)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every usable core)")
    ap.add_argument("--work", type=Path, default=None, help="where models are cached")
    ap.add_argument("--rebuild", action="store_true", help="re-create the model and its format-1 copy")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements as JSON")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.images < 1:
        ap.error("--reps and --images must be >= 1")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not batches or min(batches) < 1 or not set(engines) <= {"ort", "openvino"}:
        ap.error("--batches: positive integers; --engines: ort and/or openvino")

    from captrt.bench.images import load_images
    from captrt.bench.machine import OtherCpu, load_average, machine_info, usable_cores
    from captrt.bench.measure import now_ms
    from captrt.runtime.model_dir import ModelDir

    def log(msg: str) -> None:
        print(f"[decoding] {msg}", file=sys.stderr, flush=True)

    started = now_ms()
    model, work, kind = resolve_model(args.model, args.work, args.rebuild, log)
    if args.rebuild:
        shutil.rmtree(work / OLD_DIR, ignore_errors=True)
    old = format_one_copy(model, work / OLD_DIR, log)
    mdir = ModelDir.load(model)
    pool = load_images(None, mdir.image_size, count=args.images)
    other = OtherCpu()
    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
        "kind": kind, "threads": args.threads or usable_cores(), "reps": args.reps, "images": pool.source,
        "command": "python benchmarks/decoding.py " + " ".join(argv) if argv else "python benchmarks/decoding.py",
        "model": {"path": str(model), **mdir.manifest.get("model", {}), "grid": mdir.grid, "max_beam": mdir.max_beam,
                  "max_steps": mdir.max_steps}}
    log(f"(a) default path, format 2 vs format 1: {', '.join(engines)}, batches {batches}, {args.reps} reps")
    report["format"], report["skipped"] = format_comparison(model, old, pool.images, engines, batches, args.reps,
                                                            args.threads, log)
    log(f"(b) each option vs the default path (ort), batches {batches}")
    report["options"] = option_costs(model, pool.images, batches, args.reps, args.threads, log)
    report["machine"]["load_average_end"] = load_average()
    report["machine"]["other_processes_cores"] = other.cores()
    report["seconds"] = round((now_ms() - started) / 1e3, 1)
    text = section(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    log(f"done in {report['seconds']} s")
    if args.no_write:
        print(text)
        return 0
    write_section(args.results, text, DECODING_BEGIN, DECODING_END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
