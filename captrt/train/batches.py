"""Training batches over a prepared split: (image, caption) pairs, shuffled per epoch, length-sorted.

The order depends only on (seed, epoch), so a resumed run sees the same batches as an uninterrupted
one; under DDP each rank takes every world_size-th pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, S, S, 3) uint8 images, or (B, P, E) cached features
    captions: torch.Tensor  # (B, L) int64, sorted by decreasing length
    lengths: torch.Tensor  # (B,) int64, incl. <start> and <end>


def epoch_batches(inputs: np.ndarray, captions: np.ndarray, caplens: np.ndarray, batch_size: int, seed: int,
                  epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """inputs (N, ...), captions (N, 5, L), caplens (N, 5): yields every pair once per epoch."""
    n_img, per_img = caplens.shape
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n_img * per_img, generator=g).numpy()[rank::world_size]
    for start in range(0, len(order), batch_size):
        pairs = order[start:start + batch_size]
        img_idx, cap_idx = pairs // per_img, pairs % per_img
        lens = caplens[img_idx, cap_idx]
        sort = np.argsort(-lens, kind="stable")  # the decoder runs the longest first (the seed's sort)
        img_idx, cap_idx, lens = img_idx[sort], cap_idx[sort], lens[sort]
        caps = captions[img_idx, cap_idx, : int(lens.max())]
        yield Batch(torch.from_numpy(np.ascontiguousarray(inputs[img_idx])),
                    torch.from_numpy(caps), torch.from_numpy(lens))


def num_batches(n_pairs: int, batch_size: int, world_size: int = 1) -> int:
    per_rank = len(range(0, n_pairs, world_size))
    return (per_rank + batch_size - 1) // batch_size
