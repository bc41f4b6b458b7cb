"""Signing what a machine builds for itself, so that it only ever loads its own builds.

Compiled engines (TensorRT plans, OpenVINO blobs) are executable artifacts: one found in a model directory
may have been copied from elsewhere. A secret that never leaves this machine (local_secret, created once,
mode 0600) marks what was built here: the TensorRT cache signs each plan's sidecar with it (SignedCache), and
the OpenVINO engine keys its cache directory with it, so a foreign `cache/` is rebuilt, never loaded.
Pure Python: nothing here needs an engine library.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

from captrt.atomic import atomic_path

log = logging.getLogger("captrt.runtime.signing")

CACHE_FORMAT = "captrt-trt-cache"  # the sidecar's format and version (a cache of another version rebuilds)
CACHE_VERSION = 1


def canonical(obj: Any) -> str:
    """JSON with sorted keys and tuples as lists: equal keys always serialize to equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def local_secret(path: Path | None = None) -> bytes:
    """The machine-local HMAC secret (created once, mode 0600) that marks cache entries as built here.

    Default location: $XDG_CACHE_HOME/captrt/trt-cache.key (~/.cache/...; the name it had when only TensorRT
    used it, kept so that existing caches stay valid). When it cannot be read or created, a per-process secret
    is returned: caching then only works within this process.
    """
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "captrt" / "trt-cache.key"
    for _ in range(2):
        try:
            data = path.read_bytes()
            if len(data) >= 32:
                return data
            break  # too short: damaged, or another process is writing it right now
        except FileNotFoundError:
            pass
        except OSError as exc:
            return _process_secret(path, exc)
        try:  # O_EXCL: exactly one process creates the secret, the others read it
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            return _process_secret(path, exc)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return _process_secret(path, "unreadable or too short")


def _process_secret(path: Path, why: object) -> bytes:
    log.warning("cannot keep an engine cache secret at %s (%s): cached engines will be rebuilt in every process",
                path, why)
    return secrets.token_bytes(32)


class SignedCache:
    """NAME.bin + NAME.json in one directory; a blob is returned only if the sidecar vouches for it.

    The sidecar holds the full key, the blob's sha256 and an HMAC over both with `secret`.
    """

    def __init__(self, directory: Path, secret: bytes):
        self.directory = Path(directory)
        self._secret = secret

    def _mac(self, key: Mapping[str, Any], blob_sha: str) -> str:
        return hmac.new(self._secret, (canonical(key) + "\n" + blob_sha).encode("utf-8"), hashlib.sha256).hexdigest()

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.bin", self.directory / f"{name}.json"

    def load(self, name: str, key: Mapping[str, Any]) -> bytes | None:
        """The blob stored under `name` for exactly `key`, or None (missing, stale, foreign or damaged)."""
        blob_path, side_path = self.paths(name)
        try:
            side = json.loads(side_path.read_text(encoding="utf-8"))
            blob = blob_path.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(side, dict) or side.get("format") != CACHE_FORMAT or side.get("version") != CACHE_VERSION:
            return None
        if canonical(side.get("key")) != canonical(key):
            log.info("%s: built for a different key; rebuilding", side_path)
            return None
        blob_sha = hashlib.sha256(blob).hexdigest()
        if side.get("blob_sha256") != blob_sha:
            log.warning("%s: does not match its sidecar (modified or half-written); rebuilding", blob_path)
            return None
        if not hmac.compare_digest(str(side.get("hmac", "")), self._mac(key, blob_sha)):
            log.warning("%s: not built on this machine (cache secret differs); refusing to load it", blob_path)
            return None
        return blob

    def store(self, name: str, key: Mapping[str, Any], blob: bytes) -> None:
        """Write blob then sidecar, each atomically (a sidecar paired with another writer's blob fails
        its sha256 check in load)."""
        blob_path, side_path = self.paths(name)
        blob_sha = hashlib.sha256(blob).hexdigest()
        side = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "blob_sha256": blob_sha,
                "size": len(blob), "hmac": self._mac(key, blob_sha)}
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(blob_path) as tmp:
            tmp.write_bytes(blob)
        with atomic_path(side_path) as tmp:
            tmp.write_text(json.dumps(side, indent=1, sort_keys=True), encoding="utf-8")
