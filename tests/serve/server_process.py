"""The real service for the tests: captrt.bench.serve_process.ServeProcess as a context manager, plus
what only the tests read about the process (RSS, open file descriptors)."""

from __future__ import annotations

import os
from pathlib import Path

from captrt.bench.serve_process import ServeProcess, free_port, metric_value

__all__ = ["ServerProcess", "free_port", "metric"]


class ServerProcess(ServeProcess):
    """`with ServerProcess(model_dir, "--max-batch", "4", log=path) as srv: httpx.get(srv.url + "/healthz")`.

    Waits for /readyz on entry; on exit sends SIGTERM and waits (bounded), killing the process only if
    it does not stop by itself. Engine threads are pinned to 2 and logs to warnings."""

    def __init__(self, model_dir: Path, *args: str, log: Path, env: dict[str, str] | None = None):
        super().__init__(model_dir, "--threads", "2", "--log-level", "warning", *args, log=log, env=env)

    def __enter__(self) -> "ServerProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss_bytes(self) -> int:
        """Resident set size of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0.0 when absent (a counter not yet incremented)."""
    value = metric_value(text, name, **labels)
    return 0.0 if value is None else value
