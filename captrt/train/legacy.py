"""Import checkpoints written by the seed notebook or sgrvinod's tutorial, without running their code.

Both save ``{'epoch', 'epochs_since_improvement', 'bleu-4', 'encoder', 'decoder',
'encoder_optimizer', 'decoder_optimizer'}`` with whole pickled modules: the seed's classes as
``__main__.ImageEncoder/DecoderWithAttention/BahdanauAttention``, the tutorial's as
``models.Encoder/DecoderWithAttention/Attention``. The pickle is read by
:mod:`captrt.train.legacy_unpickler` (inert stand-ins, everything else refused), the module trees
are walked into state dicts with captrt's names, and the ModelConfig is inferred from the weights.
Optimizer state is not imported (its tensors are keyed by parameter order of the old objects).
Neither format stores the vocabulary: see :func:`build_vocab_for_legacy`.
"""

from __future__ import annotations

import json
import os
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from captrt.checks import check_int, is_int
from captrt.train import legacy_unpickler
from captrt.train.config import BACKBONE_CHANNELS, ModelConfig
from captrt.train.legacy_unpickler import RefusedGlobal, StandIn
from captrt.vocab import Vocab


class LegacyCheckpointError(ValueError):
    """A legacy checkpoint that cannot be imported; the message names the file and the reason."""


@dataclass
class LegacyImport:
    config: ModelConfig
    encoder_state: dict[str, torch.Tensor]  # keys of captrt's ImageEncoder.state_dict() (resnet.*)
    decoder_state: dict[str, torch.Tensor]  # keys of captrt's DecoderWithAttention.state_dict()
    source_format: str  # "seed" | "tutorial"
    metadata: dict[str, Any] = field(default_factory=dict)  # epoch, epochs_since_improvement, bleu-4, ...


# decoder class path -> (format name, expected encoder class path)
FORMATS = {
    "__main__.DecoderWithAttention": ("seed", "__main__.ImageEncoder"),
    "models.DecoderWithAttention": ("tutorial", "models.Encoder"),
}
# The tutorial's attention layer names -> the seed's (captrt's).
TUTORIAL_RENAMES = {"encoder_att": "encoder_attn", "decoder_att": "decoder_attn", "full_att": "full_attn"}
# (bottleneck blocks?, blocks per stage layer1..layer4) -> torchvision constructor name
RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}
_MODULE_KEYS = ("encoder", "decoder", "encoder_optimizer", "decoder_optimizer")
_MAX_DEPTH = 64  # module nesting; the real trees are 4 deep, a crafted cycle must not recurse forever


def load_legacy_checkpoint(path: str | os.PathLike) -> LegacyImport:
    """Read a seed/tutorial checkpoint; raises LegacyCheckpointError (naming the file) on any problem."""
    p = Path(path)
    data = _read_pickle(p)
    if not isinstance(data, dict):
        raise LegacyCheckpointError(f"{p}: unexpected structure: the file holds a {type(data).__name__}, "
                                    "expected the dict written by the seed's/tutorial's save_checkpoint")
    if data.get("format") == "captrt-checkpoint":
        raise LegacyCheckpointError(f"{p}: this is already a captrt checkpoint; load it directly "
                                    "(captrt.train.checkpoint.load_checkpoint), there is nothing to convert")
    missing = [k for k in ("encoder", "decoder") if k not in data]
    if missing:
        raise LegacyCheckpointError(f"{p}: unexpected structure: missing {', '.join(map(repr, missing))} "
                                    f"(keys present: {sorted(map(str, data))[:12]}); expected the seed's or "
                                    "the tutorial's save_checkpoint dict with pickled encoder and decoder modules")
    source_format = _detect_format(data["encoder"], data["decoder"], p)
    encoder_state = module_state_dict(data["encoder"], f"{p}: 'encoder'")
    decoder_state = module_state_dict(data["decoder"], f"{p}: 'decoder'")
    if source_format == "tutorial":
        decoder_state = {_rename_tutorial_key(k): v for k, v in decoder_state.items()}
    config = infer_config(data["encoder"], encoder_state, data["decoder"], decoder_state, str(p))
    check_shapes(config, encoder_state, decoder_state, str(p))
    metadata = {k: _plain(v) for k, v in data.items() if k not in _MODULE_KEYS and _plain(v) is not _SKIP}
    return LegacyImport(config, encoder_state, decoder_state, source_format, metadata)


def _read_pickle(p: Path) -> Any:
    """torch.load through the restricted unpickler, after refusing what it must never see."""
    if not p.is_file():
        raise LegacyCheckpointError(f"{p}: no such file" if not p.exists() else f"{p}: not a regular file")
    with open(p, "rb") as f:
        head = f.read(4)
    if not head:
        raise LegacyCheckpointError(f"{p}: empty file, not a checkpoint")
    if head == b"PK\x03\x04":  # torch >= 1.6 zip format
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise LegacyCheckpointError(f"{p}: truncated or corrupt checkpoint (zip archive unreadable: {exc})") from None
        if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
            # torch.load would hand this to torch.jit.load, which runs the archive's TorchScript.
            raise LegacyCheckpointError(f"{p}: a TorchScript archive, not a seed/tutorial checkpoint; refused")
        if not any(n.endswith("data.pkl") for n in names):
            raise LegacyCheckpointError(f"{p}: a zip archive without data.pkl, not a torch.save checkpoint")
    elif tarfile.is_tarfile(p):
        raise LegacyCheckpointError(f"{p}: a PyTorch < 0.4 tar checkpoint; this format is not supported")
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true"):
        raise LegacyCheckpointError(f"{p}: unset TORCH_FORCE_WEIGHTS_ONLY_LOAD to import legacy checkpoints "
                                    "(they are read with captrt's own restricted unpickler instead)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pre-1.6 loader warns it cannot check pickled module sources
            return torch.load(p, map_location="cpu", weights_only=False, pickle_module=legacy_unpickler)
    except RefusedGlobal as exc:
        raise LegacyCheckpointError(
            f"{p}: refused {exc.global_name!r} ({str(exc).split(': ', 1)[-1]}). Legacy import accepts only the "
            "seed's and the tutorial's model classes, their torch/torchvision layers, Adam and tensors; this file "
            "may be trying to run code. Nothing from it was executed.") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a damaged file becomes one clear error
        detail = (str(exc).splitlines() or ["ran out of data"])[0][:200]
        if isinstance(exc, EOFError) or "truncat" in detail or "EOF" in detail:
            what = "truncated checkpoint"
        else:
            what = "unreadable checkpoint (truncated, corrupt, or not written by torch.save)"
        raise LegacyCheckpointError(f"{p}: {what}: {type(exc).__name__}: {detail}") from None


def _detect_format(encoder: Any, decoder: Any, p: Path) -> str:
    for key, obj in (("decoder", decoder), ("encoder", encoder)):
        if not isinstance(obj, StandIn):
            raise LegacyCheckpointError(
                f"{p}: unexpected structure: '{key}' holds a {type(obj).__name__}, not a pickled module "
                "(the seed notebook and the tutorial pickle whole encoder/decoder modules)")
    if decoder.path not in FORMATS:
        raise LegacyCheckpointError(f"{p}: 'decoder' is a {decoder.path}, expected one of {sorted(FORMATS)}")
    fmt, encoder_path = FORMATS[decoder.path]
    if encoder.path != encoder_path:
        raise LegacyCheckpointError(f"{p}: 'encoder' is a {encoder.path} but the {fmt} format's decoder "
                                    f"goes with {encoder_path}")
    return fmt


def module_state_dict(module: Any, where: str) -> dict[str, torch.Tensor]:
    """What ``module.state_dict()`` would return, read from a StandIn tree (tensors detached)."""
    out: dict[str, torch.Tensor] = {}
    _walk(module, "", out, where, set())
    return out


def _walk(module: Any, prefix: str, out: dict, where: str, active: set[int]) -> None:
    name = prefix.rstrip(".") or "module"
    if not isinstance(module, StandIn):
        raise LegacyCheckpointError(f"{where}: {name} is a {type(module).__name__}, expected a pickled module")
    if id(module) in active or len(active) > _MAX_DEPTH:
        raise LegacyCheckpointError(f"{where}: {name}: module tree has a cycle or is nested too deep")
    attrs = module.attrs
    params, buffers, children = (_mapping(attrs.get(k), f"{where}: {name}.{k}")
                                 for k in ("_parameters", "_buffers", "_modules"))
    non_persistent = attrs.get("_non_persistent_buffers_set") or set()
    for key, tensor in list(params.items()) + [(k, v) for k, v in buffers.items() if k not in non_persistent]:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise LegacyCheckpointError(f"{where}: {prefix}{key} is a {type(tensor).__name__}, expected a tensor")
        out[prefix + str(key)] = tensor.detach()
    if module.path.endswith(".BatchNorm2d") and "running_mean" in buffers and "num_batches_tracked" not in buffers:
        out[prefix + "num_batches_tracked"] = torch.tensor(0)  # PyTorch 0.4.0 had no such buffer
    active.add(id(module))
    for key, child in children.items():
        if child is not None:
            _walk(child, f"{prefix}{key}.", out, where, active)
    active.discard(id(module))


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LegacyCheckpointError(f"{where}: expected a dict, got {type(value).__name__}")
    return value


def _rename_tutorial_key(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "attention" and parts[1] in TUTORIAL_RENAMES:
        parts[1] = TUTORIAL_RENAMES[parts[1]]
    return ".".join(parts)


def infer_backbone(encoder_state: dict[str, torch.Tensor], source: str) -> str:
    """ResNet depth from the block type (conv3 => Bottleneck) and the number of blocks per stage."""
    counts = []
    for stage in (4, 5, 6, 7):  # nn.Sequential indices of layer1..layer4 after conv1, bn1, relu, maxpool
        blocks = {k.split(".")[2] for k in encoder_state if k.startswith(f"resnet.{stage}.")}
        if blocks != {str(i) for i in range(len(blocks))}:
            raise LegacyCheckpointError(f"{source}: encoder stage resnet.{stage} has blocks {sorted(blocks)}; "
                                        "expected a torchvision ResNet without its pool and fc")
        counts.append(len(blocks))
    bottleneck = "resnet.4.0.conv3.weight" in encoder_state
    try:
        return RESNETS[(bottleneck, tuple(counts))]
    except KeyError:
        block = "Bottleneck" if bottleneck else "BasicBlock"
        raise LegacyCheckpointError(f"{source}: encoder is a ResNet with {block} blocks {counts}, which is not "
                                    f"one of {sorted(set(RESNETS.values()))}") from None


def infer_config(encoder: StandIn, encoder_state: dict, decoder: StandIn, decoder_state: dict,
                 source: str) -> ModelConfig:
    """ModelConfig from the weights: dims from shapes, enc_size from adaptive_pool, vocab_size from fc."""
    backbone = infer_backbone(encoder_state, source)
    pool = _mapping(encoder.attrs.get("_modules"), source).get("adaptive_pool")
    size = pool.attrs.get("output_size") if isinstance(pool, StandIn) else encoder.attrs.get("enc_image_size")
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not is_int(size) or size <= 0:
        raise LegacyCheckpointError(f"{source}: encoder.adaptive_pool.output_size is {size!r}; "
                                    "expected a square grid such as (14, 14)")
    needed = ("embedding.weight", "fc.weight", "attention.encoder_attn.weight", "decode_step.weight_hh")
    absent = [k for k in needed if k not in decoder_state]
    if absent:
        raise LegacyCheckpointError(f"{source}: decoder has no {', '.join(absent)}; not a Show, Attend and Tell decoder")
    vocab_size = decoder_state["fc.weight"].shape[0]
    embed_dim = decoder_state["embedding.weight"].shape[1]
    decoder_dim = decoder_state["decode_step.weight_hh"].shape[1]  # the LSTM defines H; other layers must agree
    attention_dim, encoder_dim = decoder_state["attention.encoder_attn.weight"].shape
    dropout_mod = _mapping(decoder.attrs.get("_modules"), source).get("dropout")
    dropout = dropout_mod.attrs.get("p", 0.5) if isinstance(dropout_mod, StandIn) else 0.5
    if encoder_dim != BACKBONE_CHANNELS[backbone]:
        raise LegacyCheckpointError(f"{source}: inconsistent weights: the decoder attends over {encoder_dim}-dim "
                                    f"features but the {backbone} encoder gives {BACKBONE_CHANNELS[backbone]}")
    try:
        return ModelConfig(vocab_size=int(vocab_size), backbone=backbone, enc_size=size, attention_dim=int(attention_dim),
                           embed_dim=int(embed_dim), decoder_dim=int(decoder_dim), dropout=float(dropout))
    except (TypeError, ValueError) as exc:
        raise LegacyCheckpointError(f"{source}: {exc}") from None


def check_shapes(config: ModelConfig, encoder_state: dict, decoder_state: dict, source: str) -> None:
    """Every key and shape must match captrt's model for `config` (built on the meta device: no memory)."""
    from captrt.train.model import CaptionModel

    with torch.device("meta"):
        model = CaptionModel(config)
    problems = []
    for part, state, module in (("encoder", encoder_state, model.encoder), ("decoder", decoder_state, model.decoder)):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        problems += [f"{part}.{k} missing" for k in expected if k not in state]
        problems += [f"{part}.{k} unexpected" for k in state if k not in expected]
        problems += [f"{part}.{k} has shape {tuple(state[k].shape)}, expected {shape}"
                     for k, shape in expected.items() if k in state and tuple(state[k].shape) != shape]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise LegacyCheckpointError(f"{source}: weights inconsistent with the inferred {config}: "
                                    f"{'; '.join(problems[:6])}{more}")


_SKIP = object()


def _plain(value: Any) -> Any:
    """Metadata values as plain Python (one-element tensors unwrapped); _SKIP for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return _SKIP


def build_vocab_for_legacy(word_map: str | os.PathLike | None, karpathy_json: str | os.PathLike | None,
                           min_word_freq: int = 5, *, expected_size: int | None = None) -> Vocab:
    """The vocabulary a legacy checkpoint was trained with (neither format stores it).

    word_map: the tutorial's WORDMAP_*.json (a bare word -> id dict); karpathy_json: the
    dataset_coco.json the seed built its vocabulary from (all images' sentences' tokens, words
    seen more than min_word_freq times). Give exactly one. expected_size (the decoder's fc rows,
    ``LegacyImport.config.vocab_size``) is checked when given.
    """
    if (word_map is None) == (karpathy_json is None):
        raise LegacyCheckpointError("legacy checkpoints carry no vocabulary: give exactly one of --word-map "
                                    "(the tutorial's WORDMAP_*.json) or a Karpathy JSON (the seed's dataset_coco.json)")
    if word_map is not None:
        source = str(word_map)
        try:
            vocab = Vocab.load(word_map)
        except ValueError as exc:
            raise LegacyCheckpointError(str(exc)) from None
    else:
        source = str(karpathy_json)
        check_int("min_word_freq", min_word_freq, low=0, error=LegacyCheckpointError, expected=True)
        vocab = Vocab.build(_karpathy_tokens(source), min_word_freq)
    if expected_size is not None and len(vocab) != expected_size:
        hint = "" if word_map is not None else f" (rebuilt with min_word_freq={min_word_freq}; the seed used 5)"
        raise LegacyCheckpointError(f"{source}: vocabulary has {len(vocab)} words{hint} but the checkpoint's decoder "
                                    f"predicts {expected_size} (fc.weight rows): not the vocabulary it was trained with")
    return vocab


def _karpathy_tokens(path: str) -> Iterator[list[str]]:
    """Every sentence's tokens in file order, validating the images[].sentences[].tokens layout."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacyCheckpointError(f"{path}: cannot read Karpathy JSON: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise LegacyCheckpointError(f"{path}: expected a JSON object with an 'images' list (Karpathy split format)")
    for i, image in enumerate(images):
        sentences = image.get("sentences") if isinstance(image, dict) else None
        if not isinstance(sentences, list):
            raise LegacyCheckpointError(f"{path}: images[{i}].sentences: expected a list")
        for j, sentence in enumerate(sentences):
            tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise LegacyCheckpointError(f"{path}: images[{i}].sentences[{j}].tokens: expected a list of strings")
            yield tokens
