"""The suite's speed targets, judged on one bench report, and the measured facts behind a miss.

All ratios come from one run (one process, one machine state), at batch 1 and beam 5 unless said:
1. ORT fp32 end to end >= 4x faster than the reference;
2. the ORT fp32 decoder step <= 1.3x its memory floor;
3. ORT int8 end to end >= 9x faster than the reference (beside it: the export's int8 caption parity);
4. ORT fp32 images/s at batch 8 >= 1.2x batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Target:
    name: str
    goal: str
    value: float | None  # the measured ratio, None when a configuration is missing
    threshold: float
    higher_is_better: bool
    detail: str
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "met" if ok else "missed"


def find(report: dict[str, Any], engine: str, precision: str, batch: int, beam: int) -> dict[str, Any] | None:
    """The default row of a configuration (not its streams or options rows)."""
    for r in report["results"]:
        if (r["engine"], r["precision"], r["batch"], r["beam"]) == (engine, precision, batch, beam) \
                and r.get("variant") is None:
            return r
    return None


def _e2e(r: dict[str, Any] | None) -> float | None:
    return None if r is None else r["e2e_ms"]["per_batch"]["p50"]


def _speedup(report, precision: str, threshold: float, name: str, note: str = "") -> Target:
    ort, ref = find(report, "ort", precision, 1, 5), find(report, "reference", "fp32", 1, 5)
    a, b = _e2e(ort), _e2e(ref)
    value = b / a if a and b else None
    detail = (f"reference {b:.1f} ms / ORT {precision} {a:.1f} ms = {value:.2f}x" if value
              else "needs ort and reference at batch 1, beam 5")
    return Target(name, f">= {threshold:g}x faster than reference", value, threshold, True, detail, note)


def int8_parity_note(manifest: dict[str, Any] | None) -> str:
    """The export's int8 caption parity and BLEU-4 change (captrt.json parity.int8)."""
    p = ((manifest or {}).get("parity") or {}).get("int8")
    if not p:
        return "no int8 parity report in captrt.json"
    if not p.get("measured", True):
        return f"int8 parity not measured: {p.get('reason', '')}"
    return (f"export parity (beam {p.get('beam_size')}): {p.get('identical')}/{p.get('images')} captions identical "
            f"to the PyTorch reference, BLEU-4 change {p.get('bleu4_change', 0):+.4f}")


def evaluate_targets(report: dict[str, Any], manifest: dict[str, Any] | None = None) -> list[Target]:
    targets = [_speedup(report, "fp32", 4.0, "ORT fp32 end to end vs reference (batch 1, beam 5)")]
    step = find(report, "ort", "fp32", 1, 5)
    ratio = None if step is None else step.get("floor_ratio")
    detail = (f"step p50 {step['step_ms']['p50']:.3f} ms / floor {step['floor_ms']:.3f} ms = {ratio:.2f}x"
              if ratio else "needs ort fp32 at batch 1, beam 5 on the CPU")
    targets.append(Target("ORT fp32 decoder step vs memory floor (batch 1, beam 5)", "<= 1.3x the floor", ratio, 1.3,
                          False, detail))
    targets.append(_speedup(report, "int8", 9.0, "ORT int8 end to end vs reference (batch 1, beam 5)",
                            int8_parity_note(manifest)))
    b1, b8 = find(report, "ort", "fp32", 1, 5), find(report, "ort", "fp32", 8, 5)
    value = b8["images_per_s"] / b1["images_per_s"] if b1 and b8 else None
    detail = (f"batch 8 {b8['images_per_s']:.2f} img/s / batch 1 {b1['images_per_s']:.2f} img/s = {value:.2f}x"
              if value else "needs ort fp32 at batch 1 and 8, beam 5")
    targets.append(Target("ORT fp32 throughput, batch 8 vs batch 1 (beam 5)", ">= 1.2x images/s", value, 1.2, True,
                          detail))
    return targets


def breakdown(r: dict[str, Any]) -> dict[str, float] | None:
    """Where one configuration's end-to-end p50 goes: encoder, decoder steps, the rest (search on the
    host, preprocessing, Python). Uses p50s, so the parts need not add up exactly."""
    e2e, enc = r["e2e_ms"]["per_batch"]["p50"], r["encoder_ms"]["p50"]
    step, first, steps = r["step_ms"]["p50"], r["first_step_ms"].get("p50"), r.get("steps_mean") or 0
    if None in (e2e, enc, step):
        return None
    if r["engine"] == "reference":
        # The seed step was timed for the whole batch (one step of every image).
        decoder = step * steps
    else:
        decoder = (first if first is not None else step) + step * max(steps - 1, 0)
    rest = e2e - enc - decoder
    return {"e2e_ms": e2e, "encoder_ms": enc, "decoder_ms": decoder, "other_ms": rest,
            "encoder_share": enc / e2e, "decoder_share": decoder / e2e, "other_share": rest / e2e}


def analysis_facts(report: dict[str, Any], targets: list[Target]) -> list[str]:
    """Measured facts for the missed targets (Markdown bullet lines)."""
    missed = {t.name for t in targets if t.status == "missed"}
    if not missed:
        return []
    lines = []
    for engine, prec in (("ort", "fp32"), ("ort", "int8"), ("torch", "fp32"), ("reference", "fp32")):
        for batch in (1, 8):
            r = find(report, engine, prec, batch, 5)
            b = breakdown(r) if r else None
            if b:
                lines.append(f"- {engine} {prec}, batch {batch}, beam 5: end to end {b['e2e_ms']:.1f} ms = encoder "
                             f"{b['encoder_ms']:.1f} ms ({b['encoder_share']:.0%}) + decoder steps {b['decoder_ms']:.1f} ms "
                             f"({b['decoder_share']:.0%}) + other {b['other_ms']:.1f} ms ({b['other_share']:.0%})")
    floor = report.get("floor") or {}
    for prec, f in (floor.get("precisions") or {}).items():
        if f.get("floor_ms"):
            lines.append(f"- {prec} decoder_step weights read per step: {f['read_bytes'] / 1e6:.1f} MB; floor "
                         f"{f['floor_ms']:.3f} ms at {f['bandwidth_gbps']:.1f} GB/s")
    ref, ort = find(report, "reference", "fp32", 1, 5), find(report, "ort", "fp32", 1, 5)
    if ref and ort:
        lines.append(f"- decoder step at batch 1, beam 5: reference (seed step) {ref['step_ms']['p50']:.2f} ms, "
                     f"torch {_step(report, 'torch')}, ORT fp32 {ort['step_ms']['p50']:.3f} ms, ORT int8 "
                     f"{_step(report, 'ort', 'int8')}")
        lines.append(f"- encoder at batch 1: reference {ref['encoder_ms']['p50']:.1f} ms, ORT fp32 "
                     f"{ort['encoder_ms']['p50']:.1f} ms, ORT int8 {_enc(report, 'int8')}")
    for prec in ("fp32", "int8"):
        b1, b8 = find(report, "ort", prec, 1, 5), find(report, "ort", prec, 8, 5)
        if b1 and b8:
            lines.append(f"- ORT {prec} per image, batch 1 -> 8 (beam 5): encoder {b1['encoder_ms']['p50']:.1f} -> "
                         f"{b8['encoder_ms']['p50'] / 8:.1f} ms, decoder step {b1['step_ms']['p50']:.3f} -> "
                         f"{b8['step_ms']['p50'] / 8:.3f} ms")
    load = report["machine"].get("load_average"), report["machine"].get("load_average_end")
    lines.append(f"- load average (1, 5, 15 min) at start {load[0]}, at end {load[1]} on "
                 f"{report['machine']['cores']} cores")
    return lines


def _step(report, engine: str, precision: str = "fp32") -> str:
    r = find(report, engine, precision, 1, 5)
    return "-" if r is None else f"{r['step_ms']['p50']:.3f} ms"


def _enc(report, precision: str) -> str:
    r = find(report, "ort", precision, 1, 5)
    return "-" if r is None else f"{r['encoder_ms']['p50']:.1f} ms"
