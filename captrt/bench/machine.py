"""What the numbers were measured on: CPU, cores, memory, load, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from captrt.runtime.hardware import cpu_flags, cpu_model  # noqa: F401  (re-exported: bench rows name the CPU)

from captrt.runtime.streams import usable_cores  # one definition: re-exported for the bench modules

LIBRARIES = ("captrt", "numpy", "onnxruntime-gpu", "onnxruntime", "openvino", "onnx", "torch", "torchvision", "tensorrt")


def memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class OtherCpu:
    """CPU time that other processes used while the benchmark ran, in cores (0 = quiet machine).

    The load average cannot say this: it counts the benchmark's own threads. /proc/stat's busy time
    (user+nice+system+irq+softirq+steal) minus this process's own CPU time, over the wall time."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system + t.children_user + t.children_system, t.elapsed

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(other, 0.0) / (end[2] - self.start[2]), 2)


def machine_info() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": usable_cores(), "logical_cpus": os.cpu_count(),
            "memory_gb": memory_gb(), "platform": platform.platform(), "python": sys.version.split()[0],
            "load_average": load_average()}


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide the speed (missing ones left out)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
