"""The quality budget: a precision other than exact fp32 is served only after its captions were checked.

One measurement, used by the exporter for every variant it writes, by `captrt verify`, and by
Captioner.load on a machine that has not verified this engine and precision yet:

    report = measure(engine, parity_set, vocab)        # the batched search over the parity images
    report.passed                                      # BLEU-4 and CIDEr >= budget x fp32's

Rule (anchor: MLPerf Inference accepts a quantized model at >= 99% of its fp32 accuracy): with
reference captions, the variant's corpus BLEU-4 and CIDEr-D must each be >= `budget` (0.99) times
those of the fp32 captions stored in the parity set (same images, same search); without
references, >= 97% of its captions must be token-identical to fp32's.

Results are keyed by what decides the numbers (engine.numerics(): engine, precision, provider,
device, CPU model and SIMD flags, library versions) plus a fingerprint of the model's graphs and
parity set. The exporter records its own in captrt.json ("verification"); others are cached in
MODEL_DIR/cache/verify/ (or in memory when the directory is read-only) and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from captrt.files import read_regular
from captrt.runtime.errors import UnverifiedPrecisionError
from captrt.runtime.verification.parity_set import ParitySet, fingerprint
from captrt.runtime.verification.text_metrics import cider_d, corpus_bleu4

if TYPE_CHECKING:
    from captrt.runtime.engines.base import Engine
    from captrt.runtime.model_dir import ModelDir

log = logging.getLogger("captrt.verify")

DEFAULT_BUDGET = 0.99  # fraction of fp32's BLEU-4 and CIDEr a variant must keep
IDENTICAL_BUDGET = 0.97  # without references: fraction of captions identical to fp32's
VERIFY_BATCH = 16  # images per batched search while verifying (captions do not depend on it)
MIN_PARITY_WITH_REFERENCES = 100  # fewer cannot resolve 1% (the exporter warns)


@dataclass
class QualityReport:
    """A variant's captions against the fp32 captions of the same images (and their references)."""

    images: int
    identical: int
    references: bool  # judged by BLEU-4/CIDEr against dataset references (else by identical captions)
    bleu4_fp32: float | None = None
    bleu4: float | None = None
    cider_fp32: float | None = None
    cider: float | None = None
    budget: float = DEFAULT_BUDGET
    seconds: float = 0.0
    mismatches: list[dict[str, str]] = field(default_factory=list)  # up to 5 differing captions

    @property
    def identical_fraction(self) -> float:
        return self.identical / max(self.images, 1)

    @staticmethod
    def _ratio(variant: float | None, fp32: float | None) -> float | None:
        if variant is None or fp32 is None:
            return None
        return variant / fp32 if fp32 > 0 else (1.0 if variant >= 0 else 0.0)

    @property
    def bleu4_ratio(self) -> float | None:
        return self._ratio(self.bleu4, self.bleu4_fp32)

    @property
    def cider_ratio(self) -> float | None:
        return self._ratio(self.cider, self.cider_fp32)

    @property
    def score(self) -> float:
        """One number, higher is better: the smaller metric ratio (or the identical fraction)."""
        if self.references:
            return min(self.bleu4_ratio or 0.0, self.cider_ratio or 0.0)
        return self.identical_fraction

    @property
    def passed(self) -> bool:
        if self.images == 0:
            return False
        if self.references:
            return self.score >= self.budget - 1e-12
        return self.identical_fraction >= IDENTICAL_BUDGET - 1e-12

    def with_budget(self, budget: float | None) -> "QualityReport":
        return self if budget is None else QualityReport(**{**asdict(self), "budget": budget})

    def summary(self) -> dict[str, Any]:
        """The numbers a person reads: identical %, BLEU-4 and CIDEr as % of fp32, pass/fail."""
        pct = lambda r: None if r is None else round(100 * r, 2)  # noqa: E731
        return {"images": self.images, "identical": self.identical,
                "identical_pct": round(100 * self.identical_fraction, 2), "references": self.references,
                "bleu4_pct_of_fp32": pct(self.bleu4_ratio), "cider_pct_of_fp32": pct(self.cider_ratio),
                "budget": self.budget, "passed": self.passed}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.summary()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], budget: float | None = None) -> "QualityReport":
        names = cls.__dataclass_fields__
        report = cls(**{k: v for k, v in data.items() if k in names})
        return report.with_budget(budget)

    def verdict(self) -> str:
        """'passed (budget 99% of fp32's BLEU-4 and CIDEr)' or 'failed (...)'."""
        rule = (f"budget {100 * self.budget:g}% of fp32's BLEU-4 and CIDEr" if self.references
                else f"no reference captions: budget {100 * IDENTICAL_BUDGET:g}% identical")
        return f"{'passed' if self.passed else 'failed'} ({rule})"

    def describe(self) -> str:
        """One line: '96/100 captions identical to fp32 (96.0%), BLEU-4 99.4% and CIDEr 98.7% of fp32 (...): failed (...)'."""
        head = f"{self.identical}/{self.images} captions identical to fp32 ({100 * self.identical_fraction:.1f}%)"
        if self.references:
            head += (f", BLEU-4 {100 * (self.bleu4_ratio or 0):.1f}% and CIDEr {100 * (self.cider_ratio or 0):.1f}% "
                     f"of fp32 ({self.bleu4:.4f} vs {self.bleu4_fp32:.4f}, {self.cider:.4f} vs {self.cider_fp32:.4f})")
        return f"{head}: {self.verdict()}"


def judge_tokens(variant_tokens: Sequence[Sequence[int]], fp32_tokens: Sequence[Sequence[int]],
                 references: Sequence[Sequence[Sequence[str]]] | None, words: Callable[[Sequence[int]], list[str]],
                 *, budget: float = DEFAULT_BUDGET, names: Sequence[str] | None = None,
                 seconds: float = 0.0) -> QualityReport:
    """Compare a variant's captions (word ids per image) with fp32's on the same images."""
    if len(variant_tokens) != len(fp32_tokens):
        raise ValueError(f"{len(variant_tokens)} variant captions for {len(fp32_tokens)} fp32 captions")
    same = [list(a) == list(b) for a, b in zip(variant_tokens, fp32_tokens)]
    var_words = [words(t) for t in variant_tokens]
    fp_words = [words(t) for t in fp32_tokens]
    report = QualityReport(images=len(same), identical=int(sum(same)), references=references is not None,
                           budget=budget, seconds=round(seconds, 2))
    if references is not None:
        report.bleu4_fp32, report.bleu4 = corpus_bleu4(references, fp_words), corpus_bleu4(references, var_words)
        report.cider_fp32, report.cider = cider_d(references, fp_words), cider_d(references, var_words)
    labels = list(names) if names is not None else [str(i) for i in range(len(same))]
    report.mismatches = [{"image": labels[i], "fp32": " ".join(fp_words[i]), "variant": " ".join(var_words[i])}
                         for i, s in enumerate(same) if not s][:5]
    return report


def search_tokens(engine: "Engine", images: np.ndarray, *, start: int, end: int, vocab_size: int, beam_size: int,
                  max_steps: int, batch_size: int = VERIFY_BATCH,
                  on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The runtime's batched beam search over uint8 images (M, S, S, 3) -> word ids per image."""
    from captrt.runtime.decoding.beam import beam_search

    out: list[list[int]] = []
    limit = min(batch_size, engine.max_batch or batch_size)
    for s in range(0, len(images), limit):
        results = beam_search(engine, images[s:s + limit], start=start, end=end, vocab_size=vocab_size,
                              beam_size=beam_size, max_steps=max_steps)
        out.extend(list(r.tokens) for r in results)
        if on_batch is not None:
            on_batch(len(results))
    return out


def measure(engine: "Engine", parity: ParitySet, vocab: Any, *, budget: float = DEFAULT_BUDGET,
            batch_size: int = VERIFY_BATCH, on_batch: Callable[[int], None] | None = None) -> QualityReport:
    """Run the parity images through `engine` (beam and steps as the fp32 captions were made) and judge."""
    t0 = time.perf_counter()
    beam = min(parity.beam_size, engine.max_beam)
    tokens = search_tokens(engine, parity.images, start=vocab.start, end=vocab.end, vocab_size=len(vocab),
                           beam_size=beam, max_steps=parity.max_steps, batch_size=batch_size, on_batch=on_batch)
    return judge_tokens(tokens, parity.fp32_tokens, parity.references, vocab.decode, budget=budget,
                        names=parity.names, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ keys and records
def verification_key(model: "ModelDir", engine: "Engine") -> tuple[dict[str, Any], str]:
    """(key, its sha256): what decides this engine's numbers on this machine, for this model's files."""
    key = {**engine.numerics(), "model": fingerprint(model.graphs, model.manifest.get("parity_set"))}
    return key, key_digest(key)


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def record(report: QualityReport, key: dict[str, Any], digest: str, source: str,
           speed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored verification: the report, the key it holds for, where it was measured, and (when measured)
    its speed against fp32 on this machine (captrt.runtime.verification.speed: what precision="auto" ranks by)."""
    entry = {"engine": key.get("engine"), "precision": key.get("precision"), "source": source,
             "key": key, "key_sha256": digest, "report": report.to_dict()}
    if speed is not None:
        entry["speed"] = speed
    return entry


_MEMORY: dict[tuple[str, str], dict[str, Any]] = {}  # (model path, key digest) -> record, for read-only dirs
_MEMORY_LOCK = threading.Lock()


def _cache_file(model: "ModelDir", key: dict[str, Any], digest: str) -> Path:
    return model.path / "cache" / "verify" / f"{key.get('engine')}-{key.get('precision')}-{digest[:16]}.json"


def find_record(model: "ModelDir", key: dict[str, Any], digest: str) -> dict[str, Any] | None:
    """The export's record in captrt.json, else a cached one on disk, else one kept in memory."""
    for entry in model.manifest.get("verification", []) or []:
        if isinstance(entry, dict) and entry.get("key_sha256") == digest and isinstance(entry.get("report"), dict):
            return {**entry, "source": entry.get("source", "export")}
    path = _cache_file(model, key, digest)
    try:
        data = json.loads(read_regular(path).decode("utf-8"))
        if data.get("key_sha256") == digest and isinstance(data.get("report"), dict):
            return {**data, "source": "cache"}
    except (OSError, ValueError, AttributeError):
        pass  # absent or unreadable: verify again
    with _MEMORY_LOCK:
        return _MEMORY.get((str(model.path.resolve()), digest))


def all_records(model: "ModelDir") -> list[dict[str, Any]]:
    """Every verification of `model` this machine can see: captrt.json's (source 'export'), then the cached
    ones (MODEL_DIR/cache/verify, source as recorded: 'verify' or 'load'), then those kept in memory."""
    out = [{**e, "source": e.get("source", "export")} for e in model.manifest.get("verification", []) or []
           if isinstance(e, dict) and isinstance(e.get("report"), dict) and isinstance(e.get("key"), dict)]
    cache = model.path / "cache" / "verify"
    for path in sorted(cache.glob("*.json")) if cache.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("report"), dict) and isinstance(data.get("key"), dict):
            out.append(data)
    root = str(model.path.resolve())
    with _MEMORY_LOCK:
        out += [dict(e) for (where, _), e in _MEMORY.items() if where == root]
    return out


def store_record(model: "ModelDir", entry: dict[str, Any]) -> str:
    """Cache a record under MODEL_DIR/cache/verify (atomically); in memory when that is not writable.
    Returns where it went."""
    from captrt.atomic import atomic_write_text

    path = _cache_file(model, entry["key"], entry["key_sha256"])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entry, indent=2, default=str) + "\n")
        return str(path)
    except OSError as exc:
        log.info("model directory is read-only (%s): keeping the verification in memory", exc)
        with _MEMORY_LOCK:
            _MEMORY[(str(model.path.resolve()), entry["key_sha256"])] = entry
        return "memory"


# ----------------------------------------------------------------------------------------- at load
@dataclass
class Verification:
    """What Captioner.load established: status 'exact' (fp32 as exported, nothing to check),
    'verified' (within budget), or 'unverified' (missing or failed, loaded with allow_unverified)."""

    status: str
    report: QualityReport | None = None
    source: str | None = None  # 'export', 'cache', 'this load', or None
    key_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "source": self.source}
        if self.report is not None:
            out.update(self.report.summary())
        return out


def ensure_verified(model: "ModelDir", engine: "Engine", *, allow_unverified: bool = False,
                    budget: float | None = None, verify_now: bool | None = None) -> Verification:
    """Find, or measure now, this engine's verification; refuse (UnverifiedPrecisionError) when it is
    missing or failed unless allow_unverified. verify_now: run the parity set when no result is found
    (default: unless allow_unverified, which loads at once rather than spend time verifying)."""
    if verify_now is None:
        verify_now = not allow_unverified
    if not engine.needs_verification:
        return Verification("exact")
    budget = DEFAULT_BUDGET if budget is None else check_budget(budget)
    key, digest = verification_key(model, engine)
    found = find_record(model, key, digest)
    report: QualityReport | None = None
    source = None
    if found is not None:
        report, source = QualityReport.from_dict(found["report"], budget), found["source"]
    elif verify_now:
        parity = ParitySet.load(model)
        if parity is not None:
            what = f"{engine.name} {engine.precision} ({engine.provider})"
            log.warning("verifying %s on this machine against %s's parity set (%d images) before first use",
                        what, model.path, len(parity))
            report, source = measure(engine, parity, model.vocab, budget=budget), "this load"
            where = store_record(model, record(report, key, digest, "load"))
            log.warning("%s: %s (saved to %s)", what, report.describe(), where)
    if report is not None and report.passed:
        return Verification("verified", report, source, digest)
    reason = _refusal(model, engine, report, source)
    if not allow_unverified:
        raise UnverifiedPrecisionError(reason)
    log.warning("%s; loading it anyway because allow_unverified was given", reason)
    return Verification("unverified", report, source, digest)


def _refusal(model: "ModelDir", engine: "Engine", report: QualityReport | None, source: str | None) -> str:
    what = f"precision {engine.precision!r} on engine {engine.name!r} ({engine.provider})"
    if report is None:
        why = ("has no quality verification for this machine, and the model directory has no parity set to run "
               "(exported by an older captrt: re-export it)" if model.manifest.get("parity_set") is None else
               "has no quality verification for this machine")
    else:
        why = f"missed the quality budget ({source}): {report.describe()}"
    return (f"{model.path}: {what} {why}. Serve fp32, or load it anyway with allow_unverified=True "
            "(--allow-unverified on the command line)")


def check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget <= 1:
        raise ValueError(f"quality_budget must be a fraction in (0, 1], got {budget!r}")
    return float(budget)


# ------------------------------------------------------------------------------------ `captrt verify`
def verify_model(model_dir: Any, engine: str = "ort", device: str | None = None, precision: str = "fp32", *,
                 budget: float | None = None, threads: int | None = None, save: bool = True,
                 on_batch: Callable[[int], None] | None = None, speed: bool = True,
                 **engine_options: Any) -> tuple[QualityReport, dict[str, Any]]:
    """Measure an engine and precision on MODEL_DIR's parity set on this machine, now (never from a cache).

    Returns (report, facts): facts name the model, the engine's numerics, its speed against the same
    engine in fp32 (speed=True, for precisions that need verification: captrt.runtime.verification.speed) and where
    the result was cached (save=True, only for precisions that need verification), so the next load,
    and precision="auto", reuse it. Raises ModelDirError (bad directory, no parity set), ValueError,
    EngineUnavailableError.
    """
    from captrt.runtime.verification.speed import speed_against_fp32

    from captrt.runtime.engines import create_engine
    from captrt.runtime.errors import ModelDirError
    from captrt.runtime.model_dir import ModelDir

    budget = DEFAULT_BUDGET if budget is None else check_budget(budget)
    model = ModelDir.load(model_dir)
    parity = ParitySet.load(model)
    if parity is None:
        raise ModelDirError(f"{model.manifest_path}: no parity set (exported by an older captrt); re-export the "
                            "model to verify it")
    backend = create_engine(engine, model, device=device or ("cuda" if engine == "trt" else "cpu"),
                            precision=precision, threads=threads, **engine_options)
    try:
        report = measure(backend, parity, model.vocab, budget=budget, on_batch=on_batch)
        key, digest = verification_key(model, backend)
        timing = speed_against_fp32(backend, model, parity, threads=threads, **engine_options) \
            if speed and backend.needs_verification and backend.precision != "fp32" else None
        saved = store_record(model, record(report, key, digest, "verify", timing)) \
            if save and backend.needs_verification else None
        facts = {"model": model.model_id, "parity_images": len(parity), "engine": backend.describe(),
                 "key": key, "needs_verification": backend.needs_verification, "saved": saved, "speed": timing}
    finally:
        backend.close()
    return report, facts
