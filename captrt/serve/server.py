"""`captrt serve`: run the service under uvicorn until SIGTERM/SIGINT, then drain and exit 0.

Exit codes: 0 after a signal-initiated shutdown (in-flight requests finished first), 1 when the model
failed to load, 2 for a bad configuration or an address that cannot be bound (raised as
ValueError/ModelDirError before the model loads).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import Any

from captrt.serve.config import ServeConfig

EXIT_OK, EXIT_LOAD_FAILED = 0, 1
# How long in-flight requests get after SIGTERM beyond the request timeout itself: no request can
# legitimately outlive --timeout-s, so a drain longer than this is a bug and is cut.
DRAIN_MARGIN_S = 5.0


def serve(config: ServeConfig) -> int:
    """Validate, bind, load in the background, serve until a signal; returns the exit code."""
    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from captrt.runtime import ModelDir
    from captrt.serve.app import create_app
    from captrt.serve.connections import ConnectionLimits

    config.validate()
    # A wrong path or a precision the directory lacks fails here, in one line, before anything binds.
    model = ModelDir.load(config.model)
    if config.precision != "auto":  # auto chooses among what the directory has, at load
        model.require_precision(config.precision)
    configure_logging(config.log_level)
    failure: list[str] = []
    server: Any = None

    def on_fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    sock = bind_socket(config.host, config.port)  # before the app loads anything: a busy port fails fast
    app = create_app(config, on_fatal=on_fatal)
    # uvicorn has no header timeout and no per-address cap: ConnectionLimits adds both around its own
    # HTTP protocol (captrt/serve/connections.py). No WebSocket routes: upgrades are not taken.
    closed = app.state.captrt.metrics.connections_closed
    limits = ConnectionLimits(config.header_timeout, config.max_connections_per_client,
                              on_close=lambda reason: closed.labels(reason).inc())
    uv_config = uvicorn.Config(limits.track_requests(app), host=config.host, port=config.port,
                               log_level=config.log_level, access_log=config.access_log,
                               limit_concurrency=config.max_connections, http=limits.protocol(AutoHTTPProtocol),
                               ws="none", timeout_keep_alive=config.keep_alive_timeout,
                               timeout_graceful_shutdown=int(config.timeout_s + DRAIN_MARGIN_S) + 1,
                               server_header=False)
    server = uvicorn.Server(uv_config)
    # uvicorn re-raises the signal it caught once it has shut down gracefully, which would end the
    # process with -SIGTERM; a no-op handler installed here is what it restores and re-invokes,
    # so a drained shutdown exits 0 as process managers expect.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    logging.getLogger("captrt.serve").info("captrt serve: listening on http://%s:%d", host, port)
    server.run(sockets=[sock])
    if failure:
        print(f"captrt serve: error: model failed to load: {failure[0]}", file=sys.stderr)
        return EXIT_LOAD_FAILED
    return EXIT_OK


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); ValueError naming both if it
    cannot be bound (address in use, not an address of this machine, privileged port)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ValueError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def configure_logging(level: str) -> None:
    """captrt.serve's log lines on stderr at `level` (once per process)."""
    logger = logging.getLogger("captrt.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
