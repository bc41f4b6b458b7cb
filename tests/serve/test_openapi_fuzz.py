"""Schemathesis against the running service's own OpenAPI document: valid and invalid requests of
every operation (/v1 and the protocol's /v2, whose model name and version the schema gives, so that
the inference bodies reach the parser), and no answer may be a 5xx, break the schema, or leave a
traceback in the log.

Excluded check: 'positive_data_acceptance'. A schema-valid `format: binary` image may be a GIF or
random bytes, which the service is meant to refuse (415 or 400); the same for a schema-valid /v2 body,
whose base64 elements are no images. Excluded phase: 'stateful' (the service creates no resources to
chain; it only re-sent the same requests in sequences, doubling the run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import API_KEY


def test_no_request_breaks_the_service(server, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    if not cli.exists() and shutil.which("schemathesis") is None:
        pytest.skip("schemathesis is not installed (it is in the dev extra)")
    cmd = [str(cli) if cli.exists() else "schemathesis", "run", f"{server.url}/openapi.json",
           "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--mode", "all",
           "--max-examples", "60", "--seed", "20261129", "--phases", "examples,coverage,fuzzing",
           "-H", f"Authorization: Bearer {API_KEY}", "--request-timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Traceback" not in server.log_text()
