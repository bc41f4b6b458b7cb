"""The step graph's logit processing in torch, shared by the exported graph and the torch engine.

logits (B, V) -> processed logits (B, V): repetition penalty on penalty_ids, then -inf on ban_ids.
Both id lists are padded with V: the work happens on a (B, V + 1) copy whose last column absorbs the
padding and is dropped, so one batched tensor serves slots with lists of any length. Neutral inputs
(only padding, penalty 1) return the logits bit for bit: x / 1 and x * 1 are exact.
"""

from __future__ import annotations

import torch


def apply_step_controls(logits: torch.Tensor, ban_ids: torch.Tensor, penalty_ids: torch.Tensor,
                        penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float32; ban_ids (B, Nb), penalty_ids (B, R) int64 in 0..V; penalty (B, 1) float32."""
    v = logits.shape[1]
    ext = torch.cat([logits, torch.zeros_like(logits[:, :1])], dim=1)  # (B, V+1)
    seen = torch.gather(ext, 1, penalty_ids)  # (B, R)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)  # CTRL: l / theta if l > 0 else l * theta
    ext = torch.scatter(ext, 1, penalty_ids, seen)
    ext = torch.scatter(ext, 1, ban_ids, torch.full_like(ban_ids, 0, dtype=ext.dtype) - float("inf"))
    return ext[:, :v]
