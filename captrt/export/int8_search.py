"""Accuracy-aware int8: the fastest mix of int8 and fp32 encoder layers that meets the quality budget.

When full int8 misses the budget, search instead of giving up (anchors: NNCF's
quantize_with_accuracy_control, Intel Neural Compressor's accuracy-driven tuning, ONNX Runtime's
qdq_loss_debug):
1. calibrations, best-known first: MinMax, Percentile 99.999, Entropy (each calibrated once, see
   int8_calibrate). The first that passes the judge wins, with every layer int8.
2. otherwise, with the best-scoring calibration: rank the quantized encoder layers by the error each
   adds against fp32 on a few calibration images (int8_rank), and return the most harmful to fp32 in
   growing groups (1, 2, 4, 8, ...) until the judge passes, then bisect between the last failing and
   the first passing group size; stop at the smallest passing one.
3. measure the speed of the result against fp32 (encoder at batch 1 + 10 decoder steps at N=1, K=5).
   A mix that passes but is less than `min_speedup` faster is not useful: the result says so
   (`useful` False) and names the layers at fault, rather than shipping a slow "int8".

The decoder step is quantize.quantize_decoder's per-row int8 when, with the fp32 encoder, it meets
the budget alone (one judge call first); otherwise the step stays fp32 and the search concerns the
encoder only (the encoder is most of the time, and of the gain, at batch 1). Judge calls (a beam
search over the tuning images) dominate the cost: at most len(CALIBRATIONS) + 2 * log2(layers) + 2.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx

from captrt.export.int8_calibrate import CALIBRATIONS, EncoderQuantizer, layer_label
from captrt.export.int8_rank import rank_nodes
from captrt.export.quantize import quantize_decoder
from captrt.runtime.decoding.processing import neutral_feeds
from captrt.runtime.model_dir import CONTROL_INPUTS, DECODER_OUTPUTS, LOGP_OUTPUT

RANK_IMAGES = 4  # calibration images for the per-layer error ranking
AT_FAULT = 5  # layers named when the search gives up


class Judgement(Protocol):
    """What a judge returns (captrt.runtime.verify.QualityReport is one)."""

    @property
    def passed(self) -> bool: ...

    @property
    def score(self) -> float: ...

    def summary(self) -> dict[str, Any]: ...


Judge = Callable[[onnx.ModelProto, onnx.ModelProto], Judgement]


@dataclass
class Int8Result:
    """The search's outcome; encoder/decoder are the graphs to write as the int8 variant."""

    encoder: onnx.ModelProto
    decoder: onnx.ModelProto
    calibration: str  # e.g. "minmax", "percentile-99.999", "entropy"
    fp32_nodes: list[str]  # encoder nodes returned to fp32 (empty when full int8 met the budget)
    trials: list[dict]  # each tried configuration: calibration, fp32 node count, judge summary, passed
    passed: bool  # the final mix met the budget on the tuning split
    speedup: float | None  # fp32 time / mix time (encoder batch 1 + decoder steps), None if not measured
    at_fault: list[str]  # when it gives up (not passed, or not useful): the most harmful layers
    min_speedup: float = 1.1
    fp32_layers: list[str] = field(default_factory=list)  # fp32_nodes with their weights' names
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (layer, harm) most harmful first
    timings_ms: dict[str, float] = field(default_factory=dict)  # {"fp32": ..., "int8": ...}
    reduce_range: bool = True
    decoder_int8: bool = True  # False: the step's int8 form alone missed the budget, so it stays fp32
    int8_layers: int | None = None  # encoder layers still int8 (None: not counted, full int8 chose itself)

    @property
    def useful(self) -> bool:
        """Worth shipping: within budget and at least min_speedup faster than fp32."""
        # Nothing left in int8 (fp32 step, every encoder layer back in fp32) is fp32 whatever its timing says.
        nothing_int8 = not self.decoder_int8 and self.int8_layers == 0
        return self.passed and not nothing_int8 and self.speedup is not None and self.speedup >= self.min_speedup

    def to_report(self) -> dict[str, Any]:
        """JSON-ready, for captrt.json's int8 report."""
        final = next((t["quality"] for t in reversed(self.trials)
                      if t["calibration"] == self.calibration and t["fp32_nodes"] == len(self.fp32_nodes)), None)
        return {"calibration": self.calibration, "weights": "7-bit" if self.reduce_range else "8-bit",
                "decoder": "int8 (per-row)" if self.decoder_int8 else "fp32 (its int8 form alone missed the budget)",
                "fp32_nodes": list(self.fp32_nodes), "fp32_layers": list(self.fp32_layers),
                "int8_layers": self.int8_layers,
                "passed": self.passed, "quality": final, "speedup": self.speedup, "min_speedup": self.min_speedup,
                "useful": self.useful, "timings_ms": dict(self.timings_ms), "at_fault": list(self.at_fault),
                "trials": [dict(t) for t in self.trials],
                "most_harmful": [{"layer": name, "harm": float(f"{harm:.3g}")} for name, harm in self.ranking[:10]]}


def search_int8(encoder: onnx.ModelProto, decoder: onnx.ModelProto, calib_images: np.ndarray, judge: Judge, *,
                max_fp32_nodes: int | None = None, min_speedup: float = 1.1, reduce_range: bool = True,
                calibrations: Sequence[str] = tuple(CALIBRATIONS), measure: bool = True,
                log: Callable[[str], None] = lambda s: None) -> Int8Result:
    """Search the fastest int8 mix within budget (module docstring). calib_images: uint8 (M, S, S, 3),
    disjoint from the judge's tuning images. judge(enc8, dec8) -> Judgement."""
    dec8 = quantize_decoder(decoder)
    trials: list[dict] = []
    decoder_int8 = True

    def trial(enc8: onnx.ModelProto, calibration: str, fp32_nodes: Sequence[str]) -> Judgement:
        t0 = time.perf_counter()
        verdict = judge(enc8, dec8)
        trials.append({"calibration": calibration, "fp32_nodes": len(fp32_nodes), "quality": verdict.summary(),
                       "score": float(verdict.score), "passed": bool(verdict.passed),
                       "seconds": round(time.perf_counter() - t0, 1)})
        log(f"int8 {calibration}, {len(fp32_nodes)} layer(s) fp32: score {verdict.score:.4f}, "
            f"{'passed' if verdict.passed else 'failed'}")
        return verdict

    if not trial(encoder, "fp32 encoder, int8 step", []).passed:
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
            candidates = quantizer.quantized_nodes()
            ranking = rank_nodes(encoder, quantizer.build(calibration, keep_activations=True),
                                 quantizer.images[:RANK_IMAGES], candidates)
            order = [name for name, _ in ranking]
            limit = len(order) if max_fp32_nodes is None else min(max_fp32_nodes, len(order))
            log(f"int8: ranking {len(order)} quantized layers; most harmful: "
                + ", ".join(f"{layer_label(encoder, n)} {h:.3g}" for n, h in ranking[:3]))
            chosen = _grow_and_bisect(lambda k: (order[:k], quantizer.build(calibration, order[:k])),
                                      lambda enc8, nodes: trial(enc8, calibration, nodes), limit, calibration)
    calibration, fp32_nodes, enc8, passed = chosen
    timings = measure_speedup(encoder, decoder, enc8, dec8, calib_images[0]) if measure else {}
    speedup = timings["fp32"] / timings["int8"] if timings else None
    result = Int8Result(enc8, dec8, calibration, list(fp32_nodes), trials, passed,
                        None if speedup is None else round(speedup, 3), [], min_speedup,
                        [layer_label(encoder, n) for n in fp32_nodes], ranking,
                        {k: round(v, 2) for k, v in timings.items()}, reduce_range, decoder_int8,
                        len(ranking) - len(fp32_nodes) if ranking else None)
    if not result.useful and (not passed or speedup is not None):
        # Give up honestly: name the layers that cost quality (the ranking) or, when the ranking never
        # ran, the ones kept in fp32.
        result.at_fault = [layer_label(encoder, n) for n, _ in ranking[:AT_FAULT]] or result.fp32_layers[:AT_FAULT]
    log(f"int8: {calibration}, {len(fp32_nodes)} layer(s) fp32, passed={passed}, speedup "
        f"{'n/a' if speedup is None else f'{speedup:.2f}x'}")
    return result


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


def step_feeds(session: Any, n: int, k: int) -> dict[str, np.ndarray]:
    """The neutral control inputs of a step session (format 2), or {} when it has none (format 1)."""
    if not set(CONTROL_INPUTS) <= {i.name for i in session.get_inputs()}:
        return {}
    vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == LOGP_OUTPUT) - 1  # V + 1 columns
    return neutral_feeds(n, k, int(vocab))


def measure_speedup(encoder: onnx.ModelProto, decoder: onnx.ModelProto, enc8: onnx.ModelProto,
                    dec8: onnx.ModelProto, image: np.ndarray, *, steps: int = 10, beams: int = 5,
                    repeats: int = 5, threads: int | None = None) -> dict[str, float]:
    """Median ms of encoder(1 image) + `steps` decoder steps (N=1, K=beams), fp32 and int8, with the
    runtime's session options; the two are measured in alternation so shared-CPU noise hits both."""
    import onnxruntime as ort

    from captrt.runtime.engines.ort import session_options

    def sessions(enc: onnx.ModelProto, dec: onnx.ModelProto):
        so = session_options(threads)
        return tuple(ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])
                     for g in (enc, dec))

    pairs = {"fp32": sessions(encoder, decoder), "int8": sessions(enc8, dec8)}
    feed = np.ascontiguousarray(image[None], dtype=np.uint8)

    def once(enc_s, dec_s) -> float:
        t0 = time.perf_counter()
        features, att_proj, h, c = enc_s.run(["features", "att_proj", "h0", "c0"], {"image": feed})
        h, c = np.repeat(h[:, None], beams, 1), np.repeat(c[:, None], beams, 1)
        tokens, origin = np.ones((1, beams), np.int64), np.zeros((1, beams), np.int64)
        controls = step_feeds(dec_s, 1, beams)  # the default path's (none for a format-1 graph)
        for _ in range(steps):
            h, c, _, _, ids = dec_s.run(list(DECODER_OUTPUTS), {"tokens": tokens, "origin": origin, "h": h, "c": c,
                                                                "features": features, "att_proj": att_proj, **controls})
            tokens, origin = np.ascontiguousarray(ids[:, :, 0]), np.arange(beams, dtype=np.int64)[None]
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in pairs}
    for k, (e, d) in pairs.items():  # warm-up: first runs allocate and pack weights
        once(e, d)
    for _ in range(repeats):
        for k, (e, d) in pairs.items():
            times[k].append(once(e, d))
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


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
    from captrt.runtime.verify import search_tokens

    engine = search_engine(make_session(encoder.SerializeToString()), decoder.SerializeToString())
    return search_tokens(engine, images, start=start, end=end, vocab_size=vocab_size, beam_size=beam_size,
                         max_steps=max_steps, batch_size=batch)


def token_judge(encoder: onnx.ModelProto, decoder: onnx.ModelProto, tuning_images: np.ndarray, *, start: int,
                end: int, vocab_size: int, beam_size: int = 5, max_steps: int = 50,
                budget: float = 0.97) -> Judge:
    """A judge from fp32 graphs: captions of the tuning images (uint8 (M, S, S, 3)) must be identical to
    fp32's on at least `budget` of them. The exporter's judge (captrt.runtime.verify) also scores
    BLEU-4/CIDEr against references; this one needs none."""
    kw = dict(start=start, end=end, vocab_size=vocab_size, beam_size=beam_size, max_steps=max_steps)
    reference = caption_tokens(encoder, decoder, tuning_images, **kw)

    def judge(enc8: onnx.ModelProto, dec8: onnx.ModelProto) -> TokenJudgement:
        got = caption_tokens(enc8, dec8, tuning_images, **kw)
        return TokenJudgement(len(got), sum(a == b for a, b in zip(got, reference)), budget)

    return judge
