"""run_batch: caption a corpus into a table of shards, locally or on a Ray cluster; resumable.

    from captrt.batch import run_batch
    result = run_batch(["photos/", "index.parquet"], "MODEL_DIR", "out/")           # local mode
    result = run_batch(["s3://bucket/photos/"], "MODEL_DIR", "out/", ray="auto")     # a running Ray cluster
    result.captioned, result.failed, result.exit_code

See captrt/batch/shards.py for the output directory and the resume rule, sources.py for SOURCE.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from captrt.batch.ray_mode import RayModeError, run_ray
from captrt.batch.rows import chunked
from captrt.batch.shards import FORMATS, Assembler, Chunk, OutputDir, OutputDirError
from captrt.batch.sources import SourceError, count_paths, iter_paths
from captrt.checks import check_int
from captrt.progress import Progress


EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_SHARD_ROWS = 1000
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[\w.\-]+:\d+)$")


class BatchUsageError(ValueError):
    """Bad arguments, sources, model directory or OUT_DIR: one line naming the culprit (exit code 2)."""


@dataclass
class BatchResult:
    """What one run did. captioned/failed: rows written by this run; skipped: inputs found complete
    in OUT_DIR (resume); images: inputs in total; seconds: wall time of this run after start-up;
    failed_total: failed rows in the whole OUT_DIR (earlier runs included); startup_seconds: Ray mode,
    from the call to Ray being up with the inputs in its object store (not in `seconds`)."""

    out_dir: Path
    images: int
    captioned: int
    failed: int
    skipped: int
    seconds: float
    mode: str
    failed_total: int = 0
    startup_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every input of OUT_DIR is captioned, 1 when some row (this run's or an earlier one's) failed."""
        return EXIT_SOME_FAILED if self.failed or self.failed_total else EXIT_OK

    @property
    def rate(self) -> float:
        return (self.captioned + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        skipped = f", {self.skipped} already done" if self.skipped else ""
        startup = f", after {self.startup_seconds:.1f} s of Ray start-up" if self.startup_seconds else ""
        return (f"captrt batch: {self.captioned} captioned, {self.failed} failed{skipped} in {self.seconds:.1f} s "
                f"({self.rate:.1f} images/s, {self.mode}{startup}) -> {self.out_dir}")


def run_batch(sources: Sequence[str], model: str | os.PathLike, out_dir: str | os.PathLike, *, engine: str = "ort",
              device: str | None = None, precision: str = "fp32", beam: int = 5, max_steps: int = 50,
              batch_size: int = 16, fmt: str = "parquet", resume: bool = False, split: str | None = None,
              shard_rows: int = DEFAULT_SHARD_ROWS, ray: str | None = None, actors: int | None = None,
              threads_per_actor: int | None = None, threads: int | None = None, streams: int | str | None = None,
              oversubscribe: bool = False, decode_threads: int | None = None,
              decode: str = "actor", allow_unverified: bool = False, progress: bool | None = None,
              stream: TextIO | None = None, log_interval_s: float = 30.0,
              on_shard: Callable[[dict[str, Any]], None] | None = None, ray_init: dict[str, Any] | None = None,
              decoding: dict[str, Any] | None = None) -> BatchResult:
    """Caption every image of `sources` into OUT_DIR (one row per input, in shards of `shard_rows`).

    ray: None runs in this process (local mode); 'local' starts a Ray instance on this machine;
    'auto' or 'HOST:PORT' / 'ray://HOST:PORT' joins a running cluster. actors, threads_per_actor:
    the Ray actor pool (default: as many 1-thread actors as the cluster has CPUs, see ray_mode).
    threads: engine threads in local mode (of each stream; default: the cores divided among the
    streams); streams: local mode, batches captioned at once over the one loaded model (None = 1;
    'auto': one per core; S x threads above the usable cores is refused unless oversubscribe; Ray mode
    refuses both, its actors being its parallelism); decode_threads: decoding threads in local mode
    (default: the number of cores).
    decode: Ray mode only, 'actor' (decode inside the actors) or 'tasks' (separate Ray Data tasks)
    on `stream` (default stderr).
    progress None or True: a bar on a terminal, a line every log_interval_s otherwise; False: none. on_shard(entry): called
    with each new manifest entry. ray_init: extra ray.init() keyword arguments. decoding: the decoding
    controls (Captioner.caption's keyword arguments: num_hypotheses ... seed); shards hold the caption
    (the first hypothesis), and the controls are part of the run's settings (resume checks them).
    Raises BatchUsageError (exit 2) for anything the caller must fix; KeyboardInterrupt passes through
    with every finished shard already safe in OUT_DIR (--resume continues).
    """
    sources = [str(s) for s in sources]
    _check_arguments(sources, batch_size=batch_size, shard_rows=shard_rows, actors=actors,
                     threads_per_actor=threads_per_actor, threads=threads, decode_threads=decode_threads, fmt=fmt,
                     decode=decode, ray=ray, streams=streams, oversubscribe=oversubscribe)
    out = Path(out_dir)
    _check_out_dir(out, resume)
    if device is None:
        device = "cuda" if engine == "trt" else "cpu"
    decoding = dict(decoding or {})
    model_dir = _checked_model(model, beam, max_steps, decoding)
    try:
        total = count_paths(sources, split)
    except SourceError as exc:
        raise BatchUsageError(str(exc)) from None
    settings = {"sources": sources, "split": split, "model_id": model_dir.model_id, "engine": engine,
                "precision": precision, "device": device, "beam": beam, "max_steps": max_steps, "format": fmt,
                "shard_rows": shard_rows, **({"decoding": decoding} if decoding else {})}
    load_options: dict[str, Any] = {"engine": engine, "device": device, "precision": precision,
                                    "allow_unverified": allow_unverified}
    captioner = _load_here(model, load_options, ray=ray, threads=threads, streams=streams,
                           oversubscribe=oversubscribe)
    try:
        output, created = _open_output(out, settings, resume)
        bar = Progress(max(total - output.totals()[0], 0), label="captrt batch", stream=stream,
                       enabled=progress is not False, interval_s=log_interval_s)
        assembler = Assembler(output, on_shard=on_shard)
        skipped = [0]
        chunks = _todo(sources, split, output, skipped)
        clock = _Clock(bar)
        # What run_local and run_ray share: every row stamped alike, the same decoding, one progress bar.
        stamp = {"model_id": model_dir.model_id, "engine": engine, "precision": load_options["precision"]}
        common = {"stamp": stamp, "batch_size": batch_size, "beam": beam, "max_steps": max_steps, "decoding": decoding,
                  "on_rows": bar.update}
        try:
            if ray is None:
                mode = _run_local(chunks, captioner, assembler, decode_threads, common)
            else:
                mode = run_ray(chunks, assembler, model=str(Path(model).resolve()), load_options=load_options,
                               address=ray, actors=actors, threads_per_actor=threads_per_actor, decode=decode,
                               ray_init=ray_init, on_started=clock.started, **common)
        except (SourceError, OutputDirError, RayModeError) as exc:
            if created and not output.shards:  # refused before any work: leave no OUT_DIR behind
                shutil.rmtree(out, ignore_errors=True)
            raise BatchUsageError(str(exc)) from None
        finally:
            bar.close()
        return _finish(output, assembler, total=total, skipped=skipped[0], seconds=clock.seconds(), mode=mode,
                       startup_seconds=clock.startup)
    finally:
        if captioner is not None:
            captioner.close()


# ------------------------------------------------------------------------------------ argument checks

def _check_arguments(sources: Sequence[str], *, batch_size: Any, shard_rows: Any, actors: Any,
                     threads_per_actor: Any, threads: Any, decode_threads: Any, fmt: str, decode: str,
                     ray: str | None, streams: Any, oversubscribe: bool) -> None:
    """Every argument run_batch can judge on its own, before it reads anything."""
    if not sources:
        raise BatchUsageError("no SOURCE given")
    check_int("batch_size", batch_size, error=BatchUsageError)
    check_int("shard_rows", shard_rows, error=BatchUsageError)
    for name, value in (("actors", actors), ("threads_per_actor", threads_per_actor), ("threads", threads),
                        ("decode_threads", decode_threads)):
        check_int(name, value, allow_none=True, error=BatchUsageError)
    if fmt not in FORMATS:
        raise BatchUsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if decode not in ("actor", "tasks"):
        raise BatchUsageError(f"decode must be 'actor' or 'tasks', got {decode!r}")
    if ray is not None and not _ADDRESS.match(ray):
        raise BatchUsageError(f"--ray takes auto, local, HOST:PORT or ray://HOST:PORT, got {ray!r} "
                              "(write SOURCE before --ray, or --ray local)")
    if ray is None and (actors is not None or threads_per_actor is not None):
        raise BatchUsageError("--actors and --threads-per-actor apply to --ray only")
    if streams is not None and streams != "auto":
        check_int("streams", streams, error=BatchUsageError)
    if ray is not None and (streams is not None or oversubscribe):
        raise BatchUsageError("--streams and --oversubscribe apply to local mode only: Ray runs actors, each with "
                              "its own model (--actors x --threads-per-actor)")


def _check_out_dir(out: Path, resume: bool) -> None:
    """OUT_DIR is new, empty, or (with resume) an earlier run's; never a file."""
    try:
        listed = out.is_dir() and any(out.iterdir())
    except OSError as exc:
        raise BatchUsageError(f"{out}: cannot list the output directory ({exc.strerror or exc})") from None
    if listed and not resume:
        raise BatchUsageError(f"{out}: already exists (pass --resume to continue that run, or choose a new -o)")
    if out.exists() and not out.is_dir():
        raise BatchUsageError(f"{out}: exists and is not a directory")


def _checked_model(model: str | os.PathLike, beam: int, max_steps: int, decoding: dict[str, Any]) -> Any:
    """The model directory, with every decoding control checked against it before anything starts."""
    from captrt.runtime.errors import ModelDirError
    from captrt.runtime.model_dir import ModelDir

    try:
        model_dir = ModelDir.load(Path(model))
    except ModelDirError as exc:
        raise BatchUsageError(str(exc)) from None
    try:
        from captrt.runtime.decoding import DecodingOptions

        DecodingOptions.build(beam_size=beam, max_steps=max_steps, **decoding).check(model_dir.vocab,
                                                                                    max_beam=model_dir.max_beam)
    except ValueError as exc:
        raise BatchUsageError(str(exc)) from None
    return model_dir


# ----------------------------------------------------------------------------------------- the run

def _load_here(model: str | os.PathLike, load_options: dict[str, Any], *, ray: str | None, threads: int | None,
               streams: int | str | None, oversubscribe: bool) -> Any:
    """The Captioner local mode runs, or None in Ray mode. Ray mode loads once here too when the precision needs
    a quality verification: a missing or failed one is refused in one line before any actor starts (and a first
    verification is cached for this machine's actors). precision="auto" is chosen once here, so that every actor
    and row uses the same one: load_options["precision"] becomes the choice."""
    precision = load_options["precision"]
    if ray is not None and precision != "auto" and (precision == "fp32" or load_options["allow_unverified"]):
        return None
    from captrt.runtime.captioner import Captioner
    from captrt.runtime.errors import EngineUnavailableError, ModelDirError

    try:
        captioner = Captioner.load(model, threads=threads, streams=streams or 1, oversubscribe=oversubscribe,
                                   **load_options)
    except (ModelDirError, EngineUnavailableError, ValueError, TypeError) as exc:
        raise BatchUsageError(str(exc)) from None
    load_options["precision"] = captioner.engine.precision  # what "auto" chose (else what was asked)
    if ray is not None:
        captioner.close()
        return None
    return captioner


def _open_output(out: Path, settings: dict[str, Any], resume: bool) -> tuple[OutputDir, bool]:
    """(the output directory, whether this run created it)."""
    created = not out.exists()
    try:
        return OutputDir.open(out, settings, resume), created
    except OutputDirError as exc:
        if created:  # refused before any work: leave no OUT_DIR behind
            shutil.rmtree(out, ignore_errors=True)
        raise BatchUsageError(str(exc)) from None


class _Clock:
    """The run's captioning time; Ray mode's start-up (from the call to Ray being up) is measured apart."""

    def __init__(self, bar: Progress):
        self._bar = bar
        self.start = time.monotonic()
        self.startup = 0.0

    def started(self) -> None:
        now = time.monotonic()
        self.startup, self.start = now - self.start, now
        self._bar.restart()

    def seconds(self) -> float:
        return time.monotonic() - self.start


def _run_local(chunks: Iterator[Chunk], captioner: Any, assembler: Assembler, decode_threads: int | None,
               common: dict[str, Any]) -> str:
    from captrt.batch.local import run_local
    from captrt.batch.rows import make_reader

    run_local(chunks, captioner, assembler, read=make_reader(captioner),
              decode_threads=decode_threads or (os.cpu_count() or 1), **common)
    return "local"


def _finish(output: OutputDir, assembler: Assembler, *, total: int, skipped: int, seconds: float, mode: str,
            startup_seconds: float) -> BatchResult:
    """The run's summary, written into OUT_DIR, as a BatchResult."""
    if assembler.pending:
        raise RuntimeError(f"{output.path}: {assembler.pending} chunks left incomplete (a bug); rerun with --resume")
    try:
        summary = output.finish(seconds, assembler.captioned, assembler.failed)
    except OutputDirError as exc:
        raise BatchUsageError(str(exc)) from None
    return BatchResult(output.path, total, assembler.captioned, assembler.failed, skipped, seconds, mode,
                       failed_total=summary["failed"], startup_seconds=startup_seconds)


def _todo(sources: Sequence[str], split: str | None, output: OutputDir, skipped: list[int]) -> Iterator[Chunk]:
    """The chunks of the input stream that OUT_DIR does not hold yet (counts the rest in skipped[0])."""
    for start, paths in chunked(iter_paths(sources, split), output.shard_rows):
        chunk = Chunk(start, paths)
        if output.is_done(chunk):
            skipped[0] += len(paths)
            continue
        yield chunk
