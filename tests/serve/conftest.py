"""Fixtures of the service tests: the demo-sized model, encoded test images, a running server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.serve.server_process import ServerProcess

API_KEY = "test-key-3f9a"


def encode(pixels, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="session")
def serve_model_dir(demo_sized_export):
    return demo_sized_export[0]


@pytest.fixture(scope="session")
def jpegs() -> list[bytes]:
    """12 rendered scenes at the size of real uploads (320x240, resized by the service)."""
    from captrt.synth import render_scenes

    scenes = render_scenes(12, 256, seed=7)
    return [encode(np.asarray(Image.fromarray(s).resize((320, 240)))) for s in scenes]


@pytest.fixture(scope="module")
def server(serve_model_dir, tmp_path_factory):
    """The service as users start it, with an API key, batching and small limits for the error tests."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(serve_model_dir, "--max-batch", "16", "--max-wait-ms", "20", "--max-images", "4",
                       "--max-body-mb", "1", "--api-key-env", "CAPTRT_TEST_API_KEY",
                       env={"CAPTRT_TEST_API_KEY": API_KEY}, log=log) as srv:
        yield srv


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}
