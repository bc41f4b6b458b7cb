"""Presenting a bench report (the dict run_bench returns): a terminal table, a Markdown table, JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captrt.atomic import atomic_write_text
from captrt.bench.quality import quality_cell

HEADERS = ("engine", "prec", "provider", "N", "K", "steps", "encoder ms p50/p90/p99", "step ms p50/p90/p99",
           "e2e ms/batch p50/p90/p99", "ms/img", "img/s", "engine MB", "peak RSS MB", "step/floor",
           "quality vs fp32")


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


def row_cells(r: dict[str, Any]) -> list[str]:
    ratio = r.get("floor_ratio")
    return [r["engine"], r["precision"], r["provider"], str(r["batch"]), str(r["beam"]), _steps(r),
            _pcts(r["encoder_ms"]), _pcts(r["step_ms"]), _pcts(r["e2e_ms"]["per_batch"]),
            _num(r["e2e_ms"]["per_image"]["p50"]), _num(r["images_per_s"]),
            _num(r.get("rss_load_mb"), 0), _num(r["peak_rss_mb"], 0),
            "-" if ratio is None else f"{ratio:.2f}x", quality_cell(r.get("quality"))]


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
    return lines


def format_table(report: dict[str, Any]) -> str:
    """The terminal table: aligned columns, then the floor lines and any skipped configurations."""
    rows = [list(HEADERS)] + [row_cells(r) for r in report["results"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    right = set(range(3, len(HEADERS) - 1))
    out = []
    for n, row in enumerate(rows):
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.extend(floor_lines(report))
    for s in report.get("skipped", []):
        out.append(f"skipped {s['engine']} {s['precision']}: {s['reason']}")
    out.append("engines take turns run by run on the same images, so their ratios come from the same minutes; "
               "engine MB: resident memory that loading the engine added; peak RSS: the process with all engines loaded")
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
