"""Fixtures of the `captrt batch` tests: a small exported model and a folder of images, good and bad."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import random_images


@pytest.fixture(scope="session")
def batch_model_dir(tmp_path_factory) -> Path:
    """A tiny model whose captions vary per image and end at different lengths (cheap to export)."""
    from tests.runtime.checkpoints import make_varied_checkpoint
    from tests.runtime.modeldirs import make_model_dir
    from tests.runtime.reference_helpers import torch_threads

    d = tmp_path_factory.mktemp("batch_model")
    with torch_threads(1):
        ckpt = make_varied_checkpoint(d / "varied.pt", end_bias=-5.0)
        return make_model_dir(ckpt, d / "model")


def write_images(root: Path, n: int, seed: int = 7) -> list[Path]:
    """n small PNG/JPEG images under root (every third in a subfolder), sorted as a walk lists them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    paths = []
    for i, a in enumerate(random_images(n, seed=seed, size=64)):
        folder = root / "sub" if i % 3 == 0 else root
        path = folder / (f"im{i:03d}.jpg" if i % 4 == 1 else f"im{i:03d}.png")
        Image.fromarray(a).save(path, quality=95)
        paths.append(path)
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height RGB pixels, then IEND: a decompression bomb's
    header, refused before any pixel is decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_bad_files(root: Path) -> dict[str, str]:
    """Files `captrt batch` must turn into error rows -> {name: a word its error message holds}."""
    root.mkdir(parents=True, exist_ok=True)
    buf = root / "truncated.png"
    Image.fromarray(random_images(1, seed=3, size=64)[0]).save(buf)
    data = buf.read_bytes()
    buf.write_bytes(data[: len(data) // 2])
    (root / "notimage.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "wrongformat.png", format="TIFF")
    (root / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    return {"truncated.png": "truncated.png", "notimage.jpg": "not a recognized image",
            "wrongformat.png": "TIFF", "bomb.png": "pixel"}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """24 good images (a few in a subfolder)."""
    root = tmp_path_factory.mktemp("corpus") / "images"
    write_images(root, 24)
    return root
