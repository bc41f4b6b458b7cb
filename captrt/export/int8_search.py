"""Accuracy-aware int8: the fastest candidate within the quality budget, int8 encoder mixes and the int8 step alone.

When full int8 misses the budget, search instead of giving up (anchors: NNCF's
quantize_with_accuracy_control, Intel Neural Compressor's accuracy-driven tuning, ONNX Runtime's
qdq_loss_debug):
0. the decoder step: quantize.quantize_decoder's per-row int8 with the fp32 encoder, judged first
   ("fp32 encoder, int8 step"). When it misses the budget the step stays fp32 and the search concerns the encoder only.
1. encoder calibrations, best-known first: MinMax, Percentile 99.999, Entropy (each calibrated once,
   see int8_calibrate). The first that passes the judge ends the search, with every layer int8.
2. otherwise, with the best-scoring calibration: rank the quantized encoder layers by the error each
   adds against fp32 on a few calibration images (int8_rank), and return the most harmful to fp32 in
   growing groups (1, 2, 4, 8, ...) until the judge passes, then bisect between the last failing and
   the first passing group size; stop at the smallest passing one.
3. the candidates are the step alone (fp32 encoder, int8 step; when it passed) and every encoder mix
   that passed (each with the step chosen in 0). Their end-to-end speed at batch 1 is measured the same
   way in one interleaved run against fp32 (int8_speed: encoder at batch 1 + a real caption's steps),
   and the result is the fastest candidate that is at least `min_speedup` faster than fp32 (the
   exporter judges it on the parity set and falls back to the next fastest, Int8Result.fallbacks,
   when it misses the budget there). When none is, the result says so (`useful` False) and names the
   layers at fault, rather than shipping a slow "int8". The report lists every candidate tried, with
   its quality and, when it passed, its speed.

Judge calls (a beam search over the tuning images) dominate the cost: at most len(CALIBRATIONS) +
2 * log2(layers) + 2; the speed measurement adds a few seconds per passing candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from captrt.export.int8_calibrate import CALIBRATIONS, EncoderQuantizer, layer_label
from captrt.export.int8_rank import rank_nodes
from captrt.export.int8_speed import STEPS, measure_configurations
from captrt.export.quantize import quantize_decoder

RANK_IMAGES = 4  # calibration images for the per-layer error ranking
AT_FAULT = 5  # layers named when the search gives up
STEP_ONLY = "fp32 encoder, int8 step"  # the candidate with the int8 step alone (its trial's name too)
Graphs = tuple[onnx.ModelProto, onnx.ModelProto]


class Judgement(Protocol):
    """What a judge returns (captrt.runtime.verification.verify.QualityReport is one)."""

    @property
    def passed(self) -> bool: ...

    @property
    def score(self) -> float: ...

    def summary(self) -> dict[str, Any]: ...


Judge = Callable[[onnx.ModelProto, onnx.ModelProto], Judgement]
# name -> (encoder, decoder_step) in, name -> median ms out, "fp32" included (int8_speed.measure_configurations)
Timer = Callable[[dict[str, Graphs]], dict[str, float]]


@dataclass
class Int8Result:
    """The search's outcome; encoder/decoder are the graphs to write as the int8 variant.

    calibration, fp32_nodes, fp32_layers, int8_layers, ranking describe the encoder search (its last
    mix); `chosen` names the candidate that encoder/decoder, passed, speedup and timings_ms are of: an
    encoder mix, or STEP_ONLY (then encoder_int8 is False: the variant's encoder is the fp32 one)."""

    encoder: onnx.ModelProto
    decoder: onnx.ModelProto
    calibration: str  # e.g. "minmax", "percentile-99.999", "entropy"
    fp32_nodes: list[str]  # encoder nodes returned to fp32 (empty when full int8 met the budget)
    trials: list[dict]  # each tried configuration: calibration, fp32 node count, judge summary, passed
    passed: bool  # the chosen candidate met the budget on the tuning split
    speedup: float | None  # fp32 time / its time (encoder batch 1 + decoder steps), None if not measured
    at_fault: list[str]  # when it gives up (not passed, or not useful): the most harmful layers
    min_speedup: float = 1.1
    fp32_layers: list[str] = field(default_factory=list)  # fp32_nodes with their weights' names
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (layer, harm) most harmful first
    timings_ms: dict[str, float] = field(default_factory=dict)  # {"fp32": ..., "int8": ...} (the chosen one's)
    reduce_range: bool = True
    decoder_int8: bool = True  # False: the step's int8 form alone missed the budget, so it stays fp32
    int8_layers: int | None = None  # encoder layers still int8 (None: not counted, full int8 chose itself)
    encoder_int8: bool = True  # False: the chosen candidate is the step alone, with the fp32 encoder
    chosen: str = "encoder mix"
    candidates: list[dict] = field(default_factory=list)  # every candidate: quality, speed, useful, chosen
    timed_steps: int | None = None  # decoder steps per timed run
    # candidates within budget: name -> (encoder, decoder_step, (calibration, fp32 nodes) of a mix or None)
    within: dict[str, tuple[onnx.ModelProto, onnx.ModelProto, tuple[str, list[str]] | None]] = \
        field(default_factory=dict, repr=False)
    source: onnx.ModelProto | None = field(default=None, repr=False)  # the fp32 encoder (names its layers)

    def select(self, name: str) -> None:
        """Make candidate `name` (one within budget) the result: its graphs, speed and encoder layers."""
        enc, dec, mix = self.within[name]
        for c in self.candidates:
            c.pop("chosen", None)
            if c["name"] == name:
                c["chosen"] = True
                self.speedup, self.timings_ms = c.get("speedup"), dict(c.get("timings_ms") or {})
        self.chosen, self.passed, self.encoder, self.decoder = name, True, enc, dec
        self.encoder_int8 = mix is not None
        self.decoder_int8 = any(n.op_type == "MatMulInteger" for n in dec.graph.node)
        if mix is not None:
            self.calibration, self.fp32_nodes = mix[0], list(mix[1])
            self.fp32_layers = [layer_label(self.source, n) for n in mix[1]] if self.source is not None else []
            self.int8_layers = len(self.ranking) - len(mix[1]) if self.ranking else None

    @property
    def fallbacks(self) -> list[str]:
        """The other useful candidates, fastest first, that the parity set has not judged yet: what the exporter
        tries when the chosen one meets the budget on the tuning images but not on the parity set."""
        return [c["name"] for c in sorted(self.candidates, key=lambda c: -(c.get("speedup") or 0.0))
                if c.get("useful") and c["name"] != self.chosen and c["name"] in self.within and "parity" not in c]

    def note_parity(self, quality: dict[str, Any]) -> None:
        """Record the parity set's verdict on the chosen candidate (the exporter's, beside the tuning one)."""
        next(c for c in self.candidates if c["name"] == self.chosen)["parity"] = quality

    @property
    def useful(self) -> bool:
        """Worth shipping: within budget and at least min_speedup faster than fp32."""
        # Nothing left in int8 (fp32 step, every encoder layer back in fp32) is fp32 whatever its timing says.
        nothing_int8 = not self.decoder_int8 and (self.int8_layers == 0 or not self.encoder_int8)
        return self.passed and not nothing_int8 and self.speedup is not None and self.speedup >= self.min_speedup

    def to_report(self) -> dict[str, Any]:
        """JSON-ready, for captrt.json's int8 report."""
        chosen = next((c for c in self.candidates if c.get("chosen")), None)
        final = chosen["quality"] if chosen else next(
            (t["quality"] for t in reversed(self.trials)
             if t["calibration"] == self.calibration and t["fp32_nodes"] == len(self.fp32_nodes)), None)
        return {"chosen": self.chosen, "encoder": "int8" if self.encoder_int8 else "fp32 (the fp32 variant's graph)",
                "calibration": self.calibration, "weights": "7-bit" if self.reduce_range else "8-bit",
                "decoder": "int8 (per-row)" if self.decoder_int8 else "fp32 (its int8 form alone missed the budget)",
                "fp32_nodes": list(self.fp32_nodes), "fp32_layers": list(self.fp32_layers),
                "int8_layers": self.int8_layers,
                "passed": self.passed, "quality": final, "speedup": self.speedup, "min_speedup": self.min_speedup,
                "useful": self.useful, "timings_ms": dict(self.timings_ms), "at_fault": list(self.at_fault),
                "candidates": [dict(c) for c in self.candidates], "timed_steps": self.timed_steps,
                "trials": [dict(t) for t in self.trials],
                "most_harmful": [{"layer": name, "harm": float(f"{harm:.3g}")} for name, harm in self.ranking[:10]]}


def search_int8(encoder: onnx.ModelProto, decoder: onnx.ModelProto, calib_images: np.ndarray, judge: Judge, *,
                max_fp32_nodes: int | None = None, min_speedup: float = 1.1, reduce_range: bool = True,
                calibrations: Sequence[str] = tuple(CALIBRATIONS), measure: bool = True, steps: int = STEPS,
                timer: Timer | None = None, log: Callable[[str], None] = lambda s: None) -> Int8Result:
    """Search the fastest int8 candidate within budget (module docstring). calib_images: uint8 (M, S, S, 3),
    disjoint from the judge's tuning images. judge(enc8, dec8) -> Judgement. steps: decoder steps per timed
    run (a real caption's). timer: measures candidates (default: int8_speed.measure_configurations on
    calib_images[0]); measure=False times nothing (then an encoder mix that passed is preferred)."""
    dec8 = quantize_decoder(decoder)
    trials: list[dict] = []
    passing: list[tuple[str, onnx.ModelProto, list[str], Judgement]] = []  # encoder mixes within budget
    decoder_int8 = True

    def trial(enc8: onnx.ModelProto, calibration: str, fp32_nodes: Sequence[str]) -> Judgement:
        t0 = time.perf_counter()
        verdict = judge(enc8, dec8)
        trials.append({"calibration": calibration, "fp32_nodes": len(fp32_nodes), "quality": verdict.summary(),
                       "score": float(verdict.score), "passed": bool(verdict.passed),
                       "seconds": round(time.perf_counter() - t0, 1)})
        log(f"int8 {calibration}, {len(fp32_nodes)} layer(s) fp32: score {verdict.score:.4f}, "
            f"{'passed' if verdict.passed else 'failed'}")
        if verdict.passed and enc8 is not encoder:
            passing.append((calibration, enc8, list(fp32_nodes), verdict))
        return verdict

    step_only = trial(encoder, STEP_ONLY, [])
    step_dec8 = dec8
    if not step_only.passed:
        # The step alone already costs more than the budget: keep it fp32 and search the encoder only.
        dec8, decoder_int8 = decoder, False
        log("int8: the int8 decoder step alone misses the budget; it stays fp32")
    with EncoderQuantizer(encoder, calib_images, reduce_range=reduce_range) as quantizer:
        best: tuple[float, str, onnx.ModelProto] | None = None
        chosen: tuple[str, list[str], onnx.ModelProto, bool] | None = None
        for calibration in calibrations:
            enc8 = quantizer.build(calibration)
            verdict = trial(enc8, calibration, [])
            if verdict.passed:
                chosen = (calibration, [], enc8, True)
                break
            if best is None or verdict.score > best[0]:
                best = (verdict.score, calibration, enc8)
        ranking: list[tuple[str, float]] = []
        if chosen is None:
            assert best is not None, "no calibration method given"
            _, calibration, _ = best
            order_nodes = quantizer.quantized_nodes()
            ranking = rank_nodes(encoder, quantizer.build(calibration, keep_activations=True),
                                 quantizer.images[:RANK_IMAGES], order_nodes)
            order = [name for name, _ in ranking]
            limit = len(order) if max_fp32_nodes is None else min(max_fp32_nodes, len(order))
            log(f"int8: ranking {len(order)} quantized layers; most harmful: "
                + ", ".join(f"{layer_label(encoder, n)} {h:.3g}" for n, h in ranking[:3]))
            chosen = _grow_and_bisect(lambda k: (order[:k], quantizer.build(calibration, order[:k])),
                                      lambda enc8, nodes: trial(enc8, calibration, nodes), limit, calibration)
    calibration, fp32_nodes, enc8, passed = chosen
    int8_layers = len(ranking) - len(fp32_nodes) if ranking else None
    result = Int8Result(enc8, dec8, calibration, list(fp32_nodes), trials, passed, None, [], min_speedup,
                        [layer_label(encoder, n) for n in fp32_nodes], ranking, {}, reduce_range, decoder_int8,
                        int8_layers)
    configs: dict[str, Graphs] = {}
    described: dict[str, dict] = {}
    described[STEP_ONLY] = {"name": STEP_ONLY, "encoder": "fp32", "decoder": "int8 (per-row)",
                            "quality": step_only.summary(), "passed": bool(step_only.passed)}
    if step_only.passed:
        configs[STEP_ONLY] = (encoder, step_dec8)
    else:
        described[STEP_ONLY]["speed"] = "not measured: missed the budget"
    mixes: dict[str, tuple[str, list[str], onnx.ModelProto]] = {}
    for cal, graph, nodes, verdict in passing:
        name = _mix_name(cal, nodes)
        mixes[name] = (cal, nodes, graph)
        configs[name] = (graph, dec8)
        described[name] = {"name": name, "encoder": f"int8 ({cal} calibration, {len(nodes)} layer(s) fp32)",
                           "decoder": "int8 (per-row)" if decoder_int8 else "fp32", "quality": verdict.summary(),
                           "passed": True}
    for t in trials[1:]:  # the encoder configurations that missed the budget, for the record
        if not t["passed"]:
            name = _mix_name(t["calibration"], [None] * t["fp32_nodes"])
            described.setdefault(name, {"name": name, "encoder": f"int8 ({t['calibration']} calibration, "
                                                                 f"{t['fp32_nodes']} layer(s) fp32)",
                                        "decoder": "int8 (per-row)" if decoder_int8 else "fp32",
                                        "quality": t["quality"], "passed": False,
                                        "speed": "not measured: missed the budget"})
    timings: dict[str, float] = {}
    if configs and (measure or timer is not None):
        image = calib_images[0]
        timings = (timer or (lambda c: measure_configurations(c, image, steps=steps)))({"fp32": (encoder, decoder),
                                                                                     **configs})
    for name in configs:
        if name in timings and timings.get("fp32"):
            described[name].update(timings_ms={"fp32": round(timings["fp32"], 2), "int8": round(timings[name], 2)},
                                   speedup=round(timings["fp32"] / timings[name], 3))
            described[name]["useful"] = described[name]["speedup"] >= min_speedup
    result.candidates, result.timed_steps, result.source = list(described.values()), steps, encoder
    result.within = {name: (*configs[name], (mixes[name][0], mixes[name][1]) if name in mixes else None)
                     for name in configs}
    pick = _pick(described, configs, min_speedup)
    if pick is not None:
        result.select(pick)
    if not result.useful and (not result.passed or result.speedup is not None):
        # Give up honestly: name the layers that cost quality (the ranking) or, when the ranking never
        # ran, the ones kept in fp32.
        result.at_fault = [layer_label(encoder, n) for n, _ in ranking[:AT_FAULT]] or result.fp32_layers[:AT_FAULT]
    speed = "n/a" if result.speedup is None else f"{result.speedup:.2f}x"
    log(f"int8: chose {result.chosen} ({calibration}, {len(result.fp32_nodes)} layer(s) fp32 in the encoder search), "
        f"passed={result.passed}, speedup {speed}; candidates: "
        + "; ".join(f"{c['name']} {'%.2fx' % c['speedup'] if 'speedup' in c else c.get('speed', '-')}"
                    for c in result.candidates if c["passed"]))
    return result


def _mix_name(calibration: str, fp32_nodes: Sequence[Any]) -> str:
    return f"{calibration}, {len(fp32_nodes)} fp32" if fp32_nodes else f"{calibration}, full int8"


def _pick(described: dict[str, dict], configs: dict[str, Graphs], min_speedup: float) -> str | None:
    """The fastest candidate within budget that is min_speedup faster; else the fastest within budget (not
    useful, so the exporter refuses it); unmeasured, an encoder mix before the step alone (more of it int8).
    None when nothing passed."""
    within = [n for n in configs if described[n]["passed"]]
    if not within:
        return None
    measured = [n for n in within if "speedup" in described[n]]
    if measured:
        useful = [n for n in measured if described[n]["speedup"] >= min_speedup]
        return max(useful or measured, key=lambda n: described[n]["speedup"])
    mixes = [n for n in within if n != STEP_ONLY]
    return mixes[-1] if mixes else within[0]  # the last mix that passed: the search's smallest fp32 set


def _grow_and_bisect(build: Callable[[int], tuple[list[str], onnx.ModelProto]],
                     judge: Callable[[onnx.ModelProto, list[str]], Judgement], limit: int,
                     calibration: str) -> tuple[str, list[str], onnx.ModelProto, bool]:
    """Smallest k (most harmful k layers in fp32) that passes: k = 1, 2, 4, ... then bisection.
    Returns the last configuration tried when none passes (all `limit` layers fp32)."""
    lo, k, found = 0, 1, None  # lo: largest k known to fail
    last = None
    while lo < limit:
        k = min(k, limit)
        nodes, enc8 = build(k)
        last = (calibration, nodes, enc8, False)
        if judge(enc8, nodes).passed:
            found = (calibration, nodes, enc8, True)
            break
        lo, k = k, k * 2
    if found is None:
        assert last is not None
        return last
    hi = len(found[1])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        nodes, enc8 = build(mid)
        if judge(enc8, nodes).passed:
            hi, found = mid, (calibration, nodes, enc8, True)
        else:
            lo = mid
    return found


# ----------------------------------------------------------------------------------- a judge for tests
@dataclass
class TokenJudgement:
    """Captions of a candidate against fp32's on the tuning images (identical fraction)."""

    images: int
    identical: int
    budget: float

    @property
    def score(self) -> float:
        return self.identical / max(self.images, 1)

    @property
    def passed(self) -> bool:
        return self.images > 0 and self.score >= self.budget - 1e-12

    def summary(self) -> dict[str, Any]:
        return {"images": self.images, "identical": self.identical, "identical_pct": round(100 * self.score, 2),
                "budget": self.budget, "passed": self.passed}


def caption_tokens(encoder: onnx.ModelProto, decoder: onnx.ModelProto, images: np.ndarray, *, start: int, end: int,
                   vocab_size: int, beam_size: int, max_steps: int, batch: int = 16) -> list[list[int]]:
    """Word ids per image by the runtime's batched beam search over CPU sessions of the two graphs."""
    from captrt.export.parity import make_session, search_engine
    from captrt.runtime.verification.verify import search_tokens

    engine = search_engine(make_session(encoder.SerializeToString()), decoder.SerializeToString())
    return search_tokens(engine, images, start=start, end=end, vocab_size=vocab_size, beam_size=beam_size,
                         max_steps=max_steps, batch_size=batch)


def token_judge(encoder: onnx.ModelProto, decoder: onnx.ModelProto, tuning_images: np.ndarray, *, start: int,
                end: int, vocab_size: int, beam_size: int = 5, max_steps: int = 50,
                budget: float = 0.97) -> Judge:
    """A judge from fp32 graphs: captions of the tuning images (uint8 (M, S, S, 3)) must be identical to
    fp32's on at least `budget` of them. The exporter's judge (captrt.runtime.verification.verify) also scores
    BLEU-4/CIDEr against references; this one needs none."""
    kw = dict(start=start, end=end, vocab_size=vocab_size, beam_size=beam_size, max_steps=max_steps)
    reference = caption_tokens(encoder, decoder, tuning_images, **kw)

    def judge(enc8: onnx.ModelProto, dec8: onnx.ModelProto) -> TokenJudgement:
        got = caption_tokens(enc8, dec8, tuning_images, **kw)
        return TokenJudgement(len(got), sum(a == b for a, b in zip(got, reference)), budget)

    return judge
