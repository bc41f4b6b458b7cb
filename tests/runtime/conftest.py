"""Session-wide model directories for the runtime tests: exported once, shared by every test file."""

from __future__ import annotations

import pytest

from tests.runtime.checkpoints import make_varied_checkpoint
from tests.runtime.modeldirs import make_model_dir
from tests.runtime.reference_helpers import torch_threads


@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory):
    """Image-dependent captions of 2-17 words (end_bias -5)."""
    with torch_threads(1):
        return make_varied_checkpoint(tmp_path_factory.mktemp("varied") / "varied.pt", end_bias=-5.0)


@pytest.fixture(scope="session")
def varied_model_dir(varied_checkpoint, tmp_path_factory):
    with torch_threads(1):
        return make_model_dir(varied_checkpoint, tmp_path_factory.mktemp("varied_md") / "model")


@pytest.fixture(scope="session")
def endless_checkpoint(tmp_path_factory):
    """<end> never wins (end_bias -1e4): every search runs to max_steps with nothing completed."""
    with torch_threads(1):
        return make_varied_checkpoint(tmp_path_factory.mktemp("endless") / "endless.pt", end_bias=-1e4)


@pytest.fixture(scope="session")
def endless_model_dir(endless_checkpoint, tmp_path_factory):
    with torch_threads(1):
        return make_model_dir(endless_checkpoint, tmp_path_factory.mktemp("endless_md") / "model")
