"""The library function behind `captrt verify`: measure, print the verdict, return the exit code."""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from captrt.runtime.errors import EngineUnavailableError, ModelDirError

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def verify_command(model_dir: str | os.PathLike, *, engine: str = "ort", device: str | None = None,
                   precision: str = "fp32", budget: float = 0.99, threads: int | None = None,
                   json_out: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """0 when the engine/precision keeps the quality budget on MODEL_DIR's parity set here, 1 when not, 2 on bad usage.
    The result is cached in MODEL_DIR/cache/verify, so the next Captioner.load of this pair uses it."""
    from captrt.runtime.verification.verify import verify_model

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        report, facts = verify_model(model_dir, engine, device, precision, budget=budget, threads=threads)
    except (ModelDirError, EngineUnavailableError, ValueError) as exc:
        err.write(f"captrt: error: {exc}\n")
        return EXIT_USAGE
    if json_out:
        out.write(json.dumps({**facts, "report": report.to_dict()}, default=str) + "\n")
    else:
        e = facts["engine"]
        key = facts["key"]
        flags = ", ".join(key.get("cpu_flags") or []) or "no AVX flags listed"
        lines = [f"model:     {facts['model']} ({facts['parity_images']} parity images, "
                 f"{'with' if report.references else 'without'} reference captions)",
                 f"engine:    {e.get('engine')} {e.get('precision')} on {e.get('provider')} ({key.get('cpu')}: {flags})",
                 *([f"cuda:      {e['cuda_libraries']['summary']}"] if e.get("cuda_libraries") else []),
                 f"identical: {report.identical}/{report.images} captions equal fp32's "
                 f"({100 * report.identical_fraction:.1f}%)"]
        if report.references:
            lines += [f"BLEU-4:    {report.bleu4:.4f} vs fp32 {report.bleu4_fp32:.4f} ({100 * report.bleu4_ratio:.1f}%)",
                      f"CIDEr:     {report.cider:.4f} vs fp32 {report.cider_fp32:.4f} ({100 * report.cider_ratio:.1f}%)"]
        if facts.get("speed"):
            sp = facts["speed"]
            lines.append(f"speed:     {sp['ms_per_image']:.1f} ms/image vs fp32 {sp['fp32_ms_per_image']:.1f} "
                         f"({sp['speedup']:.2f}x; batch 1, beam {sp['beam']}, {sp['images']} images)")
        lines.append(f"verdict:   {report.verdict()}"
                     + ("" if facts["needs_verification"] else " (exact fp32: loads need no verification)"))
        if facts["saved"]:
            lines.append(f"saved:     {facts['saved']}")
        out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_PASSED if report.passed else EXIT_FAILED
