"""One option table, every entry point: the library, the service's query/form parser and the CLI flags
accept and refuse exactly the same values, with the same message naming the field. The cases are
derived from DecodingOptions' own metadata, so a field added to the table is covered here, and a
field some entry point forgets fails."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from captrt.cli import app
from captrt.cli.flags import options_from_flags
from captrt.runtime.decoding import DecodingOptionError, DecodingOptions
from captrt.runtime.decoding.option_docs import option_json_schema, options_markdown
from captrt.runtime.decoding.options import SPECS, option_names, parse_option_text
from captrt.serve.upload import PARAMS, ServeError, params_schema, parse_params

MAX_BEAM, CAP = 10, 50
# Text that is not an ASCII number: each once passed str.isdigit() or int()/float() somewhere.
NOT_NUMBERS = ["\u00b2", "\u2460", "\u0663", "\uff13", "1_0", "0x10", "1" * 5000, "", "nan", "inf", "1,5"]


def _bad_values(name):
    """(text, python value or None) pairs the library must refuse for `name`, from its spec."""
    spec = SPECS[name]
    cases = []
    if spec.kind in ("int", "float"):
        cases += [(text, None) for text in NOT_NUMBERS if not (spec.kind == "float" and text in ("nan", "inf"))]
        cases += [("nan", float("nan")), ("inf", float("inf"))] if spec.kind == "float" else [("2.5", 2.5)]
        low = spec.low
        below = low if spec.above else (low - 1 if spec.kind == "int" else low - 0.5)
        cases.append((repr(below) if spec.kind == "float" else str(below), below))
        high = {"max_beam": MAX_BEAM, "beam_size": 5, "max_steps": 49}.get(spec.limit, spec.high)
        if high is not None:
            over = high + 1 if spec.kind == "int" else high * 2
            cases.append((str(over), over))
    elif spec.kind == "bool":
        cases += [("yes", "yes"), ("1", 1)]
    else:
        cases += [("<unk>", ("<unk>",)), ("zebra", ("zebra",))]
    return cases


def _good_values(name):
    spec = SPECS[name]
    default = getattr(DecodingOptions(), name)
    if spec.kind == "int":
        return [("+" + str(int(spec.low)) if spec.low else str(default or 1), int(spec.low) if spec.low else default or 1)]
    if spec.kind == "float":
        return [(" 0.5e0 " if (spec.high or 2) >= 0.5 and spec.low < 0.5 else "2", 0.5 if spec.low < 0.5 else 2.0)]
    if spec.kind == "bool":
        return [("TRUE", True), ("false", False)]
    return [("red circle", ("red", "circle"))]


def _library(name, value, vocab):
    values = {name: value}
    if name == "sample" and value is True or name.startswith("sampling_"):
        values.update(sample=True, beam_size=1)
    if name == "num_hypotheses":
        values["beam_size"] = 5
    DecodingOptions.build(**values).check(vocab, max_beam=MAX_BEAM, max_steps=CAP)


def _service(name, text, vocab):
    """As the service calls it: the model's check included (Captioner.check_options)."""
    query = [(name, text)]
    if name == "sample" or name.startswith("sampling_"):
        query += [("sample", "true"), ("beam_size", "1")] if name != "sample" else [("beam_size", "1")]
    return parse_params(query, {}, max_beam=MAX_BEAM, max_steps_cap=CAP,
                        check=lambda p: p.decoding().check(vocab, max_beam=MAX_BEAM, max_steps=CAP))


@pytest.fixture(scope="module")
def vocab(varied_model_dir):
    from captrt.runtime.model_dir import ModelDir

    return ModelDir.load(varied_model_dir).vocab


def test_every_field_is_an_entry_point_parameter():
    assert set(option_names()) <= set(PARAMS)
    assert {p["name"] for p in params_schema(MAX_BEAM, CAP)} == set(PARAMS)
    for command in ("caption", "batch"):
        help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        for name in option_names():
            spelled = (SPECS[name].flags or ("--" + name.replace("_", "-"),))[0]
            assert spelled in help_text, f"{command} lacks the flag of {name}"


@pytest.mark.parametrize("name", option_names())
def test_bad_values_are_refused_alike(name, vocab, varied_model_dir, tmp_path):
    for text, value in _bad_values(name):
        with pytest.raises(DecodingOptionError) as parsed:
            parse_option_text(name, text)
            _library(name, parse_option_text(name, text), vocab)
        message = str(parsed.value)
        assert parsed.value.field == name and message.startswith(name) and len(message) < 400
        if value is not None:  # a Python caller passing the same value meets the same message
            with pytest.raises(DecodingOptionError) as direct:
                _library(name, value, vocab)
            assert direct.value.field == name
        with pytest.raises(ServeError) as served:
            _service(name, text, vocab)
        assert served.value.status == 422 and served.value.detail.startswith(name), (text, served.value.detail)
        if SPECS[name].kind != "bool":  # bool flags are switches on the command line
            args = [f"--{name.replace('_', '-')}={text}"]
            if name == "suppress":
                args = ["--suppress", text]
            if name == "sample" or name.startswith("sampling_"):
                args += ["--sample", "--beam", "1"]
            res = CliRunner().invoke(app, ["batch", str(tmp_path / "none"), "--model", str(varied_model_dir), "-o",
                                           str(tmp_path / f"out_{name}")] + args)
            lines = res.output.strip().splitlines()
            assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"captrt: error: {name}"), \
                (name, text, res.output)
            assert lines[0] == f"captrt: error: {message}" or value is not None, (lines[0], message)


@pytest.mark.parametrize("name", option_names())
def test_good_values_mean_the_same_everywhere(name, vocab):
    for text, value in _good_values(name):
        _library(name, value, vocab)
        served = _service(name, text, vocab).decoding()
        assert getattr(served, name) == value, (name, text)
        flagged = options_from_flags({name: text if SPECS[name].kind != "bool" else value})
        assert getattr(flagged, name) == value


def test_the_library_bound_wins_for_length_penalty():
    """The service once capped length_penalty at 10 while the library accepts any value >= 0."""
    assert _service("length_penalty", "25", None).length_penalty == 25.0
    assert "maximum" not in option_json_schema("length_penalty")


def test_docs_table_is_the_code_table():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[3] / "docs" / "decoding.md").read_text()
    start, end = "<!-- decoding-options:start -->\n", "<!-- decoding-options:end -->"
    assert start in page and end in page
    assert page.split(start, 1)[1].split(end, 1)[0].strip() == options_markdown().strip(), \
        "docs/decoding.md's option table differs from DecodingOptions: paste options_markdown()"


def test_caption_flags_use_the_same_parser(varied_model_dir, tmp_path):
    for flag, text in (("--beam", "\u00b2"), ("--seed", "1" * 5000), ("--repetition-penalty", "1_0")):
        res = CliRunner().invoke(app, ["caption", str(tmp_path / "x.jpg"), "--model", str(varied_model_dir),
                                       f"{flag}={text}"])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and flag.lstrip("-").replace("-", "_") in lines[0] \
            or flag == "--beam" and "beam_size" in lines[0], res.output
