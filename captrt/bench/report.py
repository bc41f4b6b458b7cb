"""Presenting a bench report (the dict run_bench returns): a terminal table, a Markdown table, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captrt.atomic import atomic_write_text
from captrt.bench.quality import quality_cell
from captrt.bench.summary import captions_cell

HEADERS = ("engine", "prec", "run", "provider", "N", "K", "steps", "encoder ms p50/p90/p99", "step ms p50/p90/p99",
           "e2e ms/batch p50/p90/p99", "ms/img", "img/s", "% of floor", "engine MB", "peak RSS MB", "step/floor",
           "same captions", "quality vs fp32")
RIGHT = frozenset(range(4, 16))  # right-aligned columns: N .. step/floor


def _num(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}" if abs(x) >= 1 else f"{x:.{digits + 1}f}"


def _pcts(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("p50") is None:
        return "-"
    return "/".join(_num(stats[k]) for k in ("p50", "p90", "p99"))


def _steps(r: dict[str, Any]) -> str:
    if r.get("steps"):
        return str(r["steps"])
    mean = r.get("steps_mean")
    return "-" if mean is None else f"~{mean:.1f}"


def run_cell(r: dict[str, Any]) -> str:
    """'default', 'streams SxT' (S streams of T threads) or 'options'."""
    variant = r.get("variant")
    if variant == "streams":
        return f"streams {r['streams']}x{r['threads']}"
    return variant or "default"


def row_cells(r: dict[str, Any]) -> list[str]:
    ratio, pct = r.get("floor_ratio"), r.get("pct_of_floor")
    return [r["engine"], r["precision"], run_cell(r), r["provider"], str(r["batch"]), str(r["beam"]), _steps(r),
            _pcts(r["encoder_ms"]), _pcts(r["step_ms"]), _pcts(r["e2e_ms"]["per_batch"]),
            _num(r["e2e_ms"]["per_image"]["p50"]), _num(r["images_per_s"]),
            "-" if pct is None else f"{pct:.1f}%", _num(r.get("rss_load_mb"), 0), _num(r["peak_rss_mb"], 0),
            "-" if ratio is None else f"{ratio:.2f}x", captions_cell(r), quality_cell(r.get("quality"))]


def floor_lines(report: dict[str, Any]) -> list[str]:
    """One line per precision: weight bytes a step reads, bandwidth, floor."""
    floor = report.get("floor") or {}
    lines = []
    bw = floor.get("bandwidth_gbps") or {}
    if bw:
        shown = ", ".join(f"{t} thread{'s' if int(t) > 1 else ''} {v:.1f} GB/s" for t, v in bw.items())
        lines.append(f"read bandwidth ({floor.get('bandwidth_method', '')}): {shown}")
    for prec, f in (floor.get("precisions") or {}).items():
        if f.get("floor_ms") is None:
            lines.append(f"memory floor {prec}: {f.get('note', 'not measured')}")
            continue
        gathered = sum(f.get("gathered_bytes", {}).values())
        lines.append(f"memory floor {prec}: decoder_step reads {f['read_bytes'] / 1e6:.1f} MB of weights per step "
                     f"({f['weight_bytes'] / 1e6:.1f} MB initializers, {gathered / 1e6:.1f} MB only gathered by "
                     f"word id) / {f['bandwidth_gbps']:.1f} GB/s ({f['threads']} threads) = {f['floor_ms']:.3f} ms")
    if floor.get("note"):
        lines.append(f"memory floor: {floor['note']}")
    compute = floor.get("compute") or {}
    if compute.get("note"):
        lines.append(f"fp32 floor: {compute['note']}")
    elif compute.get("peak_gflops"):
        shown = ", ".join(f"{k} {v:.0f}" for k, v in compute.get("gflops", {}).items())
        lines.append(f"fp32 matmul peak: {compute['peak_gflops']:.1f} GFLOP/s ({compute['peak_of']}; measured "
                     f"GFLOP/s: {shown})" + "".join(f"; {k} not measured: {v}" for k, v in compute["errors"].items()))
        unknown = compute.get("encoder_nodes_unknown") or []
        lines.append(f"fp32 floor: encoder {compute['encoder_flops'] / 1e9:.2f} GFLOP per image ({compute['encoder_nodes_counted']} "
                     f"Conv/MatMul/Gemm nodes of the fp32 graph at batch 1" + (f", {len(unknown)} without shapes left out"
                                                                            if unknown else "")
                     + f") / {compute['peak_gflops']:.1f} GFLOP/s = {compute['encoder_floor_ms']:.2f} ms, + per decoder "
                     "step the fp32 memory floor above / batch; % of floor = img/s over the floor's img/s "
                     "(a floor: every other cost counted as free)")
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The terminal table: aligned columns, then the floor lines and any skipped configurations."""
    rows = [list(HEADERS)] + [row_cells(r) for r in report["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    out = []
    for n, row in enumerate(rows):
        cells = (c.rjust(w) if i in RIGHT else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(floor_lines(report))
    out.extend(f"summary: {line}" for line in report.get("summary") or [])
    for s in report.get("skipped", []):
        variant = f" {s['variant']}" if s.get("variant") else ""
        out.append(f"skipped {s['engine']} {s['precision']}{variant}: {s['reason']}")
    out.append("engines take turns run by run on the same images, so their ratios come from the same minutes; "
               "engine MB: resident memory that loading the engine added; peak RSS: the process with all engines loaded")
    if any(r.get("variant") == "streams" for r in report["results"]):
        out.append("streams SxT rows: one caption() call over a list of images with batch_size=N, its batches spread "
                   "over S streams of T threads; ms/img and img/s are the call's wall time over its images")
    rss = {r.get("peak_rss_scope") for r in report["results"]}
    if "process" in rss:
        out.append("peak RSS: the process's peak so far (this kernel refuses to reset it per configuration)")
    return "\n".join(out)


def format_markdown(report: dict[str, Any]) -> str:
    """The same table in GitHub Markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in report["results"]]
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON (atomically: a reader never sees half a file)."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"--json {path}: is a directory; give a file name")
    atomic_write_text(path, json.dumps(report, indent=1, sort_keys=False) + "\n")
    return path
