"""Paths that are not regular files (a FIFO, /dev/zero, a socket) are refused before they are read, by
the library, `captrt caption`, `captrt batch` and `captrt serve`'s model directory: one clear message,
never a hang. Every call that could hang runs in a thread under a timeout."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from captrt.files import NotRegularFileError, open_regular, read_regular
from captrt.runtime import InvalidImageError, ModelDir, ModelDirError
from captrt.runtime.preprocess import load_image
from tests.conftest import random_images

TIMEOUT_S = 20.0


def within(fn, timeout_s: float = TIMEOUT_S):
    """fn() in a thread; its result, its exception, or a failure if it has not returned in time."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"{fn} still running after {timeout_s} s (hung on a special file?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def release(fifo: Path) -> None:
    """Open the FIFO's write end once, so a reader wrongly blocked in open() returns (test cleanup)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader blocked: nothing to release


@pytest.fixture
def specials(tmp_path):
    """{kind: path} of a FIFO, a character device and a listening Unix socket, each named like an image."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.png"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    sock.listen(1)
    try:
        yield {"a FIFO": fifo, "a character device": Path("/dev/zero"), "a socket": sock_path}
    finally:
        release(fifo)
        sock.close()


def test_open_regular_refuses_all_but_regular_files(specials, tmp_path):
    for kind, path in specials.items():
        with pytest.raises(NotRegularFileError) as info:
            within(lambda p=path: open_regular(p))
        assert str(info.value) == f"{path}: not a regular file ({kind})" and info.value.kind == kind
    with pytest.raises(IsADirectoryError):
        open_regular(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_regular(tmp_path / "absent")
    (tmp_path / "plain").write_bytes(b"abc")
    os.symlink(tmp_path / "plain", tmp_path / "link")
    assert read_regular(tmp_path / "link") == b"abc" and read_regular(tmp_path / "plain", max_bytes=1) == b"ab"
    os.symlink(specials["a FIFO"], tmp_path / "link-to-fifo")
    with pytest.raises(NotRegularFileError):
        within(lambda: open_regular(tmp_path / "link-to-fifo"))


def test_load_image_names_the_special_file(specials):
    for kind, path in specials.items():
        with pytest.raises(InvalidImageError, match=f"not a regular file \\({kind}\\)"):
            within(lambda p=path: load_image(p))


def test_captrt_caption_refuses_special_files_and_captions_the_rest(varied_model_dir, specials, tmp_path):
    from captrt.cli.caption import EXIT_SOME_FAILED, caption_files

    good = tmp_path / "good.png"
    Image.fromarray(random_images(1, seed=5)[0]).save(good)
    inputs = [str(specials["a FIFO"]), "/dev/zero", str(specials["a socket"]), str(good)]
    out, err = io.StringIO(), io.StringIO()
    code = within(lambda: caption_files(inputs, varied_model_dir, beam=2, threads=1, out=out, err=err), 120)
    assert code == EXIT_SOME_FAILED, err.getvalue()  # some images failed; none hung
    assert err.getvalue().splitlines() == [f"captrt: {path}: not a regular file ({kind}), refused unread"
                                           for kind, path in zip(("a FIFO", "a character device", "a socket"), inputs)]
    assert out.getvalue().startswith(f"{good}\t") and out.getvalue().count("\n") == 1


def test_captrt_batch_rows_and_manifest(varied_model_dir, tmp_path):
    """A FIFO named like an image inside a source directory becomes an error row; a manifest that is a
    FIFO is refused in one line (BatchUsageError: the CLI's exit 2)."""
    from captrt.batch import EXIT_SOME_FAILED, BatchUsageError, run_batch

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(random_images(1, seed=6, size=64)[0]).save(src / "a.png")
    os.mkfifo(src / "b.jpg")
    os.mkfifo(tmp_path / "list.txt")
    opts = {"beam": 2, "threads": 1, "progress": False, "fmt": "jsonl"}
    try:
        result = within(lambda: run_batch([src], varied_model_dir, tmp_path / "out", **opts), 120)
        assert result.exit_code == EXIT_SOME_FAILED and (result.captioned, result.failed) == (1, 1)
        rows = [json.loads(line) for p in sorted((tmp_path / "out").glob("part-*.jsonl"))
                for line in p.read_text().splitlines()]
        assert rows[0]["error"] is None
        assert rows[1]["error"] == f"{src / 'b.jpg'}: not a regular file (a FIFO), refused unread"
        with pytest.raises(BatchUsageError) as info:
            within(lambda: run_batch([tmp_path / "list.txt"], varied_model_dir, tmp_path / "n", **opts), 60)
        assert str(info.value) == f"{tmp_path / 'list.txt'}: cannot open the manifest (not a regular file (a FIFO))"
        assert not (tmp_path / "n").exists()
    finally:
        release(src / "b.jpg")
        release(tmp_path / "list.txt")


@pytest.mark.parametrize("name", ["captrt.json", "vocab.json", "encoder.onnx"])
def test_model_directory_files_must_be_regular(varied_model_dir, tmp_path, name):
    model = tmp_path / "model"
    shutil.copytree(varied_model_dir, model)
    if name == "encoder.onnx":
        name = json.loads((model / "captrt.json").read_text())["graphs"]["fp32"]["encoder"]["file"]
    (model / name).unlink()
    os.mkfifo(model / name)
    try:
        with pytest.raises(ModelDirError, match="not a regular file"):
            within(lambda: ModelDir.load(model).read_graph("fp32", "encoder"))
    finally:
        release(model / name)


def test_captrt_serve_refuses_a_fifo_in_the_model_directory(varied_model_dir, tmp_path):
    from typer.testing import CliRunner

    from captrt.cli import app

    model = tmp_path / "model"
    shutil.copytree(varied_model_dir, model)
    (model / "vocab.json").unlink()
    os.mkfifo(model / "vocab.json")
    try:
        res = within(lambda: CliRunner().invoke(app, ["serve", "--model", str(model), "--port", "0"]), 60)
    finally:
        release(model / "vocab.json")
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output == f"captrt: error: {model / 'vocab.json'}: cannot read vocabulary: " \
                         f"{model / 'vocab.json'}: not a regular file (a FIFO)\n"
