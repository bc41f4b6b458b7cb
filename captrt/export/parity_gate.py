"""The export's parity gate: the PyTorch reference captions of the parity images, and each precision
variant's numeric and caption parity against them, measured with the search users run."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from captrt.export.errors import ExportError
from captrt.export.manifest import MAX_STEPS
from captrt.export.parity import (Timer, caption_parity, make_session, not_measured, numeric_parity, parity_report,
                                  search_engine, torch_threads)
from captrt.export.progress import Progress
from captrt.runtime.verification.verify import search_tokens
from captrt.train.model import CaptionModel, normalize_uint8
from captrt.train.reference import reference_beam_search
from captrt.vocab import Vocab

NUMERIC_IMAGES = 4  # images whose graph outputs are compared with PyTorch's number by number


def parity_failure(report: dict) -> str:
    worst = max(report["max_rel_diff"].items(), key=lambda kv: kv[1])
    lines = [f"fp32 parity failed: {report['identical']}/{report['images']} beam-search captions identical to "
             f"PyTorch, worst relative difference {worst[0]}={worst[1]:.3g}"]
    for m in report.get("mismatches", [])[:3]:
        lines.append(f"  {m['image']}: PyTorch '{m['reference']}' vs ONNX '{m['variant']}'")
    lines.append("Nothing was written (pass force=True / --force to write the model anyway).")
    return "\n".join(lines)


def reference_captions(model: CaptionModel, vocab: Vocab, parity_set, beam: int, log: Progress) -> list[list[int]]:
    out = []
    with log.bar(len(parity_set), "reference") as tick, torch_threads(1):
        for image in parity_set.images:
            x = normalize_uint8(torch.from_numpy(np.ascontiguousarray(image[None])))[0]
            out.append(reference_beam_search(model, x, vocab.start, vocab.end, beam, MAX_STEPS).tokens)
            tick()
    return out


class ParityChecker:
    """Runs numeric + caption parity of one precision variant against the shared PyTorch references."""

    def __init__(self, model, vocab: Vocab, parity_set, reference: list[list[int]], beam: int, log: Progress):
        self.model, self.vocab, self.set, self.reference, self.beam, self.log = \
            model, vocab, parity_set, reference, beam, log

    def run(self, precision: str, enc: onnx.ModelProto, dec: onnx.ModelProto,
            strict: bool) -> tuple[dict, list[list[int]] | None, dict | None]:
        """-> (parity report, the variant's captions on the parity images, its engine's numerics key);
        (report, None, None) when ONNX Runtime's CPU provider cannot run the graphs (not strict)."""
        timer = Timer()
        dec_bytes = dec.SerializeToString()
        try:
            # One thread for the step: its ops are small, and the parity decode is a long chain of them.
            enc_s, dec_s = make_session(enc.SerializeToString()), make_session(dec_bytes, threads=1)
            # The captions come from the search users run: the default path's step graph (plain, when it cuts).
            engine = search_engine(enc_s, dec_bytes, precision=precision, controlled=dec_s)
        except Exception as exc:  # e.g. no CPU kernel for an fp16 operator
            if strict:
                raise ExportError(f"ONNX Runtime cannot load the {precision} graphs: {exc}") from None
            reason = f"not measured: needs a GPU (ONNX Runtime's CPU provider cannot run the {precision} graphs: " \
                     f"{str(exc).splitlines()[0][:200]})"
            self.log.say(f"{precision} parity {reason}")
            return not_measured(reason), None, None
        with self.log.step(f"{precision} parity on {len(self.set)} images"), torch_threads(1):
            numeric = numeric_parity(self.model, enc_s, dec_s, self.set.images[:NUMERIC_IMAGES], self.vocab.start)
            with self.log.bar(len(self.set), f"{precision} beam search") as tick:
                # The same search, batch and code as `captrt verify` and a first load (captrt.runtime.verification.verify).
                tokens = search_tokens(engine, self.set.images, start=self.vocab.start, end=self.vocab.end,
                                       vocab_size=len(self.vocab), beam_size=self.beam, max_steps=MAX_STEPS,
                                       on_batch=tick)
            captions = caption_parity(self.reference, tokens, self.vocab.decode, self.set.captions, self.set.names)
        report = parity_report(numeric, captions, beam_size=self.beam, max_steps=MAX_STEPS, strict=strict,
                               seconds=timer())
        self.log.say(f"{precision} parity: {report['identical']}/{report['images']} captions identical to PyTorch, "
                     f"BLEU-4 change {report['bleu4_change']:+.4f}")
        return report, tokens, engine.numerics()
