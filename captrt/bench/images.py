"""The images a benchmark decodes: a folder, a dataset's test split, an array, or synthetic scenes."""

from __future__ import annotations

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
    from captrt.synth import render_scenes

    return render_scenes(count, size, seed, key=(7,))


def _karpathy_files(path: Path) -> tuple[list[Path], str]:
    """Up to MAX_FILES images of the first non-empty split in SPLIT_ORDER, and that split's name
    (captrt.train.data's parser)."""
    from captrt.train.data import DatasetError, load_karpathy

    try:
        entries = load_karpathy(path)
    except DatasetError as exc:  # names the file and the entry
        raise ValueError(f"images: {exc}") from None
    for split in SPLIT_ORDER:
        chosen = [e.path for e in entries if e.split == split]
        if chosen:
            return chosen[:MAX_FILES], split
    return [], ""


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
        what = f"{path} ({len(files)} images)"
    else:
        files, split = _karpathy_files(path)
        what = f"{path} ({len(files)} images of its {split} split)"
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
