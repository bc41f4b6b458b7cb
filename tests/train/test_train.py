"""Training end to end on a tiny synthetic dataset: metrics, checkpoints, exact resume, DDP."""

import json
import subprocess
import sys

import pytest
import torch

from captrt.synth import make_synth_dataset
from captrt.train.checkpoint import load_checkpoint
from captrt.train.data import DatasetError
from captrt.train.loop import TrainConfig, train
from captrt.train.prepare import load_prepared, prepare_dataset

TINY = dict(backbone="resnet18", enc_size=2, attention_dim=16, embed_dim=16, decoder_dim=16, batch_size=16,
            val_images=3, val_beam=2, progress=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data_json = make_synth_dataset(root / "synth", 30, seed=1)
    return prepare_dataset(data_json, None, root / "prepared", min_word_freq=1, progress=False)


def test_prepare_layout(prepared):
    split, vocab = load_prepared(prepared, "train")
    assert split.images.dtype == "uint8" and split.images.shape[1:] == (256, 256, 3)
    assert split.captions.shape[:2] == (len(split.images), 5)
    first = split.captions[0, 0]
    assert first[0] == vocab.start and first[split.caplens[0, 0] - 1] == vocab.end
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_prepared(prepared, "dev")


def test_prepare_refuses_missing_image_and_leaves_nothing(tmp_path):
    data_json = make_synth_dataset(tmp_path / "s", 6, seed=2)
    data = json.loads(data_json.read_text())
    victim = tmp_path / "s" / "images" / data["images"][4]["filename"]
    victim.unlink()
    with pytest.raises(DatasetError, match=f"image file not found: .*{victim.name}"):
        prepare_dataset(data_json, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=f"{victim.name}"):
        prepare_dataset(data_json, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_train_writes_checkpoints_and_metrics(prepared, tmp_path):
    best = train(TrainConfig(data=str(prepared), out=str(tmp_path / "run"), epochs=2, **TINY))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(0.0 <= r["val_bleu4"] <= 1.0 and r["train_loss"] > 0 for r in lines)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.train_state["epoch"] == 2
    # best.pt is the first epoch with the highest validation BLEU-4 (strictly better replaces it)
    assert best == tmp_path / "run" / "best.pt" and best.is_file()
    assert load_checkpoint(best).train_state["epoch"] == max(lines, key=lambda r: r["val_bleu4"])["epoch"]


def test_resume_gives_the_same_weights(prepared, tmp_path):
    """2 epochs straight == 1 epoch, then --resume, then 1 more (on CPU, bit for bit)."""
    train(TrainConfig(data=str(prepared), out=str(tmp_path / "a"), epochs=2, **TINY))
    train(TrainConfig(data=str(prepared), out=str(tmp_path / "b"), epochs=1, **TINY))
    train(TrainConfig(data=str(prepared), out=str(tmp_path / "b"), epochs=2, **TINY), resume=str(tmp_path / "b" / "last.pt"))
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert b.train_state["epoch"] == 2
    for k, v in a.decoder_state.items():
        assert torch.equal(v, b.decoder_state[k]), k
    sa, sb = a.train_state["decoder_optimizer"]["state"], b.train_state["decoder_optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_fine_tune_encoder_updates_blocks_2_to_4_only(prepared, tmp_path):
    cfg = TrainConfig(data=str(prepared), out=str(tmp_path / "ft"), epochs=1, fine_tune_encoder=True, **TINY)
    train(cfg)
    torch.manual_seed(cfg.seed)
    from captrt.train.config import ModelConfig
    from captrt.train.model import CaptionModel

    ckpt = load_checkpoint(tmp_path / "ft" / "last.pt")
    init = CaptionModel(ModelConfig.from_dict(ckpt.config.to_dict())).encoder.state_dict()
    assert torch.equal(init["resnet.0.weight"], ckpt.encoder_state["resnet.0.weight"])  # stem frozen
    assert not torch.equal(init["resnet.7.1.conv2.weight"], ckpt.encoder_state["resnet.7.1.conv2.weight"])
    assert ckpt.train_state["encoder_optimizer"] is not None


def test_ddp_two_cpu_processes(prepared, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "captrt",
           "train", "--data", str(prepared), "-o", str(out), "--backbone", "resnet18", "--enc-size", "2", "--dim", "16",
           "--epochs", "1", "--batch-size", "16", "--val-images", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.train_state["train_config"]["batch_size"] == 16
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes


def test_train_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), epochs=1, **TINY))
