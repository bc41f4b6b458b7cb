"""export_model: checkpoint -> model directory (docs/model-format.md), parity-checked, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from captrt.atomic import atomic_directory
from captrt.export import images as image_sets
from captrt.export.errors import ExportError
from captrt.export.fp16 import convert_to_fp16
from captrt.export.graphs import DecoderStepGraph, EncoderGraph, example_decoder_inputs, example_encoder_inputs
from captrt.export.manifest import (GRAPH_FILES, MANIFEST, MAX_STEPS, build_manifest, graph_entry, sha256_file,
                                    write_json)
from captrt.export.onnx_export import export_graph, graph_io, save_onnx
from captrt.export.ops import TENSORRT_MAX_OPSET, TOPK_MAX_K, tensorrt_problems
from captrt.export.parity import Timer
from captrt.export.parity_gate import ParityChecker, parity_failure, reference_captions
from captrt.export.progress import Progress
from captrt.export.quantize import quantize_decoder, quantize_encoder
from captrt.export.variant_quality import (describe_candidates, describe_mix, search_int8_variant, time_variants,
                                          verify_engines_here)
from captrt.runtime import graph_contract
from captrt.runtime.graph_contract import CONTROL_INPUTS
from captrt.runtime.verification.parity_set import ParitySet, fingerprint
from captrt.runtime.verification.verify import (DEFAULT_BUDGET, MIN_PARITY_WITH_REFERENCES, QualityReport,
                                                check_budget, judge_tokens, key_digest)
from captrt.runtime.verification.verify import record as verify_record
from captrt.train.model import CaptionModel
from captrt.vocab import Vocab

PARITY_BEAM = 5
# torch.onnx's own opset: no version conversion, so a normal export prints no exporter warnings (17 is
# converted to from 18 and says so twice); TensorRT 10 parses up to 20 (captrt.export.ops).
DEFAULT_OPSET = 18
PARITY_COUNT = 100  # parity images by default: 50 cannot resolve a 1% change of BLEU-4
TUNE_COUNT = 100  # images the int8 search judges candidates on (neither parity nor calibration images)
INT8_ENCODER = "static QDQ: per-channel symmetric int8 weights, uint8 activations, MinMax calibration; for CPUs"
INT8_DECODER = "int8 MatMuls (per-column uint8 weights, per-row activation scales: batch-independent), log_softmax/TopK fp32"
FP16 = "fp16 weights and activations; softmax, log_softmax, TopK, reductions and the LSTM cell state fp32; fp32 I/O"


def export_model(checkpoint: str | Path, out_dir: str | Path, *, opset: int = DEFAULT_OPSET, max_beam: int = 10,
                 fp16: bool = False, int8: bool = False, calib_json: str | None = None,
                 calib_images: str | None = None, word_map: str | None = None,
                 parity_images: list[str | Path] | None = None, parity_count: int = PARITY_COUNT, force: bool = False,
                 overwrite: bool = False, progress: bool = True, calib_count: int = 64,
                 quality_budget: float = DEFAULT_BUDGET, verify_engines: Sequence[tuple[str, str]] = (),
                 int8_search: bool = True, int8_min_speedup: float = 1.1, int8_max_fp32_layers: int | None = None,
                 tune_count: int = TUNE_COUNT) -> dict[str, Any]:
    """Export `checkpoint` to the model directory `out_dir` and return its manifest (captrt.json).

    fp32 graphs must pass parity (identical beam-search captions on every parity image, numeric
    differences within tolerance) or nothing is written, unless force. The directory carries its
    parity set (images, references, fp32 captions: captrt.runtime.verification.parity_set). Each fp16/int8
    variant is judged on it against fp32 (captrt.runtime.verification.verify, `quality_budget`): one that misses
    the budget is not written (force writes it, recorded as failed) and is listed in the returned
    manifest's "refused". verify_engines: (engine, precision) pairs decided by an engine at load
    time, e.g. ("openvino", "bf16"), verified on this machine and recorded in captrt.json.
    int8_search: search the fastest int8 candidate within the budget, encoder mixes and the int8 step
    alone (captrt.export.int8_search), on `tune_count` tuning images; one that is not int8_min_speedup
    faster than fp32 end to end at batch 1 is refused; int8_max_fp32_layers caps the encoder layers the
    search may return to fp32. False quantizes everything once and lets the budget decide.
    Raises ExportError (a ValueError naming the file) on bad input; on any failure the output
    directory is left as it was.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_arguments(out_dir, opset, max_beam, parity_count, calib_count, overwrite, calib_json, calib_images)
    if isinstance(tune_count, bool) or not isinstance(tune_count, int) or tune_count < 1:
        raise ExportError(f"tune_count: expected an integer >= 1, got {tune_count!r}")
    try:
        quality_budget = check_budget(quality_budget)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    log = Progress(progress)
    timer = Timer()
    with log.step(f"loading {checkpoint}"):
        model, vocab, source = load_model(checkpoint, word_map)
    cfg = model.config
    if max_beam > cfg.vocab_size:
        raise ExportError(f"max_beam {max_beam} exceeds the vocabulary size {cfg.vocab_size} of {checkpoint}")

    # Read every input image before the long steps, so a bad file fails in seconds, not minutes.
    with log.step("reading parity/calibration images"):
        parity_set, calib_set, tune_set = image_sets.export_sets(
            cfg.image_size, parity_images, parity_count, calib_json, calib_images, calib_count, int8,
            tune=tune_count if int8 and int8_search else 0)
    log.say(f"parity: {len(parity_set)} images ({parity_set.source})"
            + (f"; calibration: {len(calib_set)} images ({calib_set.source})" if int8 else "")
            + (f"; int8 tuning: {len(tune_set)} images ({tune_set.source})" if tune_set is not None else ""))
    if parity_set.captions is not None and len(parity_set) < MIN_PARITY_WITH_REFERENCES and (fp16 or int8):
        log.say(f"warning: {len(parity_set)} parity images cannot resolve a 1% quality change; "
                f"use >= {MIN_PARITY_WITH_REFERENCES} (--parity-images)")

    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:  # mode follows the umask
            manifest = _export_into(tmp, model, vocab, source, log, timer, opset=opset, max_beam=max_beam,
                                    fp16=fp16, int8=int8, parity_set=parity_set, calib_set=calib_set, force=force,
                                    budget=quality_budget, tune_set=tune_set,
                                    search_options={"min_speedup": int8_min_speedup,
                                                    "max_fp32_layers": int8_max_fp32_layers})
            manifest = time_variants(tmp, manifest, log)
            if verify_engines:
                manifest = verify_engines_here(tmp, manifest, verify_engines, quality_budget, log)
    except FileExistsError as exc:
        raise ExportError(str(exc)) from None
    log.say(f"wrote {out_dir} in {timer():.0f}s")
    for precision, report in manifest.get("refused", {}).items():
        log.say(f"refused {precision}: {report['reason']}")
    return manifest


def _check_arguments(out_dir: Path, opset: int, max_beam: int, parity_count: int, calib_count: int,
                     overwrite: bool, calib_json: str | None, calib_images: str | None) -> None:
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    for name, value, low in (("opset", opset, 17), ("max_beam", max_beam, 1), ("parity_count", parity_count, 1),
                             ("calib_count", calib_count, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ExportError(f"{name}: expected an integer >= {low}, got {value!r}")
    if opset > TENSORRT_MAX_OPSET:
        raise ExportError(f"opset {opset}: TensorRT 10 parses opsets up to {TENSORRT_MAX_OPSET}")
    if max_beam >= TOPK_MAX_K:
        raise ExportError(f"max_beam {max_beam}: TensorRT's TopK needs K < {TOPK_MAX_K}")
    if (calib_json is None) != (calib_images is None):
        raise ExportError("calibration needs both the dataset JSON (--calib) and its image root (--images)")


def load_model(checkpoint: Path, word_map: str | None) -> tuple[CaptionModel, Vocab, dict[str, Any]]:
    """A captrt checkpoint, or a legacy (seed/tutorial) pickle when a word map is given."""
    from captrt.train.checkpoint import CheckpointError, load_checkpoint

    kind = "captrt"
    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        if "pickled objects" not in str(exc):
            raise ExportError(str(exc)) from None
        if word_map is None:
            raise ExportError(f"{exc} Or export it directly with its vocabulary: --word-map WORDMAP.json") from None
        from captrt.train.convert import import_legacy  # lazily: legacy support is optional

        try:
            ckpt = import_legacy(checkpoint, word_map=word_map)
        except ValueError as exc:  # LegacyCheckpointError and friends name the file
            raise ExportError(str(exc)) from None
        kind = f"legacy-{ckpt.metrics['imported_from']}"
    except Exception as exc:  # e.g. KeyError from torch's unpickler on arbitrary bytes
        raise ExportError(f"{checkpoint}: unreadable, not a checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if word_map is not None and kind == "captrt":
        try:
            given = Vocab.load(word_map)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        if given != ckpt.vocab:
            raise ExportError(f"{word_map}: differs from the vocabulary stored in {checkpoint} "
                              "(a word map is only needed for legacy checkpoints)")
    try:
        model = ckpt.build_model()
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    source = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(checkpoint), "kind": kind}
    if word_map is not None:
        source["word_map"] = str(Path(word_map).resolve())
    return model, ckpt.vocab, source


def _export_into(tmp: Path, model: CaptionModel, vocab: Vocab, source: dict, log: Progress, timer: Timer, *,
                 opset: int, max_beam: int, fp16: bool, int8: bool, parity_set, calib_set, force: bool,
                 budget: float, tune_set=None, search_options: dict | None = None) -> dict:
    """The export's steps into the temporary directory: trace, gate fp32 on parity, make and judge the
    variants, write the manifest."""
    cfg = model.config
    enc, dec = _trace(model, opset, max_beam, log)
    with log.step(f"PyTorch reference beam search on {len(parity_set)} images"):
        reference = reference_captions(model, vocab, parity_set, min(PARITY_BEAM, max_beam), log)
    checker = ParityChecker(model, vocab, parity_set, reference, min(PARITY_BEAM, max_beam), log)

    graphs: dict[str, dict] = {}
    parity: dict[str, dict] = {}
    _write_pair(tmp, GRAPH_FILES["fp32"], enc, dec)
    parity["fp32"], fp32_tokens, _ = checker.run("fp32", enc, dec, strict=True)
    if not parity["fp32"]["passed"] and not force:
        raise ExportError(parity_failure(parity["fp32"]))
    graphs["fp32"] = _entries(tmp, GRAPH_FILES["fp32"], "fp32", enc, dec)
    parity_data = ParitySet(parity_set.images, parity_set.names, parity_set.captions, fp32_tokens, checker.beam,
                            MAX_STEPS)
    variants, search = _variants(enc, dec, fp16=fp16, int8=int8, calib_set=calib_set, tune_set=tune_set, vocab=vocab,
                                 beam=checker.beam, budget=budget, log=log, search_options=search_options)

    def judge(precision: str, e, d) -> tuple[dict, QualityReport | None, dict | None]:
        """A variant's parity report, its quality against fp32 (None when not measured here), its numerics."""
        check_contract(e, d, cfg, max_beam)
        report, tokens, numerics = checker.run(precision, e, d, strict=False)
        if not report["measured"]:
            return report, None, None
        quality = judge_tokens(tokens, fp32_tokens, parity_set.captions, vocab.decode, budget=budget,
                               names=parity_set.names, seconds=report["seconds"])
        report["quality"], report["passed"] = quality.to_dict(), quality.passed
        log.say(f"{precision} quality: {quality.describe()}")
        return report, quality, numerics

    judged: dict[str, tuple[QualityReport, dict]] = {}  # precision -> (quality, engine numerics)
    refused: dict[str, dict] = {}
    for precision, (e, d, note_e, note_d) in variants.items():
        report, quality, numerics = judge(precision, e, d)
        search_report = None
        if precision == "int8" and search is not None:
            report, quality, numerics = _int8_fallbacks(search, judge, report, quality, numerics, log, force)
            e, d = search.encoder, search.decoder
            search_report = report["search"] = search.to_report()
            note_e = f"{INT8_ENCODER}; {describe_mix(search_report)}"
        if precision == "int8":
            report["calibration"] = {"images": len(calib_set), "source": calib_set.source}
        if quality is not None:
            judged[precision] = (quality, numerics)
        parity[precision] = report
        refusal = None if force else _refusal(precision, report, quality, search_report)
        if refusal is not None:
            refused[precision] = refusal  # not written: it would serve worse (or no faster) than it claims
            continue
        graphs[precision] = _write_variant(tmp, precision, e, d, note_e, note_d, search_report, graphs["fp32"])
    return _write_manifest(tmp, model, vocab, source, timer, opset=opset, max_beam=max_beam, graphs=graphs,
                           parity=parity, parity_data=parity_data, judged=judged, refused=refused, budget=budget,
                           parity_source=parity_set.source)


def _trace(model: CaptionModel, opset: int, max_beam: int, log: Progress) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The fp32 encoder and step graphs, checked against the graph contract and TensorRT's operator list."""
    cfg = model.config
    with log.step("tracing encoder (torch.onnx, dynamo)"):
        enc = export_graph(EncoderGraph(model), example_encoder_inputs(cfg.image_size), "encoder", opset)
    with log.step("tracing decoder step"):
        dec = export_graph(DecoderStepGraph(model, max_beam), example_decoder_inputs(model), "decoder_step", opset)
    check_contract(enc, dec, cfg, max_beam)
    for name, graph in (("encoder", enc), ("decoder_step", dec)):
        problems = tensorrt_problems(graph)
        if problems:
            raise ExportError(f"{name}: operators TensorRT 10 cannot parse: {'; '.join(problems[:5])}")
    return enc, dec


def _variants(enc: onnx.ModelProto, dec: onnx.ModelProto, *, fp16: bool, int8: bool, calib_set, tune_set, vocab: Vocab,
              beam: int, budget: float, log: Progress, search_options: dict | None) -> tuple[dict[str, tuple], Any]:
    """The lower-precision graphs asked for, precision -> (encoder, step, encoder note, step note), and the
    int8 search's result (None without a search)."""
    variants: dict[str, tuple] = {}
    if fp16:
        with log.step("converting to fp16"):
            try:
                enc16, dec16 = convert_to_fp16(enc), convert_to_fp16(dec, state_inputs=("c",), control_inputs=CONTROL_INPUTS)
            except ValueError as exc:  # e.g. weights beyond fp16's range
                raise ExportError(f"fp16 variant: {exc}") from None
        variants["fp16"] = (enc16, dec16, FP16, FP16)
    search = None
    if int8 and tune_set is not None:
        with log.step(f"int8: accuracy-aware search on {len(calib_set)} calibration, {len(tune_set)} tuning images"):
            search = search_int8_variant(enc, dec, calib_set, tune_set, vocab, beam, budget, log,
                                         **(search_options or {}))
        variants["int8"] = (search.encoder, search.decoder, INT8_ENCODER, INT8_DECODER)
    elif int8:
        with log.step(f"int8: calibrating the encoder on {len(calib_set)} images"), \
                log.bar(len(calib_set), "calibration") as tick:
            enc8 = quantize_encoder(enc, list(calib_set.images), on_image=tick)
        with log.step("int8: quantizing the decoder step"):
            dec8 = quantize_decoder(dec)
        variants["int8"] = (enc8, dec8, INT8_ENCODER, INT8_DECODER)
    return variants, search


def _int8_fallbacks(search: Any, judge: Any, report: dict, quality: QualityReport | None, numerics: dict | None,
                    log: Progress, force: bool) -> tuple[dict, QualityReport | None, dict | None]:
    """The chosen candidate's parity verdict is recorded on it; when it met the budget on the tuning images
    but not on the parity set (and not force), the next fastest useful one is judged in turn, until one
    passes or none is left. -> the last one's judgement."""
    while quality is not None:
        search.note_parity(quality.summary())
        if quality.passed or force or not search.fallbacks:
            break
        log.say(f"int8: {search.chosen} misses the budget on the parity set; trying {search.fallbacks[0]}")
        search.select(search.fallbacks[0])
        report, quality, numerics = judge("int8", search.encoder, search.decoder)
    return report, quality, numerics


def _refusal(precision: str, report: dict, quality: QualityReport | None, search_report: dict | None) -> dict | None:
    """Why a judged variant is not written (below the budget, or an int8 no faster than fp32), else None."""
    if report["passed"] is False:
        tried = f"; int8 candidates: {describe_candidates(search_report)}" if search_report is not None else ""
        return {"reason": quality.describe() + tried, "quality": quality.summary()}
    if precision == "int8" and search_report is not None and not search_report["useful"]:
        # Within budget only with so much in fp32 that it is not faster: say so instead of shipping a slow "int8".
        return {"reason": f"no int8 candidate within budget is {search_report['min_speedup']}x "
                          f"faster than fp32: {describe_mix(search_report)}; candidates: "
                          f"{describe_candidates(search_report)}; layers at fault: "
                          f"{', '.join(search_report['at_fault']) or 'none named'}",
                "quality": quality.summary() if quality is not None else None, "search": search_report}
    return None


def _write_variant(tmp: Path, precision: str, enc: onnx.ModelProto, dec: onnx.ModelProto, note_e: str, note_d: str,
                   search_report: dict | None, fp32_entries: dict) -> dict:
    """Write a variant's graphs; -> its manifest entries."""
    if precision == "int8" and search_report is not None and search_report["encoder"] != "int8":
        # The int8 step alone won: the variant's encoder is the fp32 graph, by reference (same file and hash).
        save_onnx(dec, tmp / GRAPH_FILES["int8"][1])
        return {"encoder": {**fp32_entries["encoder"], "shared_with": "fp32",
                            "quantization": "none: the fp32 encoder (" + describe_mix(search_report) + ")"},
                "decoder_step": graph_entry(tmp, GRAPH_FILES["int8"][1], "int8", tensorrt_problems(dec), note_d)}
    _write_pair(tmp, GRAPH_FILES[precision], enc, dec)
    return _entries(tmp, GRAPH_FILES[precision], precision, enc, dec, note_e, note_d)


def _write_manifest(tmp: Path, model: CaptionModel, vocab: Vocab, source: dict, timer: Timer, *, opset: int,
                    max_beam: int, graphs: dict, parity: dict, parity_data: ParitySet, judged: dict, refused: dict,
                    budget: float, parity_source: str) -> dict:
    """The parity set, vocab.json and captrt.json, with a verification record per written variant."""
    parity_entry = parity_data.save(tmp)
    model_print = fingerprint(graphs, parity_entry)
    records = []
    for precision, (quality, numerics) in judged.items():
        if precision in graphs:  # the key holds for the files as written, so only written variants get one
            key = {**numerics, "model": model_print}
            records.append(verify_record(quality, key, key_digest(key), "export"))

    write_json(tmp / "vocab.json", vocab.to_json())
    exporter = {"tool": "captrt.export", "torch_exporter": "torch.onnx.export(dynamo=True)",
                "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": _ort_version(),
                "parity_images": parity_source, "seconds": round(timer(), 1)}
    manifest = build_manifest(model.config, vocab, opset=opset, max_beam=max_beam, graphs=graphs, parity=parity,
                              source=source, exporter=exporter)
    manifest["parity_set"] = parity_entry
    manifest["quality_budget"] = budget
    manifest["verification"] = records
    if refused:
        manifest["refused"] = refused
    write_json(tmp / MANIFEST, manifest)
    return manifest


def check_contract(enc: onnx.ModelProto, dec: onnx.ModelProto, cfg, max_beam: int) -> None:
    """The graphs' names, dtypes and shapes are exactly the contract's (captrt.runtime.graph_contract)."""
    sizes = graph_contract.sizes(image_size=cfg.image_size, num_pixels=cfg.num_pixels, encoder_dim=cfg.encoder_dim,
                                 attention_dim=cfg.attention_dim, decoder_dim=cfg.decoder_dim, max_beam=max_beam,
                                 vocab_size=cfg.vocab_size)
    for name, graph in (("encoder", enc), ("decoder_step", dec)):
        spec = graph_contract.graph(name)
        got = {side: {k2: (v[0], list(v[1])) for k2, v in d.items()} for side, d in graph_io(graph).items()}
        want = {side: {t.name: (t.dtype, t.dims(sizes)) for t in tensors}
                for side, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs))}
        if got != want:
            raise ExportError(f"{name}: exported inputs/outputs {got} differ from the model format {want}")


def _write_pair(tmp: Path, files: tuple[str, str], enc: onnx.ModelProto, dec: onnx.ModelProto) -> None:
    save_onnx(enc, tmp / files[0])
    save_onnx(dec, tmp / files[1])


def _entries(tmp: Path, files: tuple[str, str], precision: str, enc, dec, enc_q: str | None = None,
             dec_q: str | None = None) -> dict[str, dict]:
    return {"encoder": graph_entry(tmp, files[0], precision, tensorrt_problems(enc), enc_q),
            "decoder_step": graph_entry(tmp, files[1], precision, tensorrt_problems(dec), dec_q)}


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
