"""Corpus captioning throughput: `captrt caption` vs `captrt batch` (local) vs `captrt batch --ray`.

    python benchmarks/batch.py                  # 240 images, ~5 min on 2 cores
    python benchmarks/batch.py --images 60      # a quick check of the pipeline

Method
- Model: MODEL_DIR (--model; default demo_out/model when `make demo` made it), else a demo-sized
  random-weight model exported here (ResNet-18, 8x8 grid, 256-wide decoder, captions of 3-18 words:
  the tests' demo_sized_export). Beam 5, batch 16, fp32, ONNX Runtime on the CPU.
- Corpus: `captrt synth` scenes re-saved as 640x480 JPEGs (quality 90), the size of a COCO photo, so
  decoding costs what it costs on a real corpus (the synth's own 256x256 files decode in ~1 ms).
- Each configuration runs in a fresh process, one after the other, in ABAB... rounds (--rounds) so
  the machine's drift hits all of them alike; images/s is pooled over rounds.
  * caption: `captrt caption CORPUS --json` (the whole command; its process start and model load
    measured apart with a 1-image run and subtracted, so it is "once started" like the others);
  * batch local: run_batch in a fresh process; images over its own seconds (after the model load);
  * batch ray 1x2 / 2x1: run_batch(ray="local"): Ray start-up (ray.init + putting the inputs)
    reported apart; images over the seconds after it, which still include starting the actors
    and loading the model in each (so "once started" is slightly pessimistic for Ray).
- Ray's per-batch overhead: a no-op actor over the same number of batches of paths, in the same
  Ray instance, seconds per batch.
The results go between `<!-- batch:begin -->` and `<!-- batch:end -->` in RESULTS.md (replaced in
place, or appended); benchmarks/run_suite.py carries that section over when it rewrites the file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from captrt.bench.sections import BATCH_BEGIN as BEGIN, BATCH_END as END, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ("caption", "local", "ray_1x2", "ray_2x1")
SHARD_ROWS = 32
BEAM, BATCH = 5, 16


def make_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from captrt.export.exporter import export_model
    from tests.export.helpers import make_varied_length_checkpoint

    ckpt = make_varied_length_checkpoint(work / "demo.pt", backbone="resnet18", enc_size=8, dim=256)
    export_model(ckpt, work / "model", parity_count=1, progress=False)
    return work / "model"


def make_corpus(work: Path, n: int) -> Path:
    from PIL import Image

    from captrt.synth import make_synth_dataset

    make_synth_dataset(work / "synth", n, seed=1)
    out = work / "corpus"
    out.mkdir()
    for p in sorted((work / "synth" / "images").glob("*.jpg")):
        Image.open(p).convert("RGB").resize((640, 480), Image.Resampling.BICUBIC).save(out / p.name, quality=90)
    return out


def one(config: str, model: str, corpus: str, out: str) -> dict:
    """Run one configuration in this process -> {seconds, images, rate, startup, first_shard}."""
    if config == "caption":
        raise ValueError("caption runs as a command")
    from captrt.batch import run_batch

    stamps: list[tuple[float, int]] = []
    t0 = time.monotonic()
    kw = {"ray": "local", "actors": int(config[4]), "threads_per_actor": int(config[6])} if config.startswith("ray") else {}
    result = run_batch([corpus], model, out, beam=BEAM, batch_size=BATCH, shard_rows=SHARD_ROWS, progress=False,
                       on_shard=lambda e: stamps.append((time.monotonic(), e["rows"])), **kw)
    n = result.captioned + result.failed
    # result.seconds: after the model load (local) or after Ray is up with the inputs put (ray); Ray's
    # actor start and per-actor model load stay inside it (against Ray, on a corpus this small).
    return {"images": n, "wall": time.monotonic() - t0, "startup": result.startup_seconds,
            "first_shard": stamps[0][0] - t0, "steady_rows": n, "steady_seconds": result.seconds}


def overhead(batches: int) -> dict:
    """Ray Data's fixed costs on this machine: ray.init, and seconds per batch through a no-op actor."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    t0 = time.monotonic()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="captrt-ray-", dir="/tmp"))
    init = time.monotonic() - t0
    DataContext.get_current().enable_progress_bars = False

    class NoOp:
        def __call__(self, batch):
            return batch

    def run(n: int) -> float:
        ds = ray.data.from_items([{"path": f"p{i}"} for i in range(n * BATCH)], override_num_blocks=max(1, n // 2))
        t = time.monotonic()
        for _ in ds.map_batches(NoOp, batch_size=BATCH, compute=ActorPoolStrategy(size=1), num_cpus=1).iter_batches(
                batch_size=None):
            pass
        return time.monotonic() - t

    run(2)  # warm: worker processes exist
    small, large = run(2), run(batches)
    ray.shutdown()
    return {"init_s": init, "first_execution_s": small, "per_batch_ms": 1000 * (large - small) / (batches - 2)}


def caption_run(model: str, corpus: str, files: list[str]) -> dict:
    cmd = [sys.executable, "-m", "captrt", "caption", "--model", model, "--beam", str(BEAM), "--batch", str(BATCH),
           "--json"]
    t = time.monotonic()
    subprocess.run(cmd + files[:1], check=True, capture_output=True, cwd=ROOT)
    start = time.monotonic() - t
    t = time.monotonic()
    res = subprocess.run(cmd + [corpus], capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - t
    assert res.returncode in (0, 1), res.stderr
    n = len(res.stdout.splitlines())
    return {"images": n, "wall": wall, "startup": start, "steady_rows": n, "steady_seconds": wall - start}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--one", nargs=4, metavar=("CONFIG", "MODEL", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="captrt-bench-batch-"))
    try:
        model = args.model or (ROOT / "demo_out" / "model" if (ROOT / "demo_out" / "model").is_dir() else None)
        model_note = f"{model}" if model else "demo-sized random-weight model (ResNet-18, 8x8 grid, 256-wide decoder)"
        model = model or make_model(work)
        corpus = make_corpus(work, args.images)
        files = sorted(str(p) for p in corpus.iterdir())
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            order = CONFIGS if r % 2 == 0 else tuple(reversed(CONFIGS))
            for config in order:
                if config == "caption":
                    got = caption_run(str(model), str(corpus), files)
                else:
                    out = work / f"out-{config}-{r}"
                    res = subprocess.run([sys.executable, __file__, "--one", config, str(model), str(corpus), str(out)],
                                         capture_output=True, text=True, cwd=ROOT)
                    if res.returncode != 0:
                        raise SystemExit(f"{config}: {res.stderr[-2000:]}")
                    got = json.loads(res.stdout.strip().splitlines()[-1])
                    shutil.rmtree(out, ignore_errors=True)
                runs[config].append(got)
                print(f"round {r} {config}: {json.dumps(got)}", file=sys.stderr)
        costs = overhead(batches=42)
        print(json.dumps(costs), file=sys.stderr)
        section = render(runs, costs, args, model_note)
        print(section)
        if not args.no_write:
            write_section(args.results, section, BEGIN, END)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def pooled(runs: list[dict]) -> tuple[float, float, float]:
    """(steady images/s, mean wall seconds, mean start-up seconds) over rounds."""
    rate = sum(r["steady_rows"] for r in runs) / sum(r["steady_seconds"] for r in runs)
    return rate, sum(r["wall"] for r in runs) / len(runs), sum(r.get("startup", 0.0) for r in runs) / len(runs)


def render(runs: dict[str, list[dict]], costs: dict, args: argparse.Namespace, model_note: str) -> str:
    names = {"caption": "`captrt caption` over the files", "local": "`captrt batch` (local mode)",
             "ray_1x2": "`captrt batch --ray`, 1 actor x 2 threads", "ray_2x1": "`captrt batch --ray`, 2 actors x 1 thread"}
    rates = {c: pooled(runs[c]) for c in CONFIGS}
    cap_rate, local_rate = rates["caption"][0], rates["local"][0]
    lines = [BEGIN, "## Corpus captioning (`captrt batch`)", "",
             f"`python benchmarks/batch.py --images {args.images} --rounds {args.rounds}`, "
             f"{_dt.date.today().isoformat()}, {os.cpu_count()} cores, shared with other work (timings are ratios "
             "within one run). Model: " + model_note + f"; beam {BEAM}, batch {BATCH}, fp32, ONNX Runtime CPU. Corpus: "
             f"{args.images} synthetic scenes as 640x480 JPEGs. Each configuration in a fresh process, rounds "
             "alternating in ABBA order; images/s pooled over rounds, once started: `captrt caption`'s whole run minus "
             "a 1-image run (process start, model load); local mode after its model load; Ray after `ray.init` and "
             f"the inputs put, but with actor start and per-actor model load included; shards of {SHARD_ROWS} rows.",
             "",
             "| configuration | images/s once started | vs caption | vs local | wall s (incl. start-up) | start-up s |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in CONFIGS:
        rate, wall, start = rates[c]
        lines.append(f"| {names[c]} | {rate:.1f} | {rate / cap_rate:.2f}x | {rate / local_rate:.2f}x | {wall:.1f} | "
                     f"{start:.1f} |")
    best_ray = max(rates["ray_1x2"][0], rates["ray_2x1"][0])
    lines += ["", f"- Target local >= 1.2x caption: {'met' if local_rate >= 1.2 * cap_rate else 'missed'} "
                  f"({local_rate / cap_rate:.2f}x). Target Ray within 15% of local once started: "
                  f"{'met' if best_ray >= 0.85 * local_rate else 'missed'} (best {best_ray / local_rate:.2f}x).",
              f"- Ray's fixed costs here: `ray.init` {costs['init_s']:.1f} s; a first no-op `map_batches` execution "
              f"(actor start, scheduling) {costs['first_execution_s']:.1f} s; then {costs['per_batch_ms']:.1f} ms per "
              f"batch of {BATCH} through a no-op actor. Actors also load the model once each (in the wall time above).",
              f"- **Projection, not a measurement**: M nodes like this one, each running the 2x1 pool, give about "
              f"M x {rates['ray_2x1'][0]:.1f} images/s once started (actors are independent and rows return "
              f"to the driver at ~100 bytes an image), less the per-batch overhead above, after a start-up of "
              f"~{rates['ray_2x1'][2]:.0f} s + actor start. The driver's share (listing, ray.put of {SHARD_ROWS}-row "
              "blocks, writing shards) is well under 1 ms per image, so one driver feeds tens of nodes.", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
