"""The benchmark suite's model: seed-sized (ResNet-101, 14x14 grid, 512 dims, COCO-sized vocabulary) with
random weights. Speed does not depend on what the weights say, only on their shapes, so a random
checkpoint measures exactly what a trained one would, without a dataset or a download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from captrt.hashing import sha256_file

SUITE_VOCAB = 9490  # COCO Karpathy split, min_word_freq 5 (the seed's WORDMAP size)
SUITE_CONFIG: dict[str, Any] = {"backbone": "resnet101", "enc_size": 14, "attention_dim": 512, "embed_dim": 512,
                                "decoder_dim": 512}
STAMP = "suite_stamp.json"
RECIPE = 2  # bump when make_random_checkpoint changes: cached suite models are then rebuilt


def default_work() -> Path:
    """Where the suite model is cached: outside the repository, since its checkpoint and model directory
    are ~0.5 GB. Every benchmark that uses the suite model shares it."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "captrt" / "bench-suite"


def synthetic_vocab(size: int):
    """A Vocab of `size` words: <pad> 0, w1..w{size-4}, then <unk>, <start>, <end> (the seed's id layout)."""
    from captrt.vocab import Vocab

    if size < 5:
        raise ValueError(f"vocab size must be >= 5, got {size}")
    word2id = {"<pad>": 0}
    word2id.update({f"w{i}": i for i in range(1, size - 3)})
    word2id.update({"<unk>": size - 3, "<start>": size - 2, "<end>": size - 1})
    return Vocab(word2id)


def make_random_checkpoint(path: str | Path, *, vocab_size: int = SUITE_VOCAB, seed: int = 0, sharpen: float = 40.0,
                           **config: Any) -> Path:
    """Write a captrt checkpoint with random weights (SUITE_CONFIG unless overridden by `config`).

    fc is scaled by `sharpen` so log-probabilities are far apart and beams do not tie, and <pad>/<start>
    are never emitted (a trained model never emits them either).
    """
    import torch

    from captrt.train.checkpoint import Checkpoint, save_checkpoint
    from captrt.train.config import ModelConfig
    from captrt.train.model import CaptionModel

    vocab = synthetic_vocab(vocab_size)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, **{**SUITE_CONFIG, **config})
    model = CaptionModel(cfg).eval()
    calibrate_batchnorm(model.encoder, cfg.image_size)
    with torch.no_grad():
        model.decoder.fc.weight.mul_(sharpen)
        model.decoder.fc.bias[vocab.pad] = -1e4
        model.decoder.fc.bias[vocab.start] = -1e4
    save_checkpoint(path, Checkpoint(cfg, vocab, model.encoder.state_dict(), model.decoder.state_dict()))
    return Path(path)


def calibrate_batchnorm(encoder, image_size: int, count: int = 8) -> None:
    """Set every BatchNorm's running statistics from `count` synthetic scenes.

    A random ResNet's BatchNorms hold mean 0 / variance 1, so in eval mode nothing normalizes and
    activations grow through the residual blocks (ResNet-101 features reach ~1e4): the LSTM then
    saturates, every image gets the same caption, and float32 rounding differences between
    PyTorch and ONNX Runtime become large enough to flip near-tied beams in the export's parity
    check. With statistics measured on images, features are O(1) as in a trained encoder.
    """
    import torch
    import torch.nn as nn

    from captrt.bench.images import synthetic_images
    from captrt.train.model import normalize_uint8

    norms = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    x = normalize_uint8(torch.from_numpy(synthetic_images(count, image_size, seed=1234)))
    encoder.train()
    with torch.no_grad():
        encoder(x)
    encoder.eval()
    for m in norms:
        m.momentum = 0.1  # back to PyTorch's default


def suite_model_dir(work: str | Path, *, parity_count: int = 4, calib_count: int = 16, max_beam: int = 10,
                    rebuild: bool = False, progress: bool = True) -> Path:
    """WORK/model: the suite's exported model directory (fp32 + int8), built once and reused.

    Reused when WORK/suite_stamp.json records the same settings and the checkpoint it was exported from
    (sha256) is still there; otherwise the checkpoint is made and exported again.
    """
    from captrt.export.exporter import export_model

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, out = work / "suite.pt", work / "model"
    settings = {"recipe": RECIPE, "vocab_size": SUITE_VOCAB, **SUITE_CONFIG, "parity_count": parity_count,
                "calib_count": calib_count, "max_beam": max_beam, "int8": True,
                "int8_forced": True}
    stamp_path = work / STAMP
    if not rebuild and stamp_path.is_file() and ckpt.is_file() and (out / "captrt.json").is_file():
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stamp = {}
        if stamp.get("settings") == settings and stamp.get("checkpoint_sha256") == sha256_file(ckpt):
            return out
    make_random_checkpoint(ckpt)
    # Random weights: int8 quality means nothing here, so it is written with force (no search) and benched
    # as "unverified"; the precision table's quality comes from a trained model.
    export_model(ckpt, out, int8=True, max_beam=max_beam, parity_count=parity_count, calib_count=calib_count,
                 overwrite=True, progress=progress, force=True, int8_search=False)
    stamp_path.write_text(json.dumps({"settings": settings, "checkpoint_sha256": sha256_file(ckpt)}, indent=1),
                          encoding="utf-8")
    return out

