"""The exporter's one error type."""

from __future__ import annotations


class ExportError(ValueError):
    """Export cannot proceed or its result failed a check; the message names the file or step."""
