"""Bad model directories: each is refused at load with an error naming the file or field."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from captrt.runtime import Captioner, ModelDirError
from captrt.runtime.model_dir import ModelDir
from captrt.runtime.onnx_scan import OnnxParseError, embedding_rows, scan_model


@pytest.fixture
def model_copy(varied_model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(varied_model_dir, dst)
    return dst


def manifest(d: Path) -> dict:
    return json.loads((d / "captrt.json").read_text())


def write_manifest(d: Path, m: dict) -> None:
    (d / "captrt.json").write_text(json.dumps(m))


def rehash(d: Path, precision: str = "fp32") -> None:
    m = manifest(d)
    for graph in ("encoder", "decoder_step"):
        entry = m["graphs"][precision][graph]
        entry["sha256"] = hashlib.sha256((d / entry["file"]).read_bytes()).hexdigest()
    write_manifest(d, m)


def test_valid_directory_loads(varied_model_dir):
    md = ModelDir.load(varied_model_dir)
    assert md.precisions == ("fp32",)
    assert md.vocab_size == md.dims["vocab_size"] == len(md.vocab)
    assert md.max_beam == 10 and md.grid == 4
    # the graphs read back verified, and the decoder's embedding table is found (the vocabulary check runs)
    data = md.read_graph("fp32", "decoder_step")
    assert embedding_rows(scan_model(data)) == md.vocab_size


def test_model_id_names_the_manifest(model_copy):
    """'<dir>@<sha256 prefix of captrt.json>': stable across loads, new when anything listed changes."""
    first = ModelDir.load(model_copy).model_id
    assert first == ModelDir.load(model_copy).model_id and first.startswith("model@") and len(first) == 6 + 12
    m = manifest(model_copy)
    m["max_beam"] = m["max_beam"] - 1
    (model_copy / "captrt.json").write_text(json.dumps(m))
    assert ModelDir.load(model_copy).model_id != first


def test_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="no such model directory"):
        Captioner.load(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ModelDirError, match="not a directory"):
        Captioner.load(f)


def test_directory_without_manifest(tmp_path):
    with pytest.raises(ModelDirError, match=r"captrt\.json: missing"):
        Captioner.load(tmp_path)


def test_unreadable_manifest(model_copy):
    (model_copy / "captrt.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="unreadable manifest"):
        Captioner.load(model_copy)


@pytest.mark.parametrize("field,value,message", [
    ("format", "something-else", "format 'something-else' is not 'captrt-model'"),
    ("format_version", 3, "format_version 3 is not supported"),
    ("format_version", None, "format_version None is not supported"),
    ("max_beam", 0, "max_beam: expected a positive integer"),
    ("grid", 7, "grid 7 differs from model.enc_size"),
])
def test_bad_manifest_fields(model_copy, field, value, message):
    m = manifest(model_copy)
    m[field] = value
    write_manifest(model_copy, m)
    with pytest.raises(ModelDirError, match=message) as info:
        Captioner.load(model_copy)
    assert "captrt.json" in str(info.value)


def test_graph_sha256_mismatch(model_copy):
    path = model_copy / "decoder_step.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last byte
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"decoder_step\.onnx: sha256 .* does not match captrt\.json"):
        Captioner.load(model_copy)


def test_missing_graph_file(model_copy):
    (model_copy / "encoder.onnx").unlink()
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: missing \(listed in captrt\.json graphs\.fp32\.encoder\)"):
        Captioner.load(model_copy)


def test_graph_path_outside_directory_is_refused(model_copy):
    m = manifest(model_copy)
    m["graphs"]["fp32"]["encoder"]["file"] = "../encoder.onnx"
    write_manifest(model_copy, m)
    with pytest.raises(ModelDirError, match="plain file name inside the directory"):
        Captioner.load(model_copy)


def test_vocab_size_differs_from_manifest(model_copy):
    m = manifest(model_copy)
    m["vocab"]["size"] += 1
    write_manifest(model_copy, m)
    with pytest.raises(ModelDirError, match=r"vocab\.json: has \d+ words but captrt\.json vocab\.size is"):
        Captioner.load(model_copy)


def test_vocab_json_does_not_match_graph(model_copy):
    """vocab.json and captrt.json agree with each other (V+1 words) but the decoder graph has V rows."""
    vocab = json.loads((model_copy / "vocab.json").read_text())["word2id"]
    vocab["zebra"] = len(vocab)
    (model_copy / "vocab.json").write_text(json.dumps({"word2id": vocab}))
    m = manifest(model_copy)
    m["vocab"]["size"] = m["model"]["vocab_size"] = len(vocab)
    write_manifest(model_copy, m)
    ModelDir.load(model_copy)  # the manifest alone is consistent...
    with pytest.raises(ModelDirError, match=r"decoder_step\.onnx: the graph's vocabulary has \d+ words but vocab\.json has"):
        Captioner.load(model_copy)  # ...the graph is not


def test_special_token_ids_must_match(model_copy):
    m = manifest(model_copy)
    m["vocab"]["end"] = 1
    write_manifest(model_copy, m)
    with pytest.raises(ModelDirError, match=r"<end> has id \d+ but captrt\.json vocab\.end is 1"):
        Captioner.load(model_copy)


def test_external_data_is_refused(model_copy):
    onnx = pytest.importorskip("onnx")  # only to write the hostile file; the runtime does not use onnx
    model = onnx.load(str(model_copy / "decoder_step.onnx"))
    onnx.save_model(model, str(model_copy / "decoder_step.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    rehash(model_copy)  # a correct hash: the refusal must come from the external data itself
    with pytest.raises(ModelDirError, match=r"decoder_step\.onnx: refers to external data"):
        Captioner.load(model_copy)


def test_external_data_in_a_constant_node_is_refused(model_copy):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    model = onnx.load(str(model_copy / "decoder_step.onnx"))
    value = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4])
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    model.graph.node.insert(0, helper.make_node("Constant", [], ["unused_const"], value=value))
    (model_copy / "decoder_step.onnx").write_bytes(model.SerializeToString())
    rehash(model_copy)
    with pytest.raises(ModelDirError, match="refers to external data"):
        Captioner.load(model_copy)


def test_not_an_onnx_file(model_copy):
    (model_copy / "encoder.onnx").write_bytes(b"\xff" * 100)
    rehash(model_copy)
    with pytest.raises(ModelDirError, match=r"encoder\.onnx: not a valid ONNX model"):
        Captioner.load(model_copy)


def test_scan_rejects_truncated_protobuf(varied_model_dir):
    data = (varied_model_dir / "decoder_step.onnx").read_bytes()
    with pytest.raises(OnnxParseError):
        scan_model(data[: len(data) // 2])


def test_precision_not_exported_lists_what_exists(varied_model_dir):
    with pytest.raises(ModelDirError, match=r"precision 'int8' was not exported; this directory has fp32"):
        Captioner.load(varied_model_dir, precision="int8")


def test_max_beam_checked_against_graph_candidates(model_copy):
    """captrt.json claims more candidates per beam than decoder_step.onnx returns."""
    m = manifest(model_copy)
    m["max_beam"] = 12
    write_manifest(model_copy, m)
    with pytest.raises(ModelDirError, match="returns 10 candidates per beam but captrt.json max_beam is 12"):
        Captioner.load(model_copy)


def test_loaded_model_still_runs_after_checks(varied_model_dir):
    from tests.conftest import random_images

    cap = Captioner.load(varied_model_dir, threads=1)
    [c] = cap.caption(random_images(1, seed=3)[0], beam_size=2)
    assert c.error is None and c.tokens and np.isfinite(c.score)
