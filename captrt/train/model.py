"""Show, Attend and Tell as in the seed notebook, with the seed's parameter names.

ImageEncoder.resnet / .adaptive_pool; DecoderWithAttention.attention.{encoder_attn, decoder_attn,
full_attn}, .embedding, .decode_step, .init_h, .init_c, .f_beta, .fc: legacy weights map across
unchanged (the tutorial's `*_att` names are renamed on import).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from captrt.train.config import ModelConfig


class ImageEncoder(nn.Module):
    """ResNet without pool and fc, then adaptive average pooling to an enc_size x enc_size grid."""

    def __init__(self, backbone: str = "resnet101", enc_size: int = 14, pretrained: bool = False):
        super().__init__()
        self.enc_image_size = enc_size
        resnet = build_resnet(backbone, pretrained)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((enc_size, enc_size))
        self.fine_tune(False)

    def fine_tune(self, fine_tune: bool = True) -> None:
        """Freeze the backbone; with fine_tune, train blocks 2 through 4 as the seed does."""
        for p in self.resnet.parameters():
            p.requires_grad = False
        for child in list(self.resnet.children())[5:]:
            for p in child.parameters():
                p.requires_grad = fine_tune

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) normalized float -> features (N, P, E)."""
        out = self.resnet(images)  # (N, E, S/32, S/32)
        out = self.adaptive_pool(out)  # (N, E, G, G)
        return out.flatten(2).transpose(1, 2)  # (N, P, E), P = G*G in row-major (y, x) order


def build_resnet(backbone: str, pretrained: bool) -> nn.Module:
    ctor = getattr(torchvision.models, backbone)
    if not pretrained:
        return ctor(weights=None)
    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    try:
        return ctor(weights=weights)
    except Exception as exc:  # network, cache or hash failures all mean the same to the user
        raise RuntimeError(
            f"--pretrained: could not fetch ImageNet weights {weights} for {backbone} ({exc}). "
            "Put the file in torch's hub cache ($TORCH_HOME/hub/checkpoints) or train without --pretrained."
        ) from None


class BahdanauAttention(nn.Module):
    """Additive attention: full_attn(relu(encoder_attn(f) + decoder_attn(h))), softmax over pixels."""

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int):
        super().__init__()
        self.encoder_attn = nn.Linear(encoder_dim, attention_dim)
        self.decoder_attn = nn.Linear(decoder_dim, attention_dim)
        self.full_attn = nn.Linear(attention_dim, 1)

    def forward(self, encoder_out: torch.Tensor, decoder_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out (B, P, E), decoder_hidden (B, H) -> context (B, E), alpha (B, P)."""
        return self.attend(encoder_out, self.encoder_attn(encoder_out), decoder_hidden)

    def attend(self, encoder_out: torch.Tensor, att_proj: torch.Tensor, decoder_hidden: torch.Tensor):
        """Same as forward with encoder_attn(encoder_out) = att_proj (B, P, A) precomputed."""
        att2 = self.decoder_attn(decoder_hidden)  # (B, A)
        att = self.full_attn(F.relu(att_proj + att2.unsqueeze(1))).squeeze(2)  # (B, P)
        alpha = F.softmax(att, dim=1)  # (B, P)
        context = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (B, E)
        return context, alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim: int, embed_dim: int, decoder_dim: int, vocab_size: int,
                 encoder_dim: int = 2048, dropout: float = 0.5):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.attention_dim = attention_dim
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.vocab_size = vocab_size
        self.attention = BahdanauAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_weights()

    def init_weights(self) -> None:
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_hidden_state(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoder_out (B, P, E) -> h, c (B, H) from the mean feature."""
        mean = encoder_out.mean(dim=1)  # (B, E)
        return self.init_h(mean), self.init_c(mean)

    def step(self, words: torch.Tensor, encoder_out: torch.Tensor, att_proj: torch.Tensor | None,
             h: torch.Tensor, c: torch.Tensor):
        """One decode step. words (B,), encoder_out (B, P, E), h/c (B, H) -> h, c, logits (B, V), alpha (B, P).

        With att_proj None the attention projects the features itself, as the seed does every step.
        """
        emb = self.embedding(words)  # (B, D)
        if att_proj is None:
            context, alpha = self.attention(encoder_out, h)
        else:
            context, alpha = self.attention.attend(encoder_out, att_proj, h)
        gate = torch.sigmoid(self.f_beta(h))  # (B, E)
        h, c = self.decode_step(torch.cat([emb, gate * context], dim=1), (h, c))
        logits = self.fc(self.dropout(h))  # (B, V)
        return h, c, logits, alpha

    def forward(self, encoder_out: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
        """Teacher forcing over a batch sorted by decreasing length.

        encoder_out (B, P, E), captions (B, L) with <start>...<end>, lengths (B,) including both.
        Returns logits (B, T, V), alphas (B, T, P), decode_lengths (list, lengths-1) in the
        batch's order; the batch must already be sorted by decreasing length (the loader does it).
        """
        batch = encoder_out.size(0)
        decode_lengths = (lengths - 1).tolist()
        t_max = max(decode_lengths)
        emb = self.embedding(captions)  # (B, L, D)
        h, c = self.init_hidden_state(encoder_out)
        att_proj = self.attention.encoder_attn(encoder_out)  # (B, P, A): identical math, computed once
        logits = encoder_out.new_zeros(batch, t_max, self.vocab_size)
        alphas = encoder_out.new_zeros(batch, t_max, encoder_out.size(1))
        for t in range(t_max):
            b = sum(1 for n in decode_lengths if n > t)  # sorted: the first b sequences are still running
            context, alpha = self.attention.attend(encoder_out[:b], att_proj[:b], h[:b])
            gate = torch.sigmoid(self.f_beta(h[:b]))
            h, c = self.decode_step(torch.cat([emb[:b, t], gate * context], dim=1), (h[:b], c[:b]))
            logits[:b, t] = self.fc(self.dropout(h))
            alphas[:b, t] = alpha
        return logits, alphas, decode_lengths


class CaptionModel(nn.Module):
    """Encoder and decoder together, built from a ModelConfig."""

    def __init__(self, config: ModelConfig, pretrained: bool = False):
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.backbone, config.enc_size, pretrained)
        self.decoder = DecoderWithAttention(config.attention_dim, config.embed_dim, config.decoder_dim,
                                            config.vocab_size, config.encoder_dim, config.dropout)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S, 3) RGB -> float (N, 3, S, S) normalized with ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
