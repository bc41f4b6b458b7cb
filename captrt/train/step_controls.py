"""The step graph's logit processing in torch, shared by the exported graph and the torch engine.

The step computes V + 1 logits: fc's V and a padding column V whose logit is -inf (a zero weight row
with bias -inf), so that id lists padded with V need no copy of the logits to land somewhere harmless
and the padding column never takes probability mass. Then, in one scatter: the repetition penalty on
penalty_ids (l / theta if l > 0 else l * theta) and -inf on ban_ids. The host keeps the two lists
disjoint (a banned word is not also penalized), so the scatter writes each real word once; padding
entries all write -inf into column V. Neutral inputs (only padding, theta 1) leave fc's logits as they
are (x / 1 and x * 1 are exact; column V is -inf already).
"""

from __future__ import annotations

import torch


def padded_logits(fc: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """fc(h) with the padding column: (B, H) -> (B, V + 1), column V = -inf (for eager code; the exported
    graph folds the extra row into fc's weights, see captrt.export.graphs)."""
    logits = fc(h)
    return torch.cat([logits, torch.full_like(logits[:, :1], float("-inf"))], dim=1)


def apply_step_controls(ext: torch.Tensor, ban_ids: torch.Tensor, penalty_ids: torch.Tensor,
                        penalty: torch.Tensor) -> torch.Tensor:
    """ext (B, V + 1) float32 logits with column V at -inf; ban_ids (B, Nb), penalty_ids (B, R) int64 in
    0..V, disjoint but for the padding V; penalty (B, 1) float32 -> processed logits (B, V + 1)."""
    seen = torch.gather(ext, 1, penalty_ids)  # (B, R)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)  # CTRL: l / theta if l > 0 else l * theta
    banned = torch.zeros_like(ban_ids, dtype=ext.dtype) - float("inf")  # (B, Nb)
    return torch.scatter(ext, 1, torch.cat([penalty_ids, ban_ids], dim=1), torch.cat([seen, banned], dim=1))
