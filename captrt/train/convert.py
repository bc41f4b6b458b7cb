"""`captrt convert`: a legacy pickled checkpoint -> a captrt checkpoint (weights_only-loadable)."""

from __future__ import annotations

import os
from pathlib import Path

from captrt.train.checkpoint import Checkpoint, save_checkpoint


def import_legacy(old: str | os.PathLike, word_map: str | os.PathLike | None = None,
                  karpathy_json: str | os.PathLike | None = None, min_word_freq: int = 5) -> Checkpoint:
    """Read a seed-notebook or tutorial checkpoint without running code from it."""
    from captrt.train.legacy import build_vocab_for_legacy, load_legacy_checkpoint

    imported = load_legacy_checkpoint(old)
    vocab = build_vocab_for_legacy(word_map, karpathy_json, min_word_freq, expected_size=imported.config.vocab_size)
    metrics = {k: v for k, v in imported.metadata.items() if isinstance(v, (int, float))}
    metrics["imported_from"] = imported.source_format
    return Checkpoint(imported.config, vocab, imported.encoder_state, imported.decoder_state, None, metrics, str(old))


def convert_legacy(old: str | os.PathLike, out: str | os.PathLike, **kwargs) -> Path:
    ckpt = import_legacy(old, **kwargs)
    save_checkpoint(out, ckpt)
    return Path(out)
