"""Integer arguments checked one way everywhere: the type, a lower bound, and a one-line error naming the field.

bool is refused although Python counts it an int (True would otherwise pass as 1); numpy integers are accepted
and returned as Python ints. The error type is the caller's (ModelDirError, BatchUsageError, ...), so each
entry point keeps its own exit code and its own way of reporting.
Two wordings exist because callers report in two forms, both relied on by users and tests:
"NAME must be WHAT, got VALUE" (flags and keyword arguments) and "NAME: expected WHAT, got VALUE"
(a field inside a file or a list, whose name ends with the place it was found).
"""

from __future__ import annotations

import numbers
from typing import Any

AUTO = "auto"


def describe(low: int) -> str:
    """What a lower bound of `low` asks for: 'a positive integer', 'a non-negative integer', 'an integer >= N'."""
    return {1: "a positive integer", 0: "a non-negative integer"}.get(low, f"an integer >= {low}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _refuse(name: str, value: Any, what: str, error: type[Exception], expected: bool) -> Exception:
    text = f"{name}: expected {what}, got {value!r}" if expected else f"{name} must be {what}, got {value!r}"
    return error(text)


def check_int(name: str, value: Any, *, low: int = 1, allow_none: bool = False, error: type[Exception] = ValueError,
              what: str | None = None, expected: bool = False) -> Any:
    """`value` as an int when it is an integer >= `low` (None passes through when allow_none); otherwise raises
    error("NAME must be WHAT, got VALUE"), or with expected=True error("NAME: expected WHAT, got VALUE").
    WHAT is describe(low) unless given (e.g. to add "or None" where None has a meaning)."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < low:
        raise _refuse(name, value, what or describe(low), error, expected)
    return int(value)


def int_or_auto(name: str, value: Any, *, text: bool = False, error: type[Exception] = ValueError) -> int | str:
    """'auto' or a positive integer, else error("NAME must be a positive integer or 'auto', got VALUE").
    text=True reads a command line's string: 'auto' in any case with spaces around, or an integer's digits."""
    if value == AUTO or (text and isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    number = value
    if text and isinstance(value, str):
        digits = value.strip()  # ASCII digits only: int() would take '٣' or '1_0'
        number = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 9 else None
    if not is_int(number) or number < 1:
        raise _refuse(name, value, f"a positive integer or {AUTO!r}", error, False)
    return int(number)
