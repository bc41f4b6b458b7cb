"""OpenVINO engine: the model directory's ONNX graphs on OpenVINO's CPU plugin, in fp32, bf16 or int8.

Why: ONNX Runtime's CPU provider does not use the bf16 units of current server CPUs (AVX512-BF16 on
AMD Zen 4/5 and Intel Cooper Lake+, AMX on Sapphire Rapids+) for convolutions; OpenVINO's CPU plugin
does, and it reads our ONNX graphs as they are (no new files in the model directory).

- fp32 runs the fp32 graphs with INFERENCE_PRECISION_HINT=f32 set explicitly: the plugin's default on
  AMX CPUs is bf16, which would change captions silently.
- bf16 runs the fp32 graphs with INFERENCE_PRECISION_HINT=bf16. It needs avx512_bf16 or amx_bf16:
  without them OpenVINO quietly computes in f32 (checked here: 2026.4 on an AVX2 CPU), so the engine
  checks the CPU flags first and then the precision the compiled model reports, and fails otherwise.
- int8 runs the int8 graphs (static QDQ encoder, or the fp32 one when the export chose the int8 step
  alone; per-row int8 decoder step).
- bf16-int8 runs the fp32 encoder in bf16 and the int8 variant's step (in ONNX Runtime by default): the
  bf16 encoder's speed with the int8 step's, where the model's int8 variant exists.

Each graph runs where it measured fastest for its precision (DEFAULT_PLACEMENT; docs/engines.md,
benchmarks/RESULTS.md); `encoder_on=` / `step_on=` ('openvino' | 'ort') pick any mix. A graph that
OpenVINO cannot read or compile falls back to ONNX Runtime when its placement was the default (never
for bf16, where ONNX Runtime would mean fp32), and describe()/numerics() say which ran where.

Graphs come from ModelDir.read_graph (sha256 checked, external data refused) and are compiled once
with dynamic batch/beam shapes (measured against one compile per shape class: see _ov_config).
Compiled models are shared; each thread gets its own InferRequest (OpenVINO: one request per
thread), so an engine, and a Captioner, may be shared by threads.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from captrt.checks import check_int
from captrt.runtime.engines.ort import (SessionEngine, ClosedEngine, cpu_session, plain_step_bytes, session_io,
                                       session_options)
from captrt.runtime.errors import EngineUnavailableError, ModelDirError
from captrt.runtime.model_dir import PLAIN_STEP
from captrt.runtime import hardware
from captrt.runtime.hardware import cpu_model

if TYPE_CHECKING:
    from captrt.runtime.model_dir import ModelDir

log = logging.getLogger("captrt.runtime.openvino")

BACKENDS = ("openvino", "ort")
# Either flag gives the CPU plugin bf16 kernels (AVX512-BF16: AMD Zen 4/5, Intel Cooper Lake+; AMX: Intel
# Sapphire Rapids+). AVX-512 alone is not enough: the plugin then silently stays in f32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Which backend runs each graph by default, per precision: decided by measurement (benchmarks/RESULTS.md,
# "OpenVINO"). fp32 and int8, measured here (AVX2 EPYC, 2 threads, demo-sized model, batch 1, beam 5,
# engines interleaved): the small, memory-bound step is ~2x faster in ORT (fp32 0.50 vs 0.97 ms p50,
# int8 0.42 vs 1.20 ms: OpenVINO's per-call overhead on dynamic shapes), the encoder ties in fp32 and
# is ~10% faster in OpenVINO in int8, and encoder-OpenVINO + step-ORT was the fastest end to end (fp32
# 107 vs 114 ms ORT-only vs 128 ms OpenVINO-only). bf16, from ../shared/notes/runtime-facts.md (AVX512-BF16
# EPYC, not this machine): OpenVINO bf16 beat ORT fp32 on both graphs (encoder 25.5 vs 50.6 ms, step
# N=1 K=5 1.02 vs 1.19 ms), so bf16 runs both in OpenVINO.
DEFAULT_PLACEMENT: dict[str, dict[str, str]] = {
    "fp32": {"encoder": "openvino", "decoder_step": "ort"},
    "bf16": {"encoder": "openvino", "decoder_step": "openvino"},
    "int8": {"encoder": "openvino", "decoder_step": "ort"},
    # bf16 encoder + the int8 variant's step, which runs fastest in ONNX Runtime's per-row int8 kernels
    "bf16-int8": {"encoder": "openvino", "decoder_step": "ort"},
}
# precision -> graph -> the model directory's variant it reads (bf16-int8: fp32's encoder, int8's step)
_VARIANTS = {"fp32": {"encoder": "fp32", "decoder_step": "fp32"}, "bf16": {"encoder": "fp32", "decoder_step": "fp32"},
             "int8": {"encoder": "int8", "decoder_step": "int8"},
             "bf16-int8": {"encoder": "fp32", "decoder_step": "int8"}}
SUPPORTED = tuple(_VARIANTS)  # the precisions this engine runs
# precision -> graph -> INFERENCE_PRECISION_HINT. int8 asks for f32 too: the non-quantized ops then compute as
# in ONNX Runtime on every CPU (the plugin's default on AMX CPUs would run them in bf16, i.e. different numbers
# on different machines).
_HINTS = {"fp32": {"encoder": "f32", "decoder_step": "f32"}, "bf16": {"encoder": "bf16", "decoder_step": "bf16"},
          "int8": {"encoder": "f32", "decoder_step": "f32"}, "bf16-int8": {"encoder": "bf16", "decoder_step": "f32"}}


def import_openvino() -> Any:
    """The openvino module, or EngineUnavailableError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise EngineUnavailableError(f"engine 'openvino' needs OpenVINO ({exc}): pip install 'captrt[openvino]'") from None
    return openvino


def check_bf16_cpu(flags: Sequence[str] | frozenset[str] | None = None) -> None:
    """Raise EngineUnavailableError unless the CPU has bf16 units (flags: /proc/cpuinfo's, by default)."""
    have = frozenset(hardware.all_cpu_flags() if flags is None else flags)
    if any(f in have for f in BF16_FLAGS):
        return
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in have]
    raise EngineUnavailableError(
        f"precision 'bf16' needs a CPU with bf16 units: CPU flag avx512_bf16 (AMD Zen 4/5, Intel Cooper Lake+) or "
        f"amx_bf16 (Intel Sapphire Rapids+). This CPU ({cpu_model()}) has neither "
        f"(it has: {', '.join(simd) or 'no AVX2/AVX-512'}); OpenVINO would silently compute in fp32 here. "
        "Use precision='fp32' or 'int8'.")


def _type_name(value: Any) -> str:
    """OpenVINO's element type (e.g. <Type: 'bfloat16'>) as its short name: 'bf16', 'f32'."""
    getter = getattr(value, "get_type_name", None)
    return str(getter() if getter else value)


class OvGraph:
    """One compiled OpenVINO model with ONNX Runtime's `run(output_names, feeds) -> list` interface.

    The compiled model is shared; every thread gets its own InferRequest (requests are not thread-safe).
    Inputs are shared with OpenVINO (no copy; the call is synchronous); outputs are copied, because
    they become the next step's inputs and must not alias the request's own output buffers."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self._local = threading.local()

    def _request(self) -> Any:
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._request().infer(feeds, share_inputs=True, share_outputs=False)
        return [out[name] for name in names]

    @property
    def inference_precision(self) -> str:
        return _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def io(self) -> tuple[list[str], list[str], int | None]:
        """(input names, output names, the static last dimension of cand_logp if there is one)."""
        outs = [o.get_any_name() for o in self.compiled.outputs]
        last = None
        if "cand_logp" in outs:
            dim = self.compiled.output("cand_logp").get_partial_shape()[-1]
            last = dim.get_length() if dim.is_static else None
        return [i.get_any_name() for i in self.compiled.inputs], outs, last


class OrtGraph:
    """An ONNX Runtime session in a mix (same run() interface)."""

    def __init__(self, session: Any):
        self.session = session

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(list(names), feeds)

    inference_precision = "f32"  # ORT's CPU provider computes the graphs' float ops in fp32

    def io(self) -> tuple[list[str], list[str], int | None]:
        return session_io(self.session)


class OpenVinoEngine(SessionEngine):
    """OpenVINO CPU plugin (device 'cpu' only). Options: encoder_on / step_on ('openvino' | 'ort'; default
    DEFAULT_PLACEMENT[precision]), cache (True: OpenVINO's compiled-model cache under MODEL_DIR/cache), streams
    (NUM_STREAMS: concurrent searches over the one compiled model; Captioner.load sets it), plain_step (True: the
    default path runs the step graph cut without its decoding controls; False: the format-2 graph)."""

    name = "openvino"

    def __init__(self, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 encoder_on: str | None = None, step_on: str | None = None, cache: bool = True, streams: int = 1,
                 plain_step: bool = True, **options: Any):
        if options:
            raise ValueError(f"engine 'openvino': unknown option(s) {sorted(options)}")
        if device != "cpu":
            raise ValueError(f"engine 'openvino' runs on the CPU only (device='cpu'), not device={device!r}")
        if precision not in _VARIANTS:
            raise ValueError(f"engine 'openvino': precision must be one of {', '.join(_VARIANTS)}, not {precision!r}")
        placement = dict(DEFAULT_PLACEMENT[precision])
        explicit = set()
        for graph, value in (("encoder", encoder_on), ("decoder_step", step_on)):
            if value is not None:
                if value not in BACKENDS:
                    raise ValueError(f"{'encoder_on' if graph == 'encoder' else 'step_on'}: expected 'openvino' or "
                                     f"'ort', got {value!r}")
                placement[graph] = value
                explicit.add(graph)
        self.hints, self.variants = _HINTS[precision], _VARIANTS[precision]
        if "bf16" in self.hints.values():
            check_bf16_cpu()
        model.require_precision(precision)
        # what numerics() reports: the variant both graphs come from, or "fp32+int8" for a mix
        self.variant = "+".join(dict.fromkeys(self.variants.values()))
        self.placement, self.fallbacks = placement, {}  # fallbacks: graph -> why OpenVINO could not run it
        self.threads = threads
        check_int("streams", streams, expected=True)
        self.streams = streams  # NUM_STREAMS: concurrent infer requests of one compiled model, T threads each
        # explicit: the plugin's default takes every core; with S streams the plugin splits S x T among them
        self.num_threads = streams * threads if threads else os.cpu_count() or 1
        self._ov = import_openvino() if "openvino" in placement.values() else None
        self.cache_dir: Path | None = None
        self._core = self._new_core(model, precision, cache) if self._ov else None
        enc_v, step_v = self.variants["encoder"], self.variants["decoder_step"]
        encoder = self._load(model.read_graph(enc_v, "encoder"), model.graph_path(enc_v, "encoder"), precision,
                             "encoder", "encoder" in explicit)
        step, step_path = model.read_graph(step_v, "decoder_step"), model.graph_path(step_v, "decoder_step")
        # The default path runs the step graph cut without its decoding controls (captrt.runtime.engines.plain_step);
        # the format-2 graph is compiled on the first step that has options, where the plain one runs.
        plain = plain_step_bytes(model, step) if plain_step else None

        def open_controlled() -> OvGraph | OrtGraph:
            runner = self._load(model.read_graph(step_v, "decoder_step"), step_path, precision, "decoder_step",
                                "decoder_step" in explicit, lazy=True)
            model.check_io(step_v, {"decoder_step": runner.io()})
            return runner

        decoder = self._load(plain if plain is not None else step, step_path, precision, "decoder_step",
                             "decoder_step" in explicit)
        del step
        super().__init__(encoder, decoder, model.max_beam, model=model, device=device, precision=precision,
                         threads=threads, open_controlled=open_controlled if plain is not None else None)
        graphs = {"encoder": encoder, "decoder_step": decoder}
        model.check_io(enc_v, {"encoder": encoder.io()})
        model.check_io(step_v, {(PLAIN_STEP if self.plain else "decoder_step"): decoder.io()})
        self.effective = {g: graphs[g].inference_precision for g in graphs}
        # A graph placed on 'ort' (asked for explicitly) computes in fp32 and is reported as such.
        if any(self.effective[g] != "bf16" for g in graphs if self.placement[g] == "openvino" and self.hints[g] == "bf16"):
            # The flags said yes but the plugin still chose f32 (e.g. a VM hiding the instructions): never run
            # fp32 under the name bf16.
            raise EngineUnavailableError(
                f"precision {precision!r}: OpenVINO {self._ov.__version__} compiled {self.effective} on this CPU "
                f"({cpu_model()}), not bf16; its CPU plugin needs avx512_bf16 or amx_bf16 at run time")

    # -- loading --------------------------------------------------------------------------------
    def _new_core(self, model: "ModelDir", precision: str, cache: bool) -> Any:
        core = self._ov.Core()
        self.cache_dir = cache_directory(model) if cache else None
        if self.cache_dir is not None:
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        return core

    def _ov_config(self, precision: str, graph: str) -> dict[str, Any]:
        # S streams (default one), latency hint: each batch its parallelism inside each op. Dynamic batch
        # and beam dimensions, compiled once: one compile per (N, K_prev, K) shape class was at most ~5%
        # faster per call here (within this machine's noise) and a shrinking batch would compile dozens.
        # No thread pinning: pinned workers wait for their own core when other processes (or this process's
        # ONNX Runtime pool) hold it. Measured here, 2 cores shared with other work, the step at N=1 K=5:
        # pinned 4.5-7.9 ms, unpinned 0.8-1.05 ms (ORT 0.6 ms in the same minutes).
        cfg: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.num_threads, "NUM_STREAMS": self.streams,
                               "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
        cfg["INFERENCE_PRECISION_HINT"] = self.hints[graph]
        if precision == "fp32":
            cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # never quantize activations on the fly in fp32
        return cfg

    def _load(self, data: bytes, path: Path, precision: str, graph: str, explicit: bool,
              lazy: bool = False) -> OvGraph | OrtGraph:
        """Compile `graph`'s bytes (sha256-checked by ModelDir.read_graph, or cut from such) where its placement
        says; a graph OpenVINO cannot compile falls back to ONNX Runtime unless placed there explicitly (or bf16).
        lazy: the format-2 step opened after load; a fallback then leaves the reported placement (the default
        path's, which the verification covers) as it is and is noted under 'decoder_step (controls)'."""
        if self.placement[graph] == "openvino":
            try:
                compiled = self._core.compile_model(self._core.read_model(data), "CPU", self._ov_config(precision, graph))
                return OvGraph(compiled)
            except Exception as exc:  # OpenVINO raises RuntimeError/OpConversionFailure/GeneralFailure
                why = " ".join(str(exc).split())[:400]
                if explicit or self.hints[graph] == "bf16":  # ONNX Runtime would mean fp32 under the name bf16
                    raise ModelDirError(f"{path}: OpenVINO {self._ov.__version__} cannot compile this graph: {why}") from None
                log.warning("%s: OpenVINO cannot compile it (%s); running it in ONNX Runtime", path, why)
                if lazy:
                    self.fallbacks[f"{graph} (controls)"] = why
                else:
                    self.fallbacks[graph] = why
                    self.placement[graph] = "ort"
        return OrtGraph(cpu_session(data, path, session_options(self.threads)))

    # -- what runs --------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        """e.g. 'openvino:CPU[f32]', or a mix: 'openvino:CPU[bf16]+ort:CPU' (encoder+decoder_step)."""
        parts = [f"openvino:CPU[{self.effective[g]}]" if self.placement[g] == "openvino" else "ort:CPU"
                 for g in ("encoder", "decoder_step")]
        return parts[0] if parts[0] == parts[1] else "+".join(parts)

    @property
    def needs_verification(self) -> bool:
        # Exact only when every graph computes in f32 (fp32 requests f32 explicitly and checks it came true).
        return self.precision != "fp32" or any(p not in ("f32", "fp32") for p in self.effective.values())

    def _graphs_info(self) -> dict[str, dict[str, str]]:
        return {g: {"backend": self.placement[g], "inference_precision": self.effective[g],
                    **({"fallback": self.fallbacks[g]} if g in self.fallbacks else {})}
                for g in ("encoder", "decoder_step")}

    def _libraries(self) -> dict[str, str]:
        libs = {"openvino": self._ov.__version__} if self._ov is not None else {}
        if "ort" in self.placement.values():
            import onnxruntime as ort

            libs["onnxruntime"] = ort.__version__
        return libs

    def numerics(self) -> dict[str, Any]:
        return {**super().numerics(), "libraries": self._libraries(), "graphs": self._graphs_info(),
                "variant": self.variant}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "cpu": cpu_model(), "graphs": self._graphs_info(), "variant": self.variant,
                "libraries": self._libraries(), "inference_num_threads": self.num_threads, "num_streams": self.streams,
                "cache_dir": None if self.cache_dir is None else str(self.cache_dir)}

    def close(self) -> None:
        self.encoder = self.decoder = self._controlled = ClosedEngine()  # type: ignore[assignment]
        self._core = None


def cache_directory(model: "ModelDir") -> Path | None:
    """MODEL_DIR/cache/openvino-<tag>, or None (compile without a cache) when it cannot be created.

    OpenVINO names its blobs by a hash of the model and the compile options, which anyone can compute:
    a model directory shipped with a crafted cache/ would have its blob loaded instead of the verified
    graph. The directory's tag is an HMAC of the model's identity with this machine's cache secret (the
    TensorRT engine's, captrt.runtime.signing.local_secret), so only blobs compiled on this machine are ever found."""
    from captrt.runtime.signing import local_secret

    try:
        root = model.cache_dir()
        tag = hmac.new(local_secret(), f"openvino\n{model.manifest_sha256}".encode(), hashlib.sha256).hexdigest()[:16]
        d = root / f"openvino-{tag}"
        d.mkdir(exist_ok=True)
        probe = d / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (OSError, ModelDirError) as exc:
        log.warning("%s: no OpenVINO compiled-model cache (%s); compiling at every load", model.path, exc)
        return None
    return d
