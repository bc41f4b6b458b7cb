"""One runner per engine: caption a batch end to end and report where the time went.

- EngineRunner: a runtime engine (ort, trt, torch) under the runtime's batched beam search
  (captrt.runtime.decoding.beam_search). The engine is wrapped in TimedEngine, a delegating proxy that
  times the real engine's encode/step calls: what is timed is exactly what the search runs.
- ReferenceRunner: captrt.train.reference (the seed's algorithm) on the model directory's checkpoint,
  one image at a time, the attention projection recomputed at every step, under torch.inference_mode():
  the baseline users have. TorchCompileRunner: the same search with the encoder through torch.compile
  (inductor, freezing), compiled and warmed up when created: the strongest PyTorch peer.
- OptionsRunner: an EngineRunner decoding with options (n-best, token scores, no-repeat n-grams, a minimum
  length: captrt.runtime.decoding), over the engine of the default row: the options path's cost.
- StreamRunner: Captioner.load(streams=S, threads=T) captioning a list of images with batch_size=B, so
  that the list's batches spread over the S streams: the library's own path, end to end.

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
PEERS = ("reference", "torch-compile")  # the seed's search in PyTorch: eager, and with the encoder compiled


@dataclass
class RunSample:
    """Timings of one end-to-end call on one batch (milliseconds)."""

    e2e_ms: float
    encoder_ms: float | None  # None: not timed apart (streams: S encoders may run at once)
    step_ms: list[float] = field(default_factory=list)  # steps 2..T: every slot of the beam in use
    first_step_ms: list[float] = field(default_factory=list)  # step 1: one slot per image
    steps_per_image: list[int] = field(default_factory=list)  # decoder steps each image's search ran
    tokens: list[list[int]] | None = None  # each image's best caption (word ids), to compare runners


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

    def step(self, state, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False, **controls: Any):
        t = now_ms()
        out = self._engine.step(state, tokens, origin, want_alpha=want_alpha, **controls)
        self.step_ms.append(now_ms() - t)
        return out


class EngineRunner:
    """A runtime engine (ort / trt / torch) under captrt.runtime.decoding.beam_search."""

    variant: str | None = None  # None: the default row of its engine x precision

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

    def images_per_run(self, batch: int) -> int:
        return batch

    def _search(self, images: np.ndarray, beam: int, steps: int | None):
        from captrt.runtime.decoding.beam import beam_search

        vocab = self.model.vocab
        return beam_search(self.timed, images, start=vocab.start, end=FORCE_END if steps else vocab.end,
                           vocab_size=len(vocab), beam_size=beam, max_steps=steps or self.model.max_steps)

    def run(self, images: np.ndarray, beam: int, steps: int | None) -> RunSample:
        self.timed.reset()
        t = now_ms()
        results = self._search(images, beam, steps)
        e2e = now_ms() - t
        # The search's first step runs one slot per image (K=1); the rest run the full beam.
        first = self.timed.step_ms[:1]
        rest = self.timed.step_ms[1:] or first
        return RunSample(e2e, sum(self.timed.encode_ms), list(rest), list(first),
                         [_steps_of(r.tokens, r.finished) for r in results], [list(r.tokens) for r in results])

    def seed_step_ms(self, images: np.ndarray, beam: int, warmup: int, iters: int) -> list[float] | None:
        """Only the reference times its step apart; engines' steps are timed inside the search."""
        return None

    def close(self) -> None:
        self.engine.close()


# The options row: the decoding controls a caller most often turns on together (n-best with scores,
# no repeated trigram, a minimum length), timed beside the default path.
OPTIONS_ROW = {"num_hypotheses": 3, "return_scores": True, "no_repeat_ngram_size": 3, "min_length": 5}


def options_for(beam: int, max_steps: int, base: dict[str, Any] | None = None):
    """The DecodingOptions of the options row at this beam and step count: num_hypotheses at most the beam,
    min_length below max_steps (DecodingOptions' own limits)."""
    from captrt.runtime.decoding import DecodingOptions

    o = dict(OPTIONS_ROW if base is None else base)
    if "num_hypotheses" in o:
        o["num_hypotheses"] = min(int(o["num_hypotheses"]), beam)
    if "min_length" in o:
        o["min_length"] = min(int(o["min_length"]), max_steps - 1)
    return DecodingOptions.build(beam_size=beam, max_steps=max_steps, **o)


class OptionsRunner(EngineRunner):
    """The options path: beam_search with decoding options, over another runner's engine (not owned)."""

    variant = "options"

    def __init__(self, base: EngineRunner, options: dict[str, Any] | None = None):
        if not base.engine.controls:
            from captrt.runtime.errors import EngineUnavailableError

            raise EngineUnavailableError(f"{base.model.path} is in model format version {base.model.format_version}: "
                                         "its step graph has no decoding controls (re-export it)")
        self.name, self.model, self.precision = base.name, base.model, base.precision
        self.engine, self.timed = base.engine, TimedEngine(base.engine)
        self.options = dict(OPTIONS_ROW if options is None else options)
        self.used: dict[str, Any] = {}  # the options of the last run, after the beam/step caps

    def _search(self, images: np.ndarray, beam: int, steps: int | None):
        from captrt.runtime.decoding.beam import beam_search

        vocab = self.model.vocab
        max_steps = steps or self.model.max_steps
        o = options_for(beam, max_steps, self.options).check(vocab, max_beam=self.engine.max_beam)
        self.used = o.changed()
        rules = o.resolve(vocab) if o.needs_graph_controls else None
        return beam_search(self.timed, images, start=vocab.start, end=FORCE_END if steps else vocab.end,
                           vocab_size=len(vocab), beam_size=beam, max_steps=max_steps, rules=rules,
                           num_hypotheses=o.num_hypotheses, return_scores=o.return_scores)

    def close(self) -> None:
        pass  # the engine belongs to the default row's runner


class _ForcedEndVocab:
    """A vocabulary whose <end> is FORCE_END: a Captioner given it never completes a hypothesis, so its
    searches run exactly max_steps steps, as the other rows' forced searches do."""

    end = FORCE_END

    def __init__(self, vocab: Any):
        self._vocab = vocab

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vocab, name)

    def __len__(self) -> int:
        return len(self._vocab)


class StreamRunner:
    """Captioner.load(engine, precision, streams=S, threads=T): one run captions a list of
    images_per_run(B) images with caption(batch_size=B), whose batches the Captioner spreads over its S
    streams (input order kept) while the calling thread prepares the next batch: S streams kept busy
    by the library itself, end to end, as a caller of caption() gets them. images/s = images / wall time."""

    variant = "streams"

    def __init__(self, name: str, model: ModelDir, *, precision: str, device: str, streams: int, threads: int,
                 most_streams: int, forced: bool, checkpoint: str | Path | None = None, batches_per_stream: int = 2):
        from captrt.runtime.captioner import Captioner

        options: dict[str, Any] = {"checkpoint": checkpoint} if name == "torch" else {}
        self.name, self.model, self.precision = name, model, precision
        self.streams, self.threads = streams, threads
        # Every stream count captions the same list: most_streams x batches_per_stream batches of B.
        self.batches_per_run = most_streams * batches_per_stream
        # The bench has checked the precision's quality already (and skipped or marked it): no second refusal.
        self.captioner = Captioner.load(model.path, engine=name, device=device, precision=precision,
                                        streams=streams, threads=threads, allow_unverified=True, **options)
        if forced:
            self.captioner.vocab = _ForcedEndVocab(self.captioner.vocab)
        self.engine = self.captioner.engine

    @property
    def provider(self) -> str:
        return str(self.captioner.provider)

    def images_per_run(self, batch: int) -> int:
        return batch * self.batches_per_run

    def run(self, images: np.ndarray, beam: int, steps: int | None, batch: int = 1) -> RunSample:
        t = now_ms()
        caps = self.captioner.caption(images, beam_size=beam, max_steps=steps or self.model.max_steps,
                                      batch_size=batch)
        e2e = now_ms() - t
        bad = [c.error for c in caps if c.error]
        if bad:
            raise RuntimeError(f"streams run: {len(bad)} image(s) failed: {bad[0]}")
        return RunSample(e2e, None, steps_per_image=[_steps_of(c.tokens, c.finished) for c in caps],
                         tokens=[list(c.tokens) for c in caps])

    def seed_step_ms(self, images: np.ndarray, beam: int, warmup: int, iters: int) -> None:
        return None

    def close(self) -> None:
        self.captioner.close()


class ReferenceRunner:
    """captrt.train.reference on the checkpoint the model directory was exported from (CPU, fp32).

    A batch of N images is N searches in a row, as users run the seed today.
    """

    name = "reference"
    precision = "fp32"
    variant = None

    def __init__(self, model: ModelDir, *, threads: int | None, checkpoint: str | Path | None = None):
        import torch

        from captrt.train.torch_engine import find_checkpoint, load_source_checkpoint

        if threads is not None:
            torch.set_num_threads(threads)
        self.model, self.checkpoint = model, find_checkpoint(model, checkpoint)
        ckpt = load_source_checkpoint(model, self.checkpoint)
        self.net = ckpt.build_model("cpu")
        self.encoder = self.net.encoder

    @property
    def provider(self) -> str:
        return "torch:cpu"

    def images_per_run(self, batch: int) -> int:
        return batch

    def _encode(self, image: np.ndarray):
        import torch

        from captrt.train.model import normalize_uint8

        with torch.inference_mode():
            x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.uint8)))
            return self.encoder(x)  # (1, P, E)

    def run(self, images: np.ndarray, beam: int, steps: int | None) -> RunSample:
        import torch

        from captrt.train.reference import reference_beam_search_features

        vocab = self.model.vocab
        end = FORCE_END if steps else vocab.end
        max_steps = steps or self.model.max_steps
        encoder_ms, per_image, tokens = 0.0, [], []
        # inference_mode for the whole search (the reference's own no_grad nests inside it): no autograd
        # bookkeeping and no version counters, PyTorch's fastest eager mode.
        with torch.inference_mode():
            t = now_ms()
            for image in images:
                t_enc = now_ms()
                features = self._encode(image)
                encoder_ms += now_ms() - t_enc
                result = reference_beam_search_features(self.net.decoder, features, vocab.start, end, beam, max_steps)
                per_image.append(_steps_of(result.tokens, result.finished))
                tokens.append(list(result.tokens))
            e2e = now_ms() - t
        return RunSample(e2e, encoder_ms, steps_per_image=per_image, tokens=tokens)

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
        self.net = self.encoder = None


class TorchCompileRunner(ReferenceRunner):
    """The reference search with its encoder through torch.compile (inductor, freezing: weights folded in as
    constants, the convolutions' BatchNorm fused), compiled and warmed up here, so no timed run compiles.
    The decoder steps stay eager: their shapes change as beams end, and each shape would recompile."""

    name = "torch-compile"

    def __init__(self, model: ModelDir, *, threads: int | None, checkpoint: str | Path | None = None):
        import torch

        from captrt.runtime.errors import EngineUnavailableError

        super().__init__(model, threads=threads, checkpoint=checkpoint)
        blank = np.full((model.image_size, model.image_size, 3), 127, np.uint8)
        eager = self.encoder
        try:
            self.encoder = torch.compile(eager, backend="inductor", options={"freezing": True})
            for _ in range(2):  # the first call compiles; the second runs what the timed calls will
                self._encode(blank)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op...: the row says why
            self.encoder = eager
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise EngineUnavailableError(f"torch.compile (inductor, freezing) failed on this machine: "
                                         f"{type(exc).__name__}: {first[:300]}") from None


def make_runner(name: str, model: ModelDir, *, precision: str, device: str, threads: int | None,
                checkpoint: str | Path | None = None):
    """The runner for engine `name` ('reference', 'torch-compile' or a runtime engine)."""
    if name in PEERS:
        import importlib.util

        from captrt.runtime.errors import EngineUnavailableError

        if importlib.util.find_spec("torch") is None:  # a runtime-only install: skip it, with the reason
            raise EngineUnavailableError(f"engine {name!r} is the PyTorch reference search: pip install 'captrt[train]'")
        cls = ReferenceRunner if name == "reference" else TorchCompileRunner
        return cls(model, threads=threads, checkpoint=checkpoint)
    return EngineRunner(name, model, precision=precision, device=device, threads=threads, checkpoint=checkpoint)
