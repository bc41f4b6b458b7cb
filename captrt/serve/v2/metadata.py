"""Who answers on /v2: the server's metadata and the one model's name, version and metadata.

The model's name is --model-name (default: the model directory's name); its version is the hash part
of the model id that /v1/model reports ('<directory>@<12 hex of captrt.json's sha256>'), so a
re-exported model is a new version. Any other name or version is 404.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captrt.runtime import ModelDir
from captrt.serve.upload import ServeError
from captrt.serve.v2.outputs import tensor_metadata

EXTENSIONS = ["binary_tensor_data"]


@dataclass(frozen=True)
class ModelIdentity:
    """The served model as the protocol names it; version None when the manifest could not be read
    (the load then fails and every model route answers 503)."""

    name: str
    version: str | None

    @classmethod
    def of(cls, model: ModelDir | None, model_path: Path, name: str | None) -> "ModelIdentity":
        directory, _, version = model.model_id.partition("@") if model is not None else ("", "", None)
        return cls(name or directory or Path(model_path).resolve().name, version or None)

    def check(self, name: str, version: str | None) -> None:
        """404 naming what is served when the path's model name or version is another."""
        if name != self.name:
            raise ServeError(404, f"unknown model {name!r}; this server serves {self.name!r}")
        if version is not None and version != self.version:
            raise ServeError(404, f"model {name!r} has no version {version!r}; it serves version {self.version!r}")


def server_metadata() -> dict[str, Any]:
    from captrt import __version__

    return {"name": "captrt", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(identity: ModelIdentity, info: dict[str, Any]) -> dict[str, Any]:
    """The metadata response: name, versions, platform ('captrt_<engine>'), inputs, outputs."""
    return {"name": identity.name, "versions": [identity.version] if identity.version else [],
            "platform": f"captrt_{info.get('engine', 'ort')}", **tensor_metadata(info.get("grid"))}
