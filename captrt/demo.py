"""`make demo`: synth -> prepare -> train -> eval -> export -> caption -> bench, on the CPU, offline.

Sized to finish in about 10 minutes on 2 cores (install included): a ResNet-18 encoder on an
8x8 grid, frozen (its features are computed once), a 256-wide decoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(out: str | Path = "demo_out", n_images: int = 1600, epochs: int = 8, seed: int = 0) -> dict:
    from captrt.synth import make_synth_dataset
    from captrt.train.evaluate import evaluate, format_metrics
    from captrt.train.loop import TrainConfig, train
    from captrt.train.prepare import prepare_dataset

    out = Path(out)
    t0 = time.time()
    _say(f"synth: {n_images} rendered scenes with 5 captions each -> {out / 'synth'}")
    data_json = make_synth_dataset(out / "synth", n_images, seed=seed)
    _say("prepare: decode and resize once into a uint8 memmap")
    prepared = prepare_dataset(data_json, None, out / "prepared", overwrite=True)

    _say(f"train: resnet18 encoder (8x8 grid, frozen features), 256-wide decoder, {epochs} epochs")
    cfg = TrainConfig(data=str(prepared), out=str(out / "run"), backbone="resnet18", enc_size=8, attention_dim=256,
                      embed_dim=256, decoder_dim=256, dropout=0.5, epochs=epochs, batch_size=32, decoder_lr=1e-3,
                      val_beam=3, val_images=160, seed=seed)
    best = train(cfg)

    _say("eval: reference beam search (beam 5) on the test split")
    result = evaluate(best, data_json, split="test", beam_size=5, results_path=out / "test_results.json")
    print(format_metrics(result.metrics))
    for path, caption in result.predictions[:5]:
        print(f"  {Path(path).name}: {caption}")

    _say("export: encoder.onnx + decoder_step.onnx (+ int8 within the 99% quality budget), parity set of 100 test images")
    from captrt.export.exporter import export_model

    manifest = export_model(best, out / "model", max_beam=10, int8=True, calib_json=str(data_json),
                            calib_images=str(Path(data_json).parent), overwrite=True, parity_count=100)
    for precision, report in manifest["parity"].items():
        print(f"{precision}: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}))
    for precision, refused in manifest.get("refused", {}).items():
        print(f"{precision} refused (not written): {refused['reason']}")

    _say("caption: the torch-free runtime (ONNX Runtime, CPU) with attention maps")
    from captrt.runtime import Captioner
    from captrt.cli.caption import caption_files

    samples = [p for p, _ in result.predictions[:4]]
    caption_files(samples, out / "model", attention_dir=str(out / "attention"))
    captioner = Captioner.load(out / "model", engine="ort")
    runtime = captioner.caption(samples, beam_size=5)
    same = sum(r.text == ref for r, (_, ref) in zip(runtime, result.predictions[:4]))
    print(f"runtime captions identical to the reference beam search on {same}/{len(samples)} samples")

    _say("bench: ONNX Runtime against the reference (the seed's per-image search)")
    from captrt.bench.bench import run_bench

    precisions = [p for p in ("fp32", "int8") if p in manifest["graphs"]]
    bench = run_bench(out / "model", engines=["ort", "reference"], precisions=precisions, batches=[1, 8], beams=[5],
                      steps=None, warmup=1, iters=3)
    _say("precisions: speed beside quality (batch 1, beam 5; quality on the model's parity set)")
    for line in precision_lines(manifest, bench):
        print(line)
    summary = {"bleu4": result.metrics.get("BLEU-4"), "seconds": round(time.time() - t0, 1)}
    _say(f"demo done in {summary['seconds']:.0f} s: test BLEU-4 {summary['bleu4']:.3f}")
    for line in serve_hint(out / "model"):
        print(line)
    return summary


def serve_hint(model: Path) -> list[str]:
    """The command that serves the demo's model and the address of its page, as the user can paste them: the
    captrt script beside the running interpreter (make demo's .venv/bin/captrt) when there is one."""
    import shlex
    import sys

    from captrt.serve.config import ServeConfig

    script = Path(sys.executable).parent / "captrt"
    if not script.is_file():
        command = "captrt"
    else:
        try:
            command = str(script.relative_to(Path.cwd()))
        except ValueError:
            command = str(script)
    try:
        model = model.resolve().relative_to(Path.cwd())
    except ValueError:
        model = model.resolve()
    defaults = ServeConfig(model=str(model))
    return ["", "Serve the model and caption your own images in the browser:",
            f"  {shlex.quote(command)} serve --model {shlex.quote(str(model))}",
            f"  then open http://{defaults.host}:{defaults.port}/"]


def precision_lines(manifest: dict, bench: dict) -> list[str]:
    """'int8: 2.1x fp32's speed (41.0 vs 86.3 ms per image), BLEU-4 100.4% and CIDEr 99.6% of fp32, 93% identical'."""
    e2e = {r["precision"]: r["e2e_ms"]["per_image"]["p50"] for r in bench["results"]
           if r["engine"] == "ort" and r["batch"] == 1}
    quality = {e["precision"]: e["report"] for e in manifest.get("verification", []) if e.get("engine") == "ort"}
    lines = []
    for precision, ms in e2e.items():
        speed = f"{e2e['fp32'] / ms:.2f}x fp32's speed ({ms:.1f} vs {e2e['fp32']:.1f} ms per image)" if "fp32" in e2e \
            else f"{ms:.1f} ms per image"
        q = quality.get(precision)
        if precision == "fp32":
            judged = "the reference: captions identical to PyTorch's on every parity image"
        elif q is None:
            judged = "quality not measured"
        elif q.get("references"):
            judged = (f"BLEU-4 {q['bleu4_pct_of_fp32']:.1f}% and CIDEr {q['cider_pct_of_fp32']:.1f}% of fp32, "
                      f"{q['identical_pct']:.0f}% identical, {'within' if q['passed'] else 'MISSES'} the budget")
        else:
            judged = f"{q['identical_pct']:.0f}% identical to fp32, {'within' if q['passed'] else 'MISSES'} the budget"
        lines.append(f"{precision}: {speed}; {judged}")
    return lines
