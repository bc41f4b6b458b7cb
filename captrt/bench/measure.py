"""Timers, percentiles and peak resident memory.

Peak RSS: Linux keeps the process's high-water mark in /proc/self/status (VmHWM) and lets a process
reset it by writing "5" to /proc/self/clear_refs, so each configuration gets its own peak without a
subprocess. Where that reset is refused (non-Linux, restricted /proc) the figure is the process's
lifetime peak (ru_maxrss) and the scope says so.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Sequence

PERCENTILES = (50, 90, 99)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def now_ms() -> float:
    """A monotonic clock in milliseconds (perf_counter: the finest the platform has)."""
    return time.perf_counter() * 1e3


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of a non-empty sequence, q in [0, 100]."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(x) for x in samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, float | int | None]:
    """{"p50", "p90", "p99", "mean", "n"} of millisecond samples; the percentiles are None when empty."""
    if not samples:
        return {**{f"p{q}": None for q in PERCENTILES}, "mean": None, "n": 0}
    out: dict[str, float | int | None] = {f"p{q}": round(percentile(samples, q), 4) for q in PERCENTILES}
    out["mean"] = round(sum(samples) / len(samples), 4)
    out["n"] = len(samples)
    return out


def _status_kb(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def current_rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def peak_rss_mb() -> float:
    """The process's peak resident set since start or since the last successful reset_peak_rss()."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024.0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0  # bytes on macOS, kB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False when the kernel refuses."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakRss:
    """Context manager measuring the peak RSS of a block.

    scope is "config" when the high-water mark was reset on entry (the peak belongs to this block,
    including memory already resident when it started), "process" when it could not be and the
    figure is the peak of the whole process so far.
    """

    def __init__(self) -> None:
        self.mb: float | None = None
        self.scope = "process"

    def __enter__(self) -> "PeakRss":
        self.scope = "config" if reset_peak_rss() else "process"
        return self

    def __exit__(self, *exc: object) -> None:
        self.mb = round(peak_rss_mb(), 1)
