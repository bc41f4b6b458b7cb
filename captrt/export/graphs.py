"""Torch modules whose traces are the two exported graphs (see docs/model-format.md).

EncoderGraph:     image uint8 (N, S, S, 3) -> features (N, P, E), att_proj (N, P, A), h0, c0 (N, H)
DecoderStepGraph: tokens, origin (N, K), h, c (N, K_prev, H), features (N, P, E), att_proj (N, P, A),
                  ban_ids (N, K, B), penalty_ids (N, K, R), penalty (N,)
                  -> h_out, c_out (N, K, H), alpha (N, K, P), cand_logp, cand_ids (N, K, C), logp (N, K, V + 1)

Both reuse the CaptionModel's own submodules (no weight copies), so the math is the model's math,
only rearranged for export: the attention projection of the features is hoisted into the encoder,
the step broadcasts attention over beams instead of copying features per beam, and the LSTM cell
is spelled out so the exporters emit Gemm/Sigmoid/Tanh instead of the ONNX LSTM operator.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from captrt.train.model import IMAGENET_MEAN, IMAGENET_STD, CaptionModel
from captrt.train.step_controls import apply_step_controls


def adaptive_pool_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out_size, in_size) averaging matrix with exactly nn.AdaptiveAvgPool's bins along one axis.

    PyTorch's rule: output i averages inputs [floor(i*in/out), ceil((i+1)*in/out)). Bins may
    overlap when upsampling (8 -> 14), which is why torch.onnx cannot express it as AveragePool.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"adaptive pool sizes must be positive, got {in_size} -> {out_size}")
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size  # integer floor, no float rounding
        end = -((-(i + 1) * in_size) // out_size)  # integer ceil
        m[i, start:end] = 1.0 / (end - start)
    return m.to(dtype)


class FixedAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d for a known input size as two constant MatMuls: rows then columns.

    x (N, C, H_in, W_in) -> (N, C, H_out, W_out) = Ph @ x @ Pw^T.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], dtype: torch.dtype = torch.float32):
        super().__init__()
        ph = adaptive_pool_matrix(in_hw[0], out_hw[0], dtype)  # (Ho, Hi)
        pwt = adaptive_pool_matrix(in_hw[1], out_hw[1], dtype).t().contiguous()  # (Wi, Wo)
        self.register_buffer("ph", ph, persistent=False)
        self.register_buffer("pwt", pwt, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.ph, torch.matmul(x, self.pwt))


def backbone_output_hw(model: CaptionModel, image_size: int) -> tuple[int, int]:
    """Spatial size of the ResNet's output for a square image (8 x 8 at 256), measured, not guessed."""
    with torch.no_grad():
        out = model.encoder.resnet(torch.zeros(1, 3, image_size, image_size))
    return int(out.shape[2]), int(out.shape[3])


class EncoderGraph(nn.Module):
    """uint8 NHWC image -> features, att_proj, h0, c0; normalization and pooling in the graph."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        cfg = model.config
        self.resnet = model.encoder.resnet
        grid = model.encoder.enc_image_size
        self.pool = FixedAdaptiveAvgPool2d(backbone_output_hw(model, cfg.image_size), (grid, grid))
        self.encoder_attn = model.decoder.attention.encoder_attn
        self.init_h = model.decoder.init_h
        self.init_c = model.decoder.init_c
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor):
        """image uint8 (N, S, S, 3) RGB -> features (N, P, E), att_proj (N, P, A), h0 (N, H), c0 (N, H)."""
        # The same operations, in the same order, as captrt.train.model.normalize_uint8.
        x = image.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        fmap = self.pool(self.resnet(x))  # (N, E, G, G)
        features = fmap.flatten(2).transpose(1, 2)  # (N, P, E), row-major (y, x)
        att_proj = self.encoder_attn(features)  # (N, P, A): hoisted out of every decoder step
        # sum / P rather than mean(): ReduceSum's opset-18 form converts to opset 17, ReduceMean's does not.
        mean = features.sum(dim=1) / features.shape[1]  # (N, E)
        return features, att_proj, self.init_h(mean), self.init_c(mean)


class DecoderStepGraph(nn.Module):
    """One beam-search step for N images x K beams with in-graph state gather and top-C candidates."""

    def __init__(self, model: CaptionModel, max_beam: int):
        super().__init__()
        dec = model.decoder
        if not 1 <= max_beam <= dec.vocab_size:
            raise ValueError(f"max_beam {max_beam} must be between 1 and the vocabulary size {dec.vocab_size}")
        self.max_beam = int(max_beam)
        self.embedding = dec.embedding
        self.decoder_attn = dec.attention.decoder_attn
        self.full_attn = dec.attention.full_attn
        self.f_beta = dec.f_beta
        self.cell = dec.decode_step  # nn.LSTMCell; only its parameters are used (see _lstm_cell)
        # fc with the padding column of the decoding controls (captrt.train.step_controls): a zero weight row
        # and bias -inf, so the graph's matmul writes V + 1 logits at once (no copy to add the column).
        # Dropout is the identity at eval, so it is left out. (self.fc stays for code that wants fc alone.)
        self.fc = dec.fc
        with torch.no_grad():
            w, b = dec.fc.weight, dec.fc.bias
            self.register_buffer("fc_weight", torch.cat([w, w.new_zeros(1, w.shape[1])]), persistent=False)
            self.register_buffer("fc_bias", torch.cat([b, b.new_full((1,), float("-inf"))]), persistent=False)

    def _lstm_cell(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """nn.LSTMCell's math (gate order i, f, g, o) as two Gemms and pointwise ops. x (B, D+E), h/c (B, H)."""
        cell = self.cell
        gates = F.linear(x, cell.weight_ih, cell.bias_ih) + F.linear(h, cell.weight_hh, cell.bias_hh)  # (B, 4H)
        hd = h.shape[1]
        # Slices, not chunk(): opset-18 Split(num_outputs) does not convert back to opset 17.
        i, f, g, o = gates[:, :hd], gates[:, hd:2 * hd], gates[:, 2 * hd:3 * hd], gates[:, 3 * hd:]
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new, c_new

    def forward(self, tokens, origin, h, c, features, att_proj, ban_ids, penalty_ids, penalty):
        """See the module docstring for shapes; C = max_beam."""
        n, k = tokens.shape
        hidden = h.shape[2]
        # Slot k continues beam origin[n, k] of the previous step: gather the state in-graph.
        index = origin.unsqueeze(2).expand(n, k, hidden)  # (N, K, H)
        h_prev = torch.gather(h, 1, index).reshape(n * k, hidden)  # (B, H), B = N*K
        c_prev = torch.gather(c, 1, index).reshape(n * k, hidden)

        # Additive attention broadcast over beams: features and att_proj are per image, not per beam.
        att2 = self.decoder_attn(h_prev).reshape(n, k, 1, -1)  # (N, K, 1, A)
        scores = self.full_attn(F.relu(att_proj.unsqueeze(1) + att2)).squeeze(3)  # (N, K, P)
        alpha = F.softmax(scores, dim=2)  # (N, K, P)
        context = torch.matmul(alpha, features).reshape(n * k, -1)  # (B, E)

        emb = self.embedding(tokens.reshape(n * k))  # (B, D)
        gate = torch.sigmoid(self.f_beta(h_prev))  # (B, E)
        h_new, c_new = self._lstm_cell(torch.cat([emb, gate * context], dim=1), h_prev, c_prev)

        logits = F.linear(h_new, self.fc_weight, self.fc_bias).float()  # (B, V + 1), fp32 for the beam scores
        # Decoding controls before the top-C selection, so the search over candidates stays exact.
        theta = penalty.reshape(n, 1, 1).expand(n, k, 1).reshape(n * k, 1)  # (B, 1)
        logits = apply_step_controls(logits, ban_ids.reshape(n * k, -1), penalty_ids.reshape(n * k, -1), theta)
        logp = F.log_softmax(logits, dim=1)  # (B, V + 1): column V is -inf, exp(-inf) adds nothing
        cand_logp, cand_ids = torch.topk(logp, self.max_beam, dim=1, largest=True, sorted=True)  # (B, C)
        return (h_new.reshape(n, k, hidden), c_new.reshape(n, k, hidden), alpha,
                cand_logp.reshape(n, k, self.max_beam), cand_ids.reshape(n, k, self.max_beam),
                logp.reshape(n, k, -1))


def example_encoder_inputs(image_size: int, batch: int = 2) -> tuple[torch.Tensor]:
    """Tracing inputs; batch 2 so the exporter does not specialize N to 1."""
    return (torch.zeros(batch, image_size, image_size, 3, dtype=torch.uint8),)


def example_decoder_inputs(model: CaptionModel, n: int = 2, k: int = 3, k_prev: int = 4, banned: int = 5,
                           penalized: int = 6):
    """Tracing inputs with N, K, K_prev, B and R all different and > 1, so none is specialized or unified."""
    cfg = model.config
    p, e, a, hd, v = cfg.num_pixels, cfg.encoder_dim, cfg.attention_dim, cfg.decoder_dim, cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, v, (n, k), generator=g)
    origin = torch.randint(0, k_prev, (n, k), generator=g)
    ban_ids = torch.randint(0, v // 2, (n, k, banned), generator=g)  # V is the padding id;
    penalty_ids = torch.randint(v // 2, v + 1, (n, k, penalized), generator=g)  # the lists are disjoint
    return (tokens, origin, torch.randn(n, k_prev, hd, generator=g), torch.randn(n, k_prev, hd, generator=g),
            torch.randn(n, p, e, generator=g), torch.randn(n, p, a, generator=g), ban_ids, penalty_ids,
            torch.full((n,), 1.2))


