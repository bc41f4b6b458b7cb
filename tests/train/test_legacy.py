"""Legacy import: seed-notebook and tutorial checkpoints written by their own classes in a subprocess,
read here (where neither ``__main__.ImageEncoder`` nor ``models`` exists) without running their code."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captrt.train.legacy import LegacyCheckpointError, build_vocab_for_legacy, load_legacy_checkpoint
from captrt.train.legacy_unpickler import RefusedGlobal, RestrictedUnpickler
from captrt.vocab import Vocab

FIXTURES = Path(__file__).parent / "legacy_fixtures"
_spec = importlib.util.spec_from_file_location("legacy_fixture_common", FIXTURES / "fixture_common.py")
fixture_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_common)
TINY = ["--backbone", "resnet18", "--enc-size", "4", "--dim", "16", "--vocab", "20"]


def _jobs(d: Path, jobs: dict[str, list[str]]) -> Path:
    spec = [[str(d / f"{k}.pth"), str(d / f"{k}_ref.pt"), *v] for k, v in jobs.items()]
    (d / "jobs.json").write_text(json.dumps(spec))
    return d / "jobs.json"


@pytest.fixture(scope="module")
def legacy_files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Checkpoints written by the original classes: name -> (checkpoint, reference digests/outputs).

    Seed: seed_classes.py run as __main__, like the notebook. Tutorial: tutorial_models.py copied to
    models.py on the subprocess's sys.path. The two subprocesses run concurrently (importing torch
    dominates), each writing several checkpoints.
    """
    seed_dir, tut_dir = tmp_path_factory.mktemp("seed"), tmp_path_factory.mktemp("tutorial")
    seed_jobs = {
        "seed": TINY + ["--fine-tune"],  # with an encoder optimizer too, as with fine_tune_encoder=True
        "seed_broken": TINY + ["--break-shape"],
    }
    tut_jobs = {
        "tutorial_pre16": TINY + ["--legacy-format"],  # torch < 1.6's format, as the tutorial's era wrote
        # The tutorial's real structure: ResNet-101 with a 14x14 grid (zip format).
        "tutorial_resnet101": ["--backbone", "resnet101", "--enc-size", "14", "--dim", "16", "--vocab", "30"],
    }
    shutil.copy(FIXTURES / "tutorial_models.py", tut_dir / "models.py")
    procs = [
        subprocess.Popen([sys.executable, str(FIXTURES / "seed_classes.py"), str(_jobs(seed_dir, seed_jobs))],
                         cwd=seed_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([sys.executable, str(FIXTURES / "make_tutorial_checkpoint.py"), str(tut_dir),
                          str(_jobs(tut_dir, tut_jobs))], cwd=tut_dir, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True),
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    files = {k: (seed_dir / f"{k}.pth", seed_dir / f"{k}_ref.pt") for k in seed_jobs}
    files.update({k: (tut_dir / f"{k}.pth", tut_dir / f"{k}_ref.pt") for k in tut_jobs})
    return files


def _assert_no_legacy_classes_here() -> None:
    assert not hasattr(sys.modules["__main__"], "ImageEncoder")
    assert not hasattr(sys.modules["__main__"], "DecoderWithAttention")
    assert "models" not in sys.modules


def _check_import(path: Path, ref_path: Path, fmt: str, backbone: str, enc_size: int, vocab: int):
    _assert_no_legacy_classes_here()
    imported = load_legacy_checkpoint(path)
    _assert_no_legacy_classes_here()  # nothing was imported while loading
    ref = torch.load(ref_path, weights_only=True)
    assert imported.source_format == fmt
    c = imported.config
    assert (c.backbone, c.enc_size, c.vocab_size) == (backbone, enc_size, vocab)
    assert (c.attention_dim, c.embed_dim, c.decoder_dim, c.dropout) == (16, 18, 20, 0.5)
    assert imported.metadata == {"epoch": 7, "epochs_since_improvement": 2, "bleu-4": 0.2345}
    rename = {".encoder_att.": ".encoder_attn.", ".decoder_att.": ".decoder_attn.", ".full_att.": ".full_attn."}
    expected_dec = {}
    for k, v in ref["decoder"].items():
        for old, new in rename.items():
            k = k.replace(old, new) if fmt == "tutorial" else k
        expected_dec[k] = v
    # ref holds sha256 digests of (dtype, shape, bytes) of every tensor of the original state_dict()
    for got, want in ((imported.encoder_state, ref["encoder"]), (imported.decoder_state, expected_dec)):
        assert set(got) == set(want)
        for k in want:
            assert fixture_common.tensor_digest(got[k]) == want[k], k
    return imported, ref


def _captrt_model(imported):
    from captrt.train.model import CaptionModel

    with torch.device("meta"):  # no init cost: the imported tensors are assigned in
        model = CaptionModel(imported.config)
    model.encoder.load_state_dict(imported.encoder_state, assign=True)  # strict: names and shapes are captrt's
    model.decoder.load_state_dict(imported.decoder_state, assign=True)
    return model.eval()


def _check_same_outputs(imported, ref) -> None:
    """captrt's model with the imported weights computes what the original classes computed."""
    model = _captrt_model(imported)
    with torch.no_grad():
        feats = model.encoder(ref["images"])  # (N, P, E)
        torch.testing.assert_close(feats, ref["enc_out"].flatten(1, 2), rtol=1e-5, atol=1e-5)
        order = ref["sort_idx"]
        logits, alphas, _ = model.decoder(feats[order], ref["captions"][order], ref["lengths"].squeeze(1)[order])
    torch.testing.assert_close(logits, ref["predictions"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alphas, ref["alphas"], rtol=1e-5, atol=1e-5)


def test_seed_checkpoint_imports_exactly(legacy_files):
    path, ref_path = legacy_files["seed"]
    imported, ref = _check_import(path, ref_path, "seed", "resnet18", 4, 20)
    assert "resnet.4.0.bn1.num_batches_tracked" in imported.encoder_state
    _check_same_outputs(imported, ref)


def test_tutorial_checkpoint_in_pre16_format_imports_with_renames(legacy_files):
    with open(legacy_files["tutorial_pre16"][0], "rb") as f:
        assert f.read(2) != b"PK"  # really the old non-zip format
    imported, ref = _check_import(*legacy_files["tutorial_pre16"], "tutorial", "resnet18", 4, 20)
    assert not any("_att." in k for k in imported.decoder_state)
    _check_same_outputs(imported, ref)


def test_tutorial_resnet101_structure(legacy_files):
    imported, ref = _check_import(*legacy_files["tutorial_resnet101"], "tutorial", "resnet101", 14, 30)
    assert "resnet.6.22.conv3.weight" in imported.encoder_state  # layer3 has 23 Bottlenecks
    _check_same_outputs(imported, ref)


def test_inconsistent_shapes_are_reported(legacy_files):
    with pytest.raises(LegacyCheckpointError, match=r"seed_broken\.pth: weights inconsistent .*decoder\.fc\.weight has shape \(20, 23\), expected \(20, 20\)"):
        load_legacy_checkpoint(legacy_files["seed_broken"][0])


class _Evil:
    """Unpickling this runs ``func(*args)``: the classic malicious-checkpoint payload."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    return {
        "posix.system": _Evil(os.system, (f"touch {marker}",)),
        "builtins.eval": _Evil(eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Evil(subprocess.Popen, (["touch", str(marker)],)),
    }


@pytest.mark.parametrize("name", ["posix.system", "builtins.eval", "subprocess.Popen"])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    control = tmp_path / "CONTROL"
    result = pickle.loads(pickle.dumps(_payloads(control)[name]))  # the payload is live under plain pickle
    if isinstance(result, subprocess.Popen):
        result.wait(timeout=30)
    assert control.exists()

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"epoch": 1, "bleu-4": 0.1, "encoder": _payloads(marker)[name], "decoder": None}, path)
    with pytest.raises(LegacyCheckpointError, match=rf"evil\.pth: refused '{name}'.*Nothing from it was executed"):
        load_legacy_checkpoint(path)
    assert not marker.exists() and not (tmp_path / "PWNED").exists()


def _raw(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


@pytest.mark.parametrize("payload, refused", [
    # BUILD on an allowed function would set its __defaults__ (process-wide state).
    (b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b", "_rebuild_tensor_v2.*BUILD"),
    # NEWOBJ may only create stand-ins, not arbitrary allowed classes.
    (b"ccollections\nOrderedDict\n)\x81", "OrderedDict.*NEWOBJ"),
    (b"c__builtin__\ngetattr\n", "builtins.getattr"),
])
def test_unpickler_refuses_opcode_tricks(payload, refused):
    before = torch._utils._rebuild_tensor_v2.__defaults__
    with pytest.raises(RefusedGlobal, match=refused):
        RestrictedUnpickler(io.BytesIO(_raw(payload))).load()
    assert torch._utils._rebuild_tensor_v2.__defaults__ == before


def test_truncated_files(legacy_files, tmp_path):
    for name, src in (("zip", legacy_files["seed"][0]), ("pre16", legacy_files["tutorial_pre16"][0])):
        data = src.read_bytes()
        for frac in (0.5, 0.001):
            cut = tmp_path / f"{name}_{frac}.pth"
            cut.write_bytes(data[: int(len(data) * frac)])
            with pytest.raises(LegacyCheckpointError, match=rf"{cut.name}: .*truncated"):
                load_legacy_checkpoint(cut)


def test_not_a_file_empty_and_garbage(tmp_path):
    with pytest.raises(LegacyCheckpointError, match="missing.pth: no such file"):
        load_legacy_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(LegacyCheckpointError, match="not a regular file"):
        load_legacy_checkpoint(tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(LegacyCheckpointError, match="empty.pth: empty file"):
        load_legacy_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n" * 10)
    with pytest.raises(LegacyCheckpointError, match="text.pth: unreadable checkpoint"):
        load_legacy_checkpoint(tmp_path / "text.pth")


def test_captrt_checkpoint_given_by_mistake(tmp_path):
    path = tmp_path / "captrt.pt"
    torch.save({"format": "captrt-checkpoint", "format_version": 1, "config": {"vocab_size": 8},
                "vocab": {"word2id": {}}, "encoder": {"resnet.0.weight": torch.zeros(2)},
                "decoder": {"fc.weight": torch.zeros(2)}, "train_state": None, "metrics": {}}, path)
    with pytest.raises(LegacyCheckpointError, match="captrt.pt: this is already a captrt checkpoint"):
        load_legacy_checkpoint(path)


def test_unexpected_structure(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "encoder": None}, path)
    with pytest.raises(LegacyCheckpointError, match=r"odd.pth: unexpected structure: missing 'decoder'"):
        load_legacy_checkpoint(path)
    torch.save({"encoder": {"w": torch.zeros(1)}, "decoder": {"w": torch.zeros(1)}}, path)
    with pytest.raises(LegacyCheckpointError, match="'decoder' holds a dict, not a pickled module"):
        load_legacy_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(LegacyCheckpointError, match="holds a list"):
        load_legacy_checkpoint(path)


def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    with pytest.raises(LegacyCheckpointError, match="TorchScript archive"):
        load_legacy_checkpoint(path)


# --- vocabulary -------------------------------------------------------------------------------

def _karpathy(path: Path, sentences_per_image: list[list[str]]) -> Path:
    images = [{"filename": f"{i}.jpg", "split": "train", "sentences": [{"tokens": s.split()} for s in sents]}
              for i, sents in enumerate(sentences_per_image)]
    path.write_text(json.dumps({"images": images}))
    return path


def test_vocab_rebuilt_from_karpathy_json_with_the_seed_rule(tmp_path):
    path = _karpathy(tmp_path / "dataset_coco.json", [["b a c", "b a"], ["a d", "b"], ["c c"]])
    vocab = build_vocab_for_legacy(None, path, min_word_freq=2)
    # counts: b 3, a 3, c 3, d 1 -> words with count > 2 in first-appearance order, then the specials
    assert vocab.word2id == {"b": 1, "a": 2, "c": 3, "<unk>": 4, "<start>": 5, "<end>": 6, "<pad>": 0}
    assert build_vocab_for_legacy(None, path, 2, expected_size=7) == vocab
    with pytest.raises(LegacyCheckpointError, match=r"dataset_coco.json: vocabulary has 8 words .*min_word_freq=0.* predicts 7"):
        build_vocab_for_legacy(None, path, 0, expected_size=7)


def test_vocab_from_tutorial_word_map(tmp_path):
    word_map = {"a": 1, "dog": 2, "<unk>": 3, "<start>": 4, "<end>": 5, "<pad>": 0}
    path = tmp_path / "WORDMAP_coco.json"
    path.write_text(json.dumps(word_map))
    assert build_vocab_for_legacy(path, None, expected_size=6) == Vocab(word_map)
    with pytest.raises(LegacyCheckpointError, match=r"WORDMAP_coco.json: vocabulary has 6 words but .* predicts 20"):
        build_vocab_for_legacy(path, None, expected_size=20)
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(LegacyCheckpointError, match="WORDMAP_coco.json: .*missing special token"):
        build_vocab_for_legacy(path, None)


def test_vocab_input_errors(tmp_path):
    with pytest.raises(LegacyCheckpointError, match="exactly one of --word-map"):
        build_vocab_for_legacy(None, None)
    with pytest.raises(LegacyCheckpointError, match="exactly one of --word-map"):
        build_vocab_for_legacy("a.json", "b.json")
    with pytest.raises(LegacyCheckpointError, match="nope.json: cannot read Karpathy JSON"):
        build_vocab_for_legacy(None, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"sentences": [{"tokens": ["a"]}, {"tokens": "a b"}]}]}))
    with pytest.raises(LegacyCheckpointError, match=r"bad.json: images\[0\].sentences\[1\].tokens"):
        build_vocab_for_legacy(None, bad)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(LegacyCheckpointError, match="bad.json: expected a JSON object with an 'images' list"):
        build_vocab_for_legacy(None, bad)
