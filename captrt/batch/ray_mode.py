"""Ray mode of `captrt batch`: Ray Data's map_batches over a pool of captioning actors.

    inputs (driver, streamed) --ray.put, one Arrow block per chunk--> Dataset.from_arrow_refs
        --map_batches(CaptionActor, ActorPoolStrategy(size=actors), num_cpus=threads per actor)-->
        result rows back to the driver --> Assembler --> the same shards and manifest as local mode

Why this shape
- The driver lists the inputs and puts them in the object store itself, one small Arrow block per
  chunk: there are no read tasks, so an actor pool that takes every CPU cannot starve them (with a
  read operator, Ray 2.60 stalls on a 2-CPU machine: the actors hold both CPUs, "3/2 CPU"). It also
  needs no filesystem shared by the nodes for the input list, only for the images themselves.
- Decoding runs inside the actors (a thread pool per actor, overlapping the engine), so decoded
  pixels never cross the object store; `decode="tasks"` moves it to separate Ray Data tasks
  (what a GPU actor pool wants), at the price of one CPU kept free for them.
- Rows come back to the driver (about 100 bytes an image) and the driver alone writes shards and the
  manifest: OUT_DIR needs no shared filesystem either, and exactly-once is the driver's job: the
  Assembler keys rows by input position and drops the duplicates that a retried batch produces.
- Fault tolerance is Ray Data's: actor pools run with max_restarts=-1 and max_task_retries=-1
  (Ray Data's defaults for actor pools), so an actor or worker process killed mid-run is restarted and its
  batches are retried.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from captrt.batch.shards import Assembler, Chunk, arrow_schema


class RayModeError(ValueError):
    """Ray mode cannot run as asked (Ray not installed, a pool larger than the cluster, no cluster at
    the address): a usage error, exit code 2."""


class CaptionActor:
    """A Ray Data callable class: one Captioner per actor process, built once, used for every batch.

    __call__: a pyarrow batch with `index`, `path` (and `image`, `decode_error` when decoding ran as
    tasks) -> a pyarrow table with every shard column, one row per input, same order.
    """

    def __init__(self, model: str, load_options: dict[str, Any], threads: int, beam: int, max_steps: int,
                 stamp: dict[str, str], decoding: dict[str, Any] | None = None):
        from captrt.batch.rows import make_reader
        from captrt.runtime.captioner import Captioner

        self.captioner = Captioner.load(model, threads=threads, **load_options)
        self.read = make_reader(self.captioner)
        self.decoder = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="captrt-decode")
        self.beam, self.max_steps, self.stamp, self.decoding = beam, max_steps, stamp, dict(decoding or {})

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        from captrt.batch.rows import error_row, read_or_error, result_rows

        indices = batch.column("index").to_pylist()
        paths = batch.column("path").to_pylist()
        if "image" in batch.column_names:  # decoded by decode_batch tasks
            errors = batch.column("decode_error").to_pylist()
            size = self.captioner.model.image_size
            flat = batch.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            images = flat.reshape(len(paths), size, size, 3)
            decoded = [e if e is not None else images[k] for k, e in enumerate(errors)]
        else:
            decoded = list(self.decoder.map(lambda p: read_or_error(self.read, p), paths))
        ok = [k for k, d in enumerate(decoded) if not isinstance(d, str)]
        rows: list[dict[str, Any] | None] = [None] * len(paths)
        if ok:
            caps = self.captioner.caption([np.asarray(decoded[k]) for k in ok], beam_size=self.beam,
                                          max_steps=self.max_steps, batch_size=len(ok), **self.decoding)
            for k, row in zip(ok, result_rows([(indices[k], paths[k]) for k in ok], caps, self.stamp)):
                rows[k] = row
        for k, d in enumerate(decoded):
            if isinstance(d, str):
                rows[k] = error_row(indices[k], paths[k], d, self.stamp)
        return pa.Table.from_pylist(rows, schema=arrow_schema())


def decode_batch(batch: Any, *, model: str) -> Any:
    """Ray Data task (decode="tasks"): decode a batch's images with the model's preprocessing.
    -> the batch plus `image` (fixed-size list of S*S*3 uint8, zeros on error) and `decode_error`."""
    import numpy as np
    import pyarrow as pa

    from captrt.batch.rows import read_or_error
    from captrt.batch.sources import is_uri, open_remote
    from captrt.runtime.model_dir import ModelDir
    from captrt.runtime.preprocess import DEFAULT_MAX_BYTES, load_image

    size = ModelDir.load(model).image_size

    def read(path: str) -> Any:
        source = open_remote(path, DEFAULT_MAX_BYTES) if is_uri(path) else path
        return load_image(source, size, name=path)

    paths = batch.column("path").to_pylist()
    images = np.zeros((len(paths), size * size * 3), np.uint8)
    errors: list[str | None] = []
    for k, p in enumerate(paths):
        got = read_or_error(read, p)
        if isinstance(got, str):
            errors.append(got)
        else:
            images[k] = got.reshape(-1)
            errors.append(None)
    column = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), size * size * 3)
    return batch.append_column("image", column).append_column("decode_error", pa.array(errors, pa.string()))


def plan_pool(cpus: float, gpus: float, device: str, actors: int | None, threads_per_actor: int | None,
              decode: str) -> tuple[int, int, float]:
    """(actors, threads per actor, CPUs reserved per actor) for a cluster with `cpus` CPUs.

    CPU engines: threads per actor default 1, actors default all CPUs (minus one kept for decode
    tasks with decode="tasks"). The pool must fit the cluster's CPUs, else Ray would wait forever
    for an actor it cannot place: that is refused up front. GPU engines: one GPU per actor.
    """
    tpa = threads_per_actor or 1
    spare = 1 if decode == "tasks" else 0
    if device == "cuda":
        n = actors or max(1, int(gpus))
        if gpus < n:
            raise RayModeError(f"--actors {n} with a CUDA engine needs {n} GPUs; the cluster has {gpus:g}")
        return n, tpa, float(tpa)
    n = actors or max(1, int((cpus - spare) // tpa))
    if n * tpa + spare > cpus:
        raise RayModeError(f"{n} actors x {tpa} threads{' + 1 CPU for decode tasks' if spare else ''} need "
                           f"{n * tpa + spare} CPUs; the Ray cluster has {cpus:g} (lower --actors or "
                           "--threads-per-actor)")
    return n, tpa, float(tpa)


def connect(address: str, ray_init: dict[str, Any] | None) -> tuple[Any, bool]:
    """-> (ray module, whether this call started Ray and must shut it down).

    'local' starts Ray on this machine (or reuses one this process already has); 'auto',
    'HOST:PORT' or 'ray://HOST:PORT' joins a running cluster. Token authentication, on by default
    for clusters in Ray 2.60, stays on: the driver finds the token in RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as every Ray client does.
    """
    try:
        import ray
    except ImportError:
        raise RayModeError("--ray needs Ray Data: pip install 'captrt[ray]'") from None
    if ray.is_initialized():
        return ray, False
    # Ray's INFO lines would interleave with our progress display; warnings and errors still show.
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    options.update(ray_init or {})
    if address == "local":
        options.setdefault("num_cpus", os.cpu_count() or 1)
        # Short socket paths: Ray's Unix sockets live under the temp dir (107-byte limit).
        options.setdefault("_temp_dir", tempfile.mkdtemp(prefix="captrt-ray-", dir="/tmp"))
        ray.init(**options)
    else:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayModeError(f"--ray {address}: cannot join the cluster ({exc})") from None
    return ray, True


def run_ray(chunks: Iterable[Chunk], assembler: Assembler, *, model: str, load_options: dict[str, Any],
            stamp: dict[str, str], address: str, actors: int | None, threads_per_actor: int | None,
            batch_size: int, beam: int, max_steps: int, decode: str, on_rows: Callable[[int], None],
            ray_init: dict[str, Any] | None = None, on_started: Callable[[], None] | None = None,
            decoding: dict[str, Any] | None = None) -> str:
    """Caption every input of `chunks` on Ray; returns a description of the pool ('ray: 2 actors x 1 thread').

    model: an absolute path every node can read (same path on every node, or a shared filesystem).
    on_started(): called once Ray is up and the inputs are in its object store.
    """
    import pyarrow as pa

    ray, started = connect(address, ray_init)
    try:
        import ray.data
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # ours is the one progress display; Ray's would be a 2nd set of \r bars
        ctx.enable_operator_progress_bars = False
        resources = ray.cluster_resources()
        device = load_options.get("device", "cpu")
        n, tpa, cpus_each = plan_pool(resources.get("CPU", 0.0), resources.get("GPU", 0.0), device, actors,
                                      threads_per_actor, decode)
        refs = []
        for chunk in chunks:
            assembler.expect(chunk)
            block = pa.table({"index": pa.array(range(chunk.start, chunk.start + len(chunk.paths)), pa.int64()),
                              "path": pa.array(chunk.paths, pa.string())})
            refs.append(ray.put(block))
        if not refs:
            return "ray: nothing to do"
        ds = ray.data.from_arrow_refs(refs)
        if decode == "tasks":
            ds = ds.map_batches(decode_batch, fn_kwargs={"model": model}, batch_size=batch_size,
                                batch_format="pyarrow", num_cpus=1)
        # Ray Data gives actor pools max_restarts=-1 and max_task_retries=-1 by default (2.60): a killed
        # actor is restarted and its batches retried. Not passed again: extra remote args are deprecated.
        ds = ds.map_batches(CaptionActor, batch_size=batch_size, batch_format="pyarrow",
                            fn_constructor_kwargs={"model": model, "load_options": load_options, "threads": tpa,
                                                   "beam": beam, "max_steps": max_steps, "stamp": stamp,
                                                   "decoding": decoding},
                            compute=ActorPoolStrategy(size=n), num_cpus=cpus_each,
                            num_gpus=1 if device == "cuda" else None)
        if on_started is not None:
            on_started()
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            added = sum(assembler.add(row) for row in table.to_pylist())
            if added:
                on_rows(added)
        return f"ray: {n} actor{'s' if n > 1 else ''} x {tpa} thread{'s' if tpa > 1 else ''}"
    finally:
        if started:
            ray.shutdown()
