"""captrt.json (docs/model-format.md) and vocab.json writing, sha256 of files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from captrt import __version__
from captrt.hashing import sha256_file  # noqa: F401  (re-exported for the exporter)
from captrt.runtime.model_dir import FORMAT, FORMAT_VERSION, MANIFEST, MAX_STEPS  # the reader owns the format
from captrt.train.config import ModelConfig
from captrt.train.model import IMAGENET_MEAN, IMAGENET_STD
from captrt.vocab import Vocab

GRAPH_FILES = {
    "fp32": ("encoder.onnx", "decoder_step.onnx"),
    "fp16": ("encoder.fp16.onnx", "decoder_step.fp16.onnx"),
    "int8": ("encoder.int8.onnx", "decoder_step.int8.onnx"),
}


def graph_entry(directory: Path, file: str, precision: str, tensorrt_problems: list[str],
                quantization: str | None = None) -> dict[str, Any]:
    """One graph's manifest entry; the hash is of the file as written."""
    entry: dict[str, Any] = {"file": file, "sha256": sha256_file(directory / file), "precision": precision,
                             "tensorrt_ops": not tensorrt_problems}
    if tensorrt_problems:
        entry["tensorrt_problems"] = sorted(set(p.split(": ", 1)[-1] for p in tensorrt_problems))[:10]
    if quantization:
        entry["quantization"] = quantization
    return entry


def build_manifest(config: ModelConfig, vocab: Vocab, *, opset: int, max_beam: int,
                   graphs: dict[str, dict[str, dict]], parity: dict[str, dict], source: dict[str, Any],
                   exporter: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "captrt_version": __version__,
        "model": {"backbone": config.backbone, "enc_size": config.enc_size, "image_size": config.image_size,
                  "encoder_dim": config.encoder_dim, "attention_dim": config.attention_dim,
                  "embed_dim": config.embed_dim, "decoder_dim": config.decoder_dim, "vocab_size": config.vocab_size},
        "vocab": {"file": "vocab.json", "size": len(vocab), "pad": vocab.pad, "unk": vocab.unk,
                  "start": vocab.start, "end": vocab.end},
        "preprocess": {"size": config.image_size, "resize": "bilinear", "mean": list(IMAGENET_MEAN),
                       "std": list(IMAGENET_STD), "input": "uint8 RGB NHWC, normalized inside encoder.onnx"},
        "grid": config.enc_size,
        "max_beam": max_beam,
        "max_steps": MAX_STEPS,
        "opset": opset,
        "graphs": graphs,
        "parity": parity,
        "source": source,
        "exporter": exporter,
    }


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
