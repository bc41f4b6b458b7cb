"""Atomic writes: results carry the umask's permissions, failures leave nothing behind."""

from __future__ import annotations

import os

import pytest

from captrt.atomic import atomic_directory, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_file_and_directory_modes_follow_the_umask(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    with atomic_directory(tmp_path / "model") as d:
        (d / "f").write_text("y")
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def test_failed_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "model") as d:
            (d / "half").write_text("y")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_complete(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old").write_text("1")
    with pytest.raises(FileExistsError, match="model"):
        with atomic_directory(tmp_path / "model"):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "model", overwrite=True):
            raise RuntimeError("boom")
    assert (tmp_path / "model" / "old").read_text() == "1"
    with atomic_directory(tmp_path / "model", overwrite=True) as d:
        (d / "new").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new"]
