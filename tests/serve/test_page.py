"""The web page's routes without a browser: headers (CSP), no inline code, --no-ui, the OpenAPI schema
unchanged by the page, and the page's files in a built (non-editable) wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

import captrt
from captrt.serve import ServeConfig, create_app
from captrt.serve.page import ASSETS, CSP

ROOT = Path(captrt.__file__).resolve().parent.parent
UI_FILES = sorted(name for name, _ in ASSETS.values())


def client(tmp_path: Path, **options: object) -> TestClient:
    """The app without its lifespan (no model loads): enough for the page and the schema, which need
    no model (a missing model directory only leaves the schema's limits out)."""
    return TestClient(create_app(ServeConfig(model=tmp_path / "no-model", **options)))


class _Markup(HTMLParser):
    """Collects what a strict CSP would refuse or what would leave the origin."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.problems.append(f"<{tag} {name}=...>: inline code")
            if name in ("src", "href", "action") and value and not (value.startswith("/") or value == "data:,"):
                self.problems.append(f"<{tag} {name}={value!r}>: not this origin")
        if tag == "script" and not dict(attrs).get("src"):
            self.problems.append("<script> without src: inline script")
        self.in_script = tag == "script"

    def handle_data(self, data: str) -> None:
        if self.in_script and data.strip():
            self.problems.append("<script> with a body: inline script")

    def handle_endtag(self, tag: str) -> None:
        self.in_script = False


def test_page_and_assets_carry_the_csp(tmp_path):
    http = client(tmp_path)
    for path, (name, media_type) in ASSETS.items():
        r = http.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"].startswith(media_type)
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (ROOT / "captrt/serve/ui" / name).read_bytes()
    assert "'unsafe-inline'" not in CSP and "'unsafe-eval'" not in CSP and "script-src 'self'" in CSP
    assert "http" not in CSP and "*" not in CSP
    markup = _Markup()
    markup.feed(http.get("/").text)
    assert markup.problems == []
    script = http.get("/ui/app.js").text
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "http:", "https:",
                      "localStorage", "document.cookie"):
        assert forbidden not in script, forbidden
    assert "url(" not in http.get("/ui/style.css").text  # no fonts or images from anywhere


def test_no_ui_is_api_only_and_the_schema_is_unchanged(tmp_path):
    with_ui, without = client(tmp_path), client(tmp_path, ui=False)
    for path in ASSETS:
        assert without.get(path).status_code == 404, path
    schema = with_ui.get("/openapi.json").json()
    assert schema == without.get("/openapi.json").json()
    v2 = {f"/v2/models/{{name}}{v}{op}" for v in ("", "/versions/{version}") for op in ("", "/ready", "/infer")}
    assert set(schema["paths"]) == {"/healthz", "/readyz", "/metrics", "/v1/model", "/v1/captions", "/v2",
                                    "/v2/health/live", "/v2/health/ready", *v2}
    assert with_ui.get("/docs").text == without.get("/docs").text


def test_cli_ui_flag(tmp_path, monkeypatch):
    from captrt.cli import app

    seen: list[ServeConfig] = []
    monkeypatch.setattr("captrt.serve.server.serve", lambda config: seen.append(config) or 0)
    for flag in ([], ["--no-ui"]):
        res = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), *flag])
        assert res.exit_code == 0, res.output
    assert [c.ui for c in seen] == [True, False]


def test_a_built_wheel_contains_the_page(tmp_path):
    """A non-editable install gets the page: build a wheel from a copy of the sources."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "captrt", src / "captrt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = (tmp_path / "dist").glob("captrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"captrt/serve/ui/{name}" for name in UI_FILES} <= names
    assert "captrt/serve/page.py" in names
