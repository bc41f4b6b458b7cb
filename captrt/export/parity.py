"""Parity of exported graphs against the PyTorch model.

Two measurements per precision variant:
1. numeric: encoder outputs and a few decoder steps (several beams, shuffled origins so the
   in-graph gather is exercised), ONNX Runtime end to end vs PyTorch end to end, as max abs and
   max relative differences (relative = max |onnx - torch| / max |torch| per tensor);
2. captions: the runtime's batched beam search (captrt.runtime.decoding, over the two sessions)
   compared token for token with `reference_beam_search`, plus corpus BLEU-4 of both against
   references.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from captrt.train.model import CaptionModel, normalize_uint8
from captrt.runtime.model_dir import DECODER_OUTPUTS
from captrt.train.step_controls import apply_step_controls

FP32_MAX_REL_DIFF = 1e-3  # fp32 fails parity above this (per tensor, relative to its max magnitude)
NUMERIC_KEYS = ("features", "att_proj", "h", "c", "alpha", "logp")
PARITY_BATCH = 8  # images per batched search (progress moves per batch)


def make_session(model_bytes: bytes, threads: int | None = None):
    """CPU ONNX Runtime session for parity runs, with the runtime's own session options."""
    import onnxruntime as ort

    from captrt.runtime.engines.ort import session_options

    so = session_options(threads or min(os.cpu_count() or 1, 4))
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


@torch.no_grad()
def numeric_parity(model: CaptionModel, encoder, decoder, images: np.ndarray, start: int,
                   steps: int = 3, beams: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """Max abs and relative differences, ONNX Runtime vs PyTorch, on uint8 images (N, S, S, 3)."""
    diffs: dict[str, list[float]] = {key: [0.0, 0.0] for key in NUMERIC_KEYS}  # [max abs diff, max |ref|]

    def record(key: str, got: np.ndarray, ref: torch.Tensor) -> None:
        ref_np = ref.float().numpy()
        diffs[key][0] = max(diffs[key][0], float(np.abs(got.astype(np.float32) - ref_np).max(initial=0.0)))
        diffs[key][1] = max(diffs[key][1], float(np.abs(ref_np).max(initial=0.0)))

    dec = model.decoder
    n = images.shape[0]
    feats_t = model.encoder(normalize_uint8(torch.from_numpy(images)))  # (N, P, E)
    h_t, c_t = dec.init_hidden_state(feats_t)
    feats, att_proj, h, c = encoder.run(None, {"image": images})
    record("features", feats, feats_t)
    record("att_proj", att_proj, dec.attention.encoder_attn(feats_t))
    record("h", h, h_t)
    record("c", c, c_t)

    rng = np.random.default_rng(0)
    hidden = h_t.shape[1]
    tokens = np.full((n, 1), start, dtype=np.int64)
    origin = np.zeros((n, 1), dtype=np.int64)
    h, c = h[:, None], c[:, None]
    h_t, c_t = h_t[:, None], c_t[:, None]  # (N, K_prev, H), PyTorch side
    for step in range(steps):
        k = tokens.shape[1]
        idx = torch.from_numpy(origin)[..., None].expand(n, k, hidden)
        hp, cp = torch.gather(h_t, 1, idx).reshape(n * k, hidden), torch.gather(c_t, 1, idx).reshape(n * k, hidden)
        enc_rows = feats_t.repeat_interleave(k, dim=0)  # the reference's per-beam copy of the features
        hn, cn, logits, alpha = dec.step(torch.from_numpy(tokens.reshape(-1)), enc_rows, None, hp, cp)
        # Decoding controls in use (random bans and penalized words, theta 1.3): the in-graph processing
        # is checked against the torch function the torch engine runs.
        v = logits.shape[1]
        ban = rng.integers(0, v // 2, size=(n, k, 3)).astype(np.int64)  # disjoint lists, as the host sends them
        pen = rng.integers(v // 2, v + 1, size=(n, k, 4)).astype(np.int64)  # (V: padding)
        theta = np.full(n, 1.3, np.float32)
        ext = torch.cat([logits, torch.full_like(logits[:, :1], float("-inf"))], dim=1)  # the graph's V + 1
        logits = apply_step_controls(ext, torch.from_numpy(ban.reshape(n * k, -1)),
                                     torch.from_numpy(pen.reshape(n * k, -1)),
                                     torch.from_numpy(theta).repeat_interleave(k)[:, None])
        logp_t = F.log_softmax(logits, dim=1)[:, :v]  # (N*K, V)
        h, c, alpha_o, cand_logp, cand_ids = decoder.run(list(DECODER_OUTPUTS), {
            "tokens": tokens, "origin": origin, "h": h, "c": c, "features": feats, "att_proj": att_proj,
            "ban_ids": ban, "penalty_ids": pen, "penalty": theta})
        record("h", h, hn.reshape(n, k, hidden))
        record("c", c, cn.reshape(n, k, hidden))
        record("alpha", alpha_o, alpha.reshape(n, k, -1))
        # Compare log-probabilities at the ids ONNX chose: robust to reordering of near-ties.
        record("logp", cand_logp.reshape(n * k, -1), logp_t.gather(1, torch.from_numpy(cand_ids.reshape(n * k, -1))))
        h_t, c_t = hn.reshape(n, k, hidden), cn.reshape(n, k, hidden)
        # Next slots: continue random parents (exercising the gather) with PyTorch's choice of words.
        if step == 0:  # like a beam search's first step: the best `beams` words of the single start slot
            origin = np.zeros((n, beams), np.int64)
            tokens = logp_t.topk(beams, dim=1).indices.numpy().astype(np.int64)
        else:
            origin = rng.integers(0, k, size=(n, beams)).astype(np.int64)
            best = logp_t.reshape(n, k, -1).argmax(dim=2).numpy()  # (N, K)
            tokens = np.take_along_axis(best, origin, axis=1).astype(np.int64)
    abs_diff = {key: v[0] for key, v in diffs.items()}
    rel_diff = {key: (v[0] / v[1] if v[1] > 0 else v[0]) for key, v in diffs.items()}
    return abs_diff, rel_diff


def corpus_bleu4(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]) -> float:
    """nltk corpus BLEU-4 (smoothing method1 so that short corpora do not collapse to 0)."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(corpus_bleu([list(map(list, r)) for r in references], [list(h) for h in hypotheses],
                                 smoothing_function=SmoothingFunction().method1))


def caption_parity(reference_tokens: Sequence[list[int]], variant_tokens: Sequence[list[int]],
                   words: Callable[[Sequence[int]], list[str]], dataset_refs: Sequence[list[list[str]]] | None,
                   names: Sequence[str]) -> dict:
    """Token-identity and BLEU-4 of a variant's captions vs the PyTorch reference captions."""
    n = len(reference_tokens)
    same = [list(a) == list(b) for a, b in zip(reference_tokens, variant_tokens)]
    ref_words = [words(t) for t in reference_tokens]
    var_words = [words(t) for t in variant_tokens]
    if dataset_refs is not None:
        refs, source = dataset_refs, "dataset"
    else:
        refs, source = [[w] for w in ref_words], "reference_beam_search"
    bleu_ref, bleu_var = corpus_bleu4(refs, ref_words), corpus_bleu4(refs, var_words)
    mismatches = [{"image": names[i], "reference": " ".join(ref_words[i]), "variant": " ".join(var_words[i])}
                  for i in range(n) if not same[i]][:5]
    return {"images": n, "identical": int(sum(same)), "identical_fraction": float(sum(same)) / max(n, 1),
            "bleu_references": source, "bleu4_reference": round(bleu_ref, 6), "bleu4_variant": round(bleu_var, 6),
            "bleu4_change": round(bleu_var - bleu_ref, 6), "mismatches": mismatches}


def candidates(decoder) -> int:
    """C, a decoder_step session's candidates per beam (its cand_logp's last dimension, the max_beam)."""
    return int(next(o for o in decoder.get_outputs() if o.name == "cand_logp").shape[-1])


def search_engine(encoder, decoder_bytes: bytes, *, precision: str = "fp32", controlled=None):
    """A SessionEngine that decodes as the runtime's default path does: with the step graph cut without its
    decoding controls (captrt.runtime.engines.plain_step) when the cut applies, the format-2 graph beside it for
    controls (`controlled`, a session of decoder_bytes when the caller has one; opened on demand otherwise).
    The step's ops are small: its sessions take one thread."""
    from captrt.runtime.engines.ort import SessionEngine
    from captrt.runtime.engines.plain_step import plain_step_graph

    plain = plain_step_graph(decoder_bytes)
    if plain is None:
        dec = controlled if controlled is not None else make_session(decoder_bytes, threads=1)
        return SessionEngine(encoder, dec, candidates(dec), precision=precision)
    step = make_session(plain, threads=1)
    return SessionEngine(encoder, step, candidates(step), precision=precision, controlled=controlled,
                         open_controlled=None if controlled is not None else lambda: make_session(decoder_bytes, 1))


def run_beam_searches(encoder, decoder, images: np.ndarray, start: int, end: int, vocab_size: int,
                      beam_size: int, max_steps: int, tick: Callable[[], None] | None = None,
                      batch: int = PARITY_BATCH) -> list:
    """BeamResults (tokens, score, finished) of uint8 images (M, S, S, 3) by the runtime's own batched
    beam search (captrt.runtime.decoding) over the two sessions: the parity gate checks what users run."""
    from captrt.runtime.decoding.beam import beam_search
    from captrt.runtime.engines.ort import SessionEngine

    engine = SessionEngine(encoder, decoder, candidates(decoder))
    out = []
    for s in range(0, len(images), batch):
        results = beam_search(engine, images[s:s + batch], start=start, end=end, vocab_size=vocab_size,
                              beam_size=beam_size, max_steps=max_steps)
        for r in results:
            out.append(r)
            if tick:
                tick()
    return out


def parity_report(numeric: tuple[dict, dict], captions: dict, *, beam_size: int, max_steps: int,
                  strict: bool, seconds: float) -> dict:
    """Assemble one precision's report; strict (fp32) requires identical captions and tight numerics."""
    abs_diff, rel_diff = numeric
    report = {"measured": True, **{k: captions[k] for k in ("images",)}, "beam_size": beam_size,
              "max_steps": max_steps, **{k: v for k, v in captions.items() if k != "images"},
              "max_abs_diff": {k: float(f"{v:.3g}") for k, v in abs_diff.items()},
              "max_rel_diff": {k: float(f"{v:.3g}") for k, v in rel_diff.items()},
              "seconds": round(seconds, 1)}
    if strict:
        worst = max(rel_diff.values())
        report["passed"] = captions["identical"] == captions["images"] and worst <= FP32_MAX_REL_DIFF
    else:
        # Variants are judged by what users see: captions. Report-only; the export does not fail on them.
        report["passed"] = captions["bleu4_change"] >= -0.02
    return report


def not_measured(reason: str) -> dict:
    return {"measured": False, "reason": reason, "passed": None}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily limit torch's intra-op threads: its small decode-step ops are slower with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
