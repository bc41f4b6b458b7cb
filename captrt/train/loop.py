"""`captrt train`: the seed's training loop, with safe checkpoints, exact resume and DDP."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from captrt.train import distributed as D
from captrt.train.batches import epoch_batches, num_batches
from captrt.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from captrt.train.config import ModelConfig
from captrt.train.model import CaptionModel, normalize_uint8
from captrt.train.prepare import load_prepared


@dataclass
class TrainConfig:
    data: str  # a `captrt prepare` directory
    out: str  # checkpoints (last.pt, best.pt) and metrics.jsonl go here
    backbone: str = "resnet101"
    enc_size: int = 14
    attention_dim: int = 512
    embed_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5
    pretrained: bool = False
    fine_tune_encoder: bool = False
    epochs: int = 20
    batch_size: int = 32
    decoder_lr: float = 4e-4
    encoder_lr: float = 1e-4
    grad_clip: float = 5.0
    alpha_c: float = 1.0  # doubly stochastic attention regularization
    lr_decay_factor: float = 0.8
    lr_decay_patience: int = 8
    early_stop_patience: int = 20
    val_beam: int = 3
    val_images: int = 0  # 0 = the whole val split
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # only on CUDA
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def top5_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """logits (T, V), targets (T,) -> percent of targets in the top 5."""
    top = logits.topk(min(5, logits.size(1)), dim=1).indices
    return float((top == targets.unsqueeze(1)).any(dim=1).float().mean() * 100.0)


def caption_loss(logits, alphas, captions, decode_lengths, alpha_c: float):
    """Cross-entropy over the real (unpadded) positions plus the doubly stochastic attention term."""
    targets = captions[:, 1:]  # (B, T): every word after <start>, up to <end>
    steps = torch.arange(logits.size(1), device=logits.device)
    mask = steps.unsqueeze(0) < torch.tensor(decode_lengths, device=logits.device).unsqueeze(1)  # (B, T)
    flat_logits, flat_targets = logits[mask], targets[:, : logits.size(1)][mask]
    loss = F.cross_entropy(flat_logits, flat_targets) + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    return loss, flat_logits, flat_targets


def clip_gradients(optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    """Clamp every gradient value to [-grad_clip, grad_clip], as the seed's clip_gradient does."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.data.clamp_(-grad_clip, grad_clip)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None):
        self.cfg = cfg
        self.dist = D.init_distributed(cfg.device)
        self.device = torch.device(cfg.device if not cfg.device.startswith("cuda") or not self.dist.enabled
                                   else f"cuda:{self.dist.local_rank}")
        self.out = Path(cfg.out)
        self.train_split, self.vocab = load_prepared(cfg.data, "train")
        self.val_split, _ = load_prepared(cfg.data, "val")
        resumed = load_checkpoint(resume) if resume else None
        if resumed is not None:
            if resumed.train_state is None:
                raise CheckpointError(f"{resume}: holds no training state (a converted or exported checkpoint); cannot resume")
            if resumed.vocab != self.vocab:
                raise CheckpointError(f"{resume}: its vocabulary differs from the prepared data in {cfg.data}")
            model_config = resumed.config
        else:
            model_config = ModelConfig(vocab_size=len(self.vocab), backbone=cfg.backbone, enc_size=cfg.enc_size,
                                       attention_dim=cfg.attention_dim, embed_dim=cfg.embed_dim,
                                       decoder_dim=cfg.decoder_dim, dropout=cfg.dropout)
        torch.manual_seed(cfg.seed)
        self.model = CaptionModel(model_config, pretrained=cfg.pretrained and resumed is None)
        if resumed is not None:
            self.model.encoder.load_state_dict(resumed.encoder_state)
            self.model.decoder.load_state_dict(resumed.decoder_state)
        self.model.to(self.device)
        self.model.encoder.fine_tune(cfg.fine_tune_encoder)
        self.decoder = self._wrap(self.model.decoder)
        self.encoder = self._wrap(self.model.encoder) if cfg.fine_tune_encoder else self.model.encoder
        self.dec_opt = torch.optim.Adam([p for p in self.model.decoder.parameters() if p.requires_grad], lr=cfg.decoder_lr)
        self.enc_opt = (torch.optim.Adam([p for p in self.model.encoder.parameters() if p.requires_grad], lr=cfg.encoder_lr)
                        if cfg.fine_tune_encoder else None)
        plateau = dict(mode="max", factor=cfg.lr_decay_factor, patience=cfg.lr_decay_patience)
        self.dec_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.dec_opt, **plateau)
        self.enc_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.enc_opt, **plateau) if self.enc_opt else None
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        # best_bleu4 starts below any BLEU-4 (>= 0): the first validated epoch writes best.pt even at 0,
        # so the path train() returns always exists.
        self.start_epoch, self.best_bleu4, self.since_improvement = 1, -1.0, 0
        if resumed is not None:
            self._restore(resumed.train_state)
        self.train_inputs = self._inputs(self.train_split.images)
        self.val_inputs = self._inputs(self.val_split.images, limit=cfg.val_images)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @torch.no_grad()
    def _inputs(self, images: np.ndarray, limit: int = 0) -> np.ndarray:
        """With a frozen encoder its features never change: compute them once instead of every epoch."""
        if limit:
            images = images[:limit]
        if self.cfg.fine_tune_encoder:
            return images
        self.model.encoder.eval()
        feats = []
        for start in range(0, len(images), 32):
            x = normalize_uint8(torch.from_numpy(np.array(images[start:start + 32])).to(self.device))
            feats.append(self.model.encoder(x).cpu().numpy())  # (b, P, E)
        return np.concatenate(feats)

    def _features(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if not self.cfg.fine_tune_encoder:
            return inputs  # cached (B, P, E)
        return self.encoder(normalize_uint8(inputs))

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        cfg = self.cfg
        self.model.decoder.train()
        self.model.encoder.train(cfg.fine_tune_encoder)
        split = self.train_split
        total = num_batches(split.caplens.size, cfg.batch_size, self.dist.world_size)
        batches = epoch_batches(self.train_inputs, split.captions, split.caplens, cfg.batch_size, cfg.seed, epoch,
                                self.dist.rank, self.dist.world_size)
        bar = _bar(batches, total, f"epoch {epoch}", cfg.progress and self.dist.is_main)
        losses, accs = [], []
        for batch in bar:
            captions, lengths = batch.captions.to(self.device), batch.lengths
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                feats = self._features(batch.inputs)
                logits, alphas, dec_lens = self.decoder(feats, captions, lengths)
                loss, flat_logits, flat_targets = caption_loss(logits.float(), alphas.float(), captions, dec_lens,
                                                               cfg.alpha_c)
            self.dec_opt.zero_grad(set_to_none=True)
            if self.enc_opt:
                self.enc_opt.zero_grad(set_to_none=True)
            if self.scaler:
                self.scaler.scale(loss).backward()
                for opt in filter(None, (self.dec_opt, self.enc_opt)):
                    self.scaler.unscale_(opt)
            else:
                loss.backward()
            for opt in filter(None, (self.dec_opt, self.enc_opt)):
                clip_gradients(opt, cfg.grad_clip)
            for opt in filter(None, (self.dec_opt, self.enc_opt)):
                (self.scaler.step(opt) if self.scaler else opt.step())
            if self.scaler:
                self.scaler.update()
            losses.append(loss.item())
            accs.append(top5_accuracy(flat_logits.detach(), flat_targets))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.3f}", top5=f"{accs[-1]:.1f}")
        return float(np.mean(losses)), float(np.mean(accs))

    @torch.no_grad()
    def validate(self) -> float:
        """Corpus BLEU-4 of real beam-search captions on the val split (the seed's is teacher-forced)."""
        from captrt.train.metrics import corpus_bleu4
        from captrt.train.reference import reference_beam_search_features

        self.model.eval()
        hyps, refs = [], []
        for i in range(len(self.val_inputs)):
            if self.cfg.fine_tune_encoder:
                feats = self.model.encoder(normalize_uint8(torch.from_numpy(np.array(self.val_inputs[i:i + 1])).to(self.device)))
            else:
                feats = torch.from_numpy(self.val_inputs[i:i + 1]).to(self.device)
            result = reference_beam_search_features(self.model.decoder, feats, self.vocab.start, self.vocab.end,
                                                    beam_size=self.cfg.val_beam)
            hyps.append(self.vocab.decode(result.tokens))
            refs.append(self.val_split.refs[i])
        return corpus_bleu4(refs, hyps)

    def fit(self) -> Path:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.start_epoch, cfg.epochs + 1):
            t0 = time.time()
            loss, top5 = self.train_epoch(epoch)
            bleu4 = self.validate() if self.dist.is_main else 0.0
            bleu4 = D.broadcast_float(bleu4, self.dist, str(self.device) if self.device.type == "cuda" else "cpu")
            self.dec_sched.step(bleu4)
            if self.enc_sched:
                self.enc_sched.step(bleu4)
            is_best = bleu4 > self.best_bleu4
            self.best_bleu4 = max(bleu4, self.best_bleu4)
            self.since_improvement = 0 if is_best else self.since_improvement + 1
            record = {"epoch": epoch, "train_loss": loss, "train_top5": top5, "val_bleu4": bleu4,
                      "best_bleu4": self.best_bleu4, "decoder_lr": self.dec_opt.param_groups[0]["lr"],
                      "seconds": round(time.time() - t0, 2)}
            if self.dist.is_main:
                self._save(epoch, is_best, record)
                with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if cfg.progress:
                    print(f"epoch {epoch}: loss {loss:.4f}  top5 {top5:.1f}%  val BLEU-4 {bleu4:.4f}"
                          f"{'  (best)' if is_best else ''}  {record['seconds']:.0f}s", flush=True)
            D.barrier(self.dist)
            if self.since_improvement >= cfg.early_stop_patience:
                if self.dist.is_main and cfg.progress:
                    print(f"early stop: no improvement for {self.since_improvement} epochs", flush=True)
                break
        D.shutdown(self.dist)
        return self.out / "best.pt"

    def _save(self, epoch: int, is_best: bool, record: dict) -> None:
        state = {
            "epoch": epoch,
            "best_bleu4": self.best_bleu4,
            "epochs_since_improvement": self.since_improvement,
            "decoder_optimizer": self.dec_opt.state_dict(),
            "encoder_optimizer": self.enc_opt.state_dict() if self.enc_opt else None,
            "decoder_scheduler": self.dec_sched.state_dict(),
            "encoder_scheduler": self.enc_sched.state_dict() if self.enc_sched else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "train_config": asdict(self.cfg),
        }
        ckpt = Checkpoint(self.model.config, self.vocab, _cpu_state(self.model.encoder), _cpu_state(self.model.decoder),
                          state, {k: v for k, v in record.items() if isinstance(v, (int, float))})
        save_checkpoint(self.out / "last.pt", ckpt)
        if is_best:
            save_checkpoint(self.out / "best.pt", ckpt)

    def _restore(self, state: dict) -> None:
        if (state.get("encoder_optimizer") is None) != (self.enc_opt is None):
            # Switching fine-tuning on at resume starts a fresh encoder optimizer, as the seed does.
            state = {**state, "encoder_optimizer": None, "encoder_scheduler": None}
        self.dec_opt.load_state_dict(state["decoder_optimizer"])
        self.dec_sched.load_state_dict(state["decoder_scheduler"])
        if self.enc_opt and state.get("encoder_optimizer"):
            self.enc_opt.load_state_dict(state["encoder_optimizer"])
            self.enc_sched.load_state_dict(state["encoder_scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_bleu4 = float(state["best_bleu4"])
        self.since_improvement = int(state["epochs_since_improvement"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _bar(items, total: int, desc: str, enabled: bool):
    if not enabled:
        return items
    from captrt.progress import track

    return track(items, total, label=desc, unit="batches")


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Train and return the path of best.pt."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if math.isnan(cfg.decoder_lr) or cfg.decoder_lr <= 0:
        raise ValueError("decoder_lr must be > 0")
    return Trainer(cfg, resume).fit()
