"""One runner per engine: caption a batch end to end and report where the time went.

- EngineRunner: a runtime engine (ort, trt, torch) under the runtime's batched beam search
  (captrt.runtime.decoding.beam_search). The engine is wrapped in TimedEngine, a delegating proxy that
  times the real engine's encode/step calls: what is timed is exactly what the search runs.
- ReferenceRunner: captrt.train.reference (the seed's algorithm) on the model directory's checkpoint,
  one image at a time, the attention projection recomputed at every step: the baseline users have.

Forced steps: end=-1 matches no word id, so nothing ever completes and every search runs exactly
max_steps steps with all beams alive; the work per configuration is then fixed and comparable
across engines and models whatever the weights say.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captrt.bench.measure import now_ms
from captrt.runtime.model_dir import ModelDir

FORCE_END = -1  # no word id equals -1: no hypothesis ever ends


@dataclass
class RunSample:
    """Timings of one end-to-end call on one batch (milliseconds)."""

    e2e_ms: float
    encoder_ms: float
    step_ms: list[float] = field(default_factory=list)  # steps 2..T: every slot of the beam in use
    first_step_ms: list[float] = field(default_factory=list)  # step 1: one slot per image
    steps_per_image: list[int] = field(default_factory=list)  # decoder steps each image's search ran


def _steps_of(tokens: list[int], finished: bool) -> int:
    """Steps a search ran: one per generated word, plus the step that emitted <end>."""
    return len(tokens) + (1 if finished else 0)


class TimedEngine:
    """Delegates every attribute to `engine`; times encode() and step() (wall clock, ms)."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.encode_ms: list[float] = []
        self.step_ms: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def reset(self) -> None:
        self.encode_ms.clear()
        self.step_ms.clear()

    def encode(self, images: np.ndarray):
        t = now_ms()
        state = self._engine.encode(images)
        self.encode_ms.append(now_ms() - t)
        return state

    def step(self, state, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False):
        t = now_ms()
        out = self._engine.step(state, tokens, origin, want_alpha=want_alpha)
        self.step_ms.append(now_ms() - t)
        return out


class EngineRunner:
    """A runtime engine (ort / trt / torch) under captrt.runtime.decoding.beam_search."""

    def __init__(self, name: str, model: ModelDir, *, precision: str, device: str, threads: int | None,
                 checkpoint: str | Path | None = None):
        from captrt.runtime.engines import create_engine

        options: dict[str, Any] = {"checkpoint": checkpoint} if name == "torch" else {}
        self.name, self.model, self.precision = name, model, precision
        self.engine = create_engine(name, model, device=device, precision=precision, threads=threads, **options)
        self.timed = TimedEngine(self.engine)

    @property
    def provider(self) -> str:
        return str(self.engine.provider)

    def run(self, images: np.ndarray, beam: int, steps: int | None) -> RunSample:
        from captrt.runtime.decoding.beam import beam_search

        vocab = self.model.vocab
        self.timed.reset()
        t = now_ms()
        results = beam_search(self.timed, images, start=vocab.start, end=FORCE_END if steps else vocab.end,
                              vocab_size=len(vocab), beam_size=beam, max_steps=steps or self.model.max_steps)
        e2e = now_ms() - t
        # The search's first step runs one slot per image (K=1); the rest run the full beam.
        first = self.timed.step_ms[:1]
        rest = self.timed.step_ms[1:] or first
        return RunSample(e2e, sum(self.timed.encode_ms), list(rest), list(first),
                         [_steps_of(r.tokens, r.finished) for r in results])

    def seed_step_ms(self, images: np.ndarray, beam: int, warmup: int, iters: int) -> list[float] | None:
        """Only the reference times its step apart; engines' steps are timed inside the search."""
        return None

    def close(self) -> None:
        self.engine.close()


class ReferenceRunner:
    """captrt.train.reference on the checkpoint the model directory was exported from (CPU, fp32).

    A batch of N images is N searches in a row, as users run the seed today.
    """

    name = "reference"
    precision = "fp32"

    def __init__(self, model: ModelDir, *, threads: int | None, checkpoint: str | Path | None = None):
        import torch

        from captrt.train.torch_engine import find_checkpoint, load_source_checkpoint

        if threads is not None:
            torch.set_num_threads(threads)
        self.model, self.checkpoint = model, find_checkpoint(model, checkpoint)
        ckpt = load_source_checkpoint(model, self.checkpoint)
        self.net = ckpt.build_model("cpu")

    @property
    def provider(self) -> str:
        return "torch:cpu"

    def _encode(self, image: np.ndarray):
        import torch

        from captrt.train.model import normalize_uint8

        with torch.inference_mode():
            x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.uint8)))
            return self.net.encoder(x)  # (1, P, E)

    def run(self, images: np.ndarray, beam: int, steps: int | None) -> RunSample:
        from captrt.train.reference import reference_beam_search_features

        vocab = self.model.vocab
        end = FORCE_END if steps else vocab.end
        max_steps = steps or self.model.max_steps
        encoder_ms, per_image = 0.0, []
        t = now_ms()
        for image in images:
            t_enc = now_ms()
            features = self._encode(image)
            encoder_ms += now_ms() - t_enc
            result = reference_beam_search_features(self.net.decoder, features, vocab.start, end, beam, max_steps)
            per_image.append(_steps_of(result.tokens, result.finished))
        return RunSample(now_ms() - t, encoder_ms, steps_per_image=per_image)

    def seed_step_ms(self, images: np.ndarray, beam: int, warmup: int, iters: int) -> list[float]:
        """One seed step for the batch: per image, decoder.step with att_proj None (the attention
        projection recomputed, as the seed does) + log_softmax + topk over its `beam` rows."""
        import torch
        import torch.nn.functional as F

        dec = self.net.decoder
        start = self.model.vocab.start
        prepared = []
        with torch.inference_mode():
            for image in images:
                feats = self._encode(image)
                enc = feats.expand(beam, feats.shape[1], feats.shape[2])
                h, c = dec.init_hidden_state(enc)
                prepared.append((enc, h, c, torch.full((beam,), start, dtype=torch.long), torch.zeros(beam, 1)))
            samples = []
            for i in range(warmup + iters):
                t = now_ms()
                for enc, h, c, words, top in prepared:
                    _, _, logits, _ = dec.step(words, enc, None, h, c)
                    scores = top + F.log_softmax(logits, dim=1)
                    scores.view(-1).topk(beam, 0, True, True)
                if i >= warmup:
                    samples.append(now_ms() - t)
        return samples

    def close(self) -> None:
        self.net = None


def make_runner(name: str, model: ModelDir, *, precision: str, device: str, threads: int | None,
                checkpoint: str | Path | None = None):
    """The runner for engine `name` ('reference' or a runtime engine)."""
    if name == "reference":
        import importlib.util

        from captrt.runtime.errors import EngineUnavailableError

        if importlib.util.find_spec("torch") is None:  # a runtime-only install: skip it, with the reason
            raise EngineUnavailableError("engine 'reference' is the PyTorch reference search: pip install 'captrt[train]'")
        return ReferenceRunner(model, threads=threads, checkpoint=checkpoint)
    return EngineRunner(name, model, precision=precision, device=device, threads=threads, checkpoint=checkpoint)
