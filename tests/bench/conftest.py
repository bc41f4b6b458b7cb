"""The tiny exported model the bench tests share (one export per session: it takes ~20 s on 2 cores)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    from captrt.export.exporter import export_model
    from tests.conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("bench_model")
    ckpt = make_tiny_checkpoint(root / "tiny.pt")
    # A random-weight model's int8 misses the quality budget: written with force (the bench measures speed, and
    # says "unverified" beside it), without the accuracy-aware search (nothing to gain on random weights).
    export_model(ckpt, root / "model", int8=True, max_beam=5, parity_count=16, calib_count=1, overwrite=True,
                 progress=False, force=True, int8_search=False)
    return root / "model"
