"""Export a checkpoint to a captrt model directory (docs/model-format.md).

    from captrt.export import export_model, ExportError

Attributes load on first use: importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_model", "ExportError"]


def __getattr__(name: str) -> Any:
    if name == "export_model":
        from captrt.export.exporter import export_model

        return export_model
    if name == "ExportError":
        from captrt.export.errors import ExportError

        return ExportError
    raise AttributeError(f"module 'captrt.export' has no attribute {name!r}")
