"""captrt.runtime.signing: the machine-local secret and the signed cache (what TensorRT's engine cache stores,
and the secret OpenVINO keys its cache with). Pure Python: runs everywhere."""

from __future__ import annotations

import json
import os

from captrt.runtime.engines import trt_build as tb
from captrt.runtime.signing import SignedCache, local_secret

PROFILE = {"image": ((1, 256, 256, 3), (8, 256, 256, 3), (32, 256, 256, 3))}
KEY_ARGS = dict(graph="encoder", graph_sha256="ab" * 32, precision="fp16", trt_version="10.3.0",
                compute_capability="8.6", profile=PROFILE, build={"strongly_typed": True, "workspace_bytes": 1 << 30})


def test_signed_cache_round_trip_and_refusals(tmp_path):
    key = tb.cache_key(**KEY_ARGS)
    name = tb.cache_name(key)
    cache = SignedCache(tmp_path, b"s" * 32)
    assert cache.load(name, key) is None  # nothing stored yet
    cache.store(name, key, b"engine-bytes")
    assert cache.load(name, key) == b"engine-bytes"
    side = json.loads((tmp_path / f"{name}.json").read_text())
    assert side["key"] == json.loads(json.dumps(key)) and side["size"] == 12

    other = tb.cache_key(**{**KEY_ARGS, "trt_version": "10.9.0"})
    assert cache.load(name, other) is None  # sidecar describes another build
    assert SignedCache(tmp_path, b"t" * 32).load(name, key) is None  # built elsewhere (other secret)

    blob_path, side_path = cache.paths(name)
    blob_path.write_bytes(b"engine-bytez")
    assert cache.load(name, key) is None  # blob replaced behind the sidecar's back
    cache.store(name, key, b"engine-bytes")
    side_path.write_text("{not json")
    assert cache.load(name, key) is None
    side_path.unlink()
    assert cache.load(name, key) is None


def test_forged_sidecar_without_the_secret_is_refused(tmp_path):
    """An attacker who ships cache/ can write a matching key and blob hash, but not the HMAC."""
    key = tb.cache_key(**KEY_ARGS)
    name = tb.cache_name(key)
    SignedCache(tmp_path, b"attacker" * 4).store(name, key, b"evil")
    side = json.loads((tmp_path / f"{name}.json").read_text())
    assert side["key"] == json.loads(json.dumps(key))  # the key alone would have matched
    assert SignedCache(tmp_path, b"local!!!" * 4).load(name, key) is None


def test_local_secret_is_created_once_and_private(tmp_path):
    path = tmp_path / "captrt" / "trt-cache.key"
    first = local_secret(path)
    assert len(first) == 32 and local_secret(path) == first
    assert os.stat(path).st_mode & 0o077 == 0
    (tmp_path / "afile").write_text("x")
    a, b = local_secret(tmp_path / "afile" / "key"), local_secret(tmp_path / "afile" / "key")
    assert len(a) == 32 and a != b  # cannot be stored: a fresh per-process secret each time
