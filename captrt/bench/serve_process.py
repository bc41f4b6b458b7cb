"""A real `captrt serve` in a subprocess on a free loopback port: for the service bench and its tests.

    srv = ServeProcess(model_dir, "--max-batch", "16", log=Path("server.log"))
    srv.wait_ready()                      # polls /readyz; ServeProcessError with the log's tail if it dies
    httpx.post(srv.url + "/v1/captions", ...)
    code = srv.stop()                     # SIGTERM, bounded wait (killed after it: srv.killed)

stdout and stderr go to a log file, never a pipe (a pipe nobody reads fills up and stalls the server).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


class ServeProcessError(RuntimeError):
    """The server failed to start, died, or did not answer; the message carries its log's tail."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly `labels` in Prometheus text (prometheus_client's
    parser); None when absent or when `text` is not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
    except ValueError:
        return None
    return None


class ServeProcess:
    """`python -m captrt serve --model MODEL --host 127.0.0.1 --port <free> *args`, started at once."""

    def __init__(self, model: Path, *args: str, log: Path, env: dict[str, str] | None = None, name: str = "server"):
        self.name = name
        self.port = free_port()
        self.log = Path(log)
        self.cmd = [sys.executable, "-m", "captrt", "serve", "--model", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.exit_code: int | None = None
        self.killed = False
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def fail(self, what: str, lines: int = 20) -> ServeProcessError:
        """A ServeProcessError naming this server, with the last `lines` of its log."""
        code = "" if self.alive() else f" (exit code {self.proc.returncode})"
        tail = "\n".join("    " + line for line in self.log_text().rstrip().splitlines()[-lines:]) or "    (empty)"
        return ServeProcessError(f"server '{self.name}' (port {self.port}){code}: {what}; its log ends with:\n{tail}")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll /readyz until 200; returns the seconds waited."""
        import httpx

        started = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() - started < timeout_s:
                if not self.alive():
                    raise self.fail("exited before it was ready")
                try:
                    if client.get(self.url + "/readyz").status_code == 200:
                        return time.monotonic() - started
                except httpx.TransportError:
                    pass  # not listening yet
                time.sleep(0.1)
        raise self.fail(f"not ready after {timeout_s:g} s")

    def terminate(self) -> None:
        """SIGTERM: the server stops accepting, drains what is in flight and exits."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the exit; kill the process after timeout_s (then self.killed). Returns the exit code."""
        try:
            self.exit_code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.killed = True
            self.proc.kill()
            self.exit_code = self.proc.wait()
        return self.exit_code

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        self.terminate()
        return self.wait_exit(timeout_s)
