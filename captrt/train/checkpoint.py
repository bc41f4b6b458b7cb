"""captrt checkpoints: plain dicts of tensors and builtins, loadable with weights_only=True.

Layout (format_version 1):
    {"format": "captrt-checkpoint", "format_version": 1, "captrt_version": str,
     "config": ModelConfig dict, "vocab": {"word2id": {...}},
     "encoder": state_dict, "decoder": state_dict,
     "train_state": dict | None (optimizers, schedulers, epoch, RNG states: see train.loop),
     "metrics": dict}
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from captrt import __version__
from captrt.atomic import atomic_path
from captrt.train.config import ModelConfig
from captrt.vocab import Vocab

FORMAT = "captrt-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a usable captrt checkpoint; the message names the file."""


@dataclass
class Checkpoint:
    config: ModelConfig
    vocab: Vocab
    encoder_state: dict[str, torch.Tensor]
    decoder_state: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def build_model(self, device: str | torch.device = "cpu"):
        """A CaptionModel in eval mode with these weights."""
        from captrt.train.model import CaptionModel

        model = CaptionModel(self.config)
        try:
            model.encoder.load_state_dict(self.encoder_state)
            model.decoder.load_state_dict(self.decoder_state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path or 'checkpoint'}: weights do not match its config: {exc}") from None
        return model.to(device).eval()


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write atomically: a crash mid-save leaves any previous file at `path` intact."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "captrt_version": __version__,
        "config": ckpt.config.to_dict(),
        "vocab": ckpt.vocab.to_json(),
        "encoder": ckpt.encoder_state,
        "decoder": ckpt.decoder_state,
        "train_state": ckpt.train_state,
        "metrics": ckpt.metrics,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> Checkpoint:
    """Load with weights_only=True; every failure becomes a CheckpointError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses pickled code: that is what legacy checkpoints hold.
        raise CheckpointError(
            f"{p}: not a captrt checkpoint (it holds pickled objects: {str(exc).splitlines()[0][:200]}). "
            "If it comes from the seed notebook or the sgrvinod tutorial, convert it with `captrt convert`."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError) as exc:  # torch.load on junk raises any of these
        raise CheckpointError(f"{p}: unreadable or truncated checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    return checkpoint_from_dict(data, str(p))


def checkpoint_from_dict(data: Any, source: str) -> Checkpoint:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a captrt checkpoint (no 'format': '{FORMAT}' entry)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: unsupported checkpoint format_version {version!r} (this captrt reads {FORMAT_VERSION})")
    for key in ("config", "vocab", "encoder", "decoder"):
        if key not in data:
            raise CheckpointError(f"{source}: missing entry {key!r}")
    try:
        config = ModelConfig.from_dict(data["config"])
        vocab = Vocab.from_json(data["vocab"], source=f"{source}: vocab")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{source}: vocabulary has {len(vocab)} words but config.vocab_size is {config.vocab_size}")
    for key in ("encoder", "decoder"):
        state = data[key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{source}: entry {key!r} is not a state dict of tensors")
    return Checkpoint(config, vocab, data["encoder"], data["decoder"], data.get("train_state"),
                      data.get("metrics") or {}, source)
