"""The quality beside each bench row: how a precision's captions compare with fp32's on the model's parity set.

fp32 engines that compute in fp32 are exact (the export's parity gate holds them token-identical to
the PyTorch reference). Every other engine/precision gets the verification Captioner.load would use
(captrt.runtime.verification.verify: the export's record or a cached one for this machine and engine numerics);
when there is none, the bench measures it now on the parity set and caches it, as a first load would.
"""

from __future__ import annotations

from typing import Any

from captrt.runtime.model_dir import ModelDir


def row_quality(model: ModelDir, runner: Any, *, measure_missing: bool = True) -> dict[str, Any]:
    """{"status": "exact" | "reference" | "peer" | "verified" | "failed" | "unverified", "source", + the report's
    summary}."""
    engine = getattr(runner, "engine", None)
    if engine is None:  # the PyTorch reference search: the yardstick itself; torch-compile: a peer of it
        return {"status": "reference" if runner.name == "reference" else "peer", "source": None}
    if not engine.needs_verification:
        return {"status": "exact", "source": None}
    from captrt.runtime.verification.verify import ensure_verified

    found = ensure_verified(model, engine, allow_unverified=True, verify_now=measure_missing)
    if found.report is None:
        return {"status": "unverified", "source": None}
    return {"status": "verified" if found.report.passed else "failed", "source": found.source,
            **found.report.summary()}


def quality_cell(q: dict[str, Any] | None) -> str:
    """Short table text: 'exact', 'ref', '96% id, BLEU 99.4%, CIDEr 98.7% ok' or '... FAIL'."""
    if not q:
        return "-"
    status = q.get("status")
    if status in ("exact", "reference", "peer", "unverified"):
        return {"exact": "exact", "reference": "ref", "peer": "peer", "unverified": "unverified"}[status]
    parts = [f"{q['identical_pct']:.0f}% id"]
    if q.get("bleu4_pct_of_fp32") is not None:
        parts.append(f"BLEU {q['bleu4_pct_of_fp32']:.1f}%")
    if q.get("cider_pct_of_fp32") is not None:
        parts.append(f"CIDEr {q['cider_pct_of_fp32']:.1f}%")
    return ", ".join(parts) + (" ok" if status == "verified" else " FAIL")
