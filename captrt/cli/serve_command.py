"""`captrt serve`: the HTTP service, on this machine or on Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captrt.cli.app import RayOptionCommand, app, fail, streams_flag


_RS = "Ray Serve (docs/ray-serve.md)"
_SL = "Security and limits (docs/security.md)"


@app.command(cls=RayOptionCommand)
def serve(model: Path = typer.Option(..., "--model", help="a `captrt export` model directory"),
          engine: str = typer.Option("ort", "--engine", help="ort | openvino | trt | torch"),
          device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the engine's)"),
          precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | bf16, bf16-int8 (--engine openvino) | auto (the fastest verified here)"),
          providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, e.g. tensorrt"),
          threads: Optional[int] = typer.Option(None, "--threads", help="engine threads of each stream (default: "
                                                                        "the cores divided among the streams)"),
          streams: str = typer.Option("1", "--streams", help="batches in flight at once over the one loaded model "
                                                             "(auto: one per core)"),
          oversubscribe: bool = typer.Option(False, "--oversubscribe", help="allow streams x threads above the cores"),
          host: str = typer.Option("127.0.0.1", "--host", help="bind address (loopback by default)"),
          port: int = typer.Option(8000, "--port"),
          max_batch: int = typer.Option(16, "--max-batch", help="images per batched engine call (1 = no batching)"),
          max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="longest wait of the oldest image for a fuller batch"),
          queue: int = typer.Option(256, "--queue", help="images waiting before 503"),
          timeout_s: float = typer.Option(30.0, "--timeout-s", help="504 for requests older than this"),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="environment variable holding the API key"),
          max_body_mb: float = typer.Option(20.0, "--max-body-mb", help="request body cap in MiB"),
          max_images: int = typer.Option(32, "--max-images", help="images per request"),
          max_steps: Optional[int] = typer.Option(None, "--max-steps", help="cap on max_steps (default: the model's)"),
          log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error"),
          access_log: bool = typer.Option(False, "--access-log", help="log one line per request"),
          ui: bool = typer.Option(True, "--ui/--no-ui", help="the web page on / (--no-ui: API only, / is 404)"),
          allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                help="serve a precision that has not met the quality budget here"),
          model_name: Optional[str] = typer.Option(None, "--model-name", help="the model's name on /v2 (default: "
                                                                              "the model directory's name)"),
          ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]", rich_help_panel=_RS,
                                            help="deploy on Ray Serve: alone starts Ray on this machine; auto or "
                                                 "HOST:PORT joins a running cluster"),
          replicas: Optional[str] = typer.Option(None, "--replicas", rich_help_panel=_RS,
                                                 help="replicas (default 1), or auto: Serve autoscaling on ongoing requests"),
          min_replicas: Optional[int] = typer.Option(None, "--min-replicas", rich_help_panel=_RS, help="--replicas auto: at least (default 1)"),
          max_replicas: Optional[int] = typer.Option(None, "--max-replicas", rich_help_panel=_RS,
                                                     help="--replicas auto: at most (default: what the cluster holds)"),
          replica_cpus: Optional[int] = typer.Option(None, "--replica-cpus", rich_help_panel=_RS,
                                                     help="CPUs of each replica = its streams x threads (default: the "
                                                          "usable cores // replicas)"),
          max_connections: int = typer.Option(1024, "--max-connections", help="open connections; beyond, requests get 503", rich_help_panel=_SL),
          max_connections_per_client: int = typer.Option(64, "--max-connections-per-client", help="open connections from one IP address (0: no cap; behind a proxy)", rich_help_panel=_SL),
          header_timeout: float = typer.Option(10.0, "--header-timeout", help="s to send complete request headers", rich_help_panel=_SL),
          body_timeout: float = typer.Option(10.0, "--body-timeout", help="s without body data before 408", rich_help_panel=_SL),
          keep_alive_timeout: float = typer.Option(5.0, "--keep-alive-timeout", help="s an idle kept-alive connection stays open", rich_help_panel=_SL),
          private_metrics: bool = typer.Option(False, "--private-metrics", help="/metrics and /readyz need the API key too", rich_help_panel=_SL)):
    """HTTP captioning service: POST /v1/captions, /healthz, /readyz, /v1/model, /metrics, and the Open Inference
    Protocol on /v2 (needs the serve extra)."""
    try:
        from captrt.serve.config import MIB, ServeConfig
        from captrt.serve.server import serve as run_service
    except ImportError as exc:
        fail(RuntimeError(f"{exc}: install the service extra with pip install 'captrt[serve]'"))
    from captrt.runtime.errors import EngineUnavailableError, ModelDirError

    config = ServeConfig(model=model, engine=engine, device=device, precision=precision, providers=providers,
                         threads=threads, streams=streams_flag(streams), oversubscribe=oversubscribe,
                         host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         queue=queue, timeout_s=timeout_s, api_key_env=api_key_env,
                         max_body_bytes=int(max_body_mb * MIB), max_images=max_images, max_steps_cap=max_steps,
                         log_level=log_level, access_log=access_log, allow_unverified=allow_unverified, ui=ui,
                         model_name=model_name, max_connections=max_connections,
                         max_connections_per_client=max_connections_per_client, header_timeout=header_timeout,
                         body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout,
                         private_metrics=private_metrics)
    ray_flags = {"replicas": replicas or 1, "min_replicas": min_replicas, "max_replicas": max_replicas,
                 "replica_cpus": replica_cpus}
    if ray is None and (replicas, min_replicas, max_replicas, replica_cpus) != (None,) * 4:
        fail(ValueError("--replicas, --min-replicas, --max-replicas and --replica-cpus need --ray"))
    try:
        if ray is not None:
            from captrt.serve.ray_run import serve_on_ray

            code = serve_on_ray(config, ray, **ray_flags)
        else:
            code = run_service(config)
    except (ModelDirError, EngineUnavailableError, ValueError) as exc:
        fail(exc)
    raise typer.Exit(code)
