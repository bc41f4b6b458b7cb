"""Parameter parsing and status mapping of caption requests (pure functions)."""

from __future__ import annotations

import pytest

from captrt.serve.batcher import DecodeParams
from captrt.serve.upload import ServeError, error_status, parse_params


def parse(query=(), fields=None, max_beam=10, cap=50):
    return parse_params(list(query), fields or {}, max_beam=max_beam, max_steps_cap=cap)


def test_defaults_follow_the_model():
    assert parse() == DecodeParams(5, 50, False, 0.0)
    assert parse(max_beam=3, cap=20) == DecodeParams(3, 20, False, 0.0)


def test_query_and_form_fields():
    assert parse([("beam_size", "2"), ("attention", "TRUE")], {"max_steps": " 7 ", "length_penalty": "0.7"}) == \
        DecodeParams(2, 7, True, 0.7)
    assert parse([("attention", "off")]).attention is False


@pytest.mark.parametrize("query,fields,needle", [
    ([("beam_size", "11")], {}, "beam_size must be an integer between 1 and 10"),
    ([("beam_size", "2.0")], {}, "beam_size"),
    ([("max_steps", "0")], {}, "max_steps"),
    ([("max_steps", "51")], {}, "between 1 and 50"),
    ([("length_penalty", "-1")], {}, "length_penalty"),
    ([("length_penalty", "inf")], {}, "length_penalty"),
    ([("attention", "2")], {}, "attention"),
    ([("beam_size", "2"), ("beam_size", "3")], {}, "given more than once"),
    ([("beam_size", "2")], {"beam_size": "2"}, "given more than once"),
    ([("beams", "2")], {}, "unknown parameter(s) beams"),
])
def test_422_names_the_field(query, fields, needle):
    with pytest.raises(ServeError) as info:
        parse(query, fields)
    assert info.value.status == 422 and needle in info.value.detail


def test_error_status_of_all_failed_images():
    assert error_status(["format"]) == 415
    assert error_status(["format", "format"]) == 415
    assert error_status(["too_large"]) == 413
    assert error_status(["unreadable"]) == 400
    assert error_status(["format", "unreadable"]) == 400
