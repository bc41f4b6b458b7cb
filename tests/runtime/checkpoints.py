"""Tiny checkpoints whose captions depend on the image and end at different lengths.

conftest.make_tiny_checkpoint's random ResNet gives nearly the same mean feature for every image, so
every image gets the same caption, and a random LSTM settles into a cycle where <end> either wins
at once or never. Here, on top of that checkpoint:
- init_h/init_c are re-centred on the mean feature of calibration images and scaled up, so h0/c0
  (and everything after) vary per image;
- hidden unit 0 becomes a clock: its gates are saturated open so c grows by `clock_rate` per step
  from an image-dependent c0, and only <end> reads it (fc weight `end_weight`), so <end>'s logit
  rises over time and wins after a number of steps that differs per image and per beam;
- weight_hh/embedding are scaled up so the other units keep wandering (varied words).
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import make_tiny_checkpoint, random_images


def make_varied_checkpoint(path: Path, *, seed: int = 0, end_bias: float = 0.0, sharpen: float = 10.0,
                           init_scale: float = 20.0, lstm_scale: float = 3.0, clock_rate: float = 0.2,
                           end_weight: float = 15.0, clock_start: float = -1.0, enc_size: int = 4,
                           dim: int = 32) -> Path:
    import torch

    from captrt.train.checkpoint import load_checkpoint, save_checkpoint
    from captrt.train.model import normalize_uint8

    make_tiny_checkpoint(path, seed=seed, enc_size=enc_size, dim=dim, sharpen=sharpen)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    d = model.decoder
    end, u, hdim = ckpt.vocab.end, 0, d.decoder_dim
    with torch.no_grad():
        feats = model.encoder(normalize_uint8(torch.from_numpy(random_images(8, seed=1000 + seed))))
        mean = feats.mean(dim=1)  # (8, E)
        centre = mean.mean(dim=0)
        for layer in (d.init_h, d.init_c):
            layer.weight.mul_(init_scale)
            layer.bias.copy_(-layer.weight @ centre)
        c0 = d.init_c(mean)[:, u]
        d.init_c.weight[u] *= 0.6 / float(c0.std())
        d.init_c.bias[u] = clock_start - float(d.init_c.weight[u] @ centre)
        cell = d.decode_step
        cell.weight_hh.mul_(lstm_scale)
        d.embedding.weight.mul_(lstm_scale)
        for gate in range(4):  # PyTorch LSTMCell gate order: input, forget, cell, output
            row = gate * hdim + u
            cell.weight_ih[row] = 0.0
            cell.weight_hh[row] = 0.0
            cell.bias_hh[row] = 0.0
            cell.bias_ih[row] = 20.0  # gates fully open: c_t = c_{t-1} + tanh(rate), h = tanh(c)
        cell.bias_ih[2 * hdim + u] = float(torch.atanh(torch.tensor(clock_rate)))
        d.fc.weight[:, u] = 0.0
        d.fc.weight[end, u] = end_weight
        d.fc.bias[end] = end_bias
        d.attention.full_attn.weight.mul_(5.0)  # attention that varies over the grid
    ckpt.encoder_state = model.encoder.state_dict()
    ckpt.decoder_state = model.decoder.state_dict()
    save_checkpoint(path, ckpt)
    return path
