"""The images a benchmark decodes: a folder, a dataset's test split, an array, or synthetic scenes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_FILES = 64  # enough variety for real decoding; loading more only slows the start
SPLIT_ORDER = ("test", "val", "restval", "train")


@dataclass
class ImagePool:
    images: np.ndarray  # uint8 (M, S, S, 3)
    source: str

    def __len__(self) -> int:
        return len(self.images)


def synthetic_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 scenes rendered by captrt.synth (shapes on textured backgrounds)."""
    from captrt.synth import render_scene, sample_scene

    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7, i)))
        out[i] = np.asarray(render_scene(sample_scene(rng), size, rng).convert("RGB"), dtype=np.uint8)
    return out


def _karpathy_files(path: Path) -> list[Path]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["images"]
        by_split = {s: [e for e in entries if e.get("split") == s] for s in SPLIT_ORDER}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"images: {path}: not a Karpathy-split dataset JSON ({type(exc).__name__}: {exc})") from None
    chosen = next((by_split[s] for s in SPLIT_ORDER if by_split[s]), [])
    root = path.parent
    files = []
    for e in chosen[:MAX_FILES]:
        if not isinstance(e, dict) or "filename" not in e:
            raise ValueError(f"images: {path}: an image entry lacks 'filename'")
        files.append(root / str(e.get("filepath", "")) / str(e["filename"]))
    return files


def load_images(images: str | Path | np.ndarray | None, size: int, count: int = 8) -> ImagePool:
    """At least one image of `size` x `size`; synthetic scenes (`count` of them) when `images` is None."""
    if images is None:
        return ImagePool(synthetic_images(count, size), f"{count} synthetic scenes (captrt.synth)")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3) or len(images) == 0:
            raise ValueError(f"images: expected a uint8 array (M, {size}, {size}, 3), "
                             f"got {images.dtype} {images.shape}")
        return ImagePool(np.ascontiguousarray(images), f"{len(images)} images given as an array")
    path = Path(images)
    if not path.exists():
        raise ValueError(f"images: {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_FILES]
        what = f"{path}"
    else:
        files = _karpathy_files(path)
        what = f"{path} ({len(files)} images of its test split)"
    if not files:
        raise ValueError(f"images: {path}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    from captrt.runtime.preprocess import load_image

    loaded = []
    for f in files:
        try:
            loaded.append(load_image(f, size))
        except (OSError, ValueError) as exc:  # InvalidImageError is a ValueError naming the file
            raise ValueError(f"images: {f}: {exc}") from None
    return ImagePool(np.stack(loaded), what)
