"""Progress display for long jobs: a bar on a terminal, plain periodic lines when not a terminal.

    progress = Progress(total=5000, label="captrt batch")
    progress.update(16)     # after each batch
    progress.close()

On a terminal: one line redrawn with a carriage return (at most 5 times a second) with a bar, count,
images/s and ETA. Otherwise (a log file, a pipe, CI): one plain line every `interval_s` seconds
(default 30) and none in between, so logs never fill with carriage-return bars. The project rule
"bar on a terminal, periodic lines otherwise" lives here, for every progress display of captrt
(batch, caption, export, prepare, train, eval): torch-free and dependency-free.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

BAR_WIDTH = 24
TTY_REFRESH_S = 0.2


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h01m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts items done out of `total` (None: unknown) and shows it on `stream` (default stderr).

    tty: None decides from stream.isatty(); True forces the bar, False the plain lines.
    enabled: False shows nothing (counting still works). interval_s: seconds between plain lines.
    """

    def __init__(self, total: int | None, *, label: str = "captrt", unit: str = "images", stream: TextIO | None = None,
                 tty: bool | None = None, enabled: bool = True, interval_s: float = 30.0):
        self.total, self.label, self.unit = total, label, unit
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty()) if tty is None else tty
        self.enabled, self.interval_s = enabled, interval_s
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self._drawn = False

    def restart(self) -> None:
        """Start the clock (rate, ETA) now: e.g. once a cluster and its workers are up."""
        self.start = self._last = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float:
        """Items per second since the start."""
        return self.done / max(self.elapsed, 1e-9)

    def text(self) -> str:
        """The status line without decoration: 'captrt batch: 1200/5000 images (24%), 30.1 images/s, ETA 2m06s'."""
        rate = self.rate
        if self.total:
            share = f" ({100 * self.done / self.total:.0f}%)"
            eta = f", ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 and self.done else ""
            count = f"{self.done}/{self.total}"
        else:
            share, eta, count = "", "", f"{self.done}"
        return f"{self.label}: {count} {self.unit}{share}, {rate:.1f} {self.unit}/s{eta}"

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self.tty and (now - self._last >= TTY_REFRESH_S or finished):
            self._draw_bar()
            self._last = now
        elif not self.tty and now - self._last >= self.interval_s:
            self.stream.write(self.text() + "\n")
            self.stream.flush()
            self._last = now

    def _draw_bar(self) -> None:
        if self.total:
            filled = min(BAR_WIDTH, BAR_WIDTH * self.done // self.total)
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
        else:
            bar = ""
        self.stream.write("\r" + bar + self.text() + "\x1b[K")  # \x1b[K clears what a longer line left
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line (terminal); nothing else: the caller prints its own summary."""
        if self.enabled and self.tty and self._drawn:
            self._draw_bar()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def track(items: Iterable[T], total: int | None = None, *, label: str = "captrt", unit: str = "items",
          enabled: bool = True, stream: TextIO | None = None) -> Iterator[T]:
    """Iterate `items`, showing progress as Progress does (a bar on a terminal, periodic lines in logs)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    progress = Progress(total, label=label, unit=unit, enabled=enabled, stream=stream)
    try:
        for item in items:
            yield item
            progress.update(1)
    finally:
        progress.close()
