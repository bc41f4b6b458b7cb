"""run_bench: latency, throughput and memory of every engine x precision x batch x beam on one model.

Per configuration: encoder latency, decoder-step latency, end-to-end latency per batch and per image
(p50/p90/p99 over `iters` timed runs after `warmup` untimed ones), images per second, peak RSS and
the provider that actually ran. With `steps` every search runs exactly that many steps (see
runners.FORCE_END); without it, real decoding of real images (`images`, else synthetic scenes).

Beside the default rows: `streams` rows (Captioner.load(streams=S, threads=T) captioning a list whose
batches spread over the streams; captions compared across S), the `torch-compile` peer beside `reference`,
and the options path (`decoding`). Every row's images/s is also given as a percentage of this machine's
fp32 floor (captrt.bench.floor), and the summary gives captrt's ratio against the strongest peer.
"""

from __future__ import annotations

import datetime as _dt
import gc
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from captrt.bench.bandwidth import DEFAULT_MB, floor_ms, measure_read_bandwidth, step_weight_bytes
from captrt.bench.floor import (DEFAULT_MATMUL_SIZES, describe_peak, floor_ms_per_image, graph_flops,
                                measure_matmul_peak, pct_of_floor)
from captrt.bench.images import load_images
from captrt.bench.machine import OtherCpu, library_versions, load_average, machine_info, usable_cores
from captrt.bench.measure import PeakRss, current_rss_mb, summarize
from captrt.bench.report import format_table, write_json
from captrt.bench.runners import OPTIONS_ROW, OptionsRunner, StreamRunner, make_runner
from captrt.bench.summary import compare_captions, summary_lines
from captrt.bench.quality import quality_cell, row_quality
from captrt.runtime.auto import AUTO, choose
from captrt.runtime.engines.base import DEVICES, ENGINES, PRECISIONS
from captrt.runtime.errors import EngineUnavailableError
from captrt.runtime.model_dir import ENGINE_PRECISIONS, ModelDir

PEERS = ("reference", "torch-compile")  # the seed's search in PyTorch: eager, and with the encoder compiled
BENCH_ENGINES = (*ENGINES, *PEERS)
CHECKPOINT_ENGINES = ("torch", *PEERS)  # run the checkpoint's fp32 weights whatever --precision says
STREAM_ENGINES = ("ort", "openvino", "trt")  # torch sets PyTorch's process-wide thread count: not per stream
BATCHES_PER_STREAM = 2  # a streams run captions (most streams x this) batches: every stream gets several
MIN_ITERS_IN_BUDGET = 3


def parse_list(value: str | int | Iterable[Any] | None, name: str, kind: type = str) -> list[Any]:
    """'ort,torch' / '1,8' / [1, 8] / 5 -> a list without duplicates; bad items are a ValueError naming `name`."""
    if value is None:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        items = [s.strip() for s in str(value).split(",")]
    else:
        items = list(value)
    out: list[Any] = []
    for item in items:
        if item == "":
            raise ValueError(f"{name}: empty item in {value!r}")
        if kind is int:
            try:
                item = int(item)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: expected integers separated by commas, got {value!r}") from None
            if item < 1:
                raise ValueError(f"{name}: values must be >= 1, got {item}")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"{name}: nothing given")
    return out


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def check_names(engines: Sequence[str], precisions: Sequence[str]) -> None:
    for e in engines:
        if e not in BENCH_ENGINES:
            raise ValueError(f"engine: unknown engine {e!r}; choose from {', '.join(BENCH_ENGINES)}")
    for p in precisions:
        if p not in PRECISIONS and p != AUTO:
            raise ValueError(f"precision: unknown precision {p!r}; choose from {', '.join(PRECISIONS)}, {AUTO}")


def plan_configs(model: ModelDir, engines: Sequence[str], precisions: Sequence[str], device: str = "cpu",
                 choices: dict[str, dict] | None = None) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(engine, precision) pairs to run, validated against the model directory, and the pairs that do not
    exist ({"engine", "precision", "reason"}: an engine precision of another engine, e.g. ort bf16).
    'auto' becomes the precision Captioner.load(precision="auto") would choose for each engine here
    (captrt.runtime.auto.choose); `choices` receives engine -> that choice."""
    check_names(engines, precisions)
    pairs: list[tuple[str, str]] = []
    skipped: list[dict[str, str]] = []
    for e in engines:
        if e in CHECKPOINT_ENGINES:
            pairs.append((e, "fp32"))
            continue
        for p in precisions:
            if p == AUTO:
                choice = choose(model, e, device).to_dict()
                if choices is not None:
                    choices[e] = choice
                p = choice["chosen"]
                if (e, p) in pairs or p in precisions:
                    continue
            owners = ENGINE_PRECISIONS.get(p)
            if owners is not None and e not in owners:
                skipped.append({"engine": e, "precision": p, "reason": f"{p} is an engine precision of "
                                f"{' / '.join(owners)} only (it runs the fp32 graphs in {p})"})
                continue
            if e in ("ort", "openvino"):
                model.require_precision(p)  # names the directory and what it has
            pairs.append((e, p))
    return pairs, skipped


def run_bench(model: str | Path, *, engines: str | Sequence[str] = "ort", precisions: str | Sequence[str] = "fp32",
              device: str = "cpu", batches: str | Sequence[int] = "1", beams: str | Sequence[int] = "5",
              steps: int | None = None, warmup: int = 2, iters: int = 10, json_out: str | Path | None = None,
              checkpoint: str | Path | None = None, threads: int | None = None,
              images: str | Path | np.ndarray | None = None, max_seconds: float | None = None,
              bandwidth_mb: int = DEFAULT_MB, progress: bool = True, print_table: bool = True,
              check_quality: bool = True, allow_unverified: bool = False,
              streams: str | int | Sequence[int] | None = None, decoding: bool = False,
              matmul_sizes: Sequence[int] = DEFAULT_MATMUL_SIZES) -> dict[str, Any]:
    """Benchmark the model directory `model`; returns the report (also written to `json_out` if given).

    engines: ort, trt, torch, openvino (the runtime's engines), reference (the seed's per-image search on
    the source checkpoint, PyTorch eager under inference_mode) and torch-compile (the same with the encoder
    through torch.compile, inductor with freezing; a machine where it cannot compile lists it in "skipped"
    with the reason). torch, reference and torch-compile always run fp32; bf16 is openvino's only (other engines'
    bf16 pairs are listed in "skipped"), and a pair this machine cannot run (bf16 without avx512_bf16 or
    amx_bf16, a missing library) is skipped with the reason. batches/beams: comma lists or sequences.
    steps: force exactly this many decoding steps (None: real decoding up to the model's max_steps).
    threads: intra-op threads for every engine (default: all usable cores). images: a directory of
    images or a Karpathy-split JSON (test split), or a uint8 (M, S, S, 3) array; default synthetic scenes.
    max_seconds: per configuration, stop timing after this long once MIN_ITERS_IN_BUDGET runs are in.
    check_quality: each row's "quality" (captrt.bench.quality): exact fp32, or the precision's verification
    on the model's parity set (the cached one, else measured now and cached, as a first load would).
    A precision that misses the quality budget (or cannot be verified) is skipped with its numbers, as
    Captioner.load refuses it, unless allow_unverified: then its rows say so beside the speed.
    streams: stream counts S (comma list): for every ort/openvino/trt pair, batch and beam, a row of
    Captioner.load(streams=S, threads=T) captioning one list of max(S) x BATCHES_PER_STREAM batches with
    caption(batch_size=batch) (T = threads if given, else the usable cores // S); the captions of every S are
    compared. decoding: an options-path row beside ort fp32 (runners.OPTIONS_ROW). matmul_sizes: the
    matmuls that measure the fp32 peak of the floor (captrt.bench.floor).
    Bad arguments raise ValueError (ModelDirError for the directory) naming the flag or file.
    """
    engine_list = parse_list(engines, "engine")
    precision_list = parse_list(precisions, "precision")
    batch_list = parse_list(batches, "batch", int)
    beam_list = parse_list(beams, "beam", int)
    check_names(engine_list, precision_list)
    if device not in DEVICES:
        raise ValueError(f"device: unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if steps is not None:
        steps = _check_count("steps", steps, 1)
    warmup, iters = _check_count("warmup", warmup, 0), _check_count("iters", iters, 1)
    if threads is not None:
        threads = _check_count("threads", threads, 1)
    stream_list = parse_list(streams, "streams", int)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds: expected a positive number, got {max_seconds!r}")
    if json_out is not None and Path(json_out).is_dir():
        raise ValueError(f"json: {json_out} is a directory; give a file name")
    mdir = ModelDir.load(model)  # ModelDirError: missing directory, bad manifest, ...
    too_wide = [b for b in beam_list if b > mdir.max_beam]
    if too_wide:
        raise ValueError(f"beam: {max(too_wide)} exceeds max_beam {mdir.max_beam} of {mdir.manifest_path} "
                         f"(re-export with --max-beam {max(too_wide)} for wider beams)")
    auto_choices: dict[str, dict] = {}
    pairs, not_pairs = plan_configs(mdir, engine_list, precision_list, device, auto_choices)
    stream_threads = threads  # None: each stream count gets the cores // S
    threads = threads or usable_cores()
    log = _logger(progress)

    most = max(max(batch_list) * max(stream_list, default=0) * BATCHES_PER_STREAM, max(batch_list), 8)
    pool = load_images(images, mdir.image_size, count=most)
    log(f"model {mdir.path}: {mdir.manifest.get('model', {}).get('backbone', '?')}, grid {mdir.grid}, "
        f"vocabulary {mdir.vocab_size}, max_beam {mdir.max_beam}; {len(pool)} images ({pool.source})")
    floor = _floor(mdir, {p for e, p in pairs if e not in PEERS}, device, threads, bandwidth_mb, log, matmul_sizes)
    other_cpu = OtherCpu()
    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": library_versions(),
        "model": {"path": str(mdir.path), **mdir.manifest.get("model", {}), "grid": mdir.grid,
                  "max_beam": mdir.max_beam, "max_steps": mdir.max_steps},
        "settings": {"engines": engine_list, "precisions": precision_list, "device": device, "batches": batch_list,
                     "beams": beam_list, "steps": steps, "warmup": warmup, "iters": iters, "threads": threads,
                     "images": pool.source, "max_seconds": max_seconds, "streams": stream_list,
                     "stream_threads": stream_threads, "decoding": OPTIONS_ROW if decoding else None},
        "floor": floor, "results": [], "skipped": list(not_pairs),
        **({"auto": auto_choices} if auto_choices else {}),
    }
    for e, choice in auto_choices.items():
        log(f"{e} auto: {choice['chosen']} ({choice['reason']})")
    for s in not_pairs:
        log(f"skipping {s['engine']} {s['precision']}: {s['reason']}")
    # All engines are loaded at once and take turns run by run (see _measure): this machine's speed
    # drifts by 2x over minutes, and ratios between engines are only fair when taken side by side.
    runners: list[tuple[Any, float | None, dict[str, Any] | None]] = []
    try:
        for engine, precision in pairs:
            before = current_rss_mb()
            try:
                runner = make_runner(engine, mdir, precision=precision, device=device, threads=threads,
                                     checkpoint=checkpoint)
            except EngineUnavailableError as exc:
                log(f"skipping {engine} {precision}: {exc}")
                report["skipped"].append({"engine": engine, "precision": precision, "reason": str(exc)})
                continue
            after = current_rss_mb()
            # None when not measurable: the allocator may reuse memory an earlier engine freed (growth <= 0)
            grown = None if before is None or after is None or after <= before else round(after - before, 1)
            quality = None
            if check_quality:
                quality = row_quality(mdir, runner)
                if quality.get("source") == "this load":
                    log(f"{engine} {precision}: verified on the parity set now: {quality}")
                if quality["status"] in ("failed", "unverified") and not allow_unverified:
                    reason = (f"{precision} on {engine} {'missed the quality budget' if quality['status'] == 'failed' else 'is not verified'}"
                              f" ({quality_cell(quality)}); pass --allow-unverified to bench it anyway")
                    log(f"skipping {engine} {precision}: {reason}")
                    report["skipped"].append({"engine": engine, "precision": precision, "reason": reason})
                    runner.close()
                    continue
            runners.append((runner, grown, quality))
        _add_variant_runners(runners, mdir, stream_list, stream_threads, decoding, device, steps, checkpoint,
                             report["skipped"], log)
        for batch in batch_list:
            for beam in beam_list:
                recs = _measure([r for r, _, _ in runners], pool.images, batch, beam, steps, warmup, iters,
                                max_seconds, device)
                compare_captions(recs)
                for rec, (runner, load_mb, quality) in zip(recs, runners):
                    rec["rss_load_mb"] = load_mb
                    rec["quality"] = quality
                    engine_obj = getattr(runner, "engine", None)  # what ran: effective precision, CPU, placement
                    rec["engine_info"] = engine_obj.describe() if engine_obj is not None else None
                    _attach_floor(rec, floor, device)
                    rec.pop("_tokens", None)
                    report["results"].append(rec)
                    log(f"{_label(rec)} batch {batch} beam {beam}: e2e p50 {rec['e2e_ms']['per_image']['p50']:.1f} "
                        f"ms/image, {rec['images_per_s']:.2f} img/s")
    finally:
        for runner, _, _ in runners:
            runner.close()
        runners.clear()
        gc.collect()
    if not report["results"]:
        raise EngineUnavailableError("no configuration could run: " + "; ".join(s["reason"] for s in report["skipped"]))
    report["machine"]["load_average_end"] = load_average()
    report["machine"]["other_processes_cores"] = other_cpu.cores()
    report["summary"] = summary_lines(report)
    if json_out is not None:
        write_json(report, json_out)
    if print_table:
        print(format_table(report), flush=True)
    return report


def _label(rec: dict[str, Any]) -> str:
    extra = {"streams": f" streams {rec.get('streams')}x{rec.get('threads')}", "options": " +options"}
    return f"{rec['engine']} {rec['precision']}{extra.get(rec.get('variant'), '')}"


def _add_variant_runners(out: list, mdir: ModelDir, stream_list: Sequence[int], stream_threads: int | None,
                         decoding: bool, device: str, steps: int | None, checkpoint: Any, skipped: list,
                         log: Callable[[str], None]) -> None:
    """Append the streams and options rows' (runner, engine MB, quality) to `out` (the default rows' list, so
    that the caller closes whatever was made), for the (engine, precision) pairs whose default runner loaded
    (their quality check has passed or was allowed)."""
    runners = list(out)
    loaded = [(r, q) for r, _, q in runners if getattr(r, "variant", None) is None]
    if decoding:
        base = [(r, q) for r, q in loaded if (r.name, r.precision) == ("ort", "fp32")]
        if not base:
            skipped.append({"engine": "ort", "precision": "fp32", "variant": "options",
                            "reason": "the options row runs beside ort fp32, which is not in this run"})
        for r, q in base:
            try:
                out.append((OptionsRunner(r), None, q))
            except EngineUnavailableError as exc:
                log(f"skipping the options row: {exc}")
                skipped.append({"engine": r.name, "precision": r.precision, "variant": "options", "reason": str(exc)})
    cores = usable_cores()
    for r, q in loaded:
        if not stream_list or r.name not in STREAM_ENGINES:
            continue
        for s in stream_list:
            t = stream_threads if stream_threads is not None else max(1, cores // s)
            before = current_rss_mb()
            try:
                sr = StreamRunner(r.name, mdir, precision=r.precision, device=device, streams=s, threads=t,
                                  most_streams=max(stream_list), forced=bool(steps), checkpoint=checkpoint,
                                  batches_per_stream=BATCHES_PER_STREAM)
            except (ValueError, EngineUnavailableError) as exc:  # S x T above the cores, an engine refusing
                log(f"skipping {r.name} {r.precision} streams {s}x{t}: {exc}")
                skipped.append({"engine": r.name, "precision": r.precision, "variant": f"streams {s}x{t}",
                                "reason": str(exc)})
                continue
            after = current_rss_mb()
            grown = None if before is None or after is None or after <= before else round(after - before, 1)
            out.append((sr, grown, q))


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if enabled:
            print(f"[captrt bench] {msg}", file=sys.stderr, flush=True)
    return log


def _floor(mdir: ModelDir, precisions: set[str], device: str, threads: int, bandwidth_mb: int,
           log: Callable[[str], None], matmul_sizes: Sequence[int] = DEFAULT_MATMUL_SIZES) -> dict[str, Any]:
    """Read bandwidth (host memory) and each precision's decoder_step weight bytes -> floor_ms; the fp32
    encoder's FLOPs and the measured matmul peak -> the end-to-end floor's compute part ("compute")."""
    if device != "cpu":
        return {"note": "not computed on device='cuda' (the floor is for host-memory reads)", "precisions": {}}
    counts = sorted({1, threads})
    log(f"measuring read bandwidth ({bandwidth_mb} MB, {', '.join(map(str, counts))} thread(s))")
    bw = measure_read_bandwidth(bandwidth_mb, counts)
    gbps = bw[threads].gbps
    out: dict[str, Any] = {"bandwidth_gbps": {str(t): round(b.gbps, 2) for t, b in bw.items()},
                           "bandwidth_method": f"numpy max-reduce over {bandwidth_mb} MB, one chunk per thread, "
                                               "best of 5",
                           "bandwidth_threads_used": threads, "precisions": {}}
    for p in sorted(precisions | {"fp32"}):
        if p not in mdir.graphs:
            continue
        try:
            wb = step_weight_bytes(mdir.read_graph(p, "decoder_step"))
        except RuntimeError as exc:  # onnx missing
            out["precisions"][p] = {"floor_ms": None, "note": str(exc)}
            continue
        out["precisions"][p] = {"weight_bytes": wb.total, "read_bytes": wb.read, "gathered_bytes": wb.gathered,
                                "bandwidth_gbps": round(gbps, 2), "threads": threads,
                                "floor_ms": round(floor_ms(wb.read, gbps), 4)}
    out["compute"] = _compute_floor(mdir, threads, log, matmul_sizes)
    return out


def _compute_floor(mdir: ModelDir, threads: int, log: Callable[[str], None],
                   matmul_sizes: Sequence[int]) -> dict[str, Any]:
    """The fp32 encoder's FLOPs at batch 1 (from the graph's shapes) and this machine's fp32 matmul peak."""
    try:
        flops = graph_flops(mdir.read_graph("fp32", "encoder"), batch=1)
    except (RuntimeError, ValueError) as exc:  # onnx missing; no fp32 graphs
        return {"note": f"encoder FLOPs not counted: {exc}"}
    log(f"measuring the fp32 matmul peak ({', '.join(f'{n}x{n}' for n in matmul_sizes)}, numpy and onnxruntime)")
    peak = measure_matmul_peak(matmul_sizes, threads)
    return {"encoder_flops": flops.flops, "encoder_flops_by_op": flops.by_op, "encoder_nodes_counted": flops.nodes,
            "encoder_nodes_unknown": flops.unknown,
            "encoder_flops_method": "2 x multiply-adds of the fp32 encoder graph's Conv/MatMul/Gemm at batch 1 "
                                    "(ONNX shape inference)",
            **describe_peak(peak), "encoder_floor_ms": round(flops.flops / (peak.best * 1e9) * 1e3, 4)}


def _attach_floor(rec: dict[str, Any], floor: dict[str, Any], device: str) -> None:
    f = (floor.get("precisions") or {}).get(rec["precision"]) or {}
    step = rec["step_ms"].get("p50")
    fl = f.get("floor_ms")
    rec["floor_ms"] = fl
    rec["floor_ratio"] = round(step / fl, 3) if fl and step is not None and device == "cpu" else None
    # The end-to-end floor is fp32's for every row (int8 does less work and may pass 100%).
    compute, fp32 = floor.get("compute") or {}, (floor.get("precisions") or {}).get("fp32") or {}
    rec["e2e_floor_ms"] = rec["pct_of_floor"] = None
    if device == "cpu" and compute.get("peak_gflops") and fp32.get("read_bytes") and rec.get("steps_mean"):
        parts = floor_ms_per_image(compute["encoder_flops"], compute["peak_gflops"], fp32["read_bytes"],
                                   fp32["bandwidth_gbps"], rec["steps_mean"], rec["batch"])
        rec["e2e_floor_ms"] = {k: round(v, 4) for k, v in parts.items()}
        rec["pct_of_floor"] = round(pct_of_floor(rec["images_per_s"], parts["total_ms"]), 2)


def _measure(runners: Sequence[Any], pool: np.ndarray, batch: int, beam: int, steps: int | None, warmup: int,
             iters: int, max_seconds: float | None, device: str) -> list[dict[str, Any]]:
    """Warm up every runner, then time up to `iters` rounds of one (batch, beam) configuration in
    which each runner runs once, in turn, on the same images. max_seconds bounds each runner's share."""
    from captrt.bench.measure import now_ms

    def take(i: int, n: int) -> np.ndarray:  # run i's n images of a cyclic walk through the image pool
        idx = (np.arange(n) + i * n) % len(pool)
        return np.ascontiguousarray(pool[idx])

    def run(runner: Any, i: int) -> Any:
        n = runner.images_per_run(batch) if hasattr(runner, "images_per_run") else batch
        if getattr(runner, "variant", None) == "streams":  # a list of n images in batches of `batch`
            return runner.run(take(i, n), beam, steps, batch=batch)
        return runner.run(take(i, n), beam, steps)

    gc.collect()
    samples: list[list[Any]] = [[] for _ in runners]
    with PeakRss() as rss:
        for i in range(warmup):
            for runner in runners:
                run(runner, i)
        started = now_ms()
        for i in range(iters):
            for runner, got in zip(runners, samples):
                got.append(run(runner, warmup + i))
            spent = now_ms() - started
            if (max_seconds is not None and i + 1 >= MIN_ITERS_IN_BUDGET
                    and spent > max_seconds * 1e3 * len(runners)):
                break
        seed_steps = [r.seed_step_ms(take(0, batch), beam, min(warmup, 2), max(3 * len(got), 5))
                      for r, got in zip(runners, samples)]
    return [_record(r, got, seed, batch, beam, steps, warmup, device, rss)
            for r, got, seed in zip(runners, samples, seed_steps)]


def _record(runner: Any, samples: list[Any], seed_steps: list[float] | None, batch: int, beam: int,
            steps: int | None, warmup: int, device: str, rss: PeakRss) -> dict[str, Any]:
    """One configuration's figures for one runner."""
    variant = getattr(runner, "variant", None)
    e2e = [s.e2e_ms for s in samples]
    step_ms = seed_steps if seed_steps is not None else [t for s in samples for t in s.step_ms]
    first = [t for s in samples for t in s.first_step_ms]
    per_image = [n for s in samples for n in s.steps_per_image]
    images = len(samples[0].steps_per_image) if samples and samples[0].steps_per_image else batch
    rec: dict[str, Any] = {
        "engine": runner.name, "precision": runner.precision, "variant": variant,
        "device": device if runner.name not in PEERS else "cpu",
        "provider": runner.provider, "batch": batch, "beam": beam, "steps": steps,
        "steps_mean": round(float(np.mean(per_image)), 2) if per_image else None,
        "iters": len(samples), "warmup": warmup,
        "encoder_ms": summarize([s.encoder_ms for s in samples if s.encoder_ms is not None]),
        "step_ms": summarize(step_ms),
        "step_timing": "seed step (decoder.step recomputing att_proj + log_softmax + topk) for each image of the batch"
                       if seed_steps is not None else "engine.step calls inside the search, steps 2..T",
        "first_step_ms": summarize(first),
        "e2e_ms": {"per_batch": summarize(e2e), "per_image": summarize([t / images for t in e2e])},
        "images_per_s": round(images * 1e3 / float(np.median(e2e)), 3),
        # every engine is resident during the configuration: the peak is the process's with all engines
        # loaded; rss_load_mb (set by the caller) is what creating this engine added
        "peak_rss_mb": rss.mb, "peak_rss_scope": rss.scope,
        "_tokens": [s.tokens for s in samples],  # for compare_captions; dropped before the report
    }
    if variant == "streams":
        # One run is one caption() call over `images` images in batches of `batch`: per_batch is that call.
        rec["e2e_ms"] = {"per_call": rec["e2e_ms"]["per_batch"], "per_batch": summarize([]),
                         "per_image": rec["e2e_ms"]["per_image"]}
        rec.update(streams=runner.streams, threads=runner.threads, images_per_run=images,
                   step_timing="not timed apart (the streams' steps overlap)",
                   measured_as=f"Captioner.load(streams={runner.streams}, threads={runner.threads}).caption(list of "
                               f"{images} images, batch_size={batch}): the list's {images // batch} batches spread "
                               f"over the streams; images/s = {images} / wall time of the call")
    elif variant == "options":
        rec["options"] = dict(getattr(runner, "used", {}) or {})
    return rec
