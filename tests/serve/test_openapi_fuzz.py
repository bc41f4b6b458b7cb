"""Schemathesis against the running service's own OpenAPI document: valid and invalid requests of
every operation (/v1 and the protocol's /v2, whose model name and version the schema gives, so that
the inference bodies reach the parser), and no answer may be a 5xx, break the schema, or leave a
traceback in the log.

Excluded check: 'positive_data_acceptance'. A schema-valid `format: binary` image may be a GIF or
random bytes, which the service is meant to refuse (415 or 400); the same for a schema-valid /v2 body,
whose base64 elements are no images. Excluded phase: 'stateful' (the service creates no resources to
chain; it only re-sent the same requests in sequences, doubling the run).

A second test draws what the schema-driven generation does not (non-ASCII digits, '1_0', integers of
thousands of digits) into every numeric parameter, as query parameters and as form fields.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# What schemathesis does not generate for a query or form value: digits outside ASCII ('²', '٣', '３',
# '①'), which str.isdigit() and float() accept but a strict parser must not, Python's '1_0' literals,
# and integers far longer than any bound (int() refuses more than 4300 digits).
_NOT_ASCII_DIGITS = st.characters(categories=("Nd", "No"), exclude_characters="0123456789")
_HOSTILE_INTEGERS = st.one_of(
    st.text(_NOT_ASCII_DIGITS, min_size=1, max_size=4),
    st.tuples(st.sampled_from(["", "1", "+", "-"]), st.text(_NOT_ASCII_DIGITS, min_size=1, max_size=3)).map("".join),
    st.tuples(st.sampled_from(["", "+", "-"]), st.sampled_from("123456789"),
              st.text("0123456789", min_size=29, max_size=200)).map("".join),
    st.tuples(st.integers(min_value=30, max_value=6000), st.sampled_from("0123456789")).map(
        lambda t: "7" + t[1] * t[0]),  # up to 6001 digits, past int()'s 4300
    st.integers(min_value=10, max_value=99).map(lambda n: f"{n // 10}_{n % 10}"),
)
_HOSTILE_NUMBERS = st.one_of(
    _HOSTILE_INTEGERS,
    st.tuples(st.text(_NOT_ASCII_DIGITS, min_size=1, max_size=2), st.sampled_from([".5", "e1", ""])).map("".join),
    st.tuples(st.sampled_from(["0.", "1e", "1."]), st.text(_NOT_ASCII_DIGITS, min_size=1, max_size=2)).map("".join),
    st.sampled_from(["1_0", "1_0.5", "0.5_1", "1e1_0"]),
)


def test_non_ascii_digits_and_huge_integers_are_422(server, jpegs):
    """Every integer and number parameter of the schema, sent a value from the strategies above as a
    query parameter or a form field: 422 naming the parameter (never 500, never accepted)."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    numeric = {p["name"]: p["schema"]["type"] for p in schema["paths"]["/v1/captions"]["post"]["parameters"]
               if p["schema"].get("type") in ("integer", "number")}
    assert {"beam_size", "max_steps", "seed", "num_hypotheses", "repetition_penalty"} <= set(numeric)
    image = [("image", ("a.jpg", jpegs[0], "image/jpeg"))]

    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(data=st.data())
        def send(data):
            name = data.draw(st.sampled_from(sorted(numeric)), label="parameter")
            value = data.draw(_HOSTILE_INTEGERS if numeric[name] == "integer" else _HOSTILE_NUMBERS, label="value")
            as_form = data.draw(st.booleans(), label="as form field")
            r = http.post("/v1/captions", files=image, data={name: value} if as_form else None,
                          params=None if as_form else {name: value})
            assert r.status_code == 422, (name, value[:80], r.status_code, r.text[:300])
            assert name in r.json()["detail"], (name, value[:80], r.text[:300])

        send()
    assert "Traceback" not in server.log_text()
