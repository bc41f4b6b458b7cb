"""captrt.checks: the one integer-argument check every entry point uses."""

import numpy as np
import pytest

from captrt.checks import check_int, int_or_auto
from captrt.runtime.errors import ModelDirError


def test_check_int_accepts_integers_at_or_above_the_bound():
    assert check_int("n", 1) == 1
    assert check_int("n", 0, low=0) == 0
    assert check_int("n", 32, low=32) == 32
    value = check_int("n", np.int64(7))
    assert value == 7 and type(value) is int
    assert check_int("n", None, allow_none=True) is None


@pytest.mark.parametrize("value", [0, -3, True, False, 2.0, "3", None, np.float32(2)])
def test_check_int_refuses_with_one_line_naming_the_field(value):
    with pytest.raises(ValueError) as info:
        check_int("--max-batch", value)
    assert str(info.value) == f"--max-batch must be a positive integer, got {value!r}"


def test_check_int_wording_bound_and_error_type():
    with pytest.raises(ValueError, match=r"^seed must be a non-negative integer, got -1$"):
        check_int("seed", -1, low=0)
    with pytest.raises(ValueError, match=r"^image_size must be an integer >= 32, got 16$"):
        check_int("image_size", 16, low=32)
    with pytest.raises(ModelDirError, match=r"^m/captrt.json: max_beam: expected a positive integer, got 0$"):
        check_int("m/captrt.json: max_beam", 0, error=ModelDirError, expected=True)
    with pytest.raises(ValueError, match=r"^threads: expected a positive integer or None, got 'x'$"):
        check_int("threads", "x", allow_none=True, what="a positive integer or None", expected=True)


def test_int_or_auto():
    assert int_or_auto("--streams", "auto") == "auto"
    assert int_or_auto("--streams", 3) == 3
    assert int_or_auto("--streams", " Auto ", text=True) == "auto"
    assert int_or_auto("--streams", "4", text=True) == 4
    for value, text in (("4", False), (" auto", False), ("0", True), ("two", True), (0, True), (True, True),
                        (2.5, True)):
        with pytest.raises(ValueError) as info:
            int_or_auto("--streams", value, text=text)
        assert str(info.value) == f"--streams must be a positive integer or 'auto', got {value!r}"
