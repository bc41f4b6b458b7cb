"""The engine interface: what the beam search needs from a backend (ONNX Runtime, TensorRT, PyTorch).

An engine runs the two graphs of a model directory (docs/model-format.md) and nothing else: the
search itself (captrt.runtime.decoding) is numpy on the host and identical for every engine. The
per-call decoding state lives in a `DecodeState` the engine creates in `encode` and the search
passes back to `step`/`select`, so an engine may keep h, c, features and att_proj wherever it
likes (host arrays, CUDA OrtValues, TensorRT device buffers) and only the small per-step arrays
cross the host/device boundary:

    up:   tokens (N, K) int64, origin (N, K) int64, rows (N',) int64, and with decoding controls
          (format version 2) ban_ids (N, K, B) int64, penalty_ids (N, K, R) int64, penalty (N,) float32
    down: cand_logp (N, K, C) float32, cand_ids (N, K, C) int64, alpha (N, K, P) float32 (if asked),
          logp (N, K, V) float32 (if asked: prefix forcing and sampling)

Contract, in the order the search calls it (one decode of one batch of images):

    state = engine.encode(images)                 # images uint8 (N, S, S, 3); state.beams == 1
    out = engine.step(state, tokens, origin, want_alpha=...)   # tokens/origin (N, K); K == 1 first
    ... state now holds h/c of shape (N, K, H): state.beams == K
    state = engine.select(state, rows)            # keep images `rows` (ascending), drop the rest
    out = engine.step(state, ...)                 # and so on; engine.release(state) at the end

Thread safety: one engine is shared by every thread of a Captioner; all mutable per-call data
must live in the DecodeState (or in per-thread objects the engine manages itself, e.g. TensorRT
execution contexts). `step` may update `state` in place and must return it unchanged otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:  # only for annotations: keeps this module import-light
    from captrt.runtime.model_dir import ModelDir

ENGINES = ("ort", "trt", "torch", "openvino")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "bf16-int8")


@dataclass
class DecodeState:
    """Per-call decoding state. Engines subclass it and add their buffers (host or device).

    batch: N, the images still decoding; beams: K_prev, the slots per image held in h/c
    (1 right after encode).
    """

    batch: int
    beams: int = 1


@dataclass
class StepControls:
    """Per-slot logit processing for one step (captrt.runtime.decoding.processing builds it).

    ban_ids:     int64 (N, K, B) words set to -inf; padding is V (the vocabulary size).
    penalty_ids: int64 (N, K, R) words under the repetition penalty; padding V.
    penalty:     float32 (N,) theta per image (1 = none).
    """

    ban_ids: np.ndarray
    penalty_ids: np.ndarray
    penalty: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return {"ban_ids": self.ban_ids, "penalty_ids": self.penalty_ids, "penalty": self.penalty}

    @classmethod
    def neutral(cls, n: int, k: int, vocab_size: int) -> "StepControls":
        """Controls that change nothing (the default path): one padding id each, theta = 1."""
        pad = np.full((n, k, 1), vocab_size, dtype=np.int64)
        return cls(pad, pad, np.ones(n, dtype=np.float32))


@dataclass
class StepOutput:
    """What one decoder step brings back to the host.

    cand_logp: float32 (N, K, C), top-C processed log_softmax per slot, sorted descending.
    cand_ids:  int64   (N, K, C), their word ids.
    alpha:     float32 (N, K, P) attention that produced this step's words, or None when not asked.
    logp:      float32 (N, K, V) every word's processed log_softmax, or None when not asked.
    """

    cand_logp: np.ndarray
    cand_ids: np.ndarray
    alpha: np.ndarray | None = None
    logp: np.ndarray | None = None


class Engine(ABC):
    """A backend that runs encoder and decoder_step of one precision variant of a model directory.

    Constructors take (model, *, device, precision, threads, **options) and raise
    captrt.runtime.errors.EngineUnavailableError (message: what is missing, what to install) when
    the backend or device cannot run here, and ModelDirError for a bad model directory.
    """

    name: ClassVar[str] = "base"  # "ort", "trt", "torch", "openvino"
    # The most images one encode() may take (e.g. a TensorRT profile's limit), None = no limit; the
    # Captioner splits larger batches. A plain attribute: engines set it in __init__.
    max_batch: int | None = None

    def __init__(self, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None):
        self.model = model
        self.device = device
        self.precision = precision
        self.threads = threads

    @property
    @abstractmethod
    def provider(self) -> str:
        """What actually runs, e.g. 'CPUExecutionProvider', 'CUDAExecutionProvider', 'tensorrt', 'torch:cpu'."""

    @property
    def max_beam(self) -> int:
        """C: candidates per slot returned by step; the largest beam this engine can search exactly."""
        return int(self.model.max_beam)

    @abstractmethod
    def encode(self, images: np.ndarray) -> DecodeState:
        """images uint8 (N, S, S, 3) RGB -> a state holding features (N, P, E), att_proj (N, P, A),
        h/c = h0/c0 as (N, 1, H); state.batch == N, state.beams == 1."""

    @property
    def controls(self) -> bool:
        """True when the step graph takes decoding controls (ban_ids, penalty_ids, penalty; the logp
        output): model format version 2. Older directories decode the default path only."""
        return self.model is not None and self.model.controls

    @property
    def vocab_size(self) -> int:
        """V: the padding id of the control inputs."""
        return self.model.vocab_size

    def step_controls(self, n: int, k: int, controls: StepControls | None, want_logp: bool, *,
                      plain: bool = False) -> StepControls | None:
        """What one step of N images x K slots feeds its graph: the caller's controls, neutral ones on the
        default path, or None when the graph that runs takes none: `plain` (the engine runs a step graph
        without the processing for the default path, captrt.runtime.engines.plain_step) or a format-1 graph, where
        asking for controls or logp is a ValueError. Every engine resolves its controls here."""
        if not self.controls:
            if controls is not None or want_logp:
                raise ValueError(f"{getattr(self.model, 'path', 'this model')}: the step graph has no decoding "
                                 "controls (model format version 1): re-export the model with this captrt to use them")
            return None
        if controls is None:
            return None if plain and not want_logp else StepControls.neutral(n, k, self.vocab_size)
        return controls

    @staticmethod
    def word_logp(logp: np.ndarray) -> np.ndarray:
        """A step graph's logp (N, K, V + 1) without its padding column (always -inf, not a word): (N, K, V)."""
        return logp[..., :-1]

    @abstractmethod
    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *,
             want_alpha: bool = False, controls: StepControls | None = None,
             want_logp: bool = False) -> StepOutput:
        """One decoder step for N images x K slots.

        tokens, origin: int64 (N, K), C-contiguous; 0 <= origin < state.beams. Slot k of image n
        continues slot origin[n, k] of the incoming h/c with word tokens[n, k]. Afterwards the
        state holds the new h/c (N, K, H) and state.beams == K. controls: the logit processing
        (None: none; engines with `controls` then feed neutral values); want_logp: return logp.
        Both need `self.controls`.
        """

    @abstractmethod
    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        """Keep only images `rows` (int64, strictly increasing indices into the current N) of
        features, att_proj, h and c; returns the (possibly same) state with batch == len(rows)."""

    def release(self, state: DecodeState) -> None:
        """Free the state's buffers early (device memory); the default lets garbage collection do it."""

    def close(self) -> None:
        """Free the engine's resources (sessions, engines, contexts). Idempotent."""

    @property
    def needs_verification(self) -> bool:
        """True when this engine's numerics are not the exported graphs' on ONNX Runtime's CPU provider,
        so its captions must be checked against the model directory's parity set before serving
        (captrt.runtime.verification.verify). fp32 engines that compute in fp32 are exact; every lower precision,
        and any precision the engine decides at load time (TensorRT builds, OpenVINO bf16), is not."""
        return self.precision != "fp32"

    def numerics(self) -> dict[str, Any]:
        """What decides this engine's numbers: the key of a cached verification (captrt.runtime.verification.verify).
        Engines add their library versions and the device they run on (GPU name, effective precision)."""
        from captrt.runtime.hardware import cpu_flags, cpu_model

        return {"engine": self.name, "precision": self.precision, "provider": self.provider, "device": self.device,
                "cpu": cpu_model(), "cpu_flags": cpu_flags(), "libraries": {}}

    def describe(self) -> dict[str, Any]:
        """A small summary for logs and `captrt info`."""
        return {"engine": self.name, "provider": self.provider, "device": self.device,
                "precision": self.precision, "max_beam": self.max_beam}
