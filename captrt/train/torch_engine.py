"""The PyTorch engine: the checkpoint's own modules under the same batched beam search.

Needs captrt[train] (torch, torchvision). The checkpoint comes from `checkpoint=` or from the model
directory's captrt.json `source.checkpoint`, looked up as find_checkpoint says, and must match
`source.checkpoint_sha256` when the manifest records one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from captrt.hashing import sha256_file
from captrt.runtime.engines.base import DecodeState, Engine, StepControls, StepOutput
from captrt.train.torch_step import EncoderGraph, StepGraph
from captrt.runtime.errors import EngineUnavailableError, ModelDirError

if TYPE_CHECKING:
    from captrt.runtime.model_dir import ModelDir


@dataclass
class TorchState(DecodeState):
    features: torch.Tensor | None = None
    att_proj: torch.Tensor | None = None
    h: torch.Tensor | None = None
    c: torch.Tensor | None = None



def find_checkpoint(model: "ModelDir", checkpoint: str | Path | None) -> Path:
    """The checkpoint the directory was exported from: `checkpoint` if given, else captrt.json's
    source.checkpoint (absolute as recorded; relative in the directory, then beside it), else a file
    of that base name in the directory, beside it or one folder down from its parent (demo_out/run/
    best.pt for demo_out/model, or a directory copied from another machine). When source.checkpoint_sha256
    is recorded, the file must match it: a file of the same name with other weights is refused."""
    source = model.manifest.get("source") if isinstance(model.manifest.get("source"), dict) else {}
    expected = source.get("checkpoint_sha256")
    expected = expected.lower() if isinstance(expected, str) and expected else None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ModelDirError(f"{path}: no such checkpoint file (checkpoint=)")
        candidates = [path]
    else:
        name = source.get("checkpoint")
        if not isinstance(name, str) or not name:
            raise ModelDirError(f"{model.manifest_path}: no source.checkpoint recorded; pass checkpoint=PATH")
        given = Path(name)
        recorded = [given] if given.is_absolute() else [model.path / given, model.path.parent / given]
        nearby = [model.path / given.name, model.path.parent / given.name,
                  *sorted(model.path.parent.glob(f"*/{given.name}"))] if given.name else []
        candidates = list(dict.fromkeys(p for p in recorded + nearby if p.is_file()))
        if not candidates:
            raise ModelDirError(f"{model.manifest_path}: source checkpoint {name!r} not found (looked at "
                                f"{', '.join(str(p) for p in recorded)} and for {given.name!r} near the "
                                "directory); pass checkpoint=PATH")
    if expected is None:
        return candidates[0]
    digests = {}
    for path in candidates:
        digests[path] = sha256_file(path)
        if digests[path] == expected:
            return path
    first = candidates[0]
    raise ModelDirError(f"{first}: sha256 {digests[first]} differs from captrt.json source.checkpoint_sha256 "
                        f"{expected}: not the checkpoint this model directory was exported from")


def load_source_checkpoint(model: "ModelDir", path: Path) -> Any:
    """Load the checkpoint at `path` and check it matches the directory's vocabulary and grid."""
    from captrt.train.checkpoint import CheckpointError, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise ModelDirError(str(exc)) from None
    if ckpt.vocab != model.vocab:
        raise ModelDirError(f"{path}: its vocabulary differs from {model.path / 'vocab.json'}")
    if ckpt.config.enc_size != model.grid:
        raise ModelDirError(f"{path}: enc_size {ckpt.config.enc_size} differs from captrt.json grid {model.grid}")
    return ckpt


class TorchEngine(Engine):
    """PyTorch eager. Options: checkpoint (path). precision fp32 only."""

    name = "torch"

    def __init__(self, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, checkpoint: str | Path | None = None, **options: Any):
        if options:
            raise ValueError(f"engine 'torch': unknown option(s) {sorted(options)}")
        super().__init__(model, device=device, precision=precision, threads=threads)
        if precision != "fp32":
            raise ValueError(f"engine 'torch' runs fp32 only (the checkpoint's weights), not {precision!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailableError("engine 'torch' with device='cuda': PyTorch sees no CUDA GPU "
                                         "(install a CUDA build of torch and check the driver), or use device='cpu'")
        if threads is not None:
            torch.set_num_threads(threads)  # process-wide in PyTorch: set only when asked
        self.checkpoint = find_checkpoint(model, checkpoint)
        ckpt = load_source_checkpoint(model, self.checkpoint)
        self._device = torch.device(device)
        net = ckpt.build_model(self._device)
        self._encoder = EncoderGraph(net).eval()
        self._step = StepGraph(net, model.max_beam).eval()

    @property
    def provider(self) -> str:
        return f"torch:{self._device.type}"

    def encode(self, images: np.ndarray) -> DecodeState:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(self._device)
            features, att_proj, h0, c0 = self._encoder(x)
        n = images.shape[0]
        return TorchState(batch=n, beams=1, features=features, att_proj=att_proj, h=h0.unsqueeze(1), c=c0.unsqueeze(1))

    @property
    def controls(self) -> bool:
        return True  # the checkpoint's modules take every decoding control, whatever the directory's format

    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False,
             controls: StepControls | None = None, want_logp: bool = False) -> StepOutput:
        assert isinstance(state, TorchState)
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self._device)
            o = torch.from_numpy(np.ascontiguousarray(origin, dtype=np.int64)).to(self._device)
            extra = () if controls is None else tuple(torch.from_numpy(a).to(self._device) for a in
                                                      (controls.ban_ids, controls.penalty_ids, controls.penalty))
            h, c, alpha, cand_logp, ids, logp = self._step(t, o, state.h, state.c, state.features, state.att_proj,
                                                           *extra)
        state.h, state.c, state.beams = h, c, tokens.shape[1]
        return StepOutput(cand_logp.cpu().numpy(), ids.cpu().numpy(), alpha.cpu().numpy() if want_alpha else None,
                          logp.cpu().numpy() if want_logp else None)

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        assert isinstance(state, TorchState)
        idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self._device)
        state.features, state.att_proj = state.features[idx], state.att_proj[idx]
        state.h, state.c, state.batch = state.h[idx], state.c[idx], len(rows)
        return state

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": str(self.checkpoint)}
