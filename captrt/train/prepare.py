"""`captrt prepare`: decode and resize every image once into a uint8 memmap, plus encoded captions.

Training then reads (N, S, S, 3) uint8 rows instead of decoding JPEGs five times per epoch.

Layout of OUT (written atomically as a whole):
    prepared.json                manifest: splits, counts, image size, caption length, source JSON
    vocab.json                   the vocabulary built from the dataset by the seed's rule
    {split}_images.npy           uint8 .npy memmap (N, S, S, 3)
    {split}_captions.npy         int64 (N, 5, L): <start> words <end> <pad>...
    {split}_caplens.npy          int64 (N, 5): lengths including <start> and <end>
    {split}_refs.json            every usable reference caption per image (tokens), for BLEU
    {split}_paths.json           source image paths, in row order
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captrt.atomic import atomic_directory
from captrt.train.data import (CAPTIONS_PER_IMAGE, MAX_LEN, DatasetError, all_caption_tokens, check_images_exist,
                               encode_padded, load_karpathy, sample_captions, select_split)
from captrt.vocab import Vocab

PREPARED_FORMAT = "captrt-prepared"


@dataclass
class PreparedSplit:
    images: np.ndarray  # (N, S, S, 3) uint8 memmap
    captions: np.ndarray  # (N, 5, L) int64
    caplens: np.ndarray  # (N, 5) int64
    refs: list[list[list[str]]]
    paths: list[str]


def prepare_dataset(data_json: str | os.PathLike, image_root: str | os.PathLike | None, out_dir: str | os.PathLike,
                    min_word_freq: int = 5, max_len: int = MAX_LEN, seed: int = 0, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Validate the whole dataset first (so a bad entry fails before hours of decoding), then write OUT."""
    from captrt.runtime.preprocess import IMAGE_SIZE, InvalidImageError, load_image

    entries = load_karpathy(data_json, image_root, max_len)
    vocab = Vocab.build(all_caption_tokens(entries), min_word_freq)
    splits = {name: select_split(entries, name) for name in ("train", "val", "test")}
    for chosen in splits.values():
        check_images_exist(chosen)
    longest = max(len(c) for e in entries for c in e.captions)
    length = longest + 2
    rng = random.Random(seed)
    manifest = {"format": PREPARED_FORMAT, "version": 1, "image_size": IMAGE_SIZE, "caption_length": length,
                "captions_per_image": CAPTIONS_PER_IMAGE, "min_word_freq": min_word_freq, "max_len": max_len,
                "source": str(Path(data_json).resolve()), "splits": {}}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "vocab.json").write_text(json.dumps(vocab.to_json()), encoding="utf-8")
        for name, chosen in splits.items():
            n = len(chosen)
            images = np.lib.format.open_memmap(tmp / f"{name}_images.npy", mode="w+", dtype=np.uint8,
                                               shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
            captions = np.zeros((n, CAPTIONS_PER_IMAGE, length), dtype=np.int64)
            caplens = np.zeros((n, CAPTIONS_PER_IMAGE), dtype=np.int64)
            for i, entry in enumerate(_progress(chosen, f"prepare {name}", progress)):
                try:
                    images[i] = load_image(entry.path)
                except InvalidImageError as exc:
                    raise DatasetError(f"{data_json}: image {entry.path}: {exc}") from None
                for j, tokens in enumerate(sample_captions(entry.captions, rng)):
                    ids, n_ids = encode_padded(tokens, vocab, longest)
                    captions[i, j], caplens[i, j] = ids, n_ids
            images.flush()
            del images
            np.save(tmp / f"{name}_captions.npy", captions)
            np.save(tmp / f"{name}_caplens.npy", caplens)
            (tmp / f"{name}_refs.json").write_text(json.dumps([e.captions for e in chosen]), encoding="utf-8")
            (tmp / f"{name}_paths.json").write_text(json.dumps([str(e.path) for e in chosen]), encoding="utf-8")
            manifest["splits"][name] = n
        (tmp / "prepared.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return Path(out_dir)


def load_prepared(prepared_dir: str | os.PathLike, split: str) -> tuple[PreparedSplit, Vocab]:
    d = Path(prepared_dir)
    manifest_path = d / "prepared.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{d}: not a prepared dataset (no prepared.json; run `captrt prepare`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{manifest_path}: unreadable ({exc})") from None
    if manifest.get("format") != PREPARED_FORMAT:
        raise DatasetError(f"{manifest_path}: not a captrt prepared dataset")
    if split not in manifest["splits"]:
        raise DatasetError(f"{d}: unknown split {split!r}; has {sorted(manifest['splits'])}")
    vocab = Vocab.load(d / "vocab.json")
    images = np.load(d / f"{split}_images.npy", mmap_mode="r")
    captions = np.load(d / f"{split}_captions.npy")
    caplens = np.load(d / f"{split}_caplens.npy")
    refs = json.loads((d / f"{split}_refs.json").read_text(encoding="utf-8"))
    paths = json.loads((d / f"{split}_paths.json").read_text(encoding="utf-8"))
    if not (len(images) == len(captions) == len(caplens) == len(refs) == manifest["splits"][split]):
        raise DatasetError(f"{d}: split {split!r} files disagree on the number of images")
    return PreparedSplit(images, captions, caplens, refs, paths), vocab


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from captrt.progress import track

    return track(items, label=desc, unit="images")
