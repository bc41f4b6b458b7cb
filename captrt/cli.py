"""The `captrt` command: thin typer wrappers over library functions, heavy imports inside commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer
import typer.core

from captrt.checks import int_or_auto
from captrt.cli_flags import decoding_flags

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Show, Attend and Tell: train, export, caption, bench.")


def _fail(exc: Exception) -> NoReturn:
    """Known bad-input errors end with one clear line, not a traceback."""
    typer.echo(f"captrt: error: {exc}", err=True)
    raise typer.Exit(2)


KNOWN_ERRORS: tuple[type[Exception], ...] = (ValueError, FileExistsError, FileNotFoundError, RuntimeError)


def _streams(value: str) -> int | str:
    """--streams: 'auto' or a positive integer (a bad one ends with one line, exit 2)."""
    try:
        return int_or_auto("--streams", value, text=True)
    except ValueError as exc:
        _fail(exc)


@app.command()
def synth(out: Path = typer.Argument(..., help="output directory"),
          images: int = typer.Option(1000, "--images", help="number of images"),
          seed: int = typer.Option(0, "--seed")):
    """Write a synthetic Karpathy-format dataset of rendered scenes (OUT/dataset_synth.json, OUT/images/)."""
    from captrt.synth import make_synth_dataset

    try:
        path = make_synth_dataset(out, images, seed=seed)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(str(path))


@app.command()
def prepare(data: Path = typer.Option(..., "--data", help="Karpathy split JSON"),
            images: Optional[Path] = typer.Option(None, "--images", help="image root (default: the JSON's folder)"),
            out: Path = typer.Option(..., "-o", "--out"),
            min_word_freq: int = typer.Option(5, "--min-word-freq"),
            overwrite: bool = typer.Option(False, "--overwrite")):
    """Resize every image once into a uint8 memmap plus encoded captions."""
    from captrt.train.prepare import prepare_dataset

    try:
        prepare_dataset(data, images, out, min_word_freq=min_word_freq, overwrite=overwrite)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(str(out))


@app.command()
def train(data: Path = typer.Option(..., "--data", help="a `captrt prepare` directory"),
          out: Path = typer.Option(..., "-o", "--out"),
          backbone: str = typer.Option("resnet101", "--backbone"),
          enc_size: int = typer.Option(14, "--enc-size"),
          dim: int = typer.Option(512, "--dim", help="attention, embedding and decoder size"),
          epochs: int = typer.Option(20, "--epochs"),
          batch_size: int = typer.Option(32, "--batch-size"),
          decoder_lr: float = typer.Option(4e-4, "--decoder-lr"),
          encoder_lr: float = typer.Option(1e-4, "--encoder-lr"),
          fine_tune_encoder: bool = typer.Option(False, "--fine-tune-encoder"),
          pretrained: bool = typer.Option(False, "--pretrained", help="ImageNet weights via torchvision"),
          val_images: int = typer.Option(0, "--val-images", help="limit validation decoding (0 = all)"),
          device: str = typer.Option("cpu", "--device"),
          seed: int = typer.Option(0, "--seed"),
          resume: Optional[Path] = typer.Option(None, "--resume", help="last.pt to continue from")):
    """Train with the seed's loop; writes OUT/last.pt, OUT/best.pt and OUT/metrics.jsonl."""
    from captrt.train.loop import TrainConfig, train as run

    cfg = TrainConfig(data=str(data), out=str(out), backbone=backbone, enc_size=enc_size, attention_dim=dim,
                      embed_dim=dim, decoder_dim=dim, epochs=epochs, batch_size=batch_size, decoder_lr=decoder_lr,
                      encoder_lr=encoder_lr, fine_tune_encoder=fine_tune_encoder, pretrained=pretrained,
                      val_images=val_images, device=device, seed=seed)
    try:
        best = run(cfg, resume=str(resume) if resume else None)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(str(best))


@app.command("eval")
def evaluate(checkpoint: Path = typer.Argument(...),
             data: Path = typer.Option(..., "--data"),
             images: Optional[Path] = typer.Option(None, "--images"),
             split: str = typer.Option("test", "--split"),
             beam: int = typer.Option(5, "--beam"),
             limit: int = typer.Option(0, "--limit"),
             results: Optional[Path] = typer.Option(None, "--results", help="COCO results JSON to write"),
             spice: bool = typer.Option(False, "--spice")):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ nltk BLEU-4) of reference beam-search captions."""
    from captrt.train.evaluate import evaluate as run, format_metrics

    try:
        result = run(checkpoint, data, images, split=split, beam_size=beam, limit=limit, results_path=results, spice=spice)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(format_metrics(result.metrics))


@app.command()
def convert(old: Path = typer.Argument(..., help="a seed-notebook or sgrvinod-tutorial checkpoint"),
            out: Path = typer.Option(..., "-o", "--out"),
            word_map: Optional[Path] = typer.Option(None, "--word-map", help="WORDMAP_*.json"),
            karpathy_json: Optional[Path] = typer.Option(None, "--karpathy-json", help="rebuild the seed's word2id"),
            min_word_freq: int = typer.Option(5, "--min-word-freq")):
    """Import a legacy pickled checkpoint without running code from it."""
    from captrt.train.convert import convert_legacy

    try:
        convert_legacy(old, out, word_map=word_map, karpathy_json=karpathy_json, min_word_freq=min_word_freq)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(str(out))


@app.command()
def export(checkpoint: Path = typer.Argument(...),
           out: Path = typer.Option(..., "-o", "--out"),
           opset: int = typer.Option(18, "--opset", help="ONNX opset (17..20; 18 = torch.onnx's own, no conversion)"),
           max_beam: int = typer.Option(10, "--max-beam"),
           fp16: bool = typer.Option(False, "--fp16"),
           int8: bool = typer.Option(False, "--int8"),
           calib: Optional[Path] = typer.Option(None, "--calib", help="Karpathy JSON of calibration images"),
           calib_images: Optional[Path] = typer.Option(None, "--images"),
           word_map: Optional[Path] = typer.Option(None, "--word-map"),
           bf16: bool = typer.Option(False, "--bf16", help="verify OpenVINO bf16 on this CPU and record it"),
           int8_search: bool = typer.Option(True, "--int8-search/--no-int8-search",
                                            help="when full int8 misses the budget, return layers to fp32 until it holds"),
           parity_images: int = typer.Option(100, "--parity-images", help="images in the model's parity set"),
           quality_budget: float = typer.Option(0.99, "--quality-budget",
                                                help="fraction of fp32's BLEU-4 and CIDEr a variant must keep"),
           force: bool = typer.Option(False, "--force", help="write even if fp32 parity fails or a variant misses the budget"),
           overwrite: bool = typer.Option(False, "--overwrite")):
    """Write a model directory: encoder.onnx + decoder_step.onnx (+ fp16/int8) and its parity set.

    fp32 must match PyTorch; each variant must meet the quality budget, or it is not written and
    the command exits 1 naming it (--force writes it, marked failed)."""
    from captrt.export.exporter import export_model

    try:
        manifest = export_model(checkpoint, out, opset=opset, max_beam=max_beam, fp16=fp16, int8=int8,
                                calib_json=str(calib) if calib else None,
                                calib_images=str(calib_images) if calib_images else None,
                                word_map=str(word_map) if word_map else None, parity_count=parity_images, force=force,
                                overwrite=overwrite, quality_budget=quality_budget,
                                verify_engines=[("openvino", "bf16")] if bf16 else (), int8_search=int8_search)
    except KNOWN_ERRORS as exc:
        _fail(exc)
    typer.echo(str(out))
    refused = manifest.get("refused", {})
    for variant, report in refused.items():
        typer.echo(f"captrt: {variant} refused: {report['reason']}", err=True)
    if refused:
        raise typer.Exit(1)


def _controls(decoding: Any) -> dict[str, Any]:
    """The decoding options given (beside beam and max steps), as Captioner.caption's keyword arguments."""
    return {k: v for k, v in decoding.changed().items() if k not in ("beam_size", "max_steps")}


@app.command()
@decoding_flags
def caption(images: List[str] = typer.Argument(..., help="image files, directories or globs"),
            model: Path = typer.Option(..., "--model", help="a `captrt export` model directory"),
            engine: str = typer.Option("ort", "--engine", help="ort | openvino | trt | torch"),
            device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the engine's)"),
            precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | bf16, bf16-int8 (--engine openvino) | auto (the fastest verified here)"),
            batch: int = typer.Option(16, "--batch", help="images per batch"),
            json_lines: bool = typer.Option(False, "--json", help="one JSON object per image"),
            attention: Optional[Path] = typer.Option(None, "--attention", help="write one attention PNG per image here"),
            threads: Optional[int] = typer.Option(None, "--threads"),
            providers: Optional[str] = typer.Option(None, "--providers", help="ORT providers, comma list"),
            allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                  help="load a precision that has not met the quality budget here"),
            decoding: Any = None):
    """Caption images with the torch-free runtime; one line per image (tab-separated path and caption)."""
    from captrt.runtime.cli_caption import caption_files

    code = caption_files(images, model, engine=engine, device=device, precision=precision, beam=decoding.beam_size,
                         batch=batch, json_lines=json_lines, attention_dir=attention, max_steps=decoding.max_steps,
                         threads=threads, providers=providers, allow_unverified=allow_unverified,
                         decoding=_controls(decoding))
    raise typer.Exit(code)


@app.command()
def verify(model: Path = typer.Argument(..., help="a `captrt export` model directory"),
           engine: str = typer.Option("ort", "--engine", help="ort | openvino | trt | torch"),
           device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the engine's)"),
           precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | bf16 (bf16: --engine openvino)"),
           quality_budget: float = typer.Option(0.99, "--quality-budget", help="fraction of fp32's BLEU-4 and CIDEr"),
           threads: Optional[int] = typer.Option(None, "--threads"),
           json_out: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Run the model's parity set through an engine and precision here; exit 0 within the quality budget, 1 not."""
    from captrt.runtime.cli_verify import verify_command

    raise typer.Exit(verify_command(model, engine=engine, device=device, precision=precision, budget=quality_budget,
                                    threads=threads, json_out=json_out))


class _RayOptionCommand(typer.core.TyperCommand):
    """`--ray` with an optional value, which typer's parser lacks: `--ray` alone (last, or followed by
    another option) means `--ray local`; `--ray auto` / `--ray HOST:PORT` joins a cluster."""

    def parse_args(self, ctx, args):
        fixed = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("local")
        return super().parse_args(ctx, fixed)


@app.command(cls=_RayOptionCommand)
@decoding_flags
def batch(sources: List[str] = typer.Argument(..., help="directories, globs, manifests (.txt, .csv/.parquet with a path "
                                                        "column, Karpathy JSON); local or s3://, gs://, ..."),
          model: Path = typer.Option(..., "--model", help="a `captrt export` model directory"),
          out: Path = typer.Option(..., "-o", "--out", help="output directory of shards"),
          engine: str = typer.Option("ort", "--engine", help="ort | openvino | trt | torch"),
          device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: the engine's)"),
          precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | bf16, bf16-int8 (--engine openvino) | auto (the fastest verified here)"),
          batch_size: int = typer.Option(16, "--batch-size", help="images per engine batch"),
          fmt: str = typer.Option("parquet", "--format", help="parquet | jsonl"),
          split: Optional[str] = typer.Option(None, "--split", help="Karpathy JSON sources: this split only"),
          shard_rows: int = typer.Option(1000, "--shard-rows", help="rows per output shard (the unit of resume)"),
          resume: bool = typer.Option(False, "--resume", help="continue OUT: skip inputs already in complete shards"),
          ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                            help="run on Ray: alone starts one on this machine; auto or HOST:PORT "
                                                 "joins a running cluster"),
          actors: Optional[int] = typer.Option(None, "--actors", help="Ray actors (default: CPUs / threads per actor)"),
          threads_per_actor: Optional[int] = typer.Option(None, "--threads-per-actor", help="engine threads per actor"),
          threads: Optional[int] = typer.Option(None, "--threads", help="local mode: engine threads of each stream "
                                                                        "(default: the cores divided among them)"),
          streams: Optional[str] = typer.Option(None, "--streams", help="local mode: batches captioned at once over "
                                                                        "the one loaded model (default 1; auto: one per core)"),
          oversubscribe: bool = typer.Option(False, "--oversubscribe", help="local mode: allow streams x threads "
                                                                            "above the cores"),
          allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                help="load a precision whose quality verification is missing or failed"),
          decoding: Any = None):
    """Caption a corpus into Parquet/JSON-lines shards (resumable; locally or on a Ray cluster)."""
    import signal

    from captrt.batch import EXIT_INTERRUPTED, BatchUsageError, run_batch

    def _terminate(signum, frame):  # SIGTERM ends like Ctrl-C: finished shards are already safe
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = run_batch(sources, model, out, engine=engine, device=device, precision=precision,
                           beam=decoding.beam_size, max_steps=decoding.max_steps, batch_size=batch_size, fmt=fmt,
                           resume=resume, split=split,
                           shard_rows=shard_rows, ray=ray, actors=actors, threads_per_actor=threads_per_actor,
                           threads=threads, streams=None if streams is None else _streams(streams),
                           oversubscribe=oversubscribe, allow_unverified=allow_unverified,
                           decoding=_controls(decoding))
    except BatchUsageError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo(f"captrt batch: interrupted; complete shards are in {out}, rerun with --resume to finish", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    typer.echo(result.summary(), err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def bench(model: Path = typer.Option(..., "--model", help="a `captrt export` model directory"),
          engine: str = typer.Option("ort,torch,reference", "--engine", help="comma list: ort, openvino, trt, torch, "
                                     "reference, torch-compile (the reference with its encoder through torch.compile)"),
          precision: str = typer.Option("fp32", "--precision", help="comma list: fp32, fp16, int8, bf16, bf16-int8, auto (pairs that do not exist are skipped with the reason)"),
          device: str = typer.Option("cpu", "--device"),
          batch: str = typer.Option("1,8", "--batch", help="comma list of batch sizes"),
          beam: str = typer.Option("1,5", "--beam", help="comma list of beam widths"),
          steps: Optional[int] = typer.Option(None, "--steps", help="force this many decoding steps (ignore <end>)"),
          warmup: int = typer.Option(2, "--warmup"),
          iters: int = typer.Option(10, "--iters"),
          max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="time budget per configuration"),
          threads: Optional[int] = typer.Option(None, "--threads", help="intra-op threads (default: all cores; "
                                                "streams rows: the cores // S)"),
          streams: Optional[str] = typer.Option(None, "--streams", help="comma list of stream counts S: rows of "
                                                "Captioner.load(streams=S) captioning a list of images (ort/openvino/trt)"),
          decoding: bool = typer.Option(False, "--decoding", help="also time the options path on ort fp32 "
                                        "(num_hypotheses=3, return_scores, no_repeat_ngram_size=3, min_length=5)"),
          images: Optional[Path] = typer.Option(None, "--images", help="image directory or Karpathy JSON"),
          checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="for torch/reference/torch-compile"),
          json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
          allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                                help="bench precisions that missed the quality budget (marked so)")):
    """Latency and throughput per engine, precision, batch and beam, beside the PyTorch reference."""
    from captrt.bench.bench import run_bench

    try:
        run_bench(model, engines=engine, precisions=precision, device=device, batches=batch, beams=beam, steps=steps,
                  warmup=warmup, iters=iters, max_seconds=max_seconds, threads=threads, images=images,
                  checkpoint=checkpoint, json_out=json_out, allow_unverified=allow_unverified, streams=streams,
                  decoding=decoding)
    except KNOWN_ERRORS as exc:
        _fail(exc)


_RS = "Ray Serve (docs/ray-serve.md)"
_SL = "Security and limits (docs/security.md)"


@app.command(cls=_RayOptionCommand)
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
        _fail(RuntimeError(f"{exc}: install the service extra with pip install 'captrt[serve]'"))
    from captrt.runtime.errors import EngineUnavailableError, ModelDirError

    config = ServeConfig(model=model, engine=engine, device=device, precision=precision, providers=providers,
                         threads=threads, streams=_streams(streams), oversubscribe=oversubscribe,
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
        _fail(ValueError("--replicas, --min-replicas, --max-replicas and --replica-cpus need --ray"))
    try:
        if ray is not None:
            from captrt.serve.ray_run import serve_on_ray

            code = serve_on_ray(config, ray, **ray_flags)
        else:
            code = run_service(config)
    except (ModelDirError, EngineUnavailableError, ValueError) as exc:
        _fail(exc)
    raise typer.Exit(code)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "-o", "--out"),
         images: int = typer.Option(1600, "--images"),
         epochs: int = typer.Option(8, "--epochs")):
    """synth -> prepare -> train -> eval -> export -> caption -> bench, end to end on the CPU."""
    from captrt.demo import run_demo

    try:
        run_demo(out, n_images=images, epochs=epochs)
    except KNOWN_ERRORS as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
