"""The step graph as model format version 1 had it (no decoding controls, no logp output).

Not what `captrt export` writes: kept so that tests can build a format-1 directory from the same
weights (old directories must still load) and benchmarks/decoding.py can time today's step graph
against the previous one, side by side.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F

from captrt.export.graphs import DecoderStepGraph, example_decoder_inputs
from captrt.export.onnx_export import export_graph
from captrt.train.model import CaptionModel


class FormatOneStepGraph(DecoderStepGraph):
    """tokens, origin, h, c, features, att_proj -> h_out, c_out, alpha, cand_logp, cand_ids (format 1)."""

    def forward(self, tokens, origin, h, c, features, att_proj):
        n, k = tokens.shape
        hidden = h.shape[2]
        index = origin.unsqueeze(2).expand(n, k, hidden)
        h_prev = torch.gather(h, 1, index).reshape(n * k, hidden)
        c_prev = torch.gather(c, 1, index).reshape(n * k, hidden)
        att2 = self.decoder_attn(h_prev).reshape(n, k, 1, -1)
        scores = self.full_attn(F.relu(att_proj.unsqueeze(1) + att2)).squeeze(3)
        alpha = F.softmax(scores, dim=2)
        context = torch.matmul(alpha, features).reshape(n * k, -1)
        emb = self.embedding(tokens.reshape(n * k))
        gate = torch.sigmoid(self.f_beta(h_prev))
        h_new, c_new = self._lstm_cell(torch.cat([emb, gate * context], dim=1), h_prev, c_prev)
        logp = F.log_softmax(self.fc(h_new).float(), dim=1)  # (B, V)
        cand_logp, cand_ids = torch.topk(logp, self.max_beam, dim=1, largest=True, sorted=True)
        return (h_new.reshape(n, k, hidden), c_new.reshape(n, k, hidden), alpha,
                cand_logp.reshape(n, k, self.max_beam), cand_ids.reshape(n, k, self.max_beam))


def export_format_one_step(model: CaptionModel, max_beam: int, opset: int) -> onnx.ModelProto:
    """The format-1 decoder_step.onnx of `model` (folded, checked, dims named like the exporter's)."""
    with torch.no_grad():
        return export_graph(FormatOneStepGraph(model, max_beam), example_decoder_inputs(model)[:6], "decoder_step",
                            opset, version=1)
