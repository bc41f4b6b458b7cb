"""Shared fixtures: tiny models made in the tests, so everything runs in seconds on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest

WORDS = "a red green blue circle square triangle on the left right top bottom small large two three".split()


def tiny_vocab():
    from captrt.vocab import Vocab

    return Vocab.build([WORDS] * 6, min_word_freq=5)


def make_tiny_checkpoint(path, *, seed: int = 0, backbone: str = "resnet18", enc_size: int = 4, dim: int = 32,
                         sharpen: float = 40.0, end_bias: float = 0.0):
    """A random-weight checkpoint with peaked word distributions (so beams rarely tie).

    sharpen scales fc so log-probabilities are far apart; end_bias raises <end>'s logit so that
    sequences finish after a few steps (0 keeps random lengths; very negative never finishes).
    """
    import torch

    from captrt.train.checkpoint import Checkpoint, save_checkpoint
    from captrt.train.config import ModelConfig
    from captrt.train.model import CaptionModel

    vocab = tiny_vocab()
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=len(vocab), backbone=backbone, enc_size=enc_size, attention_dim=dim,
                         embed_dim=dim, decoder_dim=dim, dropout=0.5)
    model = CaptionModel(config).eval()
    with torch.no_grad():
        model.decoder.fc.weight.mul_(sharpen)
        model.decoder.fc.bias[vocab.end] += end_bias
        model.decoder.fc.bias[vocab.pad] = -1e4  # <pad> and <start> are never emitted by a trained model
        model.decoder.fc.bias[vocab.start] = -1e4
    ckpt = Checkpoint(config, vocab, model.encoder.state_dict(), model.decoder.state_dict())
    save_checkpoint(path, ckpt)
    return path


def cuda_usable() -> bool:
    """An NVIDIA driver is loadable and ONNX Runtime offers its CUDA provider (GPU tests run only then)."""
    import ctypes

    import onnxruntime as ort

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def random_images(n: int, seed: int = 0, size: int = 256) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random images (blobs, not white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, size // 8, axis=1), size // 8, axis=2)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return make_tiny_checkpoint(tmp_path / "tiny.pt")


@pytest.fixture(scope="session")
def demo_sized_export(tmp_path_factory):
    """(model_dir, manifest) of a demo-sized model (ResNet-18, 8x8 grid, 256-dim decoder, captions of
    3-18 words) exported with the full 50-image parity gate: the export tests check the gate, the
    service tests serve it."""
    from captrt.export.exporter import export_model
    from tests.export.helpers import make_varied_length_checkpoint

    d = tmp_path_factory.mktemp("demo_sized")
    ckpt = make_varied_length_checkpoint(d / "demo.pt", backbone="resnet18", enc_size=8, dim=256)
    manifest = export_model(ckpt, d / "model", parity_count=50, progress=False)
    return d / "model", manifest


# Session-wide model directories of the runtime, CLI and service tests: exported once, shared by every test file.
@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory):
    """Image-dependent captions of 2-17 words (end_bias -5)."""
    from tests.runtime.checkpoints import make_varied_checkpoint
    from tests.runtime.reference_helpers import torch_threads

    with torch_threads(1):
        return make_varied_checkpoint(tmp_path_factory.mktemp("varied") / "varied.pt", end_bias=-5.0)


@pytest.fixture(scope="session")
def varied_model_dir(varied_checkpoint, tmp_path_factory):
    from tests.runtime.modeldirs import make_model_dir
    from tests.runtime.reference_helpers import torch_threads

    with torch_threads(1):
        return make_model_dir(varied_checkpoint, tmp_path_factory.mktemp("varied_md") / "model")


@pytest.fixture(scope="session")
def endless_checkpoint(tmp_path_factory):
    """<end> never wins (end_bias -1e4): every search runs to max_steps with nothing completed."""
    from tests.runtime.checkpoints import make_varied_checkpoint
    from tests.runtime.reference_helpers import torch_threads

    with torch_threads(1):
        return make_varied_checkpoint(tmp_path_factory.mktemp("endless") / "endless.pt", end_bias=-1e4)


@pytest.fixture(scope="session")
def endless_model_dir(endless_checkpoint, tmp_path_factory):
    from tests.runtime.modeldirs import make_model_dir
    from tests.runtime.reference_helpers import torch_threads

    with torch_threads(1):
        return make_model_dir(endless_checkpoint, tmp_path_factory.mktemp("endless_md") / "model")
