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
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from captrt.bench.bandwidth import DEFAULT_MB
from captrt.bench.floor import DEFAULT_MATMUL_SIZES
from captrt.bench.floor_report import attach_floor, measure_floor
from captrt.bench.images import load_images
from captrt.bench.machine import OtherCpu, library_versions, load_average, machine_info, usable_cores
from captrt.bench.measure import current_rss_mb
from captrt.bench.report import format_table, write_json
from captrt.bench.runners import OPTIONS_ROW, PEERS, OptionsRunner, StreamRunner, make_runner
from captrt.bench.summary import compare_captions, summary_lines
from captrt.bench.quality import quality_cell, row_quality
from captrt.bench.timing import measure_rounds
from captrt.checks import check_int
from captrt.runtime.auto import AUTO, choose
from captrt.runtime.engines.base import DEVICES, ENGINES, PRECISIONS
from captrt.runtime.errors import EngineUnavailableError
from captrt.runtime.model_dir import ENGINE_PRECISIONS, ModelDir

BENCH_ENGINES = (*ENGINES, *PEERS)
CHECKPOINT_ENGINES = ("torch", *PEERS)  # run the checkpoint's fp32 weights whatever --precision says
STREAM_ENGINES = ("ort", "openvino", "trt")  # torch sets PyTorch's process-wide thread count: not per stream
BATCHES_PER_STREAM = 2  # a streams run captions (most streams x this) batches: every stream gets several


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
    max_seconds: per configuration, stop timing after this long once timing.MIN_ITERS_IN_BUDGET runs are in.
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
    args = _check_arguments(engines, precisions, batches, beams, streams, device=device, steps=steps,
                            warmup=warmup, iters=iters, threads=threads, max_seconds=max_seconds, json_out=json_out)
    mdir = ModelDir.load(model)  # ModelDirError: missing directory, bad manifest, ...
    auto_choices: dict[str, dict] = {}
    pairs, not_pairs = _plan(mdir, args, device, auto_choices)
    stream_threads = args.threads  # None: each stream count gets the cores // S
    threads = args.threads or usable_cores()
    log = _logger(progress)

    most = max(max(args.batches) * max(args.streams, default=0) * BATCHES_PER_STREAM, max(args.batches), 8)
    pool = load_images(images, mdir.image_size, count=most)
    log(f"model {mdir.path}: {mdir.manifest.get('model', {}).get('backbone', '?')}, grid {mdir.grid}, "
        f"vocabulary {mdir.vocab_size}, max_beam {mdir.max_beam}; {len(pool)} images ({pool.source})")
    floor = measure_floor(mdir, {p for e, p in pairs if e not in PEERS}, device, threads, bandwidth_mb, log,
                          matmul_sizes)
    other_cpu = OtherCpu()
    report = _new_report(mdir, floor, not_pairs, {
        "engines": args.engines, "precisions": args.precisions, "device": device, "batches": args.batches,
        "beams": args.beams, "steps": args.steps, "warmup": args.warmup, "iters": args.iters, "threads": threads,
        "images": pool.source, "max_seconds": max_seconds, "streams": args.streams, "stream_threads": stream_threads,
        "decoding": OPTIONS_ROW if decoding else None})
    if auto_choices:
        report["auto"] = auto_choices
    for e, choice in auto_choices.items():
        log(f"{e} auto: {choice['chosen']} ({choice['reason']})")
    for s in not_pairs:
        log(f"skipping {s['engine']} {s['precision']}: {s['reason']}")
    # All engines are loaded at once and take turns run by run (captrt.bench.timing): this machine's speed
    # drifts by 2x over minutes, and ratios between engines are only fair when taken side by side.
    runners: list[tuple[Any, float | None, dict[str, Any] | None]] = []
    try:
        _add_runners(runners, pairs, mdir, device=device, threads=threads, checkpoint=checkpoint,
                     check_quality=check_quality, allow_unverified=allow_unverified, skipped=report["skipped"],
                     log=log)
        _add_variant_runners(runners, mdir, args.streams, stream_threads, decoding, device, args.steps, checkpoint,
                             report["skipped"], log)
        for batch in args.batches:
            for beam in args.beams:
                report["results"] += _configuration(runners, pool.images, batch, beam, args, max_seconds, device,
                                                    floor, log)
    finally:
        for runner, _, _ in runners:
            runner.close()
        runners.clear()
        gc.collect()
    _finish(report, other_cpu, json_out, print_table)
    return report


class _Arguments(NamedTuple):
    engines: list[str]
    precisions: list[str]
    batches: list[int]
    beams: list[int]
    streams: list[int]
    steps: int | None
    warmup: int
    iters: int
    threads: int | None


def _check_arguments(engines: Any, precisions: Any, batches: Any, beams: Any, streams: Any, *, device: str,
                     steps: Any, warmup: Any, iters: Any, threads: Any, max_seconds: Any, json_out: Any) -> _Arguments:
    """run_bench's arguments parsed and checked before anything loads: a ValueError naming the flag."""
    engine_list = parse_list(engines, "engine")
    precision_list = parse_list(precisions, "precision")
    batch_list = parse_list(batches, "batch", int)
    beam_list = parse_list(beams, "beam", int)
    check_names(engine_list, precision_list)
    if device not in DEVICES:
        raise ValueError(f"device: unknown device {device!r}; choose from {', '.join(DEVICES)}")
    steps = check_int("steps", steps, allow_none=True, expected=True)
    warmup, iters = check_int("warmup", warmup, low=0, expected=True), check_int("iters", iters, expected=True)
    threads = check_int("threads", threads, allow_none=True, expected=True)
    stream_list = parse_list(streams, "streams", int)
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds: expected a positive number, got {max_seconds!r}")
    if json_out is not None and Path(json_out).is_dir():
        raise ValueError(f"json: {json_out} is a directory; give a file name")
    return _Arguments(engine_list, precision_list, batch_list, beam_list, stream_list, steps, warmup, iters, threads)


def _plan(mdir: ModelDir, args: _Arguments, device: str,
          choices: dict[str, dict]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """plan_configs on the model directory (`choices` receives what 'auto' chose), once every beam fits its
    max_beam."""
    too_wide = [b for b in args.beams if b > mdir.max_beam]
    if too_wide:
        raise ValueError(f"beam: {max(too_wide)} exceeds max_beam {mdir.max_beam} of {mdir.manifest_path} "
                         f"(re-export with --max-beam {max(too_wide)} for wider beams)")
    return plan_configs(mdir, args.engines, args.precisions, device, choices)


def _new_report(mdir: ModelDir, floor: dict[str, Any], skipped: list[dict[str, str]],
                settings: dict[str, Any]) -> dict[str, Any]:
    """The report before any row: when, where, what model, the run's settings, the floor."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "versions": library_versions(),
        "model": {"path": str(mdir.path), **mdir.manifest.get("model", {}), "grid": mdir.grid,
                  "max_beam": mdir.max_beam, "max_steps": mdir.max_steps},
        "settings": settings, "floor": floor, "results": [], "skipped": list(skipped),
    }


def _finish(report: dict[str, Any], other_cpu: OtherCpu, json_out: str | Path | None, print_table: bool) -> None:
    """The machine's load at the end, the summary; the report written and printed as asked. A run in which
    no configuration could run is an EngineUnavailableError listing why."""
    if not report["results"]:
        raise EngineUnavailableError("no configuration could run: " + "; ".join(s["reason"] for s in report["skipped"]))
    report["machine"]["load_average_end"] = load_average()
    report["machine"]["other_processes_cores"] = other_cpu.cores()
    report["summary"] = summary_lines(report)
    if json_out is not None:
        write_json(report, json_out)
    if print_table:
        print(format_table(report), flush=True)


def _add_runners(out: list, pairs: Sequence[tuple[str, str]], mdir: ModelDir, *, device: str, threads: int,
                 checkpoint: Any, check_quality: bool, allow_unverified: bool, skipped: list,
                 log: Callable[[str], None]) -> None:
    """Append each pair's default-row (runner, engine MB, quality) to `out` as it loads (so that the caller
    closes whatever was made); a pair that cannot load, or misses its quality budget, goes to `skipped`."""
    for engine, precision in pairs:
        before = current_rss_mb()
        try:
            runner = make_runner(engine, mdir, precision=precision, device=device, threads=threads,
                                 checkpoint=checkpoint)
        except EngineUnavailableError as exc:
            log(f"skipping {engine} {precision}: {exc}")
            skipped.append({"engine": engine, "precision": precision, "reason": str(exc)})
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
                skipped.append({"engine": engine, "precision": precision, "reason": reason})
                runner.close()
                continue
        out.append((runner, grown, quality))


def _configuration(runners: Sequence[tuple[Any, float | None, dict[str, Any] | None]], images: np.ndarray,
                   batch: int, beam: int, args: _Arguments, max_seconds: float | None, device: str,
                   floor: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One (batch, beam) configuration timed over every runner in turn: the report's rows for it."""
    recs = measure_rounds([r for r, _, _ in runners], images, batch, beam, args.steps, args.warmup, args.iters,
                          max_seconds, device)
    compare_captions(recs)
    for rec, (runner, load_mb, quality) in zip(recs, runners):
        rec["rss_load_mb"] = load_mb
        rec["quality"] = quality
        engine_obj = getattr(runner, "engine", None)  # what ran: effective precision, CPU, placement
        rec["engine_info"] = engine_obj.describe() if engine_obj is not None else None
        attach_floor(rec, floor, device)
        rec.pop("_tokens", None)
        log(f"{_label(rec)} batch {batch} beam {beam}: e2e p50 {rec['e2e_ms']['per_image']['p50']:.1f} "
            f"ms/image, {rec['images_per_s']:.2f} img/s")
    return recs


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
