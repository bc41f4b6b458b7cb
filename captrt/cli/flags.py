"""The decoding options as command-line flags, derived from DecodingOptions' table.

`decoding_flags` adds one flag per DecodingOptions field to a typer command and hands the command a
checked-for-kind DecodingOptions as `decoding`: `captrt caption` and `captrt batch` declare none of them
by hand, so a field added to the table is a flag of both. Numbers are typed as text and read by the
table's strict parser (click's int() would accept '٣' or '1_0'); a bad value ends with one line
naming the field and exit 2, like every other flag.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, List, Optional

import typer

from captrt.runtime.decoding.options import (DecodingOptionError, DecodingOptions, OptionSpec, option_fields,
                                             parse_option_text)

PANEL = "Decoding options (docs/decoding.md)"
_METAVARS = {"int": "INTEGER", "float": "NUMBER"}


def _flag(name: str, spec: OptionSpec, default: Any) -> tuple[Any, Any]:
    """-> (annotation, typer.Option) of one option's flag."""
    names = spec.flags or ("--" + name.replace("_", "-"),)
    if spec.kind == "bool":
        return bool, typer.Option(bool(default), *names, help=spec.help, rich_help_panel=PANEL)
    if spec.kind == "words" and name == "suppress":  # repeatable: one word per flag
        return Optional[List[str]], typer.Option(None, *names, help=f"{spec.help} (repeatable)",
                                                 rich_help_panel=PANEL)
    shown = "none" if default in (None, ()) else default
    return Optional[str], typer.Option(None, *names, metavar=_METAVARS.get(spec.kind, "WORDS"),
                                       help=f"{spec.help} (default: {shown})", rich_help_panel=PANEL)


def decoding_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a typer command whose signature ends with `decoding`: the flags replace it."""
    signature = inspect.signature(command)
    kept = [p for name, p in signature.parameters.items() if name != "decoding"]
    defaults = DecodingOptions()
    added = []
    for f in option_fields():
        annotation, flag = _flag(f.name, f.metadata["spec"], getattr(defaults, f.name))
        added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=flag, annotation=annotation))
    names = [p.name for p in added]

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in names}
        try:
            decoding = options_from_flags(given)
        except DecodingOptionError as exc:
            typer.echo(f"captrt: error: {exc}", err=True)
            raise typer.Exit(2)
        return command(**kwargs, decoding=decoding)

    run.__signature__ = signature.replace(parameters=kept + added)  # what typer reads
    return run


def options_from_flags(given: dict[str, Any]) -> DecodingOptions:
    """Flag values (text for numbers and words, None when not given) -> DecodingOptions (kinds checked;
    the model's bounds are checked by the library when it loads the model)."""
    values = {}
    for name, value in given.items():
        if value is None or value == []:
            continue
        values[name] = parse_option_text(name, value) if isinstance(value, str) else value
    return DecodingOptions.build(**values)
