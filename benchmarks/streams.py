"""Streams: S searches at once over one loaded model, T threads each, measured side by side.

    python benchmarks/streams.py                 # the seed-sized suite model (~15 min on 2 cores)
    python benchmarks/streams.py --quick         # fewer rounds and images: checks the pipeline

Method (every comparison in one run, its configurations alternated round by round, ABAB, so this
machine's drift hits all of them alike):
- library: one Captioner per configuration S x T (1 x all cores, 1 x 1, and S x 1 up to the core count),
  loaded together; two calling threads keep the streams busy, each captioning its share of the
  images in calls of B images (B = 1 and 4), beam 5, STEPS = 16 steps per caption (below), fp32
  ONNX Runtime; images/s = images / wall seconds of the round. Captions must be identical across
  configurations. The latency at batch 1 of one caller alone is reported beside the throughput.
- memory: one fresh process per engine and S (T = cores / S): resident memory after loading and
  captioning a few images with S callers (VmRSS), so a second stream's cost is what it adds.
- service: `captrt serve --streams 1` (T = cores) and `--streams 2 --threads 1` side by side, closed
  loop at concurrency 32 (captrt.bench.load, benchmarks/serve.py's client), ABBA rounds; images/s and p99.
- corpus: `captrt batch` local mode (run_batch) with --streams 1 and 2, in fresh processes, ABAB.
The results go between `<!-- streams:begin -->` and `<!-- streams:end -->` in RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from captrt.bench.sections import STREAMS_BEGIN as BEGIN, STREAMS_END as END, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_IMAGES = ROOT / "demo_out" / "synth" / "dataset_synth.json"  # make demo's scenes, when they are there
BEAM = 5
# Steps per caption: the suite's random-weight model never emits <end>, so its captions would all run the
# 50-step limit; 16 is the bench suite's forced length, about a trained model's (COCO captions: ~10 words).
STEPS = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def images(n: int, seed: int = 0):
    from captrt.export.images import synthetic

    return list(synthetic(n, 256, seed=seed).images)


# ---------------------------------------------------------------------------------------------- library

def _round(cap, imgs, batch: int, callers: int = 2) -> tuple[float, list[list[int]]]:
    """Wall seconds for `callers` threads to caption imgs (interleaved shares) in calls of `batch`."""
    out: list[Any] = [None] * len(imgs)
    shares = [list(range(i, len(imgs), callers)) for i in range(callers)]

    def work(idx: list[int]) -> None:
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            for i, c in zip(part, cap.caption([imgs[i] for i in part], beam_size=BEAM, max_steps=STEPS,
                                              batch_size=batch)):
                out[i] = c.tokens

    threads = [threading.Thread(target=work, args=(share,)) for share in shares]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def library(model: Path, cores: int, n_images: int, rounds: int) -> dict[str, Any]:
    from captrt.runtime import Captioner

    # 1 x 1 beside them: the per-stream scaling at T = 1 and 2 that the projection to larger machines needs
    configs = [(1, cores)] + ([(1, 1)] if cores > 1 else []) + [(s, 1) for s in range(2, cores + 1)]
    caps = {f"{s}x{t}": Captioner.load(model, streams=s, threads=t) for s, t in configs}
    imgs = images(n_images, seed=1)
    rows, same = [], True
    try:
        for cap in caps.values():
            cap.warmup((1, 4), beam_size=BEAM)
        for batch in (1, 4):
            secs: dict[str, float] = {k: 0.0 for k in caps}
            tokens: dict[str, Any] = {}
            for r in range(rounds):
                order = list(caps) if r % 2 == 0 else list(caps)[::-1]
                for name in order:
                    took, toks = _round(caps[name], imgs, batch)
                    secs[name] += took
                    tokens.setdefault(name, toks)
                    log(f"  library batch {batch} {name}: {len(imgs) / took:.2f} images/s")
            same &= all(t == tokens["1x%d" % cores] for t in tokens.values())
            for name in caps:
                rows.append({"config": name, "batch": batch, "images_per_s": round(rounds * len(imgs) / secs[name], 3)})
        latency = {}
        for name, cap in caps.items():  # one caller, batch 1: what a single request waits
            t0 = time.perf_counter()
            for im in imgs[:8]:
                cap.caption(im, beam_size=BEAM, max_steps=STEPS)
            latency[name] = round((time.perf_counter() - t0) / 8 * 1000, 1)
    finally:
        for cap in caps.values():
            cap.close()
    return {"rows": rows, "identical": same, "latency_ms_batch1": latency}


# ---------------------------------------------------------------------------------------------- memory

_MEMORY_CHILD = r"""
import json, sys, threading
from captrt.export.images import synthetic
from captrt.runtime import Captioner
from captrt.bench.measure import current_rss_mb
model, engine, s, t = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cap = Captioner.load(model, engine=engine, streams=s, threads=t)
imgs = list(synthetic(4 * s, 256, seed=2).images)
def work(k):
    for i in range(k, len(imgs), s):
        cap.caption(imgs[i], beam_size=5, max_steps=16)
for _ in range(2):
    threads = [threading.Thread(target=work, args=(k,)) for k in range(s)]
    [x.start() for x in threads]; [x.join() for x in threads]
print(json.dumps({"rss_mb": current_rss_mb()}))
"""


def memory(model: Path, cores: int, engines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for engine in engines:
        for s in (1, 2):
            t = max(1, cores // s)
            proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(model), engine, str(s), str(t)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=900)
            if proc.returncode != 0:
                rows.append({"engine": engine, "streams": s, "error": proc.stderr.strip().splitlines()[-1:]})
                continue
            rss = json.loads(proc.stdout.strip().splitlines()[-1])["rss_mb"]
            rows.append({"engine": engine, "streams": s, "threads": t, "rss_mb": round(rss, 1)})
            log(f"  memory {engine} S={s}: {rss:.0f} MB")
    return rows


# ---------------------------------------------------------------------------------------------- service

def service(model: Path, cores: int, rounds: int, seconds: float, concurrency: int) -> dict[str, Any]:
    from captrt.bench import load
    from captrt.bench.serve_process import ServeProcess

    uploads = load.load_uploads(DEMO_IMAGES)[0] if DEMO_IMAGES.exists() else _jpeg_uploads()
    flags = {"s1": ["--streams", "1", "--threads", str(cores)], "s2": ["--streams", "2", "--threads", "1"]}
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="captrt-streams-bench.") as logs:
        try:
            for name, extra in flags.items():
                servers[name] = ServeProcess(model, *load.server_flags(16, "fp32", None), *extra,
                                             log=Path(logs) / f"{name}.log", name=name)
            for s in servers.values():
                s.wait_ready()
            params = {"beam_size": BEAM, "max_steps": STEPS}

            async def run() -> dict[str, list]:
                results: dict[str, list] = {k: [] for k in servers}
                for k in servers:  # warm-up, not measured
                    await load.run_round(servers[k], uploads, concurrency, max_requests=2 * concurrency,
                                         seconds=seconds, params=params)
                for r in range(rounds):
                    for k in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                        res = await load.run_round(servers[k], uploads, concurrency, max_requests=2000,
                                                   seconds=seconds, params=params)
                        results[k].append(res)
                        log(f"  serve {k} round {r + 1}: {res.images_per_s:.2f} images/s")
                return results

            results = asyncio.run(run())
        finally:
            load.stop_all(servers)
    return {k: load.summarize_mode(k, 16, concurrency, v, {}) for k, v in results.items()}


def _jpeg_uploads() -> list:
    import io

    from PIL import Image

    from captrt.bench.load import Upload

    out = []
    for i, im in enumerate(images(16, seed=3)):
        buf = io.BytesIO()
        Image.fromarray(im).resize((640, 480)).save(buf, "JPEG", quality=90)
        out.append(Upload(f"img{i}.jpg", buf.getvalue(), "image/jpeg"))
    return out


# ---------------------------------------------------------------------------------------------- corpus

_BATCH_CHILD = r"""
import json, sys, time
from captrt.batch import run_batch
model, corpus, out, streams, threads = sys.argv[1:6]
t0 = time.perf_counter()
r = run_batch([corpus], model, out, beam=5, max_steps=16, batch_size=4, streams=int(streams), threads=int(threads),
              progress=False)
print(json.dumps({"captioned": r.captioned, "seconds": r.seconds}))
"""


def corpus(model: Path, cores: int, n_images: int, rounds: int) -> dict[str, Any]:
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="captrt-streams-corpus.") as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for i, im in enumerate(images(n_images, seed=4)):
            Image.fromarray(im).resize((640, 480)).save(src / f"{i:04d}.jpg", quality=90)
        runs: dict[str, list[dict]] = {"s1": [], "s2": []}
        configs = {"s1": ("1", str(cores)), "s2": ("2", "1")}
        for r in range(rounds):
            for k in (["s1", "s2"] if r % 2 == 0 else ["s2", "s1"]):
                out = Path(tmp) / f"out-{k}-{r}"
                proc = subprocess.run([sys.executable, "-c", _BATCH_CHILD, str(model), str(src), str(out),
                                       *configs[k]], capture_output=True, text=True, cwd=ROOT, timeout=1800)
                if proc.returncode != 0:
                    return {"error": proc.stderr.strip().splitlines()[-3:]}
                runs[k].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                log(f"  batch {k} round {r + 1}: {runs[k][-1]}")
    return {k: round(sum(x["captioned"] for x in v) / sum(x["seconds"] for x in v), 3) for k, v in runs.items()}


# ---------------------------------------------------------------------------------------------- report

def section(report: dict[str, Any]) -> str:
    lib, cores = report["library"], report["machine"]["cores"]
    lines = [BEGIN, "## Streams: S searches at once over one model", "",
             f"{report['date']}, {report['machine']['cpu']}, {cores} usable cores; model: {report['model']}; "
             f"beam {BEAM}, {STEPS} steps per caption, fp32. Command: `{report['command']}`. "
             "Method: benchmarks/streams.py's docstring.", "",
             "| S x T | batch | images/s | vs 1 x " + str(cores) + " |", "|---|---|---|---|"]
    base = {r["batch"]: r["images_per_s"] for r in lib["rows"] if r["config"] == f"1x{cores}"}
    for r in lib["rows"]:
        ratio = r["images_per_s"] / base[r["batch"]]
        lines.append(f"| {r['config']} | {r['batch']} | {r['images_per_s']:.2f} | {ratio:.2f}x |")
    latency = ", ".join(f"{k} {v}" for k, v in lib["latency_ms_batch1"].items())
    lines += ["", f"Captions identical across configurations: {'yes' if lib['identical'] else 'NO'}. Latency of one "
              f"request alone at batch 1 (ms): {latency}.", ""]
    if report.get("memory"):
        lines += ["| engine | S | T | resident MB | a 2nd stream adds |", "|---|---|---|---|---|"]
        by = {(m["engine"], m["streams"]): m for m in report["memory"]}
        for m in report["memory"]:
            one = by.get((m["engine"], 1), {}).get("rss_mb")
            add = f"{(m['rss_mb'] - one) / one * 100:+.1f}%" if m["streams"] == 2 and one and "rss_mb" in m else ""
            lines.append(f"| {m['engine']} | {m['streams']} | {m.get('threads', '')} | "
                         f"{m.get('rss_mb', m.get('error'))} | {add} |")
        lines.append("")
    if report.get("service"):
        s1, s2 = report["service"]["s1"], report["service"]["s2"]
        lines += [f"Service at concurrency {s1['concurrency']}: --streams 1 {s1['images_per_s']:.2f} images/s "
                  f"(p99 {s1['latency_ms']['p99']:.0f} ms), --streams 2 --threads 1 {s2['images_per_s']:.2f} images/s "
                  f"(p99 {s2['latency_ms']['p99']:.0f} ms): {s2['images_per_s'] / s1['images_per_s']:.2f}x, p99 "
                  f"{s2['latency_ms']['p99'] / s1['latency_ms']['p99']:.2f}x.", ""]
    if report.get("corpus") and "error" not in report["corpus"]:
        c = report["corpus"]
        lines += [f"`captrt batch` local: --streams 1 {c['s1']:.2f} images/s, --streams 2 {c['s2']:.2f} images/s: "
                  f"{c['s2'] / c['s1']:.2f}x.", ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: the seed-sized suite model)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="library,memory,service,corpus")
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from captrt.bench.machine import machine_info
    from captrt.runtime.hardware import cpu_model
    from captrt.runtime.streams import usable_cores

    model = args.model
    if model is None:
        from captrt.bench.suite_model import default_work, suite_model_dir

        model = suite_model_dir(default_work())
    cores = usable_cores()
    parts = args.parts.split(",")
    rounds = 2 if args.quick else 4
    report: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "machine": {**machine_info(), "cpu": cpu_model(), "cores": cores}, "model": str(model)}
    if "library" in parts:
        log("[streams] library")
        report["library"] = library(model, cores, 8 if args.quick else 24, rounds)
    if "memory" in parts:
        log("[streams] memory")
        report["memory"] = memory(model, cores, ["ort", "openvino"])
    if "service" in parts:
        log("[streams] service")
        report["service"] = service(model, cores, rounds, 3.0 if args.quick else 10.0, 32)
    if "corpus" in parts:
        log("[streams] corpus")
        report["corpus"] = corpus(model, cores, 16 if args.quick else 64, 2)
    print(json.dumps(report, indent=1, default=str))
    if not args.no_write and "library" in report:
        write_section(args.results, section(report), BEGIN, END)
        log(f"[streams] wrote the streams section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
