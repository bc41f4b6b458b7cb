"""The decoder step's memory floor: the weight bytes one step must read, over the machine's read bandwidth.

At batch 1 a decoder step is a handful of matrix-vector products: every weight byte is read once
and used for a few multiply-adds, so no kernel can beat bytes / bandwidth. The ratio of a measured
step to that floor says how much is left to gain.

Read bandwidth: `np.maximum.reduce` (SIMD, one pass, no writes, releases the GIL) over an array much
larger than the last-level cache, split into contiguous chunks read by 1..T Python threads at once.
numpy itself is single-threaded; the threads are what read in parallel. Best of `repeats` runs.

Weight bytes: the decoder_step graph's initializers (parsed with `onnx`, no tensor data copied).
Tables read only through Gather (the word embedding) contribute just the N*K rows a step looks up,
not their whole size, so they are reported apart and left out of the floor.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_MB = 512


@dataclass
class Bandwidth:
    """One read-bandwidth measurement: `nbytes` read by `threads` threads in `seconds` (the best run)."""

    threads: int
    nbytes: int
    seconds: float
    checksum: float  # the maximum found: proves every chunk was read

    @property
    def gbps(self) -> float:
        """Decimal GB/s (1e9 bytes per second)."""
        return self.nbytes / self.seconds / 1e9


def read_once(array: np.ndarray, threads: int) -> tuple[float, float]:
    """Read the whole 1-D `array` once with `threads` threads. Returns (seconds, maximum of the array)."""
    if array.ndim != 1 or array.size == 0:
        raise ValueError("read_once expects a non-empty 1-D array")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    chunks = np.array_split(array, min(threads, array.size))
    results: list[float] = [float("-inf")] * len(chunks)

    def read(i: int) -> None:
        results[i] = float(np.maximum.reduce(chunks[i]))

    workers = [threading.Thread(target=read, args=(i,)) for i in range(1, len(chunks))]
    start = time.perf_counter()
    for w in workers:
        w.start()
    read(0)  # the calling thread reads the first chunk
    for w in workers:
        w.join()
    seconds = time.perf_counter() - start
    return seconds, max(results)


def measure_array(array: np.ndarray, threads: int, repeats: int = 5) -> Bandwidth:
    """Best-of-`repeats` read bandwidth of `array` (1-D) with `threads` threads."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    best, checksum = float("inf"), float("-inf")
    for _ in range(repeats):
        seconds, checksum = read_once(array, threads)
        best = min(best, seconds)
    return Bandwidth(threads, int(array.nbytes), best, checksum)


def measure_read_bandwidth(size_mb: int = DEFAULT_MB, threads: Iterable[int] = (1, 2),
                           repeats: int = 5) -> dict[int, Bandwidth]:
    """Read bandwidth of a `size_mb` MB float32 array for each thread count in `threads`."""
    if size_mb < 1:
        raise ValueError(f"bandwidth array size must be >= 1 MB, got {size_mb}")
    array = np.ones(size_mb * (1 << 20) // 4, dtype=np.float32)  # np.ones touches every page: no faults while timing
    array[-1] = 2.0
    try:
        return {t: measure_array(array, t, repeats) for t in threads}
    finally:
        del array


@dataclass
class WeightBytes:
    """Initializer bytes of a graph. read: what one step reads (total minus gathered tables)."""

    total: int
    read: int
    gathered: dict[str, int] = field(default_factory=dict)  # tables consumed only through Gather
    by_name: dict[str, int] = field(default_factory=dict)


def _tensor_nbytes(tensor) -> int:
    from onnx import helper

    count = 1
    for d in tensor.dims:
        count *= int(d)
    if tensor.raw_data:
        return len(tensor.raw_data)
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def step_weight_bytes(graph: str | Path | bytes) -> WeightBytes:
    """Weight bytes of a decoder_step graph (a path or serialized bytes). Needs the `onnx` package."""
    try:
        import onnx
    except ImportError as exc:  # onnx ships with captrt[train], not with the runtime
        raise RuntimeError(f"the memory floor needs the onnx package (pip install 'captrt[train]'): {exc}") from None
    if isinstance(graph, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(graph))
    else:
        model = onnx.load(str(graph), load_external_data=False)
    g = model.graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, i))
    by_name = {t.name: _tensor_nbytes(t) for t in g.initializer}
    for node in g.node:  # weights some exporters keep as Constant nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    by_name[node.output[0]] = _tensor_nbytes(attr.t)
    gathered = {name: size for name, size in by_name.items()
                if consumers.get(name) and all(op == "Gather" and i == 0 for op, i in consumers[name])}
    total = sum(by_name.values())
    return WeightBytes(total=total, read=total - sum(gathered.values()), gathered=gathered, by_name=by_name)


def floor_ms(nbytes: int, gbps: float) -> float:
    """Milliseconds to read `nbytes` at `gbps` decimal GB/s."""
    if gbps <= 0:
        raise ValueError(f"bandwidth must be positive, got {gbps}")
    return nbytes / (gbps * 1e9) * 1e3
