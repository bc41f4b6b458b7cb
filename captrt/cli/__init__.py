"""The `captrt` command: thin typer wrappers over library functions, heavy imports inside commands.

app.py holds the typer app and what commands share; each *_command(s).py registers its commands on it;
flags.py derives the decoding flags from the option table; caption.py and verify.py are the library
side of `captrt caption` and `captrt verify`.
"""

from captrt.cli import model_commands, run_commands, serve_command  # noqa: F401  (each registers its commands)
from captrt.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover
    app()
