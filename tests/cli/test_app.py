"""The command line's own wiring: every command answers --help, and the app imports no heavy library
until a command runs (so `captrt --help` is fast and works without the optional extras)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from captrt.cli import app

COMMANDS = ("synth", "prepare", "train", "eval", "convert", "export", "caption", "verify", "batch", "bench", "serve",
            "demo")
HEAVY = ("torch", "onnxruntime", "openvino", "fastapi", "uvicorn", "ray", "PIL", "captrt.runtime.captioner")


def test_every_command_is_registered_and_documented():
    listed = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert listed.exit_code == 0
    for name in COMMANDS:
        assert name in listed.output
        res = CliRunner().invoke(app, [name, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "Usage:" in res.output, (name, res.output)


def test_importing_the_app_loads_no_engine_or_service():
    code = f"import sys, captrt.cli; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("args", [["no-such-command"], ["caption"], ["serve", "--model"]])
def test_usage_errors_exit_2(args):
    assert CliRunner().invoke(app, args).exit_code == 2
