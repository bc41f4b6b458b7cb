"""Commands that make models: synth, prepare, train, eval, convert, export, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from captrt.cli.app import KNOWN_ERRORS, app, fail


@app.command()
def synth(out: Path = typer.Argument(..., help="output directory"),
          images: int = typer.Option(1000, "--images", help="number of images"),
          seed: int = typer.Option(0, "--seed")):
    """Write a synthetic Karpathy-format dataset of rendered scenes (OUT/dataset_synth.json, OUT/images/)."""
    from captrt.synth import make_synth_dataset

    try:
        path = make_synth_dataset(out, images, seed=seed)
    except KNOWN_ERRORS as exc:
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
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
        fail(exc)
    typer.echo(str(out))
    refused = manifest.get("refused", {})
    for variant, report in refused.items():
        typer.echo(f"captrt: {variant} refused: {report['reason']}", err=True)
    if refused:
        raise typer.Exit(1)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), "-o", "--out"),
         images: int = typer.Option(1600, "--images"),
         epochs: int = typer.Option(8, "--epochs")):
    """synth -> prepare -> train -> eval -> export -> caption -> bench, end to end on the CPU."""
    from captrt.demo import run_demo

    try:
        run_demo(out, n_images=images, epochs=epochs)
    except KNOWN_ERRORS as exc:
        fail(exc)
