"""The ONNX Runtime GPU path (CUDA or TensorRT EP): IO binding with the decoding state on the device.

features, att_proj, h and c stay on the GPU between steps as OrtValues; per step only tokens/origin
(N, K) int64 go up and the candidates (N, K, C) (plus alpha when asked) come down. Dropping finished
images is free when the kept images are a contiguous run of rows (a pointer offset into the same
buffer); otherwise the rows go through the host once (a rare event: at most once per finished image).

Written against ONNX Runtime's documented Python API (IOBinding.bind_input/bind_output,
run_with_iobinding, get_outputs, OrtValue.ortvalue_from_numpy/data_ptr/numpy); it cannot run
without a GPU, so it is isolated here and its tests skip on CPU-only machines.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

import numpy as np
import onnxruntime as ort

from captrt.runtime.engines.base import DecodeState, Engine, StepOutput


@dataclass(frozen=True)
class DeviceTensor:
    """A float32 tensor inside a device OrtValue: owner keeps the memory alive; offset in elements."""

    owner: ort.OrtValue
    offset: int
    shape: tuple[int, ...]

    @classmethod
    def wrap(cls, value: ort.OrtValue) -> "DeviceTensor":
        return cls(value, 0, tuple(value.shape()))

    @property
    def ptr(self) -> int:
        return self.owner.data_ptr() + 4 * self.offset  # float32 elements

    def reshape(self, *shape: int) -> "DeviceTensor":
        assert prod(shape) == prod(self.shape)
        return replace(self, shape=tuple(shape))

    def bind(self, binding: ort.IOBinding, name: str, device: str, device_id: int) -> None:
        binding.bind_input(name, device, device_id, np.float32, list(self.shape), self.ptr)

    def to_host(self) -> np.ndarray:
        flat = self.owner.numpy().reshape(-1)  # copies the owner to the host
        return flat[self.offset:self.offset + prod(self.shape)].reshape(self.shape)

    def rows(self, rows: np.ndarray, device: str, device_id: int) -> "DeviceTensor":
        """Keep rows (first axis). Contiguous runs are a view; anything else is re-uploaded."""
        row = prod(self.shape[1:])
        first = int(rows[0])
        if np.array_equal(rows, np.arange(first, first + len(rows))):
            return replace(self, offset=self.offset + first * row, shape=(len(rows),) + self.shape[1:])
        host = np.ascontiguousarray(self.to_host()[rows])
        return DeviceTensor.wrap(ort.OrtValue.ortvalue_from_numpy(host, device, device_id))


@dataclass
class CudaState(DecodeState):
    features: DeviceTensor | None = None
    att_proj: DeviceTensor | None = None
    h: DeviceTensor | None = None
    c: DeviceTensor | None = None


class CudaBinding:
    """encode/step/select of OrtEngine on the GPU. One IOBinding per call: calls share nothing mutable.

    device is 'cuda' in production; 'cpu' runs the very same binding logic (views, pointer offsets,
    re-uploads) on a machine without a GPU, which is how it is tested there.
    """

    def __init__(self, encoder: ort.InferenceSession, device_id: int, device: str = "cuda"):
        self.encoder, self.device_id, self.device = encoder, device_id, device

    def encode(self, images: np.ndarray) -> CudaState:
        b = self.encoder.io_binding()
        b.bind_cpu_input("image", images)
        names = ("features", "att_proj", "h0", "c0")
        for name in names:
            b.bind_output(name, self.device, self.device_id)
        self.encoder.run_with_iobinding(b)
        features, att_proj, h0, c0 = (DeviceTensor.wrap(v) for v in b.get_outputs())
        n = images.shape[0]
        # h0/c0 are (N, H); the step wants (N, K_prev=1, H): same memory, new shape.
        return CudaState(batch=n, beams=1, features=features, att_proj=att_proj,
                         h=h0.reshape(n, 1, h0.shape[-1]), c=c0.reshape(n, 1, c0.shape[-1]))

    def step(self, decoder: ort.InferenceSession, state: DecodeState, tokens: np.ndarray, origin: np.ndarray,
             want_alpha: bool, controls: dict[str, np.ndarray] | None = None, want_logp: bool = False) -> StepOutput:
        """decoder: the step graph this step runs (plain, or with controls); controls: its control inputs
        (Engine.step_controls' feeds; empty for a plain or format-1 graph)."""
        assert isinstance(state, CudaState)
        b = decoder.io_binding()
        b.bind_cpu_input("tokens", tokens)
        b.bind_cpu_input("origin", origin)
        for name, value in (controls or {}).items():  # small (N, K, B) id lists go up with the tokens
            b.bind_cpu_input(name, value)
        for name in ("h", "c", "features", "att_proj"):
            getattr(state, name).bind(b, name, self.device, self.device_id)
        b.bind_output("h_out", self.device, self.device_id)
        b.bind_output("c_out", self.device, self.device_id)
        # alpha comes down only when asked; otherwise it stays on the device and is dropped
        b.bind_output("alpha", *(("cpu", 0) if want_alpha else (self.device, self.device_id)))
        b.bind_output("cand_logp", "cpu")
        b.bind_output("cand_ids", "cpu")
        if controls:  # a format-2 graph: the (N, K, V) log-probs come down only for prefixes and sampling
            b.bind_output("logp", *(("cpu", 0) if want_logp else (self.device, self.device_id)))
        decoder.run_with_iobinding(b)
        h, c, alpha, cand_logp, cand_ids, *logp = b.get_outputs()
        state.h, state.c, state.beams = DeviceTensor.wrap(h), DeviceTensor.wrap(c), tokens.shape[1]
        return StepOutput(cand_logp.numpy(), cand_ids.numpy(), alpha.numpy() if want_alpha else None,
                          Engine.word_logp(logp[0].numpy()) if want_logp else None)

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        assert isinstance(state, CudaState)
        for name in ("features", "att_proj", "h", "c"):
            setattr(state, name, getattr(state, name).rows(rows, self.device, self.device_id))
        state.batch = len(rows)
        return state

    def release(self, state: DecodeState) -> None:
        if isinstance(state, CudaState):
            state.features = state.att_proj = state.h = state.c = None
