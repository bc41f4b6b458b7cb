"""Model configuration: one plain dataclass, stored as a dict inside every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from captrt.checks import check_int

# Channels of the last ResNet stage, i.e. the encoder_dim E of the features.
BACKBONE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


@dataclass
class ModelConfig:
    vocab_size: int
    backbone: str = "resnet101"
    enc_size: int = 14  # encoder grid: P = enc_size ** 2 pixels attended over
    image_size: int = 256
    attention_dim: int = 512
    embed_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"config.backbone: unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        for name in ("vocab_size", "enc_size", "image_size", "attention_dim", "embed_dim", "decoder_dim"):
            check_int(f"config.{name}", getattr(self, name), expected=True)
        if self.vocab_size < 4:
            raise ValueError(f"config.vocab_size: {self.vocab_size} cannot hold <pad>, <unk>, <start>, <end>")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"config.dropout: expected a value in [0, 1), got {self.dropout!r}")

    @property
    def encoder_dim(self) -> int:
        return BACKBONE_CHANNELS[self.backbone]

    @property
    def num_pixels(self) -> int:
        return self.enc_size * self.enc_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"config: expected a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config: unknown field(s) {sorted(unknown)}")
        if "vocab_size" not in data:
            raise ValueError("config.vocab_size: missing")
        return cls(**data)
