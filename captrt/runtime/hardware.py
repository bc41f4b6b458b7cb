"""What CPU this process runs on: its model name and the SIMD features that decide low-precision numerics.

Torch-free and cheap (one read of /proc/cpuinfo, cached): the runtime keys verification results by
the hardware (bf16 and int8 kernels differ between CPUs with and without AVX-512 BF16, VNNI, AMX),
and the bench reports it beside every number.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The features that change int8/bf16/fp32 speed or numerics, in the order they are reported.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The 'model name' of /proc/cpuinfo (Linux), else platform.processor()."""
    for line in _cpuinfo().splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def all_cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is no /proc/cpuinfo)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_flags() -> list[str]:
    """The SIMD features that matter for int8/bf16/fp32 speed and numerics (AVX2, AVX-512, VNNI, BF16, AMX)."""
    flags = all_cpu_flags()
    return [f for f in SIMD_FLAGS if f in flags]
