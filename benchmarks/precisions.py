"""Precision table: each precision's speed against fp32 and against the reference, beside its quality.

    python benchmarks/precisions.py                     # demo_out/model (make demo), into RESULTS.md
    python benchmarks/precisions.py --model DIR --no-write

A speed without its quality is not a result, so every row carries both, from one run on one machine:
- speed: `captrt bench` (run_bench) at batch 1, beam 5, real decoding (up to the model's max_steps)
  of the model's own parity images, every engine loaded at once and taking turns run by run;
  end-to-end ms per image (p50), and its ratio to ONNX Runtime fp32 and to the reference (the seed's
  per-image PyTorch search).
- quality: the precision's verification on the model's parity set (captrt.runtime.verification.verify, the same
  measurement as export, `captrt verify` and a first load): BLEU-4 and CIDEr as % of fp32's against
  the dataset's references, and the share of captions identical to fp32's; fp32 on ONNX Runtime is
  the yardstick (token-identical to the PyTorch reference by the export's gate).
Precisions the model lacks or this CPU cannot run (bf16 without avx512_bf16/amx_bf16) are listed
with the reason. The table goes between `<!-- precisions:begin -->` and `<!-- precisions:end -->` in
RESULTS.md; benchmarks/run_suite.py carries that section over when it rewrites the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAIRS = ("ort", "openvino")


def measure(model: Path, iters: int, warmup: int) -> dict[str, Any]:
    from captrt.bench.bench import run_bench
    from captrt.runtime.model_dir import ModelDir
    from captrt.runtime.verification.parity_set import ParitySet

    mdir = ModelDir.load(model)
    parity = ParitySet.load(mdir)
    images = parity.images if parity is not None else None
    return run_bench(model, engines=[*PAIRS, "reference"], precisions=["fp32", "int8", "bf16"], batches=[1],
                     beams=[5], steps=None, warmup=warmup, iters=iters, images=images, print_table=False,
                     allow_unverified=True)


def table(report: dict[str, Any]) -> list[str]:
    rows = report["results"]
    e2e = {(r["engine"], r["precision"]): r["e2e_ms"]["per_image"]["p50"] for r in rows}
    base, ref = e2e.get(("ort", "fp32")), e2e.get(("reference", "fp32"))
    out = ["| engine | precision | ms/image p50 | vs ORT fp32 | vs reference | BLEU-4 % of fp32 | CIDEr % of fp32 "
           "| identical to fp32 | quality |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = e2e[(r["engine"], r["precision"])]
        q = r.get("quality") or {}
        status = q.get("status", "-")
        pct = lambda k: "-" if q.get(k) is None else f"{q[k]:.1f}"  # noqa: E731
        if status in ("exact", "reference"):
            bleu = cider = ident = "100 (fp32)" if status == "exact" else "-"
        else:
            bleu, cider, ident = pct("bleu4_pct_of_fp32"), pct("cider_pct_of_fp32"), \
                ("-" if q.get("identical_pct") is None else f"{q['identical_pct']:.0f}%")
        verdict = {"exact": "exact", "reference": "yardstick", "verified": "within budget",
                   "failed": "**misses the budget**", "unverified": "unverified"}.get(status, status)
        out.append(f"| {r['engine']} | {r['precision']} | {ms:.1f} | {base / ms:.2f}x | {ref / ms:.2f}x | {bleu} "
                   f"| {cider} | {ident} | {verdict} |" if base and ref else
                   f"| {r['engine']} | {r['precision']} | {ms:.1f} | - | - | {bleu} | {cider} | {ident} | {verdict} |")
    return out


def section(report: dict[str, Any], model: Path) -> str:
    from captrt.bench.sections import PRECISIONS_BEGIN, PRECISIONS_END

    m = report["machine"]
    lines = [PRECISIONS_BEGIN, "## Precisions: speed beside quality", "",
             f"`python benchmarks/precisions.py --model {model}` on {report['date']}: {m['cpu']} "
             f"({', '.join(m.get('cpu_flags') or []) or 'no AVX flags listed'}), {m['cores']} cores. "
             f"Model: {report['model'].get('backbone')}, grid {report['model']['grid']}, vocabulary "
             f"{report['model'].get('vocab_size')}; batch 1, beam 5, real decoding of the model's parity images; "
             "quality on the same parity set (budget: >= 99% of fp32's BLEU-4 and CIDEr).", "", *table(report), ""]
    for s in report.get("skipped", []):
        lines.append(f"- not run: {s['engine']} {s['precision']}: {s['reason']}")
    lines += ["", PRECISIONS_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "demo_out" / "model")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    args = ap.parse_args(argv)
    if not (args.model / "captrt.json").is_file():
        print(f"precisions: {args.model} is not a model directory (run `make demo` first)", file=sys.stderr)
        return 2
    text = section(measure(args.model, args.iters, args.warmup), args.model)
    if args.no_write:
        print(text)
        return 0
    from captrt.bench.sections import PRECISIONS_BEGIN, PRECISIONS_END, write_section

    write_section(args.results, text, PRECISIONS_BEGIN, PRECISIONS_END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
