"""Progress display for the long export steps: stderr lines plus progress bars (captrt.progress), or nothing."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    def __init__(self, enabled: bool = True, prefix: str = "captrt export"):
        self.enabled = enabled
        self.prefix = prefix
        self.t0 = time.perf_counter()

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[{self.prefix} {time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, message: str) -> Iterator[None]:
        """Announce a step and, when it ends, how long it took."""
        start = time.perf_counter()
        self.say(f"{message} ...")
        yield
        self.say(f"{message}: done in {time.perf_counter() - start:.1f}s")

    @contextmanager
    def bar(self, total: int, desc: str) -> Iterator[Callable[[], None]]:
        """Yield a tick(n=1) callable advancing a progress display of `total` items: a bar on a terminal,
        periodic plain lines in logs (captrt.progress); a no-op when disabled."""
        if not self.enabled:
            yield lambda n=1: None
            return
        from captrt.progress import Progress as Display

        display = Display(total, label=f"{self.prefix}: {desc}", unit="images", stream=sys.stderr)
        try:
            yield display.update
        finally:
            display.close()
