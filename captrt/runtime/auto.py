"""precision="auto": the fastest precision verified for this engine on this machine, fp32 otherwise.

At load, every verification of the model this machine can see (captrt.json's from the export, the
cached ones from `captrt verify` and first loads: captrt.runtime.verification.verify.all_records) is matched to
this engine and this machine: same engine and device, same CPU model and SIMD flags, same library
versions as installed here, same model files. Each precision of the engine is then
- fp32: the baseline (speedup 1.0; exact on the CPU);
- a candidate when a matching verification passed the quality budget and carries a speed measured
  here against the same engine's fp32 (captrt.runtime.verification.speed, recorded by the export or `captrt verify`);
- otherwise not chosen, with the reason: refused at export, missed the budget, verified but never
  timed here, or not verified on this machine.
Candidates are tried fastest first, if at least MIN_GAIN faster than fp32: the engine is built and its verification
looked up by its exact key (never measured now, never loaded unverified); the first that holds wins,
else fp32. The choice and the table behind it go to Captioner.info()["precision_choice"].
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from captrt.runtime.model_dir import ENGINE_PRECISIONS
from captrt.runtime.errors import EngineUnavailableError, ModelDirError, UnverifiedPrecisionError
from captrt.runtime.verification.verify import QualityReport, Verification, all_records, ensure_verified

if TYPE_CHECKING:
    from captrt.runtime.engines.base import Engine
    from captrt.runtime.model_dir import ModelDir

AUTO = "auto"
# A precision must be this much faster than fp32 to be worth its rounding: below it, a speed measured on a
# busy machine is within noise, and fp32's captions are exact.
MIN_GAIN = 1.05
log = logging.getLogger("captrt.auto")


@dataclass
class PrecisionChoice:
    """What precision="auto" chose and why: `candidates` in the order considered, one dict per precision."""

    chosen: str
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"requested": AUTO, "chosen": self.chosen, "reason": self.reason,
                "candidates": [dict(c) for c in self.candidates]}


def engine_precisions(model: "ModelDir", engine: str) -> list[str]:
    """The precisions `engine` could run on `model`: its file variants, then the engine's own (OpenVINO bf16)."""
    if engine == "torch":
        return ["fp32"]
    # file variants, and those the export refused (listed, never loaded: their files are not there)
    out = list(dict.fromkeys([*model.precisions, *(p for p in (model.manifest.get("refused") or {})
                                                   if p not in ENGINE_PRECISIONS and "-" not in p)]))
    for precision, engines in ENGINE_PRECISIONS.items():
        if engine in engines:
            try:
                model.require_precision(precision)
            except ModelDirError:
                continue
            out.append(precision)
    if engine == "openvino":  # its CPU plugin takes no fp16 graphs
        from captrt.runtime.engines.openvino import SUPPORTED

        out = [p for p in out if p in SUPPORTED]
    return out


def _installed(library: str) -> str | None:
    try:
        return str(importlib.import_module(library).__version__)
    except Exception:  # noqa: BLE001 - not installed, or broken: then no record for it matches
        return None


def _machine_matches(key: dict[str, Any], engine: str, device: str, model_print: str) -> bool:
    """The record's key holds on this machine as far as can be told without building its engine."""
    from captrt.runtime.hardware import cpu_flags, cpu_model

    libraries = key.get("libraries") or {}
    return (key.get("engine") == engine and key.get("device") == device and key.get("model") == model_print
            and key.get("cpu") == cpu_model() and list(key.get("cpu_flags") or []) == cpu_flags()
            and all(_installed(lib) == version for lib, version in libraries.items()))


def survey(model: "ModelDir", engine: str, device: str, budget: float | None = None) -> list[dict[str, Any]]:
    """One entry per precision of `engine`: precision, status, speedup (when known), why; fp32 first."""
    from captrt.runtime.verification.parity_set import fingerprint

    model_print = fingerprint(model.graphs, model.manifest.get("parity_set"))
    records = [r for r in all_records(model) if _machine_matches(r["key"], engine, device, model_print)]
    refused = model.manifest.get("refused") or {}
    out: list[dict[str, Any]] = []
    for precision in engine_precisions(model, engine):
        if precision == "fp32":
            out.append({"precision": "fp32", "status": "baseline", "speedup": 1.0,
                        "why": "the yardstick (exact on the CPU); chosen when nothing faster is verified"})
            continue
        mine = [r for r in records if r["key"].get("precision") == precision]
        judged = [(QualityReport.from_dict(r["report"], budget), r) for r in mine]
        passed = [(q, r) for q, r in judged if q.passed]
        timed = [(q, r) for q, r in passed if isinstance(r.get("speed"), dict) and r["speed"].get("speedup")]
        entry: dict[str, Any] = {"precision": precision}
        if timed:
            q, r = max(timed, key=lambda qr: str(qr[1]["speed"].get("measured_at", "")))  # the latest timing
            entry.update(status="verified", speedup=float(r["speed"]["speedup"]),
                         ms_per_image=r["speed"].get("ms_per_image"), source=r.get("source"), quality=q.summary())
            entry["why"] = (f"verified here ({r.get('source')}), {entry['speedup']:.2f}x fp32 at batch 1"
                            + ("" if entry["speedup"] >= MIN_GAIN else f": not {MIN_GAIN}x faster than fp32"))
        elif passed:
            q, r = passed[-1]
            entry.update(status="untimed", source=r.get("source"), quality=q.summary(),
                         why=f"verified here ({r.get('source')}) but its speed was never measured on this machine: "
                             f"run `captrt verify {model.path} --engine {engine} --precision {precision}`")
        elif judged:
            q, r = judged[-1]
            entry.update(status="failed", source=r.get("source"), quality=q.summary(),
                         why=f"missed the quality budget ({r.get('source')}): {q.describe()}")
        elif precision in refused or f"{engine}-{precision}" in refused:
            why = (refused.get(precision) or refused.get(f"{engine}-{precision}") or {}).get("reason")
            entry.update(status="refused", why=f"refused at export: {why}")
        else:
            entry.update(status="unverified", why="not verified for this engine on this machine")
        out.append(entry)
    return out


def choose(model: "ModelDir", engine: str, device: str, budget: float | None = None) -> PrecisionChoice:
    """The ranking alone (no engine built): the fastest verified candidate faster than fp32, else fp32."""
    table = survey(model, engine, device, budget)
    faster = sorted((c for c in table if c["status"] == "verified" and c["speedup"] >= MIN_GAIN),
                    key=lambda c: -c["speedup"])
    if faster:
        best = faster[0]
        return PrecisionChoice(best["precision"], f"the fastest precision verified for {engine} on this machine: "
                                                  f"{best['speedup']:.2f}x fp32 at batch 1", table)
    return PrecisionChoice("fp32", f"no precision {MIN_GAIN}x faster than fp32 is verified and timed for {engine} "
                                   "on this machine", table)


def load_auto(model: "ModelDir", engine: str, *, device: str, threads: int | None, budget: float | None,
              allow_unverified: bool = False, **engine_options: Any) -> tuple["Engine", Verification, PrecisionChoice]:
    """Build the chosen engine (choose(), then each faster candidate in turn, then fp32) and its verification.
    allow_unverified applies to the fp32 fallback only (fp32 on a GPU needs a verification too)."""
    from captrt.runtime.engines import create_engine

    choice = choose(model, engine, device, budget)
    ranked = sorted((c for c in choice.candidates if c["status"] == "verified" and c["speedup"] >= MIN_GAIN),
                    key=lambda c: -c["speedup"])
    for candidate in ranked:
        precision = candidate["precision"]
        try:
            backend = create_engine(engine, model, device=device, precision=precision, threads=threads,
                                    **engine_options)
        except (EngineUnavailableError, ModelDirError, ValueError) as exc:
            candidate.update(status="unavailable", why=f"cannot run here: {exc}")
            continue
        try:  # the exact key now: a record that only looked like this machine's is not enough
            verification = ensure_verified(model, backend, budget=budget, verify_now=False)
        except UnverifiedPrecisionError as exc:
            backend.close()
            candidate.update(status="unverified", why=f"its verification does not hold for this engine: {exc}")
            continue
        except BaseException:
            backend.close()
            raise
        choice.chosen = precision
        choice.reason = (f"the fastest precision verified for {engine} on this machine: "
                         f"{candidate['speedup']:.2f}x fp32 at batch 1 ({candidate.get('source')})")
        candidate["chosen"] = True
        return backend, verification, choice
    choice.chosen = "fp32"
    if ranked:
        choice.reason = f"no faster verified precision could be loaded for {engine} here; fp32"
    backend = create_engine(engine, model, device=device, precision="fp32", threads=threads, **engine_options)
    try:
        verification = ensure_verified(model, backend, budget=budget, allow_unverified=allow_unverified)
    except BaseException:
        backend.close()
        raise
    next(c for c in choice.candidates if c["precision"] == "fp32")["chosen"] = True
    return backend, verification, choice
