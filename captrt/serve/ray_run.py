"""`captrt serve --ray`: deploy the service on Ray Serve, serve until SIGTERM/SIGINT, then take it down.

    code = serve_on_ray(ServeConfig(model=Path("model_dir")), "local", replicas=2)

address 'local' starts a Ray instance on this machine (its CPUs: the usable cores) and shuts it down
on exit, leaving no Ray process behind; 'auto', HOST:PORT or ray://HOST:PORT joins a running cluster
and, on exit, deletes only this application (the cluster and its Serve stay up for others).

Exit codes as `captrt serve`: 0 after a signal, 1 when the deployment failed (a replica could not
load the model), 2 for a bad value (ValueError/ModelDirError raised before anything is deployed).
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any

from captrt.serve.config import ServeConfig
from captrt.serve.ray_app import (APP_NAME, check_replica_flags, import_serve, plan_replicas, ray_app,
                                  replica_config)

EXIT_OK, EXIT_DEPLOY_FAILED = 0, 1
log = logging.getLogger("captrt.serve")


class _Stop(Exception):
    """A signal arrived while the deployment was starting: stop waiting for it."""


def serve_on_ray(config: ServeConfig, address: str = "local", *, replicas: int | str = 1,
                 min_replicas: int | None = None, max_replicas: int | None = None,
                 replica_cpus: int | None = None) -> int:
    """Deploy `config` as a Serve application on `replicas` replicas (captrt.serve.ray_app), listening on
    config.host:config.port on every node; blocks until SIGTERM/SIGINT. Returns the exit code."""
    from captrt.runtime import ModelDir
    from captrt.runtime.streams import usable_cores
    from captrt.serve.server import bind_socket

    flags = {"replicas": replicas, "min_replicas": min_replicas, "max_replicas": max_replicas,
             "replica_cpus": replica_cpus}
    local = address == "local"
    # Everything that can be checked here is, before Ray starts: a bad value costs no cluster. A local
    # Ray's one node is this machine; a joined cluster's nodes are known once joined.
    if local:
        replica_config(config, plan_replicas(config, nodes=[usable_cores()], **flags)).validate()
    else:
        check_replica_flags(**flags)
    ModelDir.load(config.model).require_precision(config.precision)
    if config.port == 0:
        raise ValueError("--port 0 cannot be used with --ray: Serve's proxies listen on one fixed port on every node")
    try:
        serve = import_serve()
        import ray
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    if local:  # the proxy will bind this address: a busy port fails now, in one line
        bind_socket(config.host, config.port).close()
    _configure_logging(config.log_level)

    stopping = threading.Event()
    starting = [True]

    def on_signal(signum: int, frame: Any) -> None:
        stopping.set()
        if starting[0]:
            raise _Stop()

    temp_dir, owner = _connect(ray, address)
    deployed = False
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}  # after ray.init's own
    try:
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        gpus = ray.cluster_resources().get("GPU", 0.0)
        plan = plan_replicas(config, nodes=nodes, gpus=gpus, **flags)
        # A cluster whose Serve already runs keeps its HTTP options (Serve says so): say where we listen.
        where = ("on the cluster's running Serve proxies (their own host and port)" if serve.status().proxies
                 else f"on http://{config.host}:{config.port}")
        serve.start(http_options={"host": config.host, "port": config.port})
        deployed = True
        try:
            serve.run(ray_app(config, nodes=nodes, **flags), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            print(f"captrt serve: error: the Ray Serve deployment failed: {_why(serve, exc)}", file=sys.stderr)
            return EXIT_DEPLOY_FAILED
        starting[0] = False
        log.info("captrt serve: listening %s (Ray Serve, %s)", where, plan.describe())
        while not stopping.wait(1.0):
            pass
        return EXIT_OK
    except _Stop:
        return EXIT_OK
    finally:
        starting[0] = False
        _take_down(ray, serve, owner, deployed)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _connect(ray: Any, address: str) -> tuple[str | None, str | None]:
    """-> (the temp dir of a Ray started here, or None; 'local' when Ray was started here, 'joined'
    when this call joined a cluster, None when this process already held Ray)."""
    from captrt.runtime.streams import usable_cores

    if ray.is_initialized():  # a caller that already holds Ray (tests, notebooks): use it, leave it
        return None, None
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if address == "local":
        # Short socket paths: Ray's Unix sockets live under its temp dir (107-byte limit).
        temp_dir = tempfile.mkdtemp(prefix="captrt-ray-", dir="/tmp")
        # address='local': a new instance even when another Ray runs on this machine.
        ray.init(address="local", num_cpus=usable_cores(), _temp_dir=temp_dir, **options)
        return temp_dir, "local"
    try:
        ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"--ray {address}: cannot join the cluster ({exc})") from None
    return None, "joined"


def _take_down(ray: Any, serve: Any, owner: str | None, deployed: bool) -> None:
    """Drain and remove the deployment. A Ray started here goes with all of its processes (Serve's
    controller and proxies included); on a joined cluster only this application is deleted."""
    if not ray.is_initialized():
        return
    try:
        if owner == "local":
            serve.shutdown()
        elif deployed:
            serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - Ray going away first is not a reason to leave it running
        log.warning("captrt serve: removing the deployment: %s", exc)
    if owner is not None:
        ray.shutdown()


def _why(serve: Any, exc: Exception) -> str:
    """The deployment's own message (a replica's error) when Serve has one, else the exception's."""
    try:
        app = serve.status().applications.get(APP_NAME)
        messages = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # noqa: BLE001 - the status is a nicety on the way out
        messages = []
    lines = [line.strip() for m in messages for line in m.splitlines() if line.strip()]
    return lines[-1] if lines else str(exc).splitlines()[0]


def _configure_logging(level: str) -> None:
    from captrt.serve.server import configure_logging

    configure_logging(level)
    # Serve's own INFO lines ("connecting to existing Serve app ...") say nothing to a `captrt serve` user.
    logging.getLogger("ray.serve").setLevel(logging.DEBUG if level.lower() in ("debug", "trace") else logging.WARNING)

