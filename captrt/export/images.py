"""Image sets for parity and int8 calibration: explicit files, a Karpathy-split dataset, or synthetic.

Every image goes through captrt.runtime.preprocess.load_image, exactly what the runtime will feed
the encoder, and every failure names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from captrt.export.errors import ExportError
from captrt.train.data import DatasetError, ImageEntry, load_karpathy

PARITY_SPLITS = ("test", "val")  # parity prefers held-out images ...
CALIB_SPLITS = ("train", "restval")  # ... calibration prefers training images
PARITY_SEED, CALIB_SEED, TUNE_SEED = 20240, 20241, 20242  # synthetic scenes: the three sets never coincide


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, S, S, 3)
    names: list[str]
    captions: list[list[list[str]]] | None = None  # per image, tokenized reference captions (dataset only)
    source: str = "synthetic"
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_file(path: str | Path, size: int) -> np.ndarray:
    """One image file -> uint8 (size, size, 3), or ExportError naming the file."""
    from captrt.runtime.preprocess import load_image

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: image file not found")
    try:
        return load_image(p, size)
    except (ValueError, OSError) as exc:
        raise ExportError(f"{p}: unreadable image ({exc})") from None


def from_files(paths: Sequence[str | Path], size: int) -> ImageSet:
    if not paths:
        raise ExportError("parity_images: the list of image files is empty")
    arrays = [load_file(p, size) for p in paths]
    return ImageSet(np.stack(arrays), [str(p) for p in paths], None, "files", [str(p) for p in paths])


def read_karpathy(json_path: str | Path, root: str | Path | None) -> list[ImageEntry]:
    """Entries of a Karpathy-split JSON (captrt.train.data's parser); an image's file is ROOT/filepath/filename."""
    jp = Path(json_path)
    if root is None:
        raise ExportError(f"{jp}: calibration dataset given without its image root (--images ROOT)")
    try:
        return load_karpathy(jp, root)
    except DatasetError as exc:  # its message names the file and the entry
        raise ExportError(f"{jp}: cannot read calibration dataset JSON: {exc}") from None


def _pick(entries: list[ImageEntry], splits: tuple[str, ...], count: int,
          avoid: set[Path] = frozenset()) -> list[ImageEntry]:
    """Up to `count` entries, preferred splits first, then the rest (file order inside each group)."""
    preferred = [e for e in entries if e.split in splits and e.path not in avoid]
    rest = [e for e in entries if e.split not in splits and e.path not in avoid]
    return (preferred + rest)[:count]


def from_dataset(entries: list[ImageEntry], splits: tuple[str, ...], count: int, size: int,
                 avoid: set[Path] = frozenset(), source: str = "dataset", strict: bool = False) -> ImageSet:
    """Up to `count` images of the preferred splits first; strict: never one of `avoid` (else they are
    reused when nothing else is left)."""
    chosen = _pick(entries, splits, count, avoid) or ([] if strict else _pick(entries, splits, count))
    if not chosen:
        raise ExportError(f"{source}: no images left once the {len(avoid)} parity images are set aside; "
                          "use a larger dataset or fewer --parity-images")
    arrays = [load_file(e.path, size) for e in chosen]
    captions = [e.captions for e in chosen]
    return ImageSet(np.stack(arrays), [str(e.path) for e in chosen],
                    captions if all(captions) else None, source, [str(e.path) for e in chosen])


def synthetic(count: int, size: int, seed: int = PARITY_SEED) -> ImageSet:
    """Scenes rendered by captrt.synth (the exporter's default parity images)."""
    from captrt.synth import render_scenes

    return ImageSet(render_scenes(count, size, seed), [f"synthetic-{i}" for i in range(count)], None,
                    "synthetic scenes (captrt.synth)")


def export_sets(size: int, parity_images, parity_count: int, calib_json, calib_root, calib_count: int,
                int8: bool, tune: int = 0) -> tuple[ImageSet, ImageSet | None, ImageSet | None]:
    """(parity, calibration, tuning): disjoint sets. Calibration never sees a parity image (the parity
    set judges what calibration produced), and the int8 search tunes on a third set, so the parity
    verdict is not the one the search optimized. tune: tuning images (0: none)."""
    entries = read_karpathy(calib_json, calib_root) if calib_json is not None else None
    if parity_images:
        parity = from_files(parity_images, size)
    elif entries is not None:
        parity = from_dataset(entries, PARITY_SPLITS, parity_count, size)
    else:
        parity = synthetic(parity_count, size)
    calib = tuning = None
    if int8:
        avoid = {Path(p) for p in parity.paths}
        if entries is not None:
            calib = from_dataset(entries, CALIB_SPLITS, calib_count, size, avoid=avoid,
                                            source="calibration dataset", strict=True)
            if tune:
                tuning = from_dataset(entries, CALIB_SPLITS, tune, size,
                                                 avoid=avoid | {Path(p) for p in calib.paths},
                                                 source="int8 tuning images (dataset)", strict=True)
        else:  # synthetic scenes of other seeds than the parity images'
            calib = synthetic(calib_count, size, seed=CALIB_SEED)
            calib.source = "synthetic scenes (captrt.synth), not the parity images"
            if tune:
                tuning = synthetic(tune, size, seed=TUNE_SEED)
                tuning.source = "synthetic scenes (captrt.synth), neither parity nor calibration images"
    return parity, calib, tuning
