"""Exceptions of the runtime: small, torch-free, importable from anywhere in captrt.runtime."""

from __future__ import annotations


class ModelDirError(ValueError):
    """A model directory that cannot be used (missing, corrupt, inconsistent); the message names the file or field."""


class EngineUnavailableError(RuntimeError):
    """The requested engine/device/precision cannot run here; the message says what is missing or what to install."""


class UnverifiedPrecisionError(ValueError):
    """A precision whose captions were not verified within the quality budget on this machine (or failed it);
    the message gives the numbers and the way out (allow_unverified=True / --allow-unverified)."""
