"""For the day a GPU is lent: do ONNX Runtime's CUDA provider and the torch engine on CUDA caption like the CPU?

    python benchmarks/gpu_check.py                  # a small random-weight model exported here, 16 images
    python benchmarks/gpu_check.py --model DIR      # an exported model directory (torch uses its checkpoint)

Captions a few synthetic images (captrt.export.images.synthetic) with ONNX Runtime on the CPU, ONNX Runtime's
CUDA provider and the torch engine (captrt.train.torch_engine) on CUDA, beam 5, and prints one line:

    gpu_check: NVIDIA H200, driver CUDA 13.0: ort-cuda 16/16 captions = cpu (1.9 ms/image), torch-cuda 16/16 = cpu (4.2 ms/image); cpu 31.0 ms/image

The times are the second pass over the images (the first one warms up), batch 8, on a machine that may be busy.
Exit 0: both GPU engines give the CPU's captions on all images but at most one (a GPU's kernels may flip a
near-tie of a random model); 1: they do not, or one cannot start; 2: no usable GPU here (one line says
what is missing: the driver, a library, a version).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEAM, BATCH = 5, 8
TINY = {"vocab_size": 61, "backbone": "resnet18", "enc_size": 8, "attention_dim": 256, "embed_dim": 256,
        "decoder_dim": 256}


def say(line: str) -> None:
    print(f"gpu_check: {line}", flush=True)


def gpu_problem() -> str | None:
    """Why neither GPU engine can run here (ONNX Runtime's view first: the driver, libraries, a device)."""
    from captrt.runtime.engines.cuda_setup import diagnose, prepare

    return diagnose(prepare(), "cuda")


def tiny_model(work: Path) -> Path:
    from captrt.bench.suite_model import make_random_checkpoint
    from captrt.export.exporter import export_model

    ckpt = make_random_checkpoint(work / "tiny.pt", **TINY)
    export_model(ckpt, work / "model", max_beam=10, parity_count=4, progress=False)
    return work / "model"


def run(model: Path, engine: str, device: str, images) -> tuple[list[list[int]], float]:
    """(tokens per image, ms per image of the second pass)."""
    from captrt.runtime import Captioner

    with Captioner.load(model, engine=engine, device=device, allow_unverified=True) as cap:
        cap.caption(images, beam_size=BEAM, batch_size=BATCH)
        start = time.perf_counter()
        caps = cap.caption(images, beam_size=BEAM, batch_size=BATCH)
        ms = 1000 * (time.perf_counter() - start) / len(images)
    return [c.tokens for c in caps], ms


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only a label
        return "GPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="an exported model directory (default: a small one made here)")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args(argv)
    why = gpu_problem()
    if why:
        say(f"no usable GPU here: {why}")
        return 2
    from captrt.export.images import synthetic
    from captrt.runtime.engines.cuda_setup import prepare

    images = list(synthetic(args.images, 256, seed=1).images)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        model = args.model or tiny_model(Path(work))
        cpu, cpu_ms = run(model, "ort", "cpu", images)
        parts, ok = [], True
        for label, engine in (("ort-cuda", "ort"), ("torch-cuda", "torch")):
            try:
                tokens, ms = run(model, engine, "cuda", images)
            except Exception as exc:  # noqa: BLE001 - reported in the line, the other engine still runs
                parts.append(f"{label} cannot start ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
                ok = False
                continue
            same = sum(a == b for a, b in zip(tokens, cpu))
            ok = ok and same >= len(images) - 1
            parts.append(f"{label} {same}/{len(images)} captions = cpu ({ms:.1f} ms/image)")
    setup = prepare()
    say(f"{gpu_name()}, driver CUDA {setup.driver_cuda or '?'}: {', '.join(parts)}; cpu {cpu_ms:.1f} ms/image")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
