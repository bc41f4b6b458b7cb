"""Karpathy split JSON: parsing, splits, captions per image, encoding (as the seed prepares them).

Format: {"images": [{"filepath": "val2014", "filename": "x.jpg", "split": "train"|"restval"|"val"|"test",
"sentences": [{"tokens": [...]}, ...]}, ...]}. Image path = IMAGE_ROOT / filepath / filename.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from captrt.vocab import Vocab

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
KNOWN_SPLITS = {"train", "restval", "val", "test"}
CAPTIONS_PER_IMAGE = 5
MAX_LEN = 100  # the seed's max caption length in words


class DatasetError(ValueError):
    """A bad dataset file or entry; the message names the file and the entry."""


@dataclass
class ImageEntry:
    path: Path
    split: str
    captions: list[list[str]]  # all usable captions (<= max_len words), as in the JSON
    image_id: int | str


def load_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                  max_len: int = MAX_LEN) -> list[ImageEntry]:
    """Parse and validate every entry; image_root defaults to the JSON's directory."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{json_path}: no such dataset file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_path}: not a readable JSON file ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{json_path}: expected a Karpathy split file with an 'images' list")
    entries = []
    for i, img in enumerate(images):
        where = f"{json_path}: images[{i}]"
        if not isinstance(img, dict):
            raise DatasetError(f"{where}: expected an object")
        for key in ("filename", "split", "sentences"):
            if key not in img:
                raise DatasetError(f"{where}: missing field {key!r}")
        split = img["split"]
        if split not in KNOWN_SPLITS:
            raise DatasetError(f"{where} ({img['filename']}): unknown split {split!r}; expected one of {sorted(KNOWN_SPLITS)}")
        if not isinstance(img["sentences"], list):
            raise DatasetError(f"{where}: 'sentences' must be a list")
        captions = []
        for j, sent in enumerate(img["sentences"]):
            tokens = sent.get("tokens") if isinstance(sent, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DatasetError(f"{where}.sentences[{j}]: 'tokens' must be a list of strings")
            if 0 < len(tokens) <= max_len:  # the seed drops over-long captions; empty ones carry nothing
                captions.append(tokens)
        if not captions:
            raise DatasetError(f"{where} ({img['filename']}): no usable caption (all empty or longer than {max_len} words)")
        path = root / img.get("filepath", "") / img["filename"]
        entries.append(ImageEntry(path, split, captions, img.get("cocoid", img.get("imgid", i))))
    return entries


def all_caption_tokens(entries: list[ImageEntry]):
    for e in entries:
        yield from e.captions


def select_split(entries: list[ImageEntry], split: str) -> list[ImageEntry]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    chosen = [e for e in entries if e.split in SPLITS[split]]
    if not chosen:
        raise DatasetError(f"split {split!r} has no images")
    return chosen


def sample_captions(captions: list[list[str]], rng: random.Random, k: int = CAPTIONS_PER_IMAGE) -> list[list[str]]:
    """Exactly k captions per image, as the seed samples them (pad by repetition, else sample)."""
    if len(captions) < k:
        return captions + [rng.choice(captions) for _ in range(k - len(captions))]
    return rng.sample(captions, k=k)


def encode_padded(tokens: list[str], vocab: Vocab, max_len: int) -> tuple[list[int], int]:
    """<start> words <end> padded to max_len + 2 ids; returns (ids, length incl. start and end)."""
    ids = vocab.encode(tokens)
    return ids + [vocab.pad] * (max_len + 2 - len(ids)), len(ids)


def check_images_exist(entries: list[ImageEntry]) -> None:
    missing = [e.path for e in entries if not e.path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"image file not found: {missing[0]}{more}")
