"""`make demo` ends with the command that serves its model and the page's address (captrt.demo.serve_hint)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from captrt.demo import serve_hint
from captrt.serve.config import ServeConfig


def test_the_demo_ends_with_how_to_serve_its_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = serve_hint(Path("demo_out") / "model")
    [command] = [line.strip() for line in lines if " serve --model " in line]
    script = Path(sys.executable).parent / "captrt"  # the venv's console script, as make demo installs it
    assert shlex.split(command)[0] in ("captrt", str(script))
    assert shlex.split(command)[1:] == ["serve", "--model", "demo_out/model"]
    defaults = ServeConfig(model=Path("demo_out/model"))
    assert lines[-1].strip() == f"then open http://{defaults.host}:{defaults.port}/"


def test_a_model_outside_the_working_directory_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = Path("/") / "srv" / "my model"
    [command] = [line.strip() for line in serve_hint(elsewhere) if " serve --model " in line]
    assert shlex.split(command)[-1] == str(elsewhere)  # quoted: a path with a space pastes as one argument
