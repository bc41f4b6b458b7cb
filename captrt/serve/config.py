"""ServeConfig: every knob of `captrt serve` in one dataclass, validated before anything loads."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from captrt.checks import check_int, int_or_auto, is_int

MIB = 1024 * 1024
# The service's default allow-list: what browsers and phones send. BMP/GIF stay out (huge or animated
# uploads for no caption gain); the library's own default (load_image) is wider.
SERVICE_FORMATS = ("JPEG", "PNG", "WEBP")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
RAW_CONTENT_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # one URL path segment, as clients quote none of it


@dataclass
class ServeConfig:
    """What `captrt serve` runs. Flags map one to one (``--max-batch`` -> max_batch)."""

    model: Path
    engine: str = "ort"
    device: str | None = None
    precision: str = "fp32"
    threads: int | None = None          # engine intra-op threads of each stream (None: the cores divided among them)
    streams: int | str = 1              # batches in flight at once over the one model ('auto': one per core)
    oversubscribe: bool = False         # allow streams x threads above the usable cores
    providers: str | None = None        # ONNX Runtime providers ('tensorrt' for its TensorRT EP)
    allow_unverified: bool = False      # serve a precision that has not met the quality budget here
    host: str = "127.0.0.1"             # loopback unless asked: a captioning model is not a public API by default
    port: int = 8000
    max_batch: int = 16                 # images per engine call
    max_wait_ms: float = 5.0            # how long the oldest waiting image may wait for company
    queue: int = 256                    # images waiting (not yet in the engine) before 503
    timeout_s: float = 30.0             # a request older than this gets 504
    api_key_env: str | None = None      # name of the environment variable holding the API key
    max_body_bytes: int = 20 * MIB
    max_images: int = 32                # images per request
    max_steps_cap: int | None = None    # None: the model's max_steps (captrt.json)
    max_image_pixels: int | None = None  # None: the runtime's default cap
    image_formats: tuple[str, ...] = field(default=SERVICE_FORMATS)
    decode_threads: int | None = None   # image decoding pool (None: usable cores)
    max_connections: int = 1024         # uvicorn's limit_concurrency
    max_connections_per_client: int = 64  # open connections from one IP address (0: no cap, e.g. behind a proxy)
    header_timeout: float = 10.0        # s to complete the request headers, from the connection or a request's first byte
    body_timeout: float = 10.0          # s the service waits for the next part of a request body (then 408)
    keep_alive_timeout: float = 5.0     # s an idle kept-alive connection stays open
    private_metrics: bool = False       # /metrics and /readyz need the API key too (/healthz never does)
    log_level: str = "info"
    access_log: bool = False            # one uvicorn line per request; off by default, as metrics cover counts
    ui: bool = True                     # the web page on GET / (--no-ui: API only)
    model_name: str | None = None       # the /v2 protocol's model name (None: the model directory's name)

    def validate(self) -> None:
        """Raise ValueError naming the flag for any value the service cannot run with."""
        for name in ("max_batch", "queue", "max_body_bytes", "max_images", "max_connections"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("threads", "max_steps_cap", "max_image_pixels", "decode_threads"):
            check_int(f"--{name.replace('_', '-')}", getattr(self, name), allow_none=True)
        int_or_auto("--streams", self.streams)
        from captrt.runtime.streams import StreamPlan

        try:  # S x T within the usable cores unless --oversubscribe
            StreamPlan.resolve(self.streams, self.threads, oversubscribe=self.oversubscribe)
        except ValueError as exc:
            flags = f"--streams {self.streams}" + (f" --threads {self.threads}" if self.threads is not None else "")
            raise ValueError(f"{flags}: {exc}") from None
        check_int("--max-connections-per-client", self.max_connections_per_client, low=0,
                  what="an integer >= 0 (0: no cap)")
        if not is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port!r}")
        for name in ("max_wait_ms", "timeout_s", "header_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name != "max_wait_ms" and value == 0):
                kind = "> 0" if name != "max_wait_ms" else ">= 0"
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {kind}, got {value!r}")
        if self.queue < self.max_images:  # else a full-size request could never be queued: 503 forever
            raise ValueError(f"--queue ({self.queue}) must be at least --max-images ({self.max_images})")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not self.image_formats:
            raise ValueError("image_formats must name at least one format")
        if self.api_key_env is not None:
            self.api_key()
        elif self.private_metrics:
            raise ValueError("--private-metrics needs --api-key-env (the key /metrics and /readyz then ask for)")
        if self.model_name is not None and not (isinstance(self.model_name, str) and MODEL_NAME.fullmatch(self.model_name)):
            raise ValueError(f"--model-name must be 1-128 letters, digits, '.', '_' or '-' (starting with a letter "
                             f"or digit), got {self.model_name!r}")

    def api_key(self) -> str | None:
        """The key from the environment variable named by --api-key-env (None when not configured).

        Surrounding whitespace is not part of the key: HTTP strips it from header values, and a key
        read from a file or a secret mount often ends with a newline. The service strips it here and
        from what clients send. A key with other characters a header cannot carry is refused.
        """
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ValueError(f"--api-key-env {self.api_key_env}: the environment variable is unset or empty")
        if not all(" " <= c <= "~" for c in key):
            raise ValueError(f"--api-key-env {self.api_key_env}: the key holds control or non-ASCII characters, "
                             "which an HTTP header cannot carry; use printable ASCII")
        return key

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0
