"""Export of a small model (resnet18, 4x4 grid, 32-dim) with fp16 and int8 variants; one export shared
by every test here. Checks the directory against docs/model-format.md, the TensorRT operator
allow-list, the step graph's batching semantics, and token-identical beam search vs PyTorch."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from captrt.export.exporter import export_model
from captrt.export.images import synthetic
from captrt.export.ops import op_histogram, tensorrt_problems
from captrt.export.parity import make_session, run_beam_searches
from captrt.runtime.decoding.processing import neutral_feeds
from captrt.runtime.model_dir import DECODER_OUTPUTS
from captrt.train.checkpoint import load_checkpoint
from captrt.train.model import normalize_uint8
from captrt.train.reference import reference_beam_search
from tests.export.helpers import make_varied_length_checkpoint

MAX_BEAM = 10
FILES = {"captrt.json", "vocab.json", "encoder.onnx", "decoder_step.onnx", "encoder.fp16.onnx",
         "decoder_step.fp16.onnx", "encoder.int8.onnx", "decoder_step.int8.onnx", "parity_images.npy", "parity.json"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_export")
    ckpt_path = make_varied_length_checkpoint(d / "tiny.pt")
    out = d / "model"
    # force: this file checks the format of every variant; the quality budget has its own tests.
    manifest = export_model(ckpt_path, out, fp16=True, int8=True, calib_count=8, parity_count=50, force=True, int8_search=False,
                            progress=False)
    ckpt = load_checkpoint(ckpt_path)
    return SimpleNamespace(dir=out, parent=d, manifest=manifest, ckpt_path=ckpt_path, ckpt=ckpt,
                           model=ckpt.build_model(), vocab=ckpt.vocab)


def _session(exported, precision="fp32", graph="encoder", threads=1):
    name = exported.manifest["graphs"][precision][graph]["file"]
    return make_session((exported.dir / name).read_bytes(), threads)


def test_directory_and_manifest_follow_the_format(exported):
    d, m, cfg = exported.dir, exported.manifest, exported.ckpt.config
    assert {p.name for p in d.iterdir()} == FILES
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith(".")] == []  # no temp leftovers
    assert json.loads((d / "captrt.json").read_text()) == m
    assert (m["format"], m["format_version"], m["captrt_version"]) == ("captrt-model", 2, "0.1.0")
    assert m["model"] == {"backbone": "resnet18", "enc_size": 4, "image_size": 256, "encoder_dim": 512,
                          "attention_dim": 32, "embed_dim": 32, "decoder_dim": 32, "vocab_size": cfg.vocab_size}
    v = exported.vocab
    assert m["vocab"] == {"file": "vocab.json", "size": len(v), "pad": 0, "unk": v.unk, "start": v.start, "end": v.end}
    assert json.loads((d / "vocab.json").read_text()) == {"word2id": v.word2id}
    assert m["preprocess"]["size"] == 256 and m["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert (m["grid"], m["max_beam"], m["max_steps"], m["opset"]) == (4, MAX_BEAM, 50, 18)
    assert set(m["graphs"]) == {"fp32", "fp16", "int8"} and set(m["parity"]) == {"fp32", "fp16", "int8"}
    for precision, pair in m["graphs"].items():
        for graph, entry in pair.items():
            data = (d / entry["file"]).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["precision"] == precision
    ps = m["parity_set"]
    for spec in ps["files"].values():
        assert spec["sha256"] == hashlib.sha256((d / spec["file"]).read_bytes()).hexdigest()
    assert (ps["images"], ps["references"], ps["beam_size"], ps["max_steps"]) == (50, False, 5, 50)
    assert m["quality_budget"] == 0.99
    src = m["source"]
    assert src["checkpoint_sha256"] == hashlib.sha256(exported.ckpt_path.read_bytes()).hexdigest()
    assert src["kind"] == "captrt"
    assert d.stat().st_mode & 0o777 == 0o777 & ~_umask()  # as mkdir would, not mkdtemp's 0700


def _umask() -> int:
    for line in open("/proc/self/status").read().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    pytest.skip("no /proc/self/status")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_graph_inputs_outputs_match_the_tables(exported, precision):
    cfg = exported.ckpt.config
    p, e, a, h = 16, 512, 32, 32
    enc = onnx.load(exported.dir / exported.manifest["graphs"][precision]["encoder"]["file"])
    dec = onnx.load(exported.dir / exported.manifest["graphs"][precision]["decoder_step"]["file"])

    def io(values):
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    f32, i64, u8 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.UINT8
    assert io(enc.graph.input) == {"image": (u8, ["batch", cfg.image_size, cfg.image_size, 3])}
    assert io(enc.graph.output) == {"features": (f32, ["batch", p, e]), "att_proj": (f32, ["batch", p, a]),
                                    "h0": (f32, ["batch", h]), "c0": (f32, ["batch", h])}
    assert io(dec.graph.input) == {"tokens": (i64, ["batch", "beams"]), "origin": (i64, ["batch", "beams"]),
                                   "h": (f32, ["batch", "prev_beams", h]), "c": (f32, ["batch", "prev_beams", h]),
                                   "features": (f32, ["batch", p, e]), "att_proj": (f32, ["batch", p, a]),
                                   "ban_ids": (i64, ["batch", "beams", "banned"]),
                                   "penalty_ids": (i64, ["batch", "beams", "penalized"]), "penalty": (f32, ["batch"])}
    assert io(dec.graph.output) == {"h_out": (f32, ["batch", "beams", h]), "c_out": (f32, ["batch", "beams", h]),
                                    "alpha": (f32, ["batch", "beams", p]),
                                    "cand_logp": (f32, ["batch", "beams", MAX_BEAM]),
                                    "cand_ids": (i64, ["batch", "beams", MAX_BEAM]),
                                    "logp": (f32, ["batch", "beams", cfg.vocab_size + 1])}
    for graph in (enc, dec):
        assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in graph.graph.initializer)
        onnx.checker.check_model(graph, full_check=True)


def test_operators_are_tensorrt10_compatible(exported):
    g = exported.manifest["graphs"]
    for precision in ("fp32", "fp16"):
        for graph in ("encoder", "decoder_step"):
            model = onnx.load(exported.dir / g[precision][graph]["file"])
            assert tensorrt_problems(model) == [], (precision, graph)
            assert g[precision][graph]["tensorrt_ops"] is True
    step = op_histogram(onnx.load(exported.dir / "decoder_step.onnx"))
    assert "LSTM" not in step and step["Gemm"] >= 2 and step["TopK"] == 1 and step["LogSoftmax"] == 1
    assert "AveragePool" not in op_histogram(onnx.load(exported.dir / "encoder.onnx"))
    # int8 targets ONNX Runtime's CPU provider (uint8 activations, MatMulInteger); the manifest says so.
    enc8_problems = tensorrt_problems(onnx.load(exported.dir / "encoder.int8.onnx"))
    assert enc8_problems and all("zero point" in p or "uint8" in p for p in enc8_problems)
    assert g["int8"]["encoder"]["tensorrt_ops"] is False
    assert g["int8"]["decoder_step"]["tensorrt_ops"] is False


def test_fp32_parity_report(exported):
    r = exported.manifest["parity"]["fp32"]
    assert r["measured"] and r["passed"]
    assert (r["images"], r["identical"], r["identical_fraction"], r["beam_size"]) == (50, 50, 1.0, 5)
    assert r["bleu4_change"] == 0.0 and r["bleu4_variant"] == r["bleu4_reference"] and r["mismatches"] == []
    assert set(r["max_abs_diff"]) >= {"features", "att_proj", "h", "c", "logp"}
    assert max(r["max_rel_diff"].values()) < 1e-4


@torch.no_grad()
def test_onnx_beam_search_is_token_identical_on_fresh_images(exported):
    """Independent of the exporter's own report: other images, captions of several lengths."""
    images = synthetic(12, 256, seed=777).images
    enc, dec = _session(exported, threads=2), _session(exported, graph="decoder_step")
    v = exported.vocab
    lengths = set()
    torch.set_num_threads(1)
    got_all = run_beam_searches(enc, dec, images, v.start, v.end, len(v), 5, 50, batch=5)  # batched, as users run it
    for image, got in zip(images, got_all):
        ref = reference_beam_search(exported.model, normalize_uint8(torch.from_numpy(image[None]))[0], v.start, v.end, 5, 50)
        assert got.tokens == ref.tokens
        assert got.finished == ref.finished
        assert abs(got.score - ref.score) < 1e-3
        lengths.add(len(ref.tokens))
    assert len(lengths) >= 3  # the test model really produces captions of different lengths


@torch.no_grad()
def test_step_batches_images_and_gathers_beams(exported):
    enc, dec = _session(exported, threads=2), _session(exported, graph="decoder_step")
    images = synthetic(3, 256, seed=5).images
    feats, att, h0, c0 = enc.run(None, {"image": images})  # N = 3 in one call
    for i in range(3):  # batch rows equal single-image runs
        single = enc.run(None, {"image": images[i:i + 1]})
        np.testing.assert_allclose(single[0][0], feats[i], rtol=1e-4, atol=1e-4)
    n, v = 3, exported.vocab
    outputs = list(DECODER_OUTPUTS)  # the default path's (logp: below)

    def ctl(n_, k_):
        return neutral_feeds(n_, k_, len(v))

    first = dec.run(None, {"tokens": np.full((n, 1), v.start, np.int64), "origin": np.zeros((n, 1), np.int64),
                           "h": h0[:, None], "c": c0[:, None], "features": feats, "att_proj": att, **ctl(n, 1)})
    h1, c1, alpha, logp, ids, full = first
    np.testing.assert_array_equal(np.take_along_axis(full, ids, axis=2), logp)  # the candidates are logp's top C
    assert h1.shape == (n, 1, 32) and logp.shape == (n, 1, MAX_BEAM) and ids.dtype == np.int64
    np.testing.assert_allclose(alpha.sum(axis=2), 1.0, rtol=1e-5)
    assert (np.diff(logp, axis=2) <= 0).all()  # sorted descending
    # PyTorch's step agrees on the first step's top candidates.
    feats_t = torch.from_numpy(feats)
    ht, ct, logits, _ = exported.model.decoder.step(torch.full((n,), v.start), feats_t, None,
                                                    torch.from_numpy(h0), torch.from_numpy(c0))
    top = torch.log_softmax(logits, 1).topk(MAX_BEAM, 1)
    np.testing.assert_allclose(logp[:, 0], top.values.numpy(), atol=1e-4)
    # Second step: K_prev = 1 -> K = 3 beams; then K = 3 -> K = 4 with crossing origins.
    tokens2 = ids[:, 0, :3]
    h2, c2, _, _, _ = dec.run(outputs, {"tokens": tokens2, "origin": np.zeros((n, 3), np.int64), "h": h1, "c": c1,
                                        "features": feats, "att_proj": att, **ctl(n, 3)})
    origin = np.array([[2, 0, 2, 1], [1, 1, 0, 2], [0, 2, 1, 0]], np.int64)
    tokens3 = np.array([[4, 5, 6, 7], [5, 5, 8, 9], [7, 6, 5, 4]], np.int64)
    out = dec.run(outputs, {"tokens": tokens3, "origin": origin, "h": h2, "c": c2, "features": feats, "att_proj": att,
                            **ctl(n, 4)})
    for b in range(n):
        for k in range(4):  # every slot equals a one-image one-beam step from its parent's state
            o = origin[b, k]
            one = dec.run(outputs, {"tokens": tokens3[b:b + 1, k:k + 1], "origin": np.zeros((1, 1), np.int64),
                                    "h": h2[b:b + 1, o:o + 1], "c": c2[b:b + 1, o:o + 1],
                                    "features": feats[b:b + 1], "att_proj": att[b:b + 1], **ctl(1, 1)})
            for full, single in zip(out, one):
                np.testing.assert_allclose(full[b, k], single[0, 0], rtol=1e-5, atol=1e-5)


def test_int8_variant_and_report(exported):
    r = exported.manifest["parity"]["int8"]
    assert r["measured"] and r["images"] == 50 and r["beam_size"] == 5
    assert 0 <= r["identical"] <= 50 and r["identical_fraction"] == pytest.approx(r["identical"] / 50)
    # Against the PyTorch captions themselves (no dataset captions here); < 1 only through the
    # smoothing of captions shorter than 4 words.
    assert r["bleu_references"] == "reference_beam_search" and 0.9 < r["bleu4_reference"] <= 1.0
    assert r["bleu4_reference"] == exported.manifest["parity"]["fp32"]["bleu4_variant"]
    assert r["bleu4_change"] == pytest.approx(r["bleu4_variant"] - r["bleu4_reference"], abs=1e-5)
    assert isinstance(r["passed"], bool) and r["calibration"]["images"] == 8
    assert max(r["max_rel_diff"].values()) < 0.5  # quantized, not broken
    enc8, dec8 = (onnx.load(exported.dir / f) for f in ("encoder.int8.onnx", "decoder_step.int8.onnx"))
    enc_ops, dec_ops = op_histogram(enc8), op_histogram(dec8)
    assert enc_ops["QuantizeLinear"] > 10 and enc_ops["DequantizeLinear"] > 10
    int8_weights = [t for t in enc8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == enc_ops["Conv"]  # every conv weight stored as int8, per channel
    assert dec_ops["MatMulInteger"] == 5  # decoder_attn, f_beta, LSTM x2, fc
    assert dec_ops["LogSoftmax"] == 1 and dec_ops["TopK"] == 1 and (exported.dir / "encoder.int8.onnx").stat().st_size \
        < (exported.dir / "encoder.onnx").stat().st_size / 2


def test_fp16_variant_and_report(exported):
    r = exported.manifest["parity"]["fp16"]
    if not r["measured"]:  # honest "needs a GPU" when the CPU provider cannot run it
        assert "GPU" in r["reason"] and r["passed"] is None
        return
    assert r["images"] == 50 and r["identical_fraction"] >= 0.8
    assert max(r["max_rel_diff"].values()) < 1e-2
    enc16 = onnx.load(exported.dir / "encoder.fp16.onnx")
    assert {t.data_type for t in enc16.graph.initializer if len(t.dims) == 4} == {onnx.TensorProto.FLOAT16}
