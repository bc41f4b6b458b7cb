"""PyTorch modules computing exactly what encoder.onnx / decoder_step.onnx compute (docs/model-format.md).

Used by the torch engine (same batched search as the ONNX engines). Deliberately not
captrt.export.graphs: those spell things for the exporters (pooling as matrices, the LSTM cell as
Gemms); these call the checkpoint's own modules (AdaptiveAvgPool2d, nn.LSTMCell), so the torch
engine checks the batched rearrangement alone and is PyTorch's fastest form as a speed baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from captrt.train.model import CaptionModel, normalize_uint8
from captrt.train.step_controls import apply_step_controls, padded_logits


class EncoderGraph(nn.Module):
    """image uint8 (N, S, S, 3) -> features (N, P, E), att_proj (N, P, A), h0, c0 (N, H)."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, image: torch.Tensor):
        features = self.encoder(normalize_uint8(image))
        att_proj = self.decoder.attention.encoder_attn(features)
        h0, c0 = self.decoder.init_hidden_state(features)
        return features, att_proj, h0, c0


class StepGraph(nn.Module):
    """One step for N images x K slots; see decoder_step.onnx for the contract.

    tokens, origin (N, K) int64; h, c (N, K_prev, H); features (N, P, E); att_proj (N, P, A);
    ban_ids (N, K, B), penalty_ids (N, K, R) int64, penalty (N,) float32 (None: no processing) ->
    h_out, c_out (N, K, H), alpha (N, K, P), cand_logp, cand_ids (N, K, C), logp (N, K, V).
    """

    def __init__(self, model: CaptionModel, candidates: int):
        super().__init__()
        self.decoder = model.decoder
        self.candidates = candidates

    def forward(self, tokens, origin, h, c, features, att_proj, ban_ids=None, penalty_ids=None, penalty=None):
        d = self.decoder
        n, k = tokens.shape
        hidden = h.shape[2]
        index = origin.unsqueeze(2).expand(n, k, hidden)
        h = torch.gather(h, 1, index)  # (N, K, H): slot k continues slot origin[n, k]
        c = torch.gather(c, 1, index)
        att2 = d.attention.decoder_attn(h)  # (N, K, A)
        att = d.attention.full_attn(F.relu(att_proj.unsqueeze(1) + att2.unsqueeze(2))).squeeze(3)  # (N, K, P)
        alpha = F.softmax(att, dim=2)
        context = torch.bmm(alpha, features)  # (N, K, E): features broadcast over the K slots
        gate = torch.sigmoid(d.f_beta(h))
        x = torch.cat([d.embedding(tokens), gate * context], dim=2).reshape(n * k, -1)
        h2, c2 = d.decode_step(x, (h.reshape(n * k, hidden), c.reshape(n * k, hidden)))
        if ban_ids is None:  # no controls: the checkpoint's own log_softmax over V words
            logp = F.log_softmax(d.fc(h2), dim=1)  # (B, V)
        else:  # as the exported graph: V + 1 logits, one scatter, log_softmax, the padding column dropped
            theta = penalty.reshape(n, 1, 1).expand(n, k, 1).reshape(n * k, 1)
            logits = apply_step_controls(padded_logits(d.fc, h2), ban_ids.reshape(n * k, -1),
                                         penalty_ids.reshape(n * k, -1), theta)
            logp = F.log_softmax(logits, dim=1)[:, :-1]  # (B, V)
        cand_logp, cand_ids = logp.topk(self.candidates, dim=1, largest=True, sorted=True)
        return (h2.reshape(n, k, hidden), c2.reshape(n, k, hidden), alpha,
                cand_logp.reshape(n, k, -1), cand_ids.reshape(n, k, -1), logp.reshape(n, k, -1))
