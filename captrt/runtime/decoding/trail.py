"""The back-pointers a search keeps per step, so a hypothesis's attention maps can be read back.

Beam search and sampling both record one StepRecord per step (which parent slot each selection came
from, its attention, and which selection each next-step slot holds) and follow them backwards with
trace_attention once a hypothesis is chosen: no per-slot copies of growing attention histories.
"""

from __future__ import annotations

import numpy as np


class StepRecord:
    """One step's back-pointers: rows' image ids (ascending), selected parent slots and their
    attention (N, beam[, P]) by selection index, and which selection each next-step slot holds."""

    __slots__ = ("ids", "slot", "alpha", "picked")

    def __init__(self, ids: np.ndarray, slot: np.ndarray, alpha: np.ndarray, picked: np.ndarray):
        self.ids, self.slot, self.alpha, self.picked = ids, slot, alpha, picked

    def row(self, image: int) -> int:
        return int(np.searchsorted(self.ids, image))


def trace_attention(trail: list[StepRecord], image: int, step: int, j: int) -> np.ndarray:
    """(step, P) attention of the hypothesis selected as j at `step`, following parents back to step 1."""
    out = []
    for u in range(step, 0, -1):
        rec = trail[u - 1]
        r = rec.row(image)
        out.append(rec.alpha[r, j])
        if u > 1:
            prev = trail[u - 2]
            j = int(prev.picked[prev.row(image), rec.slot[r, j]])
    return np.stack(out[::-1])

