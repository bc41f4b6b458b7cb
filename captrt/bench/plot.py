"""Latency vs batch and beam, one line per engine x precision x batch (matplotlib, Agg: no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_latency(report: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Two panels: end-to-end ms per image and decoder-step p50, both against beam width; solid
    lines batch 1, dashed the larger batches; the memory floor of each precision as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r.get("variant") is None]  # streams/options rows: in the tables
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault((r["engine"], r["precision"], r["batch"]), []).append(r)
    variants = sorted({(e, p) for e, p, _ in series})
    colours = {v: f"C{i}" for i, v in enumerate(variants)}
    batches = sorted({b for _, _, b in series})
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(batches)}

    fig, (ax_e2e, ax_step) = plt.subplots(1, 2, figsize=(12, 4.8))
    for (engine, prec, batch), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["beam"])
        beams = [r["beam"] for r in rows]
        label = f"{engine} {prec}, batch {batch}"
        kw = {"color": colours[(engine, prec)], "linestyle": styles[batch], "marker": "o"}
        ax_e2e.plot(beams, [r["e2e_ms"]["per_image"]["p50"] for r in rows], label=label, **kw)
        ax_step.plot(beams, [r["step_ms"]["p50"] for r in rows], label=label, **kw)
    for prec, f in ((report.get("floor") or {}).get("precisions") or {}).items():
        if f.get("floor_ms"):
            colour = colours.get(("ort", prec), "gray")
            ax_step.axhline(f["floor_ms"], color=colour, linestyle=":", linewidth=1)
            ax_step.annotate(f"{prec} memory floor {f['floor_ms']:.2f} ms", (0.01, f["floor_ms"]),
                             xycoords=("axes fraction", "data"), fontsize=7, color=colour, va="bottom")
    steps = report.get("settings", {}).get("steps")
    ax_e2e.set_title("end to end per image (p50)" + (f", {steps} forced steps" if steps else ", real decoding"))
    ax_step.set_title("decoder step for the whole batch (p50)")
    all_beams = sorted({r["beam"] for r in results})
    for ax in (ax_e2e, ax_step):
        ax.set_yscale("log")
        ax.set_xlabel("beam")
        ax.set_ylabel("ms")
        ax.set_xticks(all_beams)
        ax.grid(True, which="both", alpha=0.3)
    ax_step.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
