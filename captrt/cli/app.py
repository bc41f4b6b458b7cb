"""The `captrt` typer app and what its commands share: one-line errors (exit 2), --streams, --ray."""

from __future__ import annotations

from typing import NoReturn

import typer
import typer.core

from captrt.checks import int_or_auto

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Show, Attend and Tell: train, export, caption, bench.")


def fail(exc: Exception) -> NoReturn:
    """Known bad-input errors end with one clear line, not a traceback."""
    typer.echo(f"captrt: error: {exc}", err=True)
    raise typer.Exit(2)


KNOWN_ERRORS: tuple[type[Exception], ...] = (ValueError, FileExistsError, FileNotFoundError, RuntimeError)


def streams_flag(value: str) -> int | str:
    """--streams: 'auto' or a positive integer (a bad one ends with one line, exit 2)."""
    try:
        return int_or_auto("--streams", value, text=True)
    except ValueError as exc:
        fail(exc)


class RayOptionCommand(typer.core.TyperCommand):
    """`--ray` with an optional value, which typer's parser lacks: `--ray` alone (last, or followed by
    another option) means `--ray local`; `--ray auto` / `--ray HOST:PORT` joins a cluster."""

    def parse_args(self, ctx, args):
        fixed = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("local")
        return super().parse_args(ctx, fixed)
