"""Model directories for the runtime tests, made by the real exporter (captrt.export.exporter)."""

from __future__ import annotations

from pathlib import Path


def make_model_dir(checkpoint: Path, out_dir: Path, *, max_beam: int = 10) -> Path:
    from captrt.export.exporter import export_model

    # One parity image keeps the export's own check cheap; the runtime tests do the real parity.
    export_model(checkpoint, out_dir, max_beam=max_beam, parity_count=1, progress=False)
    return Path(out_dir)
