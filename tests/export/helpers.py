"""Test models for the exporter: tiny random-weight checkpoints whose captions end at varied lengths."""

from __future__ import annotations

import math

import numpy as np


def make_varied_length_checkpoint(path, *, seed: int = 0, sharpen: float = 10.0, backbone: str = "resnet18",
                                  enc_size: int = 4, dim: int = 32, steps: tuple[float, float] = (3.0, 18.0)):
    """make_tiny_checkpoint, then one LSTM unit turned into an image-dependent step counter that raises <end>.

    Why: with random weights an end_bias alone gives bimodal captions (empty, or never ending), because
    the raw-score beam search prefers the 1-step [<end>] hypothesis unless <end> becomes the top word
    later. Unit 0 here integrates c_0(t) = c_0(0) + DELTA * t (input/forget/output gates saturated open,
    candidate constant); c_0(0) comes from init_c and varies with the image, so tanh(c_0) crosses the
    threshold where <end>'s logit overtakes the other words after a number of steps that differs per
    image, spread over `steps`. Everything else is the random model.
    """
    import torch

    from captrt.export.images import synthetic  # the exporter's default parity images
    from tests.conftest import make_tiny_checkpoint

    from captrt.train.checkpoint import load_checkpoint, save_checkpoint
    from captrt.train.model import normalize_uint8

    make_tiny_checkpoint(path, seed=seed, backbone=backbone, enc_size=enc_size, dim=dim, sharpen=sharpen)
    ckpt = load_checkpoint(path)
    model = ckpt.build_model()
    dec, end = model.decoder, ckpt.vocab.end
    delta, threshold, kappa = 0.1, 0.6, 60.0
    hd = dec.decoder_dim
    with torch.no_grad():
        cell = dec.decode_step
        for gate in range(4):  # rows i, f, g, o of unit 0
            row = gate * hd
            cell.weight_ih[row].zero_()
            cell.weight_hh[row].zero_()
            cell.bias_hh[row] = 0.0
            cell.bias_ih[row] = math.atanh(delta) if gate == 2 else 12.0
        # c_0(0) = init_c(mean feature)[0]: map the image-dependent projection onto the start range that
        # makes tanh(c_0) reach the threshold after steps[0]..steps[1] steps.
        feats = model.encoder(normalize_uint8(torch.from_numpy(synthetic(64, model.config.image_size).images)))
        z = feats.mean(dim=1) @ dec.init_c.weight[0]
        lo, hi = np.quantile(z.numpy(), [0.02, 0.98])
        c_at = math.atanh(threshold)
        start_hi, start_lo = c_at - delta * steps[0], c_at - delta * steps[1]
        scale = (start_hi - start_lo) / max(hi - lo, 1e-6)
        dec.init_c.weight[0] *= scale
        dec.init_c.bias[0] = start_lo - scale * lo
        dec.fc.weight[end].zero_()
        dec.fc.weight[end, 0] = kappa
        dec.fc.bias[end] = -kappa * threshold
    ckpt.encoder_state = model.encoder.state_dict()
    ckpt.decoder_state = model.decoder.state_dict()
    save_checkpoint(path, ckpt)
    return path


def make_large_checkpoint(path, *, seed: int = 0, vocab_size: int = 9490, sharpen: float = 3.0):
    """ResNet-101, 14x14 grid, 512-dim attention/embedding/decoder, vocabulary 9490, random weights.

    The seed notebook's real shapes. fc is scaled by `sharpen` so that the top words are well apart
    (random logits over 9490 words otherwise have near-ties a 1e-6 difference could flip).
    """
    import torch

    from captrt.train.checkpoint import Checkpoint, save_checkpoint
    from captrt.train.config import ModelConfig
    from captrt.train.model import CaptionModel
    from captrt.vocab import END, PAD, START, UNK, Vocab

    words = [f"w{i}" for i in range(vocab_size - 4)]
    word2id = {w: i for i, w in enumerate(words, 1)}
    word2id.update({PAD: 0, UNK: vocab_size - 3, START: vocab_size - 2, END: vocab_size - 1})
    vocab = Vocab(word2id)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, backbone="resnet101", enc_size=14, attention_dim=512,
                         embed_dim=512, decoder_dim=512)
    model = CaptionModel(config)
    recalibrate_batchnorm(model.encoder.resnet)
    model.eval()
    with torch.no_grad():
        model.decoder.fc.weight.mul_(sharpen)
        model.decoder.fc.bias[vocab.pad] = -1e4
        model.decoder.fc.bias[vocab.start] = -1e4
    save_checkpoint(path, Checkpoint(config, vocab, model.encoder.state_dict(), model.decoder.state_dict()))
    return path


def recalibrate_batchnorm(resnet, images: int = 4, size: int = 128) -> None:
    """Set BatchNorm running statistics from a few smooth images, as training would.

    With random weights and the default statistics (mean 0, var 1) activations grow block after
    block: a random ResNet-101's features reach ~1e5, which saturates every gate downstream and
    makes fp32 rounding visible in the captions. Real checkpoints have O(1) features.
    """
    import torch

    from captrt.export.images import synthetic
    from captrt.train.model import normalize_uint8

    x = normalize_uint8(torch.from_numpy(synthetic(images, size).images))
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    resnet.train()
    with torch.no_grad():
        resnet(x)
    resnet.eval()
