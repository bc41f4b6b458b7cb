"""Input listing for `captrt batch`: SOURCE arguments -> a lazy, deterministic stream of image paths.

    for path in iter_paths(["photos/", "more/*.jpg", "list.txt", "s3://bucket/index.parquet"]):
        ...

A SOURCE is one of
- a directory: its image files, recursively, in sorted order (directories walked in sorted order);
- a glob pattern (`*`, `?`, `[`; `**` recurses): the matching image files, sorted;
- a manifest: `.txt` (one path a line; blank lines and lines starting with `#` skipped), `.csv` or
  `.parquet` with a `path` column, or a Karpathy split JSON (`images[]` with `filepath`/`filename`,
  filtered by `split`). Relative paths in a manifest are relative to the manifest's own folder;
- anything else: one image path, kept as given (a missing file becomes an error row, not a stop).

Paths with a URI scheme (`s3://`, `gs://`, `hdfs://`, `file://`, ...) are read through pyarrow.fs;
plain paths through the os module. Manifests are streamed (text line by line, CSV and Parquet in
record batches), so a manifest of millions of lines never sits in memory; a Karpathy JSON is one JSON
document and is parsed whole. Nothing here decodes an image.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import posixpath
import re
from typing import Any, Iterator, Sequence

from captrt.files import open_regular

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet", ".json")
PATH_COLUMN = "path"
_GLOB_CHARS = set("*?[")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
_BATCH_ROWS = 8192  # rows per record batch when streaming CSV/Parquet manifests


class SourceError(ValueError):
    """A SOURCE that cannot be listed (missing manifest, no `path` column, bad JSON, ...); names it."""


def is_uri(path: str) -> bool:
    """True for `scheme://...` paths (read through pyarrow.fs), False for plain local paths."""
    return bool(_URI.match(path))


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _ext(path: str) -> str:
    return os.path.splitext(path.rstrip("/"))[1].lower()


def iter_paths(sources: Sequence[str], split: str | None = None) -> Iterator[str]:
    """Every image path of every SOURCE, in order (SOURCE order, then each source's own order).

    split: for Karpathy JSON sources, only images of this split ('train', 'val', 'test', 'restval').
    Raises SourceError (lazily, when the stream reaches the bad source) for a source that yields
    nothing or cannot be read.
    """
    for source in sources:
        count = 0
        for path in _iter_source(str(source), split):
            count += 1
            yield path
        if count == 0:
            raise SourceError(f"{source}: no images (directories and globs list {', '.join(IMAGE_EXTENSIONS)}; "
                              "manifests must list paths)")


def count_paths(sources: Sequence[str], split: str | None = None) -> int:
    """How many paths iter_paths yields (one streaming pass, O(1) memory). Raises SourceError."""
    return sum(1 for _ in iter_paths(sources, split))


def _iter_source(source: str, split: str | None) -> Iterator[str]:
    if is_uri(source):
        yield from _iter_uri(source, split)
        return
    if os.path.isdir(source):
        yield from _walk_local(source)
    elif _GLOB_CHARS & set(source) and not os.path.exists(source):
        yield from sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p) and _is_image(p))
    elif _ext(source) in MANIFEST_EXTENSIONS:
        if not os.path.exists(source):
            raise SourceError(f"{source}: no such manifest file")
        try:
            f = open_regular(source)
        except OSError as exc:
            raise SourceError(f"{source}: cannot open the manifest ({exc.strerror or exc})") from None
        with f:
            yield from _iter_manifest(f, source, os.path.dirname(source), posix=False, split=split)
    else:
        yield source  # one image; a missing or unreadable file becomes an error row


def _walk_local(root: str) -> Iterator[str]:
    """Image files under root, recursively; sorted within each directory so the order is stable."""
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if _is_image(name):
                yield os.path.join(top, name)


def _walk_key(path: str, root: str) -> tuple:
    """Sort key giving os.walk's order (a folder's files, sorted, before its subfolders, sorted), so a
    listing through pyarrow.fs orders paths as a local directory walk does."""
    parts = posixpath.relpath(path, root).split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def _join(base: str, path: str, posix: bool) -> str:
    """A manifest entry resolved against the manifest's folder (absolute entries and URIs kept)."""
    if is_uri(path) or not base:
        return path
    if posix:
        return path if path.startswith("/") else posixpath.join(base, path)
    return path if os.path.isabs(path) else os.path.join(base, path)


def _iter_manifest(f: Any, name: str, base: str, posix: bool, split: str | None) -> Iterator[str]:
    """Paths listed by the manifest open as binary file `f` (its type chosen by `name`'s extension)."""
    ext = _ext(name)
    if ext == ".txt":
        text = io.TextIOWrapper(f, encoding="utf-8", errors="strict")
        try:
            for line in text:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield _join(base, line, posix)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{name}: not UTF-8 text ({exc.reason})") from None
    elif ext == ".csv":
        yield from (_join(base, p, posix) for p in _iter_csv(f, name))
    elif ext == ".parquet":
        yield from (_join(base, p, posix) for p in _iter_parquet(f, name))
    elif ext == ".json":
        yield from (_join(base, p, posix) for p in _iter_karpathy(f, name, split))


def _iter_csv(f: Any, name: str) -> Iterator[str]:
    text = io.TextIOWrapper(f, encoding="utf-8", newline="")
    try:
        reader = csv.DictReader(text)
        if reader.fieldnames is None or PATH_COLUMN not in reader.fieldnames:
            raise SourceError(f"{name}: no '{PATH_COLUMN}' column (columns: {', '.join(reader.fieldnames or [])})")
        for line, row in enumerate(reader, start=2):
            value = row.get(PATH_COLUMN)
            if not value:
                raise SourceError(f"{name}: line {line}: empty '{PATH_COLUMN}'")
            yield value
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"{name}: not a readable CSV ({exc})") from None


def _iter_parquet(f: Any, name: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{name}: not a readable Parquet file ({exc})") from None
    if PATH_COLUMN not in pf.schema_arrow.names:
        raise SourceError(f"{name}: no '{PATH_COLUMN}' column (columns: {', '.join(pf.schema_arrow.names)})")
    if not pa.types.is_string(pf.schema_arrow.field(PATH_COLUMN).type) \
            and not pa.types.is_large_string(pf.schema_arrow.field(PATH_COLUMN).type):
        raise SourceError(f"{name}: column '{PATH_COLUMN}' is {pf.schema_arrow.field(PATH_COLUMN).type}, not strings")
    row = 0
    for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[PATH_COLUMN]):
        for value in batch.column(0).to_pylist():
            if not value:
                raise SourceError(f"{name}: row {row}: empty '{PATH_COLUMN}'")
            row += 1
            yield value


def _iter_karpathy(f: Any, name: str, split: str | None) -> Iterator[str]:
    try:
        data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{name}: not valid JSON ({exc})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise SourceError(f"{name}: not a Karpathy split JSON (no 'images' list)")
    seen_splits = set()
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise SourceError(f"{name}: images[{i}]: no 'filename'")
        seen_splits.add(entry.get("split"))
        if split is not None and entry.get("split") != split:
            continue
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise SourceError(f"{name}: images[{i}].filepath is not a string")
        yield posixpath.join(filepath, entry["filename"]) if filepath else entry["filename"]
    if split is not None and split not in seen_splits:
        known = ", ".join(sorted(str(s) for s in seen_splits if s is not None))
        raise SourceError(f"{name}: no images in split {split!r} (splits: {known})")


def _iter_uri(source: str, split: str | None) -> Iterator[str]:
    """A remote (or file://) SOURCE through pyarrow.fs: a prefix, a glob-free file, or a manifest."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise SourceError(f"{source}: cannot open ({exc})") from None
    scheme = source.split("://", 1)[0]
    prefix = f"{scheme}://"
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = [i.path for i in infos if i.type == pafs.FileType.File and _is_image(i.path)]
        for p in sorted(files, key=lambda p: _walk_key(p, path)):
            yield prefix + p
    elif _ext(path) in MANIFEST_EXTENSIONS:
        if info.type != pafs.FileType.File:
            raise SourceError(f"{source}: no such manifest file")
        with fs.open_input_file(path) as f:
            yield from _iter_manifest(f, source, prefix + posixpath.dirname(path), posix=True, split=split)
    else:
        yield source


def open_remote(path: str, max_bytes: int) -> bytes:
    """The bytes of a `scheme://` image through pyarrow.fs, at most max_bytes + 1 of them (the caller's
    size check then refuses it). Raises OSError (missing, permission, network) with the path in it."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read(max_bytes + 1)
    except (pa.ArrowException, ValueError) as exc:
        raise OSError(f"{path}: cannot read ({exc})") from None
