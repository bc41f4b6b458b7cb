"""precision="auto", the int8 step alone and the plain step graph, measured in one run.

    python benchmarks/precision_auto.py --baseline /path/to/checkout-before   # seed + demo models -> RESULTS.md
    python benchmarks/precision_auto.py --models demo --reps 2 --no-write      # fast: checks the pipeline

Models (random weights: speed depends on shapes only; quality below is against fp32's captions, since
random models have no references): `seed`, the benchmark suite's seed-sized model (ResNet-101, 14x14
grid, 512 dims, vocabulary 9490; captrt.bench.suite_model's checkpoint), and `demo`, a demo-sized one
(ResNet-18, 8x8 grid, 256 dims, vocabulary 61). Each is exported here once with fp32 and a full int8
variant (forced: no search) and a parity set of --parity images; a copy whose int8 variant is the
fp32 encoder with the int8 step ("step only", as the export writes it when that candidate wins)
shares its files. Per model:
(a) precisions: ORT fp32, ORT int8 step only, ORT full int8, OpenVINO bf16 (both graphs), OpenVINO bf16
    encoder + int8 step, each verified on the parity set by `captrt verify`'s function (identical
    captions, BLEU-4/CIDEr when there are references; the record, with its speed, is cached where
    `precision="auto"` finds it) and timed end to end at batch 1 and 4, beam 5, --steps decoder steps
    at most per caption, every configuration loaded at once and taking turns rep by rep; then what
    `precision="auto"` loads for ort and openvino from those records, on the step-only copy and on
    the full-int8 directory.
(b) the default path: the format-2 directory as it loads now (the plain step graph cut at load),
    the same with plain_step=False (the format-2 graph with neutral controls, as before), and a
    format-1 copy (benchmarks/decoding.py's) of the same weights; ORT and OpenVINO (both graphs in
    OpenVINO), batch 1 and 4, real decoding up to the model's max_steps, turns rep by rep, captions compared.
(c) with --baseline (a checkout of captrt before these changes): the export's int8 search time on
    --search-checkpoint (default: the demo model) with its --search-calib dataset, the baseline's code
    and this one's taking turns, each in a fresh process, same calibration and tuning images.
The section goes between `<!-- auto:begin -->` and `<!-- auto:end -->` in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # decoding.py's format-1 copy and timing helpers

DEMO = {"vocab_size": 61, "backbone": "resnet18", "enc_size": 8, "attention_dim": 256, "embed_dim": 256,
        "decoder_dim": 256}
CONFIGS = [  # label, engine, precision, directory ("model": full int8, "step": the step-only copy)
    ("ORT fp32", "ort", "fp32", "model"),
    ("ORT int8, step only", "ort", "int8", "step"),
    ("ORT int8, int8 encoder", "ort", "int8", "model"),
    ("OpenVINO bf16", "openvino", "bf16", "model"),
    ("OpenVINO bf16 encoder + int8 step", "openvino", "bf16-int8", "step"),
]
BEAM = 5
RECIPE = 1


def log(msg: str) -> None:
    print(f"[precision_auto] {msg}", file=sys.stderr, flush=True)


# -- models ---------------------------------------------------------------------------------------------
def model_dirs(kind: str, work: Path, parity: int) -> tuple[Path, Path | None]:
    """(the model directory, a copy whose int8 variant is the step alone, or None when it already is). seed and
    demo are exported here once per settings (fp32 + full int8); anything else is a directory exported elsewhere
    (e.g. a trained model with the int8 search and --bf16), used as it is."""
    from captrt.bench.suite_model import make_random_checkpoint
    from captrt.export.exporter import export_model

    if kind not in ("seed", "demo"):
        model = Path(kind)
        manifest = json.loads((model / "captrt.json").read_text(encoding="utf-8"))
        int8 = manifest["graphs"].get("int8")
        if int8 is None or int8["encoder"]["file"] == manifest["graphs"]["fp32"]["encoder"]["file"]:
            return model, None
        return model, step_only_copy(model, work / f"dir-{model.parent.name}" / "model-step")
    d = work / kind
    d.mkdir(parents=True, exist_ok=True)
    ckpt, out, stamp = d / "model.pt", d / "model", d / "stamp.json"
    settings = {"recipe": RECIPE, "kind": kind, "parity": parity}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == settings and (out / "captrt.json").is_file()):
        log(f"{kind}: exporting fp32 + int8 with a {parity}-image parity set into {out}")
        make_random_checkpoint(ckpt, **(DEMO if kind == "demo" else {}))
        export_model(ckpt, out, int8=True, int8_search=False, force=True, parity_count=parity, calib_count=16,
                     overwrite=True, progress=False)
        shutil.rmtree(d / "model-step", ignore_errors=True)
        shutil.rmtree(d / "model-format1", ignore_errors=True)
        stamp.write_text(json.dumps(settings))
    return out, step_only_copy(out, d / "model-step")


def step_only_copy(model: Path, out: Path) -> Path:
    """out: `model` whose int8 variant is the fp32 encoder with the int8 step (files hard-linked)."""
    if (out / "captrt.json").is_file():
        return out
    out.mkdir(parents=True)  # (a directory exported elsewhere: verified again here, its cache is not copied)
    manifest = json.loads((model / "captrt.json").read_text(encoding="utf-8"))
    for f in model.iterdir():
        if f.is_file() and f.name not in ("captrt.json", manifest["graphs"]["int8"]["encoder"]["file"]):
            os.link(f, out / f.name)
    manifest["graphs"]["int8"]["encoder"] = {**manifest["graphs"]["fp32"]["encoder"], "shared_with": "fp32"}
    manifest["verification"] = []  # recorded for other graphs: verified again below
    manifest["parity"].pop("int8", None)
    (out / "captrt.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return out


# -- (a) precisions ---------------------------------------------------------------------------------------
def precisions(dirs: dict[str, Path], images, batches: list[int], reps: int, steps: int) -> dict[str, Any]:
    from captrt.runtime import Captioner
    from captrt.runtime.verification.verify import verify_model
    from decoding import same_captions, timed_captions

    rows: dict[str, dict[str, Any]] = {}
    caps: dict[str, Any] = {}
    chosen = _int8_kind(dirs["model"])
    for label, engine, precision, where in CONFIGS:
        row = rows[label] = {"engine": engine, "precision": precision, "dir": where}
        if dirs.get("step") is None and where == "step":
            where = row["dir"] = "model"  # the directory's own int8 variant is the step alone
        elif precision == "int8" and where == "model" and not chosen.startswith("an int8 encoder"):
            row["skipped"] = f"the directory's int8 variant is {chosen}"
            continue
        try:
            if precision != "fp32":
                log(f"verifying and timing {label}")
                report, facts = verify_model(dirs[where], engine, precision=precision)
                row.update(quality=report.summary(), record_speed=facts["speed"])
            caps[label] = Captioner.load(dirs[where], engine=engine, precision=precision, allow_unverified=True)
            caps[label].warmup([1, max(batches)], BEAM)
        except Exception as exc:  # noqa: BLE001 - e.g. no bf16 units: the row says why
            row["skipped"] = f"{type(exc).__name__}: {exc}"
            log(f"{label}: skipped: {row['skipped']}")
    times: dict[tuple[str, int], list[float]] = {}
    captions: dict[tuple[str, int], list] = {}
    options = {"beam_size": BEAM, "max_steps": steps}
    for rep in range(reps):
        order = list(caps) if rep % 2 == 0 else list(reversed(caps))
        for batch in batches:
            for label in order:
                ms, out = timed_captions(caps[label], images[:max(4, batch * 2)], batch, options)
                times.setdefault((label, batch), []).append(ms)
                captions[(label, batch)] = out
        log(f"rep {rep + 1}/{reps} done")
    for (label, batch), values in times.items():
        base = times[("ORT fp32", batch)]
        rows[label].setdefault("ms", {})[batch] = statistics.median(values)
        rows[label].setdefault("paired", {})[batch] = statistics.median(b / v for b, v in zip(base, values))
        rows[label].setdefault("same_as_fp32", {})[batch] = same_captions(captions[(label, batch)],
                                                                          captions[("ORT fp32", batch)])[0]
    choices = {}
    for where in [w for w in ("step", "model") if dirs.get(w) is not None]:
        for engine in ("ort", "openvino"):
            try:
                with Captioner.load(dirs[where], engine=engine, precision="auto") as cap:
                    choices[f"{engine} on {where}"] = cap.precision_choice.to_dict()
            except Exception as exc:  # noqa: BLE001
                choices[f"{engine} on {where}"] = {"chosen": None, "reason": f"{type(exc).__name__}: {exc}"}
    for cap in caps.values():
        cap.close()
    return {"rows": rows, "auto": choices}


def _int8_kind(model: Path) -> str:
    """'an int8 encoder (...)', 'the int8 step alone' or 'not written (...)'."""
    manifest = json.loads((model / "captrt.json").read_text(encoding="utf-8"))
    int8 = manifest["graphs"].get("int8")
    if int8 is None:
        return f"not written ({(manifest.get('refused') or {}).get('int8', {}).get('reason', 'not exported')[:120]})"
    if int8["encoder"]["file"] == manifest["graphs"]["fp32"]["encoder"]["file"]:
        return "the int8 step alone"
    search = manifest["parity"]["int8"].get("search")
    how = f"the search's choice: {search['chosen']}" if search else "every layer int8, no search"
    passed = manifest["parity"]["int8"].get("passed")
    return f"an int8 encoder ({how}; {'within' if passed else 'written with --force, misses'} the budget)"


# -- (b) the default path -------------------------------------------------------------------------------
def default_path(model: Path, images, batches: list[int], reps: int) -> list[dict[str, Any]]:
    from captrt.runtime import Captioner
    from decoding import format_one_copy, same_captions, step_ms, timed_captions

    old = format_one_copy(model, model.parent / "model-format1", log)
    out = []
    for engine, extra in (("ort", {}), ("openvino", {"step_on": "openvino"})):
        try:
            caps = {"format 1": Captioner.load(old, engine=engine, **extra),
                    "format 2, plain step (now)": Captioner.load(model, engine=engine, **extra),
                    "format 2, processing graph": Captioner.load(model, engine=engine, plain_step=False, **extra)}
        except Exception as exc:  # noqa: BLE001
            log(f"default path on {engine}: skipped: {exc}")
            continue
        for cap in caps.values():
            cap.warmup([1, max(batches)], BEAM)
        for batch in batches:
            times: dict[str, list[float]] = {k: [] for k in caps}
            got: dict[str, list] = {}
            for rep in range(reps):
                for name in (list(caps) if rep % 2 == 0 else list(reversed(caps))):
                    ms, got[name] = timed_captions(caps[name], images, batch, {"beam_size": BEAM})
                    times[name].append(ms)
            ms = {k: statistics.median(v) for k, v in times.items()}
            # per-rep ratios to format 1, timed back to back: robust to the machine's drift over minutes
            paired = {k: statistics.median(a / b for a, b in zip(v, times["format 1"])) for k, v in times.items()}
            same = all(same_captions(got[k], got["format 1"]) == (True, 0.0) for k in got)
            # the decoder step alone (batch x 5 slots), where the graphs differ: many short interleaved rounds
            steps: dict[str, list[float]] = {k: [] for k in caps}
            for rep in range(reps * 4):
                for name in (list(caps) if rep % 2 == 0 else list(reversed(caps))):
                    steps[name].append(step_ms(caps[name].engine, images[:batch], 40))
            step = {k: statistics.median(v) for k, v in steps.items()}
            step_paired = {k: statistics.median(a / b for a, b in zip(v, steps["format 1"])) for k, v in steps.items()}
            out.append({"engine": engine, "batch": batch, "ms": ms, "paired": paired, "identical": same,
                        "step_ms": step, "step_paired": step_paired})
            log(f"default path {engine} batch {batch}: {ms} paired {paired}")
        for cap in caps.values():
            cap.close()
    return out


# -- (c) the int8 search time, before and after ----------------------------------------------------------
def search_once(work: Path, checkpoint: Path, calib: Path | None) -> dict[str, float]:
    """In a fresh process: export `checkpoint` with the int8 search (calibration and tuning images from the
    `calib` dataset, else synthetic scenes); the search's and the export's seconds."""
    import time

    import captrt.export.exporter as exporter

    spent = []
    real = exporter.search_int8_variant

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t0)

    exporter.search_int8_variant = timed
    data = {"calib_json": str(calib), "calib_images": str(calib.parent)} if calib else {}
    t0 = time.perf_counter()
    manifest = exporter.export_model(checkpoint, work / "search-out", int8=True, parity_count=8, overwrite=True,
                                     progress=False, force=True, **data)
    search = manifest["parity"]["int8"].get("search", {})
    judge_s = sum(t.get("seconds", 0.0) for t in search.get("trials", []))  # the beam searches over tuning images
    return {"search_s": round(spent[0], 1), "export_s": round(time.perf_counter() - t0, 1),
            "judged": len(search.get("trials", [])), "judge_s": round(judge_s, 1),
            "rest_s": round(spent[0] - judge_s, 1), "chosen": search.get("chosen", search.get("calibration"))}


def search_times(work: Path, baseline: Path, rounds: int, checkpoint: Path,
                 calib: Path | None) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list] = {"before": [], "after": []}
    for r in range(rounds):
        for name, root in (("before", baseline), ("after", HERE.parent)) if r % 2 == 0 else \
                (("after", HERE.parent), ("before", baseline)):
            env = {**os.environ, "PYTHONPATH": str(root)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--search-once", "--work", str(work),
                   "--search-checkpoint", str(checkpoint)] + (["--search-calib", str(calib)] if calib else [])
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            log(f"int8 search {name}: {out[name][-1]}")
    return out


# -- the section ----------------------------------------------------------------------------------------
def section(report: dict[str, Any]) -> str:
    from captrt.bench.sections import AUTO_BEGIN, AUTO_END

    m = report["machine"]
    lines = [AUTO_BEGIN, "## precision=\"auto\", the int8 step alone, the plain step graph", "",
             f"`{report['command']}` on {report['date']}: {m['cpu']} ({', '.join(m.get('cpu_flags') or [])}), "
             f"{m['cores']} cores, {report['threads']} threads; load average {m.get('load_average')} at the start, "
             f"{m.get('load_average_end')} at the end (other agents' processes shared the 2 cores: compare ratios "
             "within a table, not absolute times). Method: benchmarks/precision_auto.py's docstring.", ""]
    for kind, res in report["models"].items():
        lines += [f"### {kind} model: {res['describe']}", "",
                  f"int8 variant of the directory: {res.get('int8', 'full')}.", "",
                  "| configuration | " + " | ".join(f"ms/image b{b} | vs ORT fp32 b{b}" for b in report["batches"])
                  + " | identical to fp32 (parity) | BLEU-4 / CIDEr % of fp32 | verdict | speed record (batch 1) |",
                  "|---|" + "---|---|" * len(report["batches"]) + "---|---|---|---|"]
        for label, row in res["precisions"]["rows"].items():
            if "skipped" in row:
                lines.append(f"| {label} | " + " | ".join("-" for _ in range(2 * len(report["batches"])))
                             + f" | - | - | not run: {row['skipped'][:160]} | - |")
                continue
            cells = []
            for b in report["batches"]:
                cells += [f"{row['ms'][b]:.1f}", f"{row['paired'][b]:.2f}x"]
            q = row.get("quality")
            ident = "100% (fp32)" if q is None else f"{q['identical_pct']:.0f}%"
            metr = "-" if q is None or q.get("bleu4_pct_of_fp32") is None else \
                f"{q['bleu4_pct_of_fp32']:.1f} / {q['cider_pct_of_fp32']:.1f}"
            verdict = "exact" if q is None else ("within budget" if q["passed"] else "**misses the budget**")
            sp = row.get("record_speed")
            rec = "-" if not sp else f"{sp['speedup']:.2f}x ({sp['ms_per_image']:.0f} vs {sp['fp32_ms_per_image']:.0f} ms)"
            lines.append(f"| {label} | {' | '.join(cells)} | {ident} | {metr} | {verdict} | {rec} |")
        lines += [""]
        for where, choice in res["precisions"]["auto"].items():
            lines.append(f"- `precision=\"auto\"`, {where.replace('step', 'the step-only copy').replace('model', 'the full-int8 directory')}: "
                         f"**{choice['chosen']}** ({choice['reason']})")
        lines += ["", "Default path (beam 5, real decoding up to the model's max_steps), ms per image (median of "
                  "the reps); the ratios are medians of per-rep ratios to format 1, timed back to back:", "",
                  "| engine | batch | format 1 | format 2, processing graph | format 2, plain step (now) "
                  "| now / format 1 | processing / format 1 | step ms: format 1 / processing / plain | step: plain / "
                  "format 1 | step: processing / format 1 | captions |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["default_path"]:
            keys = ("format 1", "format 2, processing graph", "format 2, plain step (now)")
            f1, proc, now = (r["ms"][k] for k in keys)
            st = " / ".join(f"{r['step_ms'][k]:.3f}" for k in keys)
            lines.append(f"| {r['engine']} | {r['batch']} | {f1:.1f} | {proc:.1f} | {now:.1f} | "
                         f"{r['paired'][keys[2]]:.3f}x | {r['paired'][keys[1]]:.3f}x | {st} | "
                         f"{r['step_paired'][keys[2]]:.3f}x | {r['step_paired'][keys[1]]:.3f}x | "
                         f"{'identical (scores equal)' if r['identical'] else '**differ**'} |")
        lines.append("")
    if report.get("search"):
        s = report["search"]
        med = {k: statistics.median(x["search_s"] for x in v) for k, v in s.items()}
        lines += [f"### The export's int8 search time ({report['search_model']})", "",
                  "| code | search s (each run) | median | of which judging (each run) | the rest: calibration, "
                  "ranking, builds, timing (each run) | export s (each run) | judge calls | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in ("before", "after"):
            col = lambda f: ", ".join(str(x.get(f, "-")) for x in s[k])  # noqa: E731
            lines.append(f"| {k} | {col('search_s')} | {med[k]:.1f} | {col('judge_s')} | {col('rest_s')} | "
                         f"{col('export_s')} | {s[k][-1].get('judged')} | {s[k][-1].get('chosen')} |")
        lines += ["", f"after / before: {med['after'] / med['before']:.2f}x (target <= 1.10x)", ""]
    lines.append(AUTO_END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="seed,demo")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="(a): decoder steps at most per caption")
    ap.add_argument("--parity", type=int, default=24, help="parity images of the exported models")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--baseline", type=Path, default=None, help="(c): a checkout of captrt before these changes")
    ap.add_argument("--search-rounds", type=int, default=1)
    ap.add_argument("--search-checkpoint", type=Path, default=None, help="(c): the checkpoint (default: the demo one)")
    ap.add_argument("--search-calib", type=Path, default=None, help="(c): its Karpathy JSON (images beside it)")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "captrt" / "bench-precision-auto")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--search-once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.search_once:
        print(json.dumps(search_once(args.work, args.search_checkpoint, args.search_calib)))
        return 0
    from captrt.bench.images import load_images
    from captrt.bench.machine import load_average, machine_info, usable_cores

    batches = [int(b) for b in args.batches.split(",")]
    report: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": {**machine_info(), "load_average": load_average()},
                              "threads": usable_cores(), "batches": batches, "models": {},
                              "command": "python benchmarks/precision_auto.py " + " ".join(argv)}
    for kind in [k for k in args.models.split(",") if k]:  # seed, demo, or model directories
        model, step = model_dirs(kind, args.work, args.parity)
        from captrt.runtime.model_dir import ModelDir

        mdir = ModelDir.load(model)
        images = load_images(None, mdir.image_size, count=8).images
        cfg = mdir.manifest["model"]
        trained = kind not in ("seed", "demo")
        ps = mdir.manifest.get("parity_set", {})
        res = {"describe": f"{cfg['backbone']}, grid {mdir.grid}, vocabulary {mdir.vocab_size}, "
                           f"{cfg['decoder_dim']} dims, {'trained: ' + str(model) if trained else 'random weights'}, "
                           f"{ps.get('images')} parity images{' with references' if ps.get('references') else ''}",
               "int8": _int8_kind(model)}
        log(f"{kind}: (a) precisions")
        res["precisions"] = precisions({"model": model, "step": step}, images, batches, args.reps, args.steps)
        log(f"{kind}: (b) default path")
        res["default_path"] = default_path(model, images[:4], batches, args.reps)
        report["models"][kind] = res
    if args.baseline is not None:
        checkpoint = args.search_checkpoint
        if checkpoint is None:
            model_dirs("demo", args.work, args.parity)
            checkpoint = args.work / "demo" / "model.pt"
        report["search_model"] = f"{checkpoint}" + (f", calibration/tuning from {args.search_calib}"
                                                    if args.search_calib else ", synthetic calibration/tuning scenes")
        report["search"] = search_times(args.work, args.baseline, args.search_rounds, checkpoint, args.search_calib)
        commits = {k: subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip() or "?" for k, root in
                   (("before", args.baseline), ("after", HERE.parent))}
        report["search_model"] += f"; code before: {commits['before']}, after: {commits['after']} (+ uncommitted)"
    report["machine"]["load_average_end"] = load_average()
    (args.work / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = section(report)
    if args.no_write:
        print(text)
        return 0
    from captrt.bench.sections import AUTO_BEGIN, AUTO_END, write_section

    write_section(args.results, text, AUTO_BEGIN, AUTO_END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
