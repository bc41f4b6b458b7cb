"""`captrt eval`: caption a split with the reference beam search and score it with the COCO metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captrt.train.checkpoint import load_checkpoint
from captrt.train.data import DatasetError, check_images_exist, load_karpathy, select_split
from captrt.train.model import normalize_uint8
from captrt.train.reference import reference_beam_search


@dataclass
class EvalResult:
    metrics: dict[str, float]
    predictions: list[tuple[str, str]]  # (image path, caption)


@torch.no_grad()
def evaluate(checkpoint: str | os.PathLike, data_json: str | os.PathLike, image_root: str | os.PathLike | None = None,
             split: str = "test", beam_size: int = 5, max_steps: int = 50, limit: int = 0,
             results_path: str | os.PathLike | None = None, spice: bool = False, progress: bool = True) -> EvalResult:
    from captrt.runtime.preprocess import InvalidImageError, load_image
    from captrt.train.metrics import caption_metrics, write_coco_results

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    entries = select_split(load_karpathy(data_json, image_root), split)
    if limit:
        entries = entries[:limit]
    check_images_exist(entries)
    refs, hyps, preds = {}, {}, []
    items = entries
    if progress:
        from captrt.progress import track

        items = track(entries, label=f"eval {split}", unit="images")
    for i, entry in enumerate(items):
        try:
            pixels = load_image(entry.path)
        except InvalidImageError as exc:
            raise DatasetError(f"{data_json}: {exc}") from None
        image = normalize_uint8(torch.from_numpy(pixels[None]))[0]
        result = reference_beam_search(model, image, ckpt.vocab.start, ckpt.vocab.end, beam_size, max_steps)
        words = ckpt.vocab.decode(result.tokens)
        refs[i], hyps[i] = entry.captions, words
        preds.append((str(entry.path), " ".join(words)))
    metrics = caption_metrics(refs, hyps, spice=spice)
    if results_path is not None:
        write_coco_results(results_path, [e.image_id for e in entries], [p[1] for p in preds])
    return EvalResult(metrics, preds)


def format_metrics(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, (float, np.floating)) else f"{k} {v}" for k, v in metrics.items())
