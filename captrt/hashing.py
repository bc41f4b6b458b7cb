"""File digests: one definition for the manifest's graph hashes and the checkpoint identity checks."""

from __future__ import annotations

import hashlib
import os

from captrt.files import open_regular


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
