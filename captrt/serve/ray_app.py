"""The service on Ray Serve: the same FastAPI app as `captrt serve`, one copy per replica.

    from captrt.serve import ServeConfig, ray_app
    from ray import serve
    app = ray_app(ServeConfig(model=Path("/models/coco"), max_batch=16), replicas=2, replica_cpus=4)
    serve.run(app, name="captrt", route_prefix="/")         # or `serve run` / a Serve config file (build)

Each replica builds `create_app(config)` when it starts (`@serve.ingress` with the app bound at replica
init), so it loads and warms its own Captioner and runs its own batcher, with every limit of the
config. A replica's CPUs are its Captioner's streams x threads, passed to the engine explicitly:
ONNX Runtime sizes its pools from the host's cores, not from the OMP_NUM_THREADS Ray sets.

Serve calls a replica's `check_health` once at the end of its start-up, before routing anything to it:
that call waits for the model to load and warm, so a loading replica is never routed to. Later calls
(every few seconds) ask the app's own /readyz in-process; anything but 200 (the model failed to
load) fails the check and Serve replaces the replica. A replica whose process dies is replaced too.

Ray is imported inside the functions: importing this module (captrt.serve does) stays cheap.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from captrt.checks import check_int, int_or_auto
from captrt.serve.config import ServeConfig

APP_NAME = "captrt"            # the Serve application and deployment name
# Time a stopping replica gives its in-flight requests beyond --timeout-s (as `captrt serve` does on SIGTERM).
DRAIN_MARGIN_S = 5.0
RAY_EXTRA = "pip install 'captrt[ray]' (it brings ray[serve])"


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas, and what each one reserves and runs: cpus = streams x threads (unless
    oversubscribed). replicas None: Serve's autoscaling between min_replicas and max_replicas."""

    replicas: int | None
    min_replicas: int
    max_replicas: int
    cpus: int
    streams: int
    threads: int
    gpus: int = 0

    def describe(self) -> str:
        count = f"{self.replicas}" if self.replicas is not None else f"{self.min_replicas}..{self.max_replicas} (auto)"
        gpu = f" + {self.gpus} GPU" if self.gpus else ""
        return (f"{count} replica{'s' if self.replicas != 1 else ''} x {self.cpus} CPU{'s' if self.cpus > 1 else ''}"
                f"{gpu} ({self.streams} stream{'s' if self.streams > 1 else ''} x {self.threads} "
                f"thread{'s' if self.threads > 1 else ''})")


def parse_replicas(value: str | int) -> int | str:
    """--replicas: a positive integer or 'auto' (ValueError naming the flag otherwise)."""
    return int_or_auto("--replicas", value, text=True)


def _fitting(nodes: Sequence[float], cpus: int) -> int:
    """Replicas of `cpus` CPUs each that the nodes can hold (a replica lives on one node)."""
    return sum(int(n // cpus) for n in nodes)


def check_replica_flags(replicas: int | str = 1, min_replicas: int | None = None, max_replicas: int | None = None,
                        replica_cpus: int | None = None) -> tuple[int | str, int, int | None]:
    """The flags' own rules, whatever the cluster: -> (replicas or 'auto', minimum, maximum or None)."""
    replicas = parse_replicas(replicas)
    if replica_cpus is not None:
        check_int("--replica-cpus", replica_cpus)
    if replicas != "auto":
        for flag, value in (("--min-replicas", min_replicas), ("--max-replicas", max_replicas)):
            if value is not None:
                raise ValueError(f"{flag} applies to --replicas auto only (got --replicas {replicas})")
        return replicas, replicas, replicas
    low = 1 if min_replicas is None else check_int("--min-replicas", min_replicas)
    high = check_int("--max-replicas", max_replicas, allow_none=True)
    if high is not None and high < low:
        raise ValueError(f"--max-replicas ({high}) must be at least --min-replicas ({low})")
    return replicas, low, high


def plan_replicas(config: ServeConfig, replicas: int | str = 1, *, min_replicas: int | None = None,
                  max_replicas: int | None = None, replica_cpus: int | None = None,
                  nodes: Sequence[float] | None = None, gpus: float | None = None) -> ReplicaPlan:
    """Check the replica flags and size each replica; ValueError naming the flag for a bad value.

    nodes: the CPUs of each node of the cluster (None: unknown, e.g. a KubeRay cluster that adds
    nodes on demand; then the default replica size is this machine's usable cores // replicas and
    nothing is checked against the cluster). With nodes, replica_cpus defaults to the most CPUs each
    replica can get with all of them placed (the usable cores // replicas on one machine), and a fixed
    count (or the autoscaling minimum) that cannot be placed is refused: Ray would wait forever.
    gpus: the cluster's GPUs, checked for CUDA engines (one GPU per replica)."""
    from captrt.runtime.streams import usable_cores

    replicas, low, high = check_replica_flags(replicas, min_replicas, max_replicas, replica_cpus)
    room = list(nodes) if nodes is not None else [float(usable_cores())]
    if replica_cpus is not None:
        cpus = replica_cpus
    else:  # the largest size at which every wanted replica still has a place
        want = high if high is not None else low
        cpus = max([c for c in range(1, int(max(room)) + 1) if _fitting(room, c) >= want] or [1])
    if high is None:  # auto without a maximum: as many as the cluster holds (at least the minimum)
        high = max(low, _fitting(room, cpus))
    if nodes is not None and _fitting(room, cpus) < low:
        sizes = ", ".join(f"{n:g}" for n in room)
        raise ValueError(f"--replicas {low if replicas != 'auto' else f'auto --min-replicas {low}'} x "
                         f"--replica-cpus {cpus} does not fit the Ray cluster (nodes with {sizes} CPUs; "
                         f"a replica lives on one node): lower --replicas or --replica-cpus")
    streams, threads = _streams_threads(config, cpus)
    need_gpu = (config.device or ("cuda" if config.engine == "trt" else "cpu")) == "cuda"
    if need_gpu and gpus is not None and gpus < low:
        raise ValueError(f"{low} replicas of a CUDA engine need {low} GPUs (one each); the Ray cluster has {gpus:g}")
    return ReplicaPlan(replicas if replicas != "auto" else None, low, high, cpus, streams, threads,
                       1 if need_gpu else 0)


def _streams_threads(config: ServeConfig, cpus: int) -> tuple[int, int]:
    """(S, T) of each replica's Captioner from --streams/--threads within its CPUs."""
    if config.streams == "auto":
        threads = config.threads or 1
        streams = max(1, cpus // threads)
    else:
        streams = check_int("--streams", config.streams)
        threads = config.threads or max(1, cpus // streams)
    check_int("--threads", config.threads, allow_none=True)
    if streams * threads > cpus and not config.oversubscribe:
        raise ValueError(f"--streams {config.streams} x --threads {threads} = {streams * threads} exceeds the "
                         f"{cpus} CPUs of a replica (--replica-cpus); use fewer, or --oversubscribe")
    return streams, threads


def replica_config(config: ServeConfig, plan: ReplicaPlan) -> ServeConfig:
    """What one replica runs: the plan's streams x threads; the cores are Ray's to count (its node may
    have more than this machine), so the replica does not check them against its own host again."""
    return replace(config, streams=plan.streams, threads=plan.threads, oversubscribe=True,
                   decode_threads=config.decode_threads or plan.cpus)


class CaptionReplica:
    """One Serve replica: its own `create_app` (Captioner, batcher, metrics). The ingress decorator is
    applied by `ray_app`, so that importing this module needs no Ray."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.service: Any = None
        logging.getLogger("captrt.serve").setLevel(config.log_level.upper())

    def __serve_build_asgi_app__(self) -> Any:
        from captrt.serve.app import create_app

        self.service = create_app(self.config)
        return self.service

    async def check_health(self) -> None:
        """Serve's health check: the app's readiness. The first call (the end of start-up) waits for
        the model to load and warm; later ones raise at once when /readyz is not 200."""
        state = self.service.state.captrt
        while not state.ready and state.load_error is None:
            await asyncio.sleep(0.05)
        status, body = await asgi_get(self.service, "/readyz")
        if status != 200:
            raise RuntimeError(f"captrt replica not ready: GET /readyz answered {status}: {body.decode(errors='replace')}")


async def asgi_get(app: Any, path: str) -> tuple[int, bytes]:
    """GET `path` from an ASGI app in this process (no socket): (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    requested = False
    status, body = 500, bytearray()

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(body)


def ray_app(config: ServeConfig, *, replicas: int | str = 1, min_replicas: int | None = None,
            max_replicas: int | None = None, replica_cpus: int | None = None,
            nodes: Sequence[float] | None = None, autoscaling: Mapping[str, Any] | None = None,
            max_ongoing_requests: int | None = None) -> Any:
    """The Serve application (`Deployment.bind()`) serving `config` on `replicas` replicas.

    replicas: a count, or 'auto' for Serve's autoscaling on ongoing requests between min_replicas
    (default 1) and max_replicas; replica_cpus: each replica's num_cpus and its Captioner's
    streams x threads; nodes: the cluster's CPUs per node, to check the replicas fit (plan_replicas).
    autoscaling: Serve autoscaling_config keys that override ours (e.g. upscale_delay_s).
    max_ongoing_requests: requests a replica holds at once (default (streams + 1) x max_batch, so S
    batches run while the next fills; never below max_batch, or batches could never fill).
    Raises ValueError for a bad value, ImportError naming the extra when Ray Serve is missing."""
    plan = plan_replicas(config, replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                         replica_cpus=replica_cpus, nodes=nodes)
    per_replica = replica_config(config, plan)
    per_replica.validate()
    ongoing = max_ongoing_requests if max_ongoing_requests is not None else (plan.streams + 1) * config.max_batch
    if check_int("max_ongoing_requests", ongoing) < config.max_batch:
        raise ValueError(f"max_ongoing_requests ({ongoing}) must be at least --max-batch ({config.max_batch})")
    serve = import_serve()
    options: dict[str, Any] = {
        "name": APP_NAME, "max_ongoing_requests": ongoing,
        "ray_actor_options": {"num_cpus": plan.cpus, **({"num_gpus": plan.gpus} if plan.gpus else {})},
        "graceful_shutdown_timeout_s": config.timeout_s + DRAIN_MARGIN_S,
    }
    if plan.replicas is not None:
        options["num_replicas"] = plan.replicas
    else:
        # Busy means a full batch waiting per replica on average: fewer and the batcher is starved by
        # the split, more and requests queue behind full batches.
        options["autoscaling_config"] = {"min_replicas": plan.min_replicas, "max_replicas": plan.max_replicas,
                                         "initial_replicas": plan.min_replicas,
                                         "target_ongoing_requests": config.max_batch, **dict(autoscaling or {})}
    deployment = serve.deployment(**options)(serve.ingress()(CaptionReplica))
    return deployment.bind(per_replica)


def import_serve() -> Any:
    """ray.serve, or ImportError saying which extra to install."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Serve ({exc}): {RAY_EXTRA}") from None
    return serve


# Keys of the builder's args that are not ServeConfig fields.
PLAN_ARGS = ("replicas", "min_replicas", "max_replicas", "replica_cpus", "max_ongoing_requests")


def build(args: dict) -> Any:
    """Serve application builder, for `serve run captrt.serve.ray_app:build model=/models/coco` and the
    `import_path` of a Serve config file (KubeRay's RayService): `args` holds ServeConfig fields
    (model, max_batch, ...) plus replicas, min_replicas, max_replicas, replica_cpus,
    max_ongoing_requests and autoscaling (a dict of Serve autoscaling_config keys)."""
    config, options = from_args(args)
    return ray_app(config, **options)


def from_args(args: Mapping[str, Any]) -> tuple[ServeConfig, dict[str, Any]]:
    """A builder's args -> (ServeConfig, ray_app's keyword arguments). Values may be strings, as
    `serve run ... key=value` gives them; ValueError names an unknown or malformed argument."""
    args = dict(args)
    unknown = sorted(set(args) - {f.name for f in fields(ServeConfig)} - set(PLAN_ARGS) - {"autoscaling"})
    if unknown:
        raise ValueError(f"unknown captrt argument(s): {', '.join(unknown)}")
    if "model" not in args:
        raise ValueError("captrt needs the model argument (a `captrt export` model directory)")
    options: dict[str, Any] = {k: _plain(args.pop(k)) for k in PLAN_ARGS if args.get(k) is not None}
    if args.get("autoscaling") is not None:
        options["autoscaling"] = dict(args.pop("autoscaling"))
    args.pop("autoscaling", None)
    return ServeConfig(**{k: _as_field(k, v) for k, v in args.items()}), options


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().lstrip("-").isdigit() else value


def _as_field(name: str, value: Any) -> Any:
    """A builder argument as the ServeConfig field's type (command-line args are strings)."""
    default = {f.name: f.default for f in fields(ServeConfig)}.get(name)
    if name == "model":
        return Path(value)
    if name == "image_formats":
        return tuple(value.split(",")) if isinstance(value, str) else tuple(value)
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, int) or name in ("threads", "max_steps_cap", "max_image_pixels", "decode_threads",
                                            "streams"):
        return _plain(value)
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    return value
