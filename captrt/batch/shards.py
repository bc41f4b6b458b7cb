"""The output directory of `captrt batch`: shards, `_manifest.json`, `_SUCCESS`, and resume.

Layout (OUT_DIR):
    part-000000000000.parquet      rows [0, R) of the input stream (R = rows per shard)
    part-000000001000.parquet      rows [R, 2R) ... (.jsonl with --format jsonl)
    _manifest.json                 settings of the run + one entry per complete shard
    _SUCCESS                       written last: counts of the whole run (absent while running)

The unit of work and of recovery is a *chunk*: R consecutive inputs (by position in the input stream).
A chunk becomes exactly one shard, written whole under a temporary name (`.part-*.tmp`), fsynced and
renamed, and only then listed in the manifest (itself replaced atomically). A run that dies at any
point leaves complete listed shards, and at most an unlisted shard or temporary file, which a resumed
run overwrites or removes. A resumed run re-reads the inputs, skips every chunk whose manifest entry
matches (same start, same number of rows, same digest of its paths) and redoes the rest, so each
input ends up in exactly one listed shard. Names starting with `.` or `_` are skipped by pyarrow,
pandas, Spark and duckdb dataset readers, so `pd.read_parquet(OUT_DIR)` reads only the shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from captrt.atomic import atomic_path, atomic_write_text
from captrt.files import read_regular

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
FORMAT_NAME = "captrt-batch"
FORMAT_VERSION = 1
FORMATS = ("parquet", "jsonl")
COLUMNS = ("index", "path", "caption", "tokens", "score", "finished", "error", "model_id", "engine", "precision")


class OutputDirError(ValueError):
    """OUT_DIR cannot be used: exists without --resume, foreign content, other settings/inputs, or a
    file system that refuses the writes (read-only, full, a file where a directory must be)."""


@contextlib.contextmanager
def _writing(path: Path, doing: str) -> Iterator[None]:
    """An OSError while writing OUT_DIR becomes one OutputDirError naming `path` (the CLI's one line)."""
    try:
        yield
    except OSError as exc:
        raise OutputDirError(f"{path}: cannot {doing} ({exc.strerror or exc})") from None


def chunk_digest(paths: Sequence[str]) -> str:
    """A short digest of a chunk's paths, in order: how a resumed run knows a shard covers its inputs."""
    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


def shard_name(start: int, fmt: str) -> str:
    return f"part-{start:012d}.{fmt}"


@dataclass
class Chunk:
    """R consecutive inputs: their positions [start, start + len(paths)) and paths."""

    start: int
    paths: list[str]
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            self.digest = chunk_digest(self.paths)


def arrow_schema():
    """The shards' Arrow schema (pyarrow imported only when Parquet is written)."""
    import pyarrow as pa

    return pa.schema([("index", pa.int64()), ("path", pa.string()), ("caption", pa.string()),
                      ("tokens", pa.list_(pa.int32())), ("score", pa.float64()), ("finished", pa.bool_()),
                      ("error", pa.string()), ("model_id", pa.string()), ("engine", pa.string()),
                      ("precision", pa.string())])


def write_shard(path: Path, rows: Sequence[dict[str, Any]], fmt: str) -> None:
    """Write rows (dicts with COLUMNS) to path atomically: temporary sibling, fsync, rename."""
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(list(rows), schema=arrow_schema())
            pq.write_table(table, tmp, compression="zstd")
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps({k: row[k] for k in COLUMNS}, ensure_ascii=False) + "\n")


@dataclass
class OutputDir:
    """OUT_DIR's manifest in memory (O(shards), never O(rows)) and the one writer of shards into it."""

    path: Path
    settings: dict[str, Any]
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)  # start -> entry

    @property
    def fmt(self) -> str:
        return self.settings["format"]

    @property
    def shard_rows(self) -> int:
        return int(self.settings["shard_rows"])

    @classmethod
    def open(cls, path: str | os.PathLike, settings: dict[str, Any], resume: bool) -> "OutputDir":
        """Create OUT_DIR, or with resume reopen it (settings must match those recorded).

        An existing non-empty OUT_DIR without resume is refused. With resume, settings that change
        the rows (model, engine, precision, beam, ...) must equal the recorded ones; `shard_rows`
        is taken from the manifest. Leftover temporary files of a killed run are removed.
        """
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise OutputDirError(f"{out}: exists and is not a directory")
        with _writing(out, "list the output directory"):
            existing = out.is_dir() and any(out.iterdir())
        if existing and not resume:
            raise OutputDirError(f"{out}: already exists (pass --resume to continue that run, or choose a new -o)")
        manifest_path = out / MANIFEST
        if existing and manifest_path.exists():
            try:
                old = json.loads(read_regular(manifest_path).decode("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise OutputDirError(f"{manifest_path}: unreadable manifest ({exc})") from None
            if not isinstance(old, dict) or old.get("format") != FORMAT_NAME:
                raise OutputDirError(f"{manifest_path}: not a captrt batch manifest")
            recorded = old.get("settings", {})
            for key, value in settings.items():
                if key == "shard_rows":
                    continue
                if recorded.get(key) != value:
                    raise OutputDirError(f"{out}: --resume with a different {key} ({value!r}; the run there used "
                                         f"{recorded.get(key)!r})")
            merged = dict(settings, shard_rows=recorded.get("shard_rows", settings["shard_rows"]))
            shards = {int(e["start"]): e for e in old.get("shards", [])}
            self = cls(out, merged, shards)
        elif existing:
            names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if names:
                raise OutputDirError(f"{out}: holds files but no {MANIFEST} ({', '.join(names[:3])}): "
                                     "not a captrt batch output")
            self = cls(out, dict(settings))
        else:
            with _writing(out, "create the output directory"):
                out.mkdir(parents=True, exist_ok=True)
            self = cls(out, dict(settings))
        for p in out.glob(".part-*.tmp"):  # a killed writer's temporary file
            with _writing(p, "remove a killed run's temporary file"):
                p.unlink(missing_ok=True)
        with _writing(out / SUCCESS, "remove it (the run is incomplete again until it ends)"):
            (out / SUCCESS).unlink(missing_ok=True)
        # Forget entries whose file is gone (deleted by hand): their chunks are redone.
        self.shards = {s: e for s, e in self.shards.items() if (out / e["file"]).is_file()}
        self._save()
        return self

    def is_done(self, chunk: Chunk) -> bool:
        """True when a listed shard covers exactly this chunk's inputs. A listed shard at this start
        with other inputs means the inputs changed since: refused, as mixing would break exactly-once."""
        entry = self.shards.get(chunk.start)
        if entry is None:
            return False
        if entry["rows"] != len(chunk.paths) or entry["digest"] != chunk.digest:
            raise OutputDirError(f"{self.path / entry['file']}: covers inputs {chunk.start}..{chunk.start + entry['rows'] - 1} "
                                 "as they were listed before, and the SOURCE now lists other paths there; "
                                 "--resume needs the same inputs (start a new OUT_DIR)")
        return True

    def add(self, chunk: Chunk, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Write one complete chunk's rows (in input order) as its shard, then list it. -> the entry."""
        if len(rows) != len(chunk.paths):
            raise ValueError(f"chunk at {chunk.start}: {len(rows)} rows for {len(chunk.paths)} inputs")
        name = shard_name(chunk.start, self.fmt)
        with _writing(self.path / name, "write the shard"):
            write_shard(self.path / name, rows, self.fmt)
        failed = sum(1 for r in rows if r["error"] is not None)
        entry = {"file": name, "start": chunk.start, "rows": len(rows), "failed": failed, "digest": chunk.digest}
        self.shards[chunk.start] = entry
        self._save()
        return entry

    def totals(self) -> tuple[int, int]:
        """(rows, failed) over every listed shard."""
        rows = sum(e["rows"] for e in self.shards.values())
        return rows, sum(e["failed"] for e in self.shards.values())

    def finish(self, seconds: float, captioned_now: int, failed_now: int) -> dict[str, Any]:
        """Write `_SUCCESS` with the counts of the whole output (all runs) and of this run."""
        rows, failed = self.totals()
        summary = {"images": rows, "captioned": rows - failed, "failed": failed, "shards": len(self.shards),
                   "this_run": {"captioned": captioned_now, "failed": failed_now, "seconds": round(seconds, 3)},
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with _writing(self.path / SUCCESS, "write it"):
            atomic_write_text(self.path / SUCCESS, json.dumps(summary, indent=1) + "\n")
        return summary

    def _save(self) -> None:
        entries = [self.shards[s] for s in sorted(self.shards)]
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "columns": list(COLUMNS),
               "settings": self.settings, "shards": entries}
        with _writing(self.path / MANIFEST, "write the manifest"):
            atomic_write_text(self.path / MANIFEST, json.dumps(doc, separators=(",", ":")) + "\n")


class Assembler:
    """Collects result rows (any order, duplicates ignored) into their chunks; writes each chunk's shard
    the moment its last row arrives. Holds only chunks still in flight."""

    def __init__(self, out: OutputDir, on_shard: Callable[[dict[str, Any]], None] | None = None):
        self.out = out
        self.on_shard = on_shard
        self._open: dict[int, tuple[Chunk, dict[int, dict[str, Any]]]] = {}  # start -> (chunk, rows by index)
        self.captioned = 0
        self.failed = 0

    def expect(self, chunk: Chunk) -> None:
        """Register a chunk before any of its rows can arrive."""
        self._open[chunk.start] = (chunk, {})

    def add(self, row: dict[str, Any]) -> int:
        """Add one row (with 'index'); -> 1 when it was new, 0 for a duplicate (a retried batch)."""
        start = row["index"] - row["index"] % self.out.shard_rows  # chunks start at multiples of R
        chunk, rows = self._open.get(start, (None, None))
        if chunk is None or row["index"] in rows:
            return 0
        rows[row["index"]] = row
        if row["error"] is None:
            self.captioned += 1
        else:
            self.failed += 1
        if len(rows) == len(chunk.paths):
            entry = self.out.add(chunk, [rows[i] for i in range(chunk.start, chunk.start + len(chunk.paths))])
            del self._open[start]
            if self.on_shard is not None:
                self.on_shard(entry)
        return 1

    @property
    def pending(self) -> int:
        return len(self._open)
