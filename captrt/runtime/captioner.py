"""Captioner: load a model directory once, caption images from any thread.

    cap = Captioner.load("model_dir")                       # ONNX Runtime on the CPU
    [c] = cap.caption("photo.jpg", beam_size=5)
    c.text, c.tokens, c.score, c.finished, c.error

A Captioner holds only read-only state (the model directory and the engine's sessions); everything
a call mutates is local to the call, so one instance may be shared by many threads.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from captrt.runtime.auto import AUTO, PrecisionChoice, load_auto
from captrt.runtime.decoding import DecodingOptionError, DecodingOptions, Hypothesis, beam_search, sample_search
from captrt.runtime.decoding.options import GRAPH_OPTIONS
from captrt.runtime.engines import create_engine
from captrt.runtime.engines.base import Engine
from captrt.runtime.model_dir import ModelDir
from captrt.runtime.preprocess import InvalidImageError, describe_source, load_image
from captrt.runtime.streams import StreamPlan, StreamSlots, usable_cores
from captrt.runtime.verification.verify import Verification, check_budget, ensure_verified

try:  # PIL is a runtime dependency; the check is only for recognising single images
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

_SINGLE = (str, os.PathLike, bytes, bytearray, memoryview)


@dataclass
class Caption:
    """One image's caption.

    text: the words joined by spaces ("" when the image could not be read).
    tokens: word ids without <start>/<end>. score: cumulative log-probability (incl. <end> when
    finished; nan on error). attention: float32 (T, grid, grid), T = len(tokens), when asked.
    error: why the image could not be captioned, else None. finished: False when max_steps ended
    the search before any hypothesis emitted <end> (the best unfinished one is returned).
    hypotheses: num_hypotheses CaptionHypothesis, ranked ([0] is this caption; with sampling, the
    samples in draw order); token_scores: per-word log-probs when return_scores was asked.
    """

    text: str
    tokens: list[int]
    score: float
    attention: np.ndarray | None = field(default=None, repr=False)
    error: str | None = None
    finished: bool = True
    hypotheses: list["CaptionHypothesis"] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def token_scores(self) -> list[float] | None:
        return self.hypotheses[0].token_scores if self.hypotheses else None

    def to_dict(self, attention: bool = False, hypotheses: bool = False, scores: bool = True) -> dict[str, Any]:
        """JSON-ready: {"caption", "tokens", "score", "finished", "error"} (+ "attention" as nested
        (T, grid, grid) lists when asked and present; + "token_scores" when scored; + "hypotheses" as a
        list of {"caption", "tokens", "score", "token_scores", "finished"} when asked; scores=False
        leaves token scores out). An unreadable image has caption/score None."""
        if self.error is not None:
            record: dict[str, Any] = {"caption": None, "tokens": [], "score": None, "finished": False,
                                      "error": self.error}
        else:
            record = {"caption": self.text, "tokens": list(self.tokens), "score": _finite(self.score),
                      "finished": self.finished, "error": None}
            if scores and self.token_scores is not None:
                record["token_scores"] = [_finite(x) for x in self.token_scores]
        if attention:
            record["attention"] = self.attention.tolist() if self.attention is not None else None
        if hypotheses:
            record["hypotheses"] = [h.to_dict(scores) for h in self.hypotheses]
        return record


@dataclass
class CaptionHypothesis:
    """One of an image's hypotheses: text, tokens, score, token_scores (or None), finished."""

    text: str
    tokens: list[int]
    score: float
    token_scores: list[float] | None
    finished: bool

    def to_dict(self, scores: bool = True) -> dict[str, Any]:
        values = None if self.token_scores is None or not scores else [_finite(x) for x in self.token_scores]
        return {"caption": self.text, "tokens": list(self.tokens), "score": _finite(self.score),
                "token_scores": values, "finished": self.finished}


def _finite(x: float) -> float | None:
    """JSON has no infinities: a -inf log-prob (a banned word forced by a prefix) is written as null."""
    return float(x) if math.isfinite(x) else None


def _as_list(images: Any) -> list[Any]:
    """A single image (path, bytes, file object, PIL image, (H, W[, C]) array) or many -> list."""
    if isinstance(images, _SINGLE) or hasattr(images, "read"):
        return [images]
    if _PILImage is not None and isinstance(images, _PILImage.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Iterable):
        return list(images)
    return [images]  # let load_image name the unsupported type


def _check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> int:
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, np.integer))
    if wrong_type or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}{hint}, got {value!r}")
    return int(value)


class Captioner:
    """Captions images with one engine over one model directory. Use Captioner.load()."""

    def __init__(self, model: ModelDir, engine: Engine, *, image_options: dict[str, Any] | None = None,
                 verification: Verification | None = None, streams: int = 1,
                 precision_choice: PrecisionChoice | None = None):
        self.model = model
        self.engine = engine
        self.precision_choice = precision_choice  # what precision="auto" chose and why (None: asked explicitly)
        self.streams = streams
        self.slots = StreamSlots(streams)  # every search holds one: at most `streams` run at once
        self._pool: ThreadPoolExecutor | None = None  # runs one call's batches on the streams (streams > 1)
        self._pool_lock = threading.Lock()
        self.verification = verification or Verification("exact" if not engine.needs_verification else "unverified")
        self.vocab = model.vocab
        self.image_options = dict(image_options or {})

    @classmethod
    def load(cls, model_dir: str | os.PathLike, engine: str = "ort", device: str | None = None, precision: str = "fp32",
             threads: int | None = None, providers: str | None = None, *, streams: int | str = 1,
             oversubscribe: bool = False, image_formats: Sequence[str] | None = None,
             max_image_bytes: int | None = None, max_image_pixels: int | None = None,
             allow_unverified: bool = False, quality_budget: float | None = None,
             **engine_options: Any) -> "Captioner":
        """Open MODEL_DIR (captrt.json + graphs) with an engine.

        engine: 'ort' (ONNX Runtime), 'trt' (native TensorRT) or 'torch' (the checkpoint in PyTorch).
        device: 'cpu' | 'cuda' (default: 'cuda' for engine='trt', else 'cpu').
        precision: 'fp32' | 'fp16' | 'int8' (a variant the directory holds), 'bf16' / 'bf16-int8' (OpenVINO),
        or 'auto': the fastest precision verified for this engine on this machine, by the speeds the export
        or `captrt verify` measured here, fp32 when none is (captrt.runtime.auto; never an unverified or
        refused one; the choice and why in info()["precision_choice"]).
        streams: batched searches that may run at once over this one loaded model (default 1; 'auto':
        one per core); threads: intra-op threads of each (default: the cores divided among the streams);
        S x T above the usable cores raises ValueError unless oversubscribe (captrt.runtime.streams).
        providers: ONNX Runtime only, 'tensorrt' for
        its TensorRT execution provider (device='cuda'). image_*: limits passed to load_image.
        Every precision but exact fp32 must have met the quality budget (captrt.runtime.verification.verify) for
        this engine on this machine: the export's record, a cached one, or a check of the model's
        parity set run now (then cached). allow_unverified=True loads a precision whose check is
        missing or failed, with a warning; quality_budget overrides the 0.99 fraction of fp32's
        BLEU-4/CIDEr. Other keyword options go to the engine (e.g. checkpoint= for 'torch', device_id=).
        Raises ModelDirError (bad directory), ValueError (bad argument), EngineUnavailableError,
        UnverifiedPrecisionError (a ValueError: quality not verified).
        """

        if device is None:
            device = "cuda" if engine == "trt" else "cpu"
        model = ModelDir.load(Path(model_dir))
        if providers is not None:
            if engine != "ort":
                raise ValueError(f"providers={providers!r} applies to engine='ort' only, not {engine!r}")
            engine_options["providers"] = providers
        if quality_budget is not None:
            check_budget(quality_budget)
        plan = StreamPlan.resolve(streams, threads, oversubscribe=oversubscribe)
        if streams != 1 or threads is not None:
            threads = plan.threads  # the default (one stream, no threads given) stays the engines' own: all cores
        if engine == "openvino":
            engine_options.setdefault("streams", plan.streams)  # one compiled model, NUM_STREAMS = S
        choice = None
        if precision == AUTO:
            backend, verification, choice = load_auto(model, engine, device=device, threads=threads,
                                                      budget=quality_budget, allow_unverified=allow_unverified,
                                                      **engine_options)
        else:
            backend = create_engine(engine, model, device=device, precision=precision, threads=threads,
                                    **engine_options)
            try:
                verification = ensure_verified(model, backend, allow_unverified=allow_unverified, budget=quality_budget)
            except BaseException:
                backend.close()
                raise
        image_options = {k: v for k, v in (("formats", image_formats), ("max_bytes", max_image_bytes),
                                           ("max_pixels", max_image_pixels)) if v is not None}
        return cls(model, backend, image_options=image_options, verification=verification, streams=plan.streams,
                   precision_choice=choice)

    @property
    def provider(self) -> str:
        """What actually runs: e.g. 'CPUExecutionProvider', 'CUDAExecutionProvider', 'torch:cpu'."""
        return self.engine.provider

    @property
    def max_beam(self) -> int:
        return min(self.model.max_beam, self.engine.max_beam)

    def info(self) -> dict[str, Any]:
        """The public facts of what runs: model id, vocabulary, grid, limits, precisions, engine, provider."""
        m = self.model
        return {"id": m.model_id, "backbone": m.manifest.get("model", {}).get("backbone"),
                "vocab_size": m.vocab_size, "grid": m.grid, "image_size": m.image_size,
                "max_beam": self.max_beam, "max_steps": m.max_steps, "precisions": list(m.precisions),
                "precision": self.engine.precision, "engine": self.engine.name, "device": self.engine.device,
                "provider": self.provider, "numerics": self.engine.describe(), "streams": self.streams,
                "decoding_controls": self.engine.controls,
                "threads": self.engine.threads or usable_cores(),
                "verification": self.verification.to_dict(),
                **({"precision_choice": self.precision_choice.to_dict()} if self.precision_choice else {})}

    def read_image(self, source: Any, name: str | None = None) -> np.ndarray:
        """Decode one image as caption() would -> uint8 (S, S, 3), with this Captioner's format and size
        limits. Lets a caller decode ahead (e.g. on other threads) and pass the arrays to caption().
        name: how errors name the source. Raises InvalidImageError (or its subclasses)."""
        return load_image(source, self.model.image_size, name=name, **self.image_options)

    def warmup(self, batch_sizes: Sequence[int] = (1,), beam_size: int = 5) -> None:
        """Run a short search per batch size so the first real request pays no session/allocator set-up."""
        beam_size = min(beam_size, self.max_beam)
        blank = np.full((self.model.image_size, self.model.image_size, 3), 127, np.uint8)
        for n in batch_sizes:
            self.caption([blank] * n, beam_size=beam_size, max_steps=2, batch_size=n)

    def caption(self, images: Any, beam_size: int | None = None, max_steps: int | None = None,
                length_penalty: float | None = None, return_attention: bool = False, batch_size: int = 16,
                **options: Any) -> list[Caption]:
        """Caption one image or many; always returns a list, one Caption per input, in order.

        images: path, bytes, binary file object, PIL image, uint8 array (H, W, 3), a (N, H, W, 3)
        array, or a list of any of these. An image that cannot be read gets Caption.error and does
        not stop the others. batch_size: images per engine batch. beam_size, max_steps, length_penalty
        (GNMT alpha among completed hypotheses; 0 = raw log-probability, the seed's rule) and every other
        keyword are DecodingOptions' fields, None meaning the default (docs/decoding.md has the table:
        num_hypotheses, return_scores, suppress, ..., seed); a bad or unknown one raises
        DecodingOptionError (a ValueError) naming the field.
        """
        options = DecodingOptions.build(beam_size=beam_size, max_steps=max_steps, length_penalty=length_penalty,
                                        **options)
        return self.caption_with(images, options, return_attention=return_attention, batch_size=batch_size)

    def check_options(self, options: DecodingOptions, max_steps: int | None = None) -> DecodingOptions:
        """Validate options against this model and engine (DecodingOptionError names the field)."""
        options.check(self.vocab, max_beam=self.max_beam, max_steps=max_steps)
        if options.needs_graph_controls and not self.engine.controls:
            used = sorted(k for k in options.changed() if k in GRAPH_OPTIONS)
            raise DecodingOptionError(used[0], f"{self.model.path} is in model format version "
                                      f"{self.model.format_version}, whose step graph has no decoding controls "
                                      f"({', '.join(used)}): re-export it with `captrt export` to use them")
        return options

    def caption_with(self, images: Any, options: DecodingOptions, *, return_attention: bool = False,
                     batch_size: int = 16) -> list[Caption]:
        """caption() with a DecodingOptions (what the CLI and the service build once per request)."""
        self.check_options(options)
        batch_size = _check_int("batch_size", batch_size, 1)
        if self.engine.max_batch is not None:
            batch_size = min(batch_size, self.engine.max_batch)
        sources = _as_list(images)
        out: list[Caption | None] = [None] * len(sources)
        pixels: list[np.ndarray] = []  # decoded images waiting for a batch: memory stays O(streams x batch_size)
        where: list[int] = []
        pending: list[Future] = []
        try:
            for i, src in enumerate(sources):
                try:
                    pixels.append(load_image(src, self.model.image_size, **self.image_options))
                    where.append(i)
                except InvalidImageError as exc:
                    out[i] = Caption("", [], float("nan"), None, str(exc) or f"{describe_source(src)}: unreadable image",
                                     False)
                if len(pixels) == batch_size or (i == len(sources) - 1 and pixels):
                    batch = (np.stack(pixels), where, out, options, return_attention)
                    if self.streams == 1 or len(sources) <= batch_size:
                        self._run(*batch)
                    else:  # the next batch is decoded here while the streams run this one
                        if len(pending) >= self.streams:
                            pending.pop(0).result()
                        pending.append(self._executor().submit(self._run, *batch))
                    pixels, where = [], []
            for f in pending:
                f.result()
        finally:
            for f in pending:  # an error: let the batches in flight finish before the caller sees it
                f.cancel()
            wait(pending)
        return out  # type: ignore[return-value]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="captrt-stream")
            return self._pool

    def _run(self, batch: np.ndarray, where: list[int], out: list, o: DecodingOptions,
             return_attention: bool) -> None:
        with self.slots.hold():  # one stream; concurrent callers wait here rather than oversubscribe the cores
            self._search(batch, where, out, o, return_attention)

    def _search(self, batch: np.ndarray, where: list[int], out: list, o: DecodingOptions,
                return_attention: bool) -> None:
        v = self.vocab
        rules = o.resolve(v) if o.needs_graph_controls else None
        common = dict(start=v.start, end=v.end, vocab_size=len(v), max_steps=o.max_steps, rules=rules,
                      return_attention=return_attention, return_scores=o.return_scores)
        if o.sample:
            results = sample_search(self.engine, batch, num_samples=o.num_hypotheses, sampling_topk=o.sampling_topk,
                                    sampling_topp=o.sampling_topp, sampling_temperature=o.sampling_temperature,
                                    seed=o.seed, **common)
        else:
            results = beam_search(self.engine, batch, beam_size=o.beam_size, length_penalty=o.length_penalty,
                                  num_hypotheses=o.num_hypotheses, **common)
        g = self.model.grid
        for i, r in zip(where, results):
            attention = r.alphas.reshape(len(r.tokens), g, g) if r.alphas is not None else None
            hyps = [self._hypothesis(h) for h in r.hypotheses]
            out[i] = Caption(self.text(r.tokens), r.tokens, r.score, attention, None, r.finished, hyps)

    def _hypothesis(self, h: Hypothesis) -> CaptionHypothesis:
        return CaptionHypothesis(self.text(h.tokens), h.tokens, h.score, h.token_scores, h.finished)

    def text(self, tokens: Iterable[int]) -> str:
        return " ".join(self.vocab.decode(tokens))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.engine.close()

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Captioner({str(self.model.path)!r}, engine={self.engine.name!r}, provider={self.provider!r}, "
                f"precision={self.engine.precision!r})")
