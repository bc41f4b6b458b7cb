"""Streams: how many inferences may run at once over one loaded model, and with how many threads each.

A stream is a slot for one batched search. S streams x T intra-op threads: S batches run at once,
each computing on T cores, over the same weights (one ONNX Runtime session per graph called
concurrently; one OpenVINO compiled model with NUM_STREAMS = S; one TensorRT engine with an
execution context per thread). The default, S = 1 and T = all cores, is one batch at a time on every
core. "auto" is the rule measured on this project's 2-core machine (docs/engines.md, "Streams"): a ResNet at
small batches scales worse across threads than across streams, so one stream per core, one thread each.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from captrt.checks import check_int


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StreamPlan:
    streams: int  # S: batches in flight at once
    threads: int  # T: intra-op threads of each

    @classmethod
    def resolve(cls, streams: int | str = 1, threads: int | None = None, *, oversubscribe: bool = False,
                cores: int | None = None) -> "StreamPlan":
        """S and T from the caller's values: streams an integer >= 1 or 'auto' (one stream per core,
        one thread each); threads None = the cores divided among the streams. S x T above the usable
        cores is refused unless oversubscribe (threads would then wait for each other's cores)."""
        cores = cores or usable_cores()
        threads = check_int("threads", threads, allow_none=True, what="a positive integer or None", expected=True)
        if streams == "auto":
            s = cores if threads is None else max(1, cores // threads)
            return cls.resolve(s, threads or 1, oversubscribe=oversubscribe, cores=cores)
        streams = check_int("streams", streams, what="an integer >= 1 or 'auto'")
        t = threads if threads is not None else max(1, cores // streams)
        if streams * t > cores and not oversubscribe:
            raise ValueError(f"streams x threads = {streams} x {t} = {streams * t} exceeds the {cores} usable cores; "
                             "use fewer streams or threads, or pass oversubscribe=True (--oversubscribe)")
        return cls(streams, t)


class StreamSlots:
    """At most `count` holders at once; a caller waits for a free slot (never runs beyond the plan).
    `busy` counts the slots in use (the service exports it as captrt_streams_busy)."""

    def __init__(self, count: int):
        self.count = count
        self._free = threading.BoundedSemaphore(count)
        self._lock = threading.Lock()
        self.busy = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._free.acquire()
        with self._lock:
            self.busy += 1
        try:
            yield
        finally:
            with self._lock:
                self.busy -= 1
            self._free.release()
