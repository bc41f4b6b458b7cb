"""caption_files (the library behind `captrt caption`) end to end, and the attention figure."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captrt.runtime import Captioner
from captrt.attention_plot import plot_attention, upsample_attention
from captrt.cli.caption import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, caption_files, expand_inputs
from tests.conftest import random_images


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    imgs = random_images(5, seed=13)
    for i, a in enumerate(imgs[:3]):
        Image.fromarray(a).save(d / f"img{i}.png")
    Image.fromarray(imgs[3]).save(d / "img3.jpg", quality=95)
    (d / "sub").mkdir()
    Image.fromarray(imgs[4]).save(d / "sub" / "img4.png")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def expected(varied_model_dir, photo_dir):
    cap = Captioner.load(varied_model_dir, threads=1)
    files = sorted(photo_dir.glob("img*")) + [photo_dir / "sub" / "img4.png"]
    return {str(p): c for p, c in zip(files, cap.caption([str(p) for p in files], beam_size=3))}


def run(inputs, model_dir, **kw):
    out, err = io.StringIO(), io.StringIO()
    code = caption_files([str(i) for i in inputs], model_dir, out=out, err=err, threads=1, **kw)
    return code, out.getvalue(), err.getvalue()


def test_expand_inputs(photo_dir):
    files, problems = expand_inputs([str(photo_dir), str(photo_dir / "sub" / "*.png"), "plain.png",
                                     str(photo_dir / "*.gif")])
    names = [Path(f).name for f in files]
    assert names == ["img0.png", "img1.png", "img2.png", "img3.jpg", "img4.png", "plain.png"]
    assert problems == [f"{photo_dir / '*.gif'}: pattern matches no images"]
    files, _ = expand_inputs([str(photo_dir / "**" / "*.png")])
    assert sorted(Path(f).name for f in files) == ["img0.png", "img1.png", "img2.png", "img4.png"]


def test_text_output(varied_model_dir, photo_dir, expected):
    code, out, err = run([photo_dir, photo_dir / "sub"], varied_model_dir, beam=3, batch=2)
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert len(lines) == 5
    for line in lines:
        path, text = line.split("\t")
        assert text == expected[path].text
    assert err == ""  # no progress line: stderr is not a terminal


def test_json_lines_with_errors(varied_model_dir, photo_dir, expected, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    code, out, err = run([photo_dir / "img0.png", broken, tmp_path / "missing.png", photo_dir / "img3.jpg"],
                         varied_model_dir, beam=3, json_lines=True, progress=True)
    assert code == EXIT_SOME_FAILED
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == [str(photo_dir / "img0.png"), str(broken), str(tmp_path / "missing.png"),
                                           str(photo_dir / "img3.jpg")]
    good = records[0]
    ref = expected[str(photo_dir / "img0.png")]
    assert good["caption"] == ref.text and good["tokens"] == ref.tokens and good["error"] is None
    assert good["score"] == pytest.approx(ref.score) and good["finished"] is True
    assert records[1]["caption"] is None and "broken.jpg" in records[1]["error"] and records[1]["score"] is None
    assert "no such file" in records[2]["error"]
    assert records[3]["caption"] == expected[str(photo_dir / "img3.jpg")].text
    assert "4/4 images" in err  # progress was forced on


def test_attention_pngs(varied_model_dir, photo_dir, tmp_path):
    out_dir = tmp_path / "att"
    code, out, err = run([photo_dir / "img0.png", photo_dir / "sub" / "img4.png"], varied_model_dir, beam=2,
                         attention_dir=out_dir)
    assert code == EXIT_OK, err
    pngs = sorted(p.name for p in out_dir.iterdir())
    assert pngs == ["img0.png", "img4.png"]
    with Image.open(out_dir / "img0.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # with plots each image is decoded once and captioned from that array: same captions, and an
    # unreadable file is reported as without plots
    inputs = [photo_dir / "img0.png", photo_dir / "missing.png", photo_dir / "sub" / "img4.png"]
    plain = run(inputs, varied_model_dir, beam=2, json_lines=True)
    plotted = run(inputs, varied_model_dir, beam=2, json_lines=True, attention_dir=tmp_path / "att2")
    assert plain[0] == plotted[0] == EXIT_SOME_FAILED and plain[1] == plotted[1]
    assert sorted(p.name for p in (tmp_path / "att2").iterdir()) == ["img0.png", "img4.png"]


@pytest.mark.parametrize("inputs,kwargs,message", [
    (["{photos}/*.gif"], {}, "no images to caption"),
    (["{photos}/img0.png"], {"beam": 50}, "beam_size must be an integer between 1 and 10"),
    (["{photos}/img0.png"], {"engine": "nope"}, "unknown engine 'nope'"),
    (["{photos}/img0.png"], {"batch": 0}, "batch must be a positive integer"),
])
def test_usage_errors(varied_model_dir, photo_dir, inputs, kwargs, message):
    code, out, err = run([i.format(photos=photo_dir) for i in inputs], varied_model_dir, **kwargs)
    assert code == EXIT_USAGE
    assert message in err and out == ""


def test_bad_model_directory(photo_dir, tmp_path):
    code, out, err = run([photo_dir / "img0.png"], tmp_path / "nope")
    assert code == EXIT_USAGE and "no such model directory" in err


def test_upsample_attention_shape_and_mass():
    a = np.zeros((4, 4), np.float32)
    a[1, 2] = 1.0
    big = upsample_attention(a, upscale=24)
    assert big.shape == (96, 96)
    y, x = np.unravel_index(np.argmax(big), big.shape)
    assert 24 <= y < 48 and 48 <= x < 72  # the peak stays in its cell
    assert big.min() >= 0


def test_plot_attention_checks_shapes(tmp_path):
    img = random_images(1, seed=1)[0]
    with pytest.raises(ValueError, match="attention must be"):
        plot_attention(img, ["a", "b"], np.zeros((3, 4, 4)), tmp_path / "x.png")
    path = plot_attention(img, ["a", "b"], np.full((2, 4, 4), 1 / 16, np.float32), tmp_path / "x.png")
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))


def test_captrt_caption_command(varied_model_dir, photo_dir, expected, tmp_path):
    """The typer command wires its flags through to caption_files: --json, --beam, --attention."""
    from typer.testing import CliRunner

    from captrt.cli import app

    img = photo_dir / "img0.png"
    res = CliRunner().invoke(app, ["caption", str(img), "--model", str(varied_model_dir), "--beam", "3", "--json",
                                   "--threads", "1", "--attention", str(tmp_path / "att")])
    assert res.exit_code == EXIT_OK, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["tokens"] == expected[str(img)].tokens
    assert len(list((tmp_path / "att").glob("*.png"))) == 1


def test_captrt_caption_command_bad_model(tmp_path, photo_dir):
    from typer.testing import CliRunner

    from captrt.cli import app

    res = CliRunner().invoke(app, ["caption", str(photo_dir / "img0.png"), "--model", str(tmp_path / "nowhere")])
    assert res.exit_code == EXIT_USAGE
    assert "nowhere" in res.output and "Traceback" not in res.output


def test_captrt_caption_in_a_subprocess(varied_model_dir, photo_dir, expected, tmp_path):
    """The installed entry point, end to end: a directory, a glob and a bad file, JSON lines, exit code 1
    for the failed image, one attention PNG per good image, no traceback."""
    import subprocess
    import sys

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    proc = subprocess.run([sys.executable, "-m", "captrt", "caption", str(photo_dir), str(photo_dir / "sub" / "*.png"),
                           str(bad), "--model",
                           str(varied_model_dir), "--beam", "3", "--json", "--threads", "1", "--attention",
                           str(tmp_path / "att")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    by_path = {r["image"]: r for r in rows}
    assert by_path[str(bad)]["error"] and "broken.jpg" in by_path[str(bad)]["error"]
    for path, cap in expected.items():
        assert by_path[path]["tokens"] == cap.tokens and by_path[path]["caption"] == cap.text
    assert len(list((tmp_path / "att").glob("*.png"))) == len(expected)
    assert "Traceback" not in proc.stderr


def test_captrt_caption_decoding_controls(varied_model_dir, photo_dir):
    """Decoding-control flags reach Captioner.caption; --json prints hypotheses and token scores;
    a bad value is one line naming the flag's field, exit 2."""
    from typer.testing import CliRunner

    from captrt.cli import app

    img = photo_dir / "img1.png"
    with Captioner.load(varied_model_dir, threads=1) as cap:
        word = cap.vocab.id2word[4]
        [want] = cap.caption(str(img), beam_size=3, num_hypotheses=2, return_scores=True, suppress=[word],
                             min_length=2, prefix=["a"] if "a" in cap.vocab.word2id else ())
    prefix = ["--prefix", "a"] if "a" in cap.vocab.word2id else []
    res = CliRunner().invoke(app, ["caption", str(img), "--model", str(varied_model_dir), "--beam", "3", "--json",
                                   "--threads", "1", "--num-hypotheses", "2", "--return-scores", "--suppress", word,
                                   "--min-length", "2", *prefix])
    assert res.exit_code == EXIT_OK, res.output
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert [h["tokens"] for h in row["hypotheses"]] == [h.tokens for h in want.hypotheses]
    assert row["token_scores"] == pytest.approx(want.token_scores)
    for args, needle in ((["--repetition-penalty", "0"], "repetition_penalty must be a finite number >= 0.001 and <= 1000"),
                         (["--suppress", "zebra"], "suppress: 'zebra' is not in the model's vocabulary"),
                         (["--sample"], "beam_size must be 1 with sample=True")):
        res = CliRunner().invoke(app, ["caption", str(img), "--model", str(varied_model_dir), "--threads", "1", *args])
        assert res.exit_code == EXIT_USAGE and needle in res.output, (args, res.output)
