"""The parity set a model directory carries, so that any engine and precision can be checked where it runs.

    MODEL_DIR/parity_images.npy   uint8 (N, S, S, 3): the parity images, already decoded and resized
    MODEL_DIR/parity.json         names, reference captions (or null), the fp32 captions, beam/steps

Both files are listed with their sha256 in captrt.json under "parity_set"; reading checks the hashes
on the very bytes it parses (no check-then-open race) and refuses anything else, like a graph.
The fp32 captions are what the exporter's fp32 graphs produced with the runtime's batched search:
a variant is judged against them (captrt.runtime.verification.verify).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from captrt.files import read_regular
from captrt.runtime.errors import ModelDirError

if TYPE_CHECKING:
    from captrt.runtime.model_dir import ModelDir

IMAGES_FILE = "parity_images.npy"
CAPTIONS_FILE = "parity.json"
MAX_PARITY_IMAGES = 500  # ~98 MB at 256x256: the set stays a small part of a model directory


@dataclass
class ParitySet:
    """images uint8 (N, S, S, 3); references: per image a list of word lists, or None (no dataset);
    fp32_tokens: the fp32 graphs' caption (word ids) per image; beam_size/max_steps: how they were made."""

    images: np.ndarray
    names: list[str]
    references: list[list[list[str]]] | None
    fp32_tokens: list[list[int]]
    beam_size: int
    max_steps: int

    def __len__(self) -> int:
        return len(self.names)

    def save(self, directory: Path) -> dict[str, Any]:
        """Write both files into `directory`; returns captrt.json's "parity_set" entry (with hashes)."""
        if not (len(self.images) == len(self.names) == len(self.fp32_tokens)):
            raise ValueError("parity set: images, names and fp32 captions differ in length")
        if len(self) > MAX_PARITY_IMAGES:
            raise ValueError(f"parity set: {len(self)} images, at most {MAX_PARITY_IMAGES} are stored")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(self.images, dtype=np.uint8), allow_pickle=False)
        images = buf.getvalue()
        captions = json.dumps({"names": self.names, "references": self.references,
                               "fp32_tokens": [list(map(int, t)) for t in self.fp32_tokens],
                               "beam_size": self.beam_size, "max_steps": self.max_steps},
                              ensure_ascii=False).encode("utf-8")
        (directory / IMAGES_FILE).write_bytes(images)
        (directory / CAPTIONS_FILE).write_bytes(captions)
        return {"images": len(self), "references": self.references is not None, "beam_size": self.beam_size,
                "max_steps": self.max_steps,
                "files": {"images": {"file": IMAGES_FILE, "sha256": hashlib.sha256(images).hexdigest()},
                          "captions": {"file": CAPTIONS_FILE, "sha256": hashlib.sha256(captions).hexdigest()}}}

    @classmethod
    def load(cls, model: "ModelDir") -> "ParitySet | None":
        """The directory's parity set, hash-checked; None for directories exported without one."""
        entry = model.manifest.get("parity_set")
        if entry is None:
            return None
        where = f"{model.manifest_path}: parity_set"
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict):
            raise ModelDirError(f"{where} must be an object with 'files'")
        raw_images = _read_checked(model.path, files.get("images"), f"{where}.files.images")
        raw_captions = _read_checked(model.path, files.get("captions"), f"{where}.files.captions")
        path = model.path / IMAGES_FILE
        try:
            images = np.load(io.BytesIO(raw_images), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ModelDirError(f"{path}: not a numpy array file: {exc}") from None
        size = model.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ModelDirError(f"{path}: expected uint8 (N, {size}, {size}, 3), got {images.dtype} {images.shape}")
        try:
            captions = json.loads(raw_captions.decode("utf-8"))
            names = [str(n) for n in captions["names"]]
            tokens = [[int(t) for t in seq] for seq in captions["fp32_tokens"]]
            refs = captions.get("references")
            beam, steps = int(captions["beam_size"]), int(captions["max_steps"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ModelDirError(f"{model.path / CAPTIONS_FILE}: malformed parity captions: {exc}") from None
        if not (len(names) == len(tokens) == len(images)) or (refs is not None and len(refs) != len(images)):
            raise ModelDirError(f"{model.path / CAPTIONS_FILE}: {len(names)} names, {len(tokens)} captions and "
                                f"{len(images)} images do not match")
        return cls(images, names, refs, tokens, beam, steps)


def _read_checked(root: Path, spec: Any, where: str) -> bytes:
    if not (isinstance(spec, dict) and isinstance(spec.get("file"), str) and isinstance(spec.get("sha256"), str)):
        raise ModelDirError(f"{where} must be {{'file': ..., 'sha256': ...}}")
    name = spec["file"]
    if Path(name).name != name or name in ("", ".", ".."):
        raise ModelDirError(f"{where}.file must be a plain file name inside the directory, got {name!r}")
    path = root / name
    try:
        data = read_regular(path)
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot read the parity set: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec["sha256"].lower():
        raise ModelDirError(f"{path}: sha256 {digest} does not match captrt.json ({spec['sha256']}); "
                            "the parity set was modified or corrupted: re-export the model")
    return data


def fingerprint(graphs: dict[str, Any], parity_entry: dict[str, Any] | None) -> str:
    """sha256 over every graph's and parity file's hash: what a verification result is valid for."""
    parts = {"graphs": {p: {g: e["sha256"] for g, e in sorted(gs.items())} for p, gs in sorted(graphs.items())},
             "parity_set": {k: v["sha256"] for k, v in sorted((parity_entry or {}).get("files", {}).items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

