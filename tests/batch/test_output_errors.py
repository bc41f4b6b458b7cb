"""`captrt batch -o OUT` where OUT cannot be written: one line naming the path, exit 2, no traceback,
nothing half-written; also `--resume` of a finished run, which must remove `_SUCCESS` first.

The tests run as root, which ignores permission bits, so `chmod` cannot make a directory unwritable.
Instead: a real read-only file system (a read-only bind mount in a private mount namespace made with
`unshare`, when this machine allows it), /sys (a kernel file system where even root cannot create a
directory), a regular file where OUT's parent directory should be, and a `_SUCCESS` that is a directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from captrt.batch import run_batch
from captrt.batch.shards import SUCCESS
from captrt.cli import app
from tests.batch.conftest import write_images

ROOT = Path(__file__).resolve().parents[2]
ARGS = ("--beam", "2", "--threads", "1", "--format", "jsonl")


@pytest.fixture(scope="module")
def finished(batch_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(source folder of 3 images, the complete output of a run over it)."""
    root = tmp_path_factory.mktemp("out_errors")
    write_images(root / "in", 3, seed=4)
    run_batch([root / "in"], batch_model_dir, root / "done", beam=2, threads=1, fmt="jsonl", progress=False)
    assert (root / "done" / SUCCESS).is_file()
    return root / "in", root / "done"


def one_line(res, path: Path, reason: str) -> None:
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output, res.output
    assert res.output.startswith(f"captrt: error: {path}: cannot ") and f"({reason})" in res.output, res.output


def test_unwritable_outputs_are_one_line(batch_model_dir, finished, tmp_path):
    src, done = finished
    runner = CliRunner()

    def batch(*args: str):
        return runner.invoke(app, ["batch", str(src), "--model", str(batch_model_dir), *ARGS, *args])

    one_line(batch("-o", "/sys/captrt-batch-out"), Path("/sys/captrt-batch-out"), "Operation not permitted")
    (tmp_path / "file").write_text("x")
    one_line(batch("-o", str(tmp_path / "file" / "out")), tmp_path / "file" / "out", "Not a directory")
    resumed = tmp_path / "resumed"
    shutil.copytree(done, resumed)
    (resumed / SUCCESS).unlink()
    (resumed / SUCCESS).mkdir()  # cannot be removed by unlink, as on a read-only file system
    (resumed / SUCCESS / "x").write_text("x")
    one_line(batch("-o", str(resumed), "--resume"), resumed / SUCCESS, "Is a directory")
    assert not list(resumed.glob(".*.tmp"))


def _readonly_mount_works(probe: Path) -> bool:
    """True when `unshare` can give a command a private read-only bind mount here (root, a kernel and
    a container that allow mount namespaces)."""
    if shutil.which("unshare") is None:
        return False
    probe.mkdir()
    proc = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" '
                           '&& ! touch "$0/x" 2>/dev/null', str(probe)], capture_output=True, timeout=30)
    return proc.returncode == 0 and not (probe / "x").exists()


def on_readonly(directory: Path, *cmd: str) -> subprocess.CompletedProcess:
    """Run cmd with `directory` mounted read-only (only for that process: a private mount namespace)."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(directory), "--", *cmd], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def test_read_only_file_system(batch_model_dir, finished, tmp_path):
    if not _readonly_mount_works(tmp_path / "probe"):
        pytest.skip("this machine does not allow a read-only bind mount in a mount namespace (unshare -m)")
    src, done = finished
    ro = tmp_path / "ro"
    shutil.copytree(done, ro / "done")
    cli = [sys.executable, "-m", "captrt", "batch", str(src), "--model", str(batch_model_dir), *ARGS]
    for out, extra, culprit in ((ro / "new", (), ro / "new"), (ro / "done", ("--resume",), ro / "done" / SUCCESS)):
        proc = on_readonly(ro, *cli, "-o", str(out), *extra)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"captrt: error: {culprit}: cannot ") and "(Read-only file system)" in proc.stderr
    assert (ro / "done" / SUCCESS).is_file() and not (ro / "new").exists()
