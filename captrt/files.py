"""Opening files that must be regular files.

A FIFO's open() waits for a writer and its reads wait for data, /dev/zero never ends, a socket cannot
be opened at all: a tool that opens whatever path it is given can hang forever or read without end.
Every path the tools read as data (images, model files, manifests) goes through open_regular, which
looks at the path before opening it and again at what was opened (the path may have been swapped in
between), so anything but a regular file is refused without reading a byte.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFileError(OSError):
    """The path names a FIFO, a device or a socket. str(): '<path>: not a regular file (<kind>)'."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(errno.EINVAL, f"not a regular file ({kind})", os.fspath(path))
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def kind_of(mode: int) -> str:
    """What a st_mode is, in words ('a regular file', 'a FIFO', 'a character device', ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _check(path: str | os.PathLike, mode: int) -> None:
    if stat.S_ISDIR(mode):  # the errno callers already turn into "is a directory"
        raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(path, kind_of(mode))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symbolic links followed).

    Raises FileNotFoundError / PermissionError as open() does, IsADirectoryError for a directory and
    NotRegularFileError for anything else, in every case before reading anything.
    """
    _check(path, os.stat(path).st_mode)  # before open(): opening a FIFO blocks until a writer comes
    # O_NONBLOCK: should the path have become a FIFO since the check, open() returns at once
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _check(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (at most max_bytes + 1 of them when max_bytes is given)."""
    with open_regular(path) as f:
        return f.read() if max_bytes is None else f.read(max_bytes + 1)
