import os
import subprocess
import sys
import textwrap

import pytest
import torch

from captrt.train.checkpoint import CheckpointError, load_checkpoint
from captrt.train.config import ModelConfig
from captrt.train.loop import caption_loss, top5_accuracy
from captrt.train.model import CaptionModel, normalize_uint8
from tests.conftest import make_tiny_checkpoint, tiny_vocab


def tiny_model(**kw):
    cfg = ModelConfig(vocab_size=20, backbone="resnet18", enc_size=4, attention_dim=16, embed_dim=8, decoder_dim=12, **kw)
    torch.manual_seed(0)
    return CaptionModel(cfg)


def test_shapes_and_seed_parameter_names():
    model = tiny_model()
    feats = model.encoder(torch.randn(2, 3, 256, 256))
    assert feats.shape == (2, 16, 512)  # (N, P, E)
    names = set(model.decoder.state_dict())
    for n in ("attention.encoder_attn.weight", "attention.decoder_attn.weight", "attention.full_attn.weight",
              "embedding.weight", "decode_step.weight_ih", "init_h.weight", "init_c.weight", "f_beta.weight", "fc.weight"):
        assert n in names
    assert all(k.startswith("resnet.") for k in model.encoder.state_dict())
    caps = torch.tensor([[18, 1, 2, 3, 19], [18, 4, 19, 0, 0]])
    lengths = torch.tensor([5, 3])
    logits, alphas, dec = model.decoder(feats, caps, lengths)
    assert logits.shape == (2, 4, 20) and alphas.shape == (2, 4, 16) and dec == [4, 2]
    assert torch.allclose(alphas[0].sum(1), torch.ones(4), atol=1e-5)
    assert torch.all(alphas[1, 2:] == 0)  # finished sequences are not decoded further


def test_forward_matches_stepwise_seed_attention():
    """Teacher forcing with the hoisted projection equals the seed's per-step attention call."""
    model = tiny_model(dropout=0.0).eval()
    feats = torch.randn(1, 16, 512)
    caps = torch.tensor([[18, 5, 6, 19]])
    logits, alphas, _ = model.decoder(feats, caps, torch.tensor([4]))
    h, c = model.decoder.init_hidden_state(feats)
    for t in range(3):
        h, c, step_logits, alpha = model.decoder.step(caps[:, t], feats, None, h, c)
        assert torch.allclose(step_logits, logits[:, t], atol=1e-5)
        assert torch.allclose(alpha, alphas[:, t], atol=1e-6)


def test_loss_masks_padding_and_adds_attention_term():
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    alphas = torch.full((2, 3, 4), 0.25)
    captions = torch.tensor([[3, 1, 2, 4], [3, 2, 4, 0]])
    loss, fl, ft = caption_loss(logits, alphas, captions, [3, 2], alpha_c=1.0)
    assert ft.tolist() == [1, 2, 4, 2, 4]  # row-major over valid positions only
    reg = ((1 - alphas.sum(1)) ** 2).mean()
    assert torch.isclose(loss, torch.log(torch.tensor(5.0)) + reg)
    assert top5_accuracy(torch.eye(5)[:3] * 10, torch.tensor([0, 1, 3])) == pytest.approx(100.0)


def test_normalize_uint8():
    img = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    out = normalize_uint8(img)
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_checkpoint_round_trip_weights_only(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)  # no pickled code: plain dicts and tensors
    assert raw["format"] == "captrt-checkpoint"
    ckpt = load_checkpoint(path)
    assert ckpt.vocab == tiny_vocab()
    model = ckpt.build_model()
    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, ckpt.decoder_state[k])


def test_checkpoint_errors(tmp_path):
    good = make_tiny_checkpoint(tmp_path / "good.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="trunc.pt: unreadable or truncated"):
        load_checkpoint(trunc)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a captrt checkpoint"):
        load_checkpoint(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(CheckpointError, match="pickled.pt.*captrt convert"):
        load_checkpoint(pickled)
    data = torch.load(good, weights_only=True)
    data["config"]["vocab_size"] += 1
    torch.save(data, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="vocabulary has .* but config.vocab_size"):
        load_checkpoint(tmp_path / "mismatch.pt")
    # junk in many shapes: every one a CheckpointError naming the file, never a raw exception
    raw = good.read_bytes()
    for i, junk in enumerate([b"", b"hello", raw[:100], raw[: len(raw) // 2], bytes(reversed(raw[:4000])),
                              b"PK\x03\x04" + os.urandom(2000)]):
        bad = tmp_path / f"junk{i}.pt"
        bad.write_bytes(junk)
        with pytest.raises(CheckpointError, match=f"junk{i}.pt"):
            load_checkpoint(bad)


def test_atomic_save_survives_a_crash_mid_save(tmp_path):
    """A process killed while writing leaves the previous checkpoint intact and no temp file."""
    path = make_tiny_checkpoint(tmp_path / "last.pt")
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, torch
        from captrt.train.checkpoint import load_checkpoint, save_checkpoint
        ckpt = load_checkpoint({str(path)!r})
        real_save = torch.save
        def dying_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(100)  # half-written
            os._exit(9)  # killed before the rename
        torch.save = dying_save
        save_checkpoint({str(path)!r}, ckpt)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == 9
    assert path.read_bytes() == before
    load_checkpoint(path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["last.pt"]
