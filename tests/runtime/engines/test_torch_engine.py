"""engine='torch': the checkpoint's PyTorch modules under the same batched search."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from captrt.runtime import Captioner, ModelDirError  # noqa: E402
from tests.conftest import random_images  # noqa: E402
from tests.runtime.reference_helpers import reference_results, torch_threads  # noqa: E402

BEAMS = (1, 5, 10)


@pytest.fixture(scope="module")
def images():
    return random_images(16, seed=9)


@pytest.fixture(scope="module")
def captioner(varied_model_dir, varied_checkpoint):
    return Captioner.load(varied_model_dir, engine="torch", checkpoint=varied_checkpoint)


def test_torch_engine_token_parity(captioner, varied_checkpoint, images):
    reference = reference_results(varied_checkpoint, images, BEAMS)
    with torch_threads(1):
        for beam, batch in zip(BEAMS, (1, 4, 16)):
            caps = captioner.caption(images, beam_size=beam, batch_size=batch, return_attention=True)
            for i, (c, ref) in enumerate(zip(caps, reference[beam])):
                assert c.tokens == ref.tokens, f"image {i}, beam {beam}"
                assert c.finished == ref.finished
                assert c.score == pytest.approx(ref.score, abs=1e-4)
                np.testing.assert_allclose(c.attention.reshape(len(c.tokens), -1), ref.alphas.numpy(), atol=1e-5)


def test_torch_and_ort_agree(captioner, varied_model_dir, images):
    ort_caps = Captioner.load(varied_model_dir, threads=1).caption(images, beam_size=5)
    with torch_threads(1):
        torch_caps = captioner.caption(images, beam_size=5)
    assert [c.tokens for c in torch_caps] == [c.tokens for c in ort_caps]


def test_provider_and_precision(captioner, varied_model_dir, varied_checkpoint):
    assert captioner.provider == "torch:cpu"
    with pytest.raises(ValueError, match="engine 'torch' runs fp32 only"):
        Captioner.load(varied_model_dir, engine="torch", precision="fp16", checkpoint=varied_checkpoint)


def test_checkpoint_from_manifest(varied_model_dir, varied_checkpoint, tmp_path, images):
    """Without checkpoint=, source.checkpoint is used: absolute as recorded, or a relative name looked up
    in the directory then beside it; its sha256 must match source.checkpoint_sha256."""
    import json

    cap = Captioner.load(varied_model_dir, engine="torch")  # as exported: the recorded path
    assert cap.engine.checkpoint.resolve() == varied_checkpoint.resolve()
    model = tmp_path / "model"
    shutil.copytree(varied_model_dir, model)
    manifest = json.loads((model / "captrt.json").read_text())
    manifest["source"]["checkpoint"] = "moved.pt"
    (model / "captrt.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=r"source checkpoint 'moved.pt' not found .* pass checkpoint=PATH"):
        Captioner.load(model, engine="torch")
    shutil.copy(varied_checkpoint, tmp_path / "moved.pt")
    cap = Captioner.load(model, engine="torch")
    assert cap.engine.checkpoint == tmp_path / "moved.pt"
    with torch_threads(1):
        assert cap.caption(images[0], beam_size=2)[0].ok


def test_wrong_checkpoint_is_refused(varied_model_dir, endless_checkpoint):
    with pytest.raises(ModelDirError, match="differs from captrt.json source.checkpoint_sha256"):
        Captioner.load(varied_model_dir, engine="torch", checkpoint=endless_checkpoint)


def test_missing_checkpoint_file(varied_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="no such checkpoint file"):
        Captioner.load(varied_model_dir, engine="torch", checkpoint=tmp_path / "none.pt")
