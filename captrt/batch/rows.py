"""One output row per input image: the columns of a shard, built the same way in every mode."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np


def result_rows(items: Sequence[tuple[int, str]], caps: Sequence[Any], stamp: dict[str, str]) -> list[dict[str, Any]]:
    """(index, path) pairs and their Captions (same order) -> rows with every shard column."""
    rows = []
    for (index, path), cap in zip(items, caps):
        rows.append({"index": int(index), "path": path, **cap.to_dict(), **stamp})
    return rows


def error_row(index: int, path: str, message: str, stamp: dict[str, str]) -> dict[str, Any]:
    """The row of an input that could not be read: caption/score null, no tokens, error set."""
    return {"index": int(index), "path": path, "caption": None, "tokens": [], "score": None, "finished": False,
            "error": message, **stamp}


def make_reader(captioner: Any) -> Callable[[str], np.ndarray]:
    """path -> uint8 (S, S, 3) with the captioner's own decoding and limits; `scheme://` paths are read
    through pyarrow.fs (bounded by the captioner's byte cap), local paths as `captrt caption` reads them."""
    from captrt.batch.sources import is_uri, open_remote
    from captrt.runtime.preprocess import DEFAULT_MAX_BYTES

    max_bytes = int(captioner.image_options.get("max_bytes", DEFAULT_MAX_BYTES))

    def read(path: str) -> np.ndarray:
        if is_uri(path):
            return captioner.read_image(open_remote(path, max_bytes), name=path)
        return captioner.read_image(path)

    return read


def read_or_error(read: Callable[[str], np.ndarray], path: str) -> np.ndarray | str:
    """read(path), or the one-line reason it could not be read (a row's `error`), in every mode."""
    from captrt.runtime.preprocess import InvalidImageError

    try:
        return read(path)
    except (InvalidImageError, OSError) as exc:
        return str(exc) or f"{path}: unreadable image"


def stamp_of(captioner: Any) -> dict[str, str]:
    """The columns that say what made a row: model id, engine, precision."""
    return {"model_id": captioner.model.model_id, "engine": captioner.engine.name,
            "precision": captioner.engine.precision}


def chunked(paths: Iterable[str], size: int) -> Iterable[tuple[int, list[str]]]:
    """(start, up to `size` consecutive paths), streaming."""
    start, buf = 0, []
    for p in paths:
        buf.append(p)
        if len(buf) == size:
            yield start, buf
            start, buf = start + size, []
    if buf:
        yield start, buf
