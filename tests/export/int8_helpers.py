"""Graphs and captions for the int8 tests: tiny checkpoints traced exactly as the exporter traces them,
and the runtime's batched beam search (captrt.runtime.decoding over SessionEngine) on ONNX Runtime's CPU provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

MAX_BEAM = 5


def trace_graphs(checkpoint: str | Path, max_beam: int = MAX_BEAM) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(encoder, decoder_step) fp32 graphs of a checkpoint, as captrt.export.exporter writes them."""
    from captrt.export.graphs import DecoderStepGraph, EncoderGraph, example_decoder_inputs, example_encoder_inputs
    from captrt.export.onnx_export import export_graph
    from captrt.train.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).build_model().eval()
    enc = export_graph(EncoderGraph(model), example_encoder_inputs(model.config.image_size), "encoder", 17)
    dec = export_graph(DecoderStepGraph(model, max_beam), example_decoder_inputs(model), "decoder_step", 17)
    return enc, dec


def session(graph: onnx.ModelProto, threads: int = 1):
    from captrt.export.parity import make_session

    return make_session(graph.SerializeToString(), threads)


def captions(enc: onnx.ModelProto, dec: onnx.ModelProto, images: np.ndarray, vocab, *, batch: int,
             beam: int = MAX_BEAM, max_steps: int = 20) -> list[list[int]]:
    """Word ids per image (uint8 (M, S, S, 3)) by the runtime's beam search, `batch` images per search."""
    from captrt.runtime.decoding.beam import beam_search
    from captrt.runtime.engines.ort import SessionEngine

    engine = SessionEngine(session(enc), session(dec), MAX_BEAM)
    out: list[list[int]] = []
    for s in range(0, len(images), batch):
        out += [list(r.tokens) for r in beam_search(engine, images[s:s + batch], start=vocab.start, end=vocab.end,
                                                     vocab_size=len(vocab), beam_size=beam, max_steps=max_steps)]
    return out
