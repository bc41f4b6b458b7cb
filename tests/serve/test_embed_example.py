"""docs/serving.md's 'embed a Captioner in your own FastAPI app' example runs as printed."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx

from captrt.runtime import Captioner

PAGE = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_embedding_example_of_the_serving_page(serve_model_dir, jpegs):
    text = PAGE.read_text()
    block = re.search(r"<!-- embed-example:begin -->\s*```python\n(.*?)```\s*<!-- embed-example:end -->", text, re.S)
    assert block, "docs/serving.md lost its embedding example"
    code = block.group(1).replace('"MODEL_DIR"', repr(str(serve_model_dir)))
    namespace: dict = {}
    exec(compile(code, str(PAGE), "exec"), namespace)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=namespace["app"])  # the example has no lifespan to run
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post("/caption", files={"image": ("a.jpg", jpegs[0], "image/jpeg")})

    r = asyncio.run(call())
    assert r.status_code == 200
    with Captioner.load(serve_model_dir) as cap:
        assert r.json() == {"caption": cap.caption(jpegs[0])[0].text, "error": None}
    namespace["captioner"].close()
