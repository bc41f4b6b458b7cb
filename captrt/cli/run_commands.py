"""Commands that run a model directory: caption, verify, batch, bench."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from captrt.cli.app import KNOWN_ERRORS, RayOptionCommand, app, fail, streams_flag
from captrt.cli.flags import decoding_flags


def controls_of(decoding: Any) -> dict[str, Any]:
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
    from captrt.cli.caption import caption_files

    code = caption_files(images, model, engine=engine, device=device, precision=precision, beam=decoding.beam_size,
                         batch=batch, json_lines=json_lines, attention_dir=attention, max_steps=decoding.max_steps,
                         threads=threads, providers=providers, allow_unverified=allow_unverified,
                         decoding=controls_of(decoding))
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
    from captrt.cli.verify import verify_command

    raise typer.Exit(verify_command(model, engine=engine, device=device, precision=precision, budget=quality_budget,
                                    threads=threads, json_out=json_out))


@app.command(cls=RayOptionCommand)
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
                           threads=threads, streams=None if streams is None else streams_flag(streams),
                           oversubscribe=oversubscribe, allow_unverified=allow_unverified,
                           decoding=controls_of(decoding))
    except BatchUsageError as exc:
        fail(exc)
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
        fail(exc)
