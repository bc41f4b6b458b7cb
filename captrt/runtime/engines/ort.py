"""ONNX Runtime engine: CPU, CUDA (IO binding keeps the decoding state on the GPU) and the TensorRT EP.

The graphs are loaded from the verified bytes of the model directory (sha256 checked, external data
refused: see model_dir.read_graph). The provider that actually runs is reported, and a GPU request
that ORT would silently serve on the CPU is an error instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from captrt.runtime.decoding.processing import neutral_controls  # the default path's controls, every step
from captrt.runtime.engines.base import DecodeState, Engine, StepControls, StepOutput
from captrt.runtime.errors import EngineUnavailableError, ModelDirError
from captrt.runtime.model_dir import CONTROL_INPUTS, DECODER_OUTPUTS, ENCODER_OUTPUTS, LOGP_OUTPUT

if TYPE_CHECKING:
    from captrt.runtime.model_dir import ModelDir

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class HostState(DecodeState):
    """Decoding state in host memory: features (N, P, E), att_proj (N, P, A), h/c (N, K, H)."""

    features: np.ndarray | None = None
    att_proj: np.ndarray | None = None
    h: np.ndarray | None = None
    c: np.ndarray | None = None


def session_options(threads: int | None, log_level: int = 3) -> ort.SessionOptions:
    """Options chosen for this workload: one graph at a time, fixed-shape steps, explicit threads."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # fusions + blocked conv layout
    so.intra_op_num_threads = threads or os.cpu_count() or 1  # explicit: ORT's default can oversubscribe
    so.inter_op_num_threads = 1  # the graphs are chains: nothing to run in parallel
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_cpu_mem_arena = True
    so.enable_mem_pattern = True  # the step repeats with the same shapes: reuse its allocation plan
    so.log_severity_level = log_level  # errors only; the provider check below replaces EP warnings
    # No spin-waiting. Each session owns a thread pool, and an idle pool's workers busy-wait for new
    # work: while the decoder steps, the encoder's worker would spin on one of this machine's two
    # cores, and vice versa. Measured on the seed-sized model (ResNet-101, vocabulary 9490, batch 1,
    # beam 5, 16 steps, 2 threads), end to end p50: fp32 207-260 ms spinning vs 129-156 ms not;
    # int8 105-127 ms vs 52-55 ms. A step's wake-up cost is within noise (~2.4 ms per step either way).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def tensorrt_options(model: "ModelDir", precision: str, max_batch: int, opt_batch: int,
                     opt_beam: int) -> dict[str, dict[str, Any]]:
    """TensorRT EP options per graph: engine + timing cache under MODEL_DIR/cache and explicit
    optimization profiles over batch and beam, so the shrinking batch never triggers a rebuild.
    The profiles are the native engine's (trt_build.profiles_for_model), in the EP's string form."""
    from captrt.runtime.engines.trt_build import profiles_for_model

    cache = model.cache_dir() / f"ort-trt-{precision}"
    cache.mkdir(exist_ok=True)
    profiles = profiles_for_model(model, max_batch=max_batch, opt_batch=min(opt_batch, max_batch),
                                  opt_beam=min(opt_beam, model.max_beam))

    def shapes(graph: str, which: int) -> str:  # which: 0 min, 1 opt, 2 max -> "name:1x2x3,name:..."
        return ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in profiles[graph].items())

    common = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
              "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
              "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8"}
    return {g: {**common, "trt_profile_min_shapes": shapes(g, 0), "trt_profile_opt_shapes": shapes(g, 1),
                "trt_profile_max_shapes": shapes(g, 2)} for g in ("encoder", "decoder_step")}


def input_names(graph: Any) -> list[str]:
    """Input names of an ONNX Runtime session or of a runner with io() (OpenVINO's OvGraph/OrtGraph)."""
    if hasattr(graph, "get_inputs"):
        return [i.name for i in graph.get_inputs()]
    return list(graph.io()[0])


class _Closed:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this Captioner/engine was closed")


class SessionEngine(Engine):
    """ONNX Runtime decoding on the host over two sessions: numpy in, numpy out.

    OrtEngine opens its sessions from a model directory; the exporter's parity gate uses this class
    on graphs that are not in a model directory yet, so it checks the very search users run."""

    name = "ort"

    def __init__(self, encoder: Any, decoder: Any, max_beam: int, *, model: "ModelDir | None" = None,
                 device: str = "cpu", precision: str = "fp32", threads: int | None = None):
        super().__init__(model, device=device, precision=precision, threads=threads)  # type: ignore[arg-type]
        self.encoder, self.decoder, self._max_beam = encoder, decoder, int(max_beam)
        self._controls = set(CONTROL_INPUTS) <= set(input_names(decoder))  # format version 2's step graph
        self._vocab_size = model.vocab_size if model is not None else None

    @property
    def max_beam(self) -> int:
        return self._max_beam

    @property
    def provider(self) -> str:
        return self.decoder.get_providers()[0]

    def numerics(self) -> dict[str, Any]:
        return {**super().numerics(), "libraries": {"onnxruntime": ort.__version__}}

    def encode(self, images: np.ndarray) -> DecodeState:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        features, att_proj, h0, c0 = self.encoder.run(list(ENCODER_OUTPUTS), {"image": images})
        n = images.shape[0]
        return HostState(batch=n, beams=1, features=features, att_proj=att_proj,
                         h=h0.reshape(n, 1, -1), c=c0.reshape(n, 1, -1))

    @property
    def controls(self) -> bool:
        return self._controls

    def control_feeds(self, tokens: np.ndarray, controls: StepControls | None,
                      want_logp: bool) -> dict[str, np.ndarray]:
        """The control inputs of one step: `controls`, or neutral ones on the default path (an old-format
        graph has none, and then asking for controls or logp is an error)."""
        if not self._controls:
            if controls is not None or want_logp:
                raise ValueError("this step graph has no decoding controls (model format version 1): "
                                 "re-export the model with this captrt to use them")
            return {}
        if controls is None:
            controls = neutral_controls(*tokens.shape, self.vocab_size)
        return controls.feeds()

    @property
    def vocab_size(self) -> int:
        """V, the padding id of the control inputs."""
        if self._vocab_size is None:
            self._vocab_size = int(next(o.shape[-1] for o in self.decoder.get_outputs() if o.name == LOGP_OUTPUT)) - 1
        return self._vocab_size

    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False,
             controls: StepControls | None = None, want_logp: bool = False) -> StepOutput:
        assert isinstance(state, HostState)
        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64),
                 "origin": np.ascontiguousarray(origin, dtype=np.int64), "h": state.h, "c": state.c,
                 "features": state.features, "att_proj": state.att_proj,
                 **self.control_feeds(tokens, controls, want_logp)}
        names = list(DECODER_OUTPUTS) + ([LOGP_OUTPUT] if want_logp else [])
        h, c, alpha, cand_logp, cand_ids, *logp = self.decoder.run(names, feeds)
        state.h, state.c, state.beams = h, c, tokens.shape[1]
        # logp: the graph's (N, K, V + 1); the padding column (always -inf) is not a word
        return StepOutput(cand_logp, cand_ids, alpha if want_alpha else None, logp[0][..., :-1] if logp else None)

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        assert isinstance(state, HostState)
        state.features, state.att_proj = state.features[rows], state.att_proj[rows]
        state.h, state.c, state.batch = state.h[rows], state.c[rows], len(rows)
        return state


class OrtEngine(SessionEngine):
    """ONNX Runtime. Options: providers ('cpu' | 'cuda' | 'tensorrt'; default from device),
    device_id (0), max_batch / opt_batch / opt_beam (TensorRT profiles), log_level (3),
    io_binding (default: on for the GPU, off for the CPU, where plain run() is as fast)."""

    name = "ort"

    def __init__(self, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, providers: str | None = None, device_id: int = 0,
                 max_batch: int = 32, opt_batch: int = 8, opt_beam: int = 5, log_level: int = 3,
                 io_binding: bool | None = None, **options: Any):
        if options:
            raise ValueError(f"engine 'ort': unknown option(s) {sorted(options)}")
        kind = providers or device
        if kind not in _PROVIDER_NAMES:
            raise ValueError(f"providers: expected 'cpu', 'cuda' or 'tensorrt', got {providers!r}")
        if kind != "cpu" and device != "cuda":
            raise ValueError(f"providers={kind!r} runs on the GPU: pass device='cuda'")
        if kind == "cpu" and device == "cuda":
            raise ValueError("providers='cpu' contradicts device='cuda'")
        self.kind = kind
        self.device_id = device_id
        self.max_batch = max_batch if kind == "tensorrt" else None  # the TensorRT profiles' limit
        # TensorRT builds its own fp16/int8 kernels from the fp32 graph (trt_fp16_enable); int8 needs the QDQ graph.
        variant = "fp32" if kind == "tensorrt" and precision == "fp16" else precision
        model.require_precision(variant)
        self.variant = variant  # the graphs actually loaded
        so = session_options(threads, log_level)
        for name, value in (("max_batch", max_batch), ("opt_batch", opt_batch), ("opt_beam", opt_beam)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        self.cuda_setup = None
        if kind != "cpu":  # pip's CUDA/cuDNN libraries loaded before ONNX Runtime looks for them
            from captrt.runtime.engines.cuda_setup import prepare

            self.cuda_setup = prepare(tensorrt=kind == "tensorrt")
            problem = self.cuda_setup.problem()
            if problem:
                raise EngineUnavailableError(f"device='cuda': {problem}")
        trt = tensorrt_options(model, precision, max_batch, opt_batch, opt_beam) if kind == "tensorrt" else None
        encoder = self._session(model, variant, "encoder", so, trt)
        decoder = self._session(model, variant, "decoder_step", so, trt)
        super().__init__(encoder, decoder, model.max_beam, model=model, device=device, precision=precision,
                         threads=threads)
        self._check_io()
        self._provider = self.decoder.get_providers()[0]
        self._cuda = None
        if io_binding if io_binding is not None else kind != "cpu":
            from captrt.runtime.engines.ort_cuda import CudaBinding

            self._cuda = CudaBinding(self.encoder, self.decoder, device_id, "cpu" if kind == "cpu" else "cuda")

    def _session(self, model: "ModelDir", variant: str, graph: str, so: ort.SessionOptions,
                 trt: dict[str, dict[str, Any]] | None) -> ort.InferenceSession:
        data = model.read_graph(variant, graph)
        if self.kind == "cpu":
            providers: list[Any] = ["CPUExecutionProvider"]
        else:
            cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
            providers = [("TensorrtExecutionProvider", {"device_id": self.device_id, **trt[graph]}), cuda] if trt else [cuda]
        path = model.graph_path(variant, graph)
        try:
            if self.kind == "cpu":
                session = ort.InferenceSession(data, sess_options=so, providers=providers)
            else:
                from captrt.runtime.engines.cuda_setup import quiet_onnxruntime

                with quiet_onnxruntime():  # its multi-line provider warnings would bury our one line
                    session = ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            if self.kind != "cpu":
                why = self._gpu_problem()
                raise EngineUnavailableError(f"device='cuda': {why}" if why else
                                             f"{path}: ONNX Runtime could not create a {self.kind} session: {exc}") from None
            raise ModelDirError(f"{path}: ONNX Runtime cannot load this graph: {str(exc)[:500]}") from None
        wanted = _PROVIDER_NAMES[self.kind]
        actual = session.get_providers()[0]
        if actual != wanted:
            # ORT falls back to the CPU with only a log line; running 50x slower unannounced is worse than failing.
            why = self._gpu_problem()
            if why:
                raise EngineUnavailableError(f"device='cuda' requested {wanted}, but ONNX Runtime could only start "
                                             f"{actual}: {why}")
            raise EngineUnavailableError(
                f"device='cuda' requested {wanted}, but ONNX Runtime could only start {actual} "
                f"(available: {', '.join(ort.get_available_providers())}). Check that an NVIDIA GPU and driver are "
                "present and that CUDA 12/13 + cuDNN 9 libraries (and TensorRT for providers='tensorrt') are installed "
                "(pip install 'onnxruntime-gpu[cuda,cudnn]'), or use device='cpu'.")
        return session

    def _gpu_problem(self) -> str | None:
        """Why the GPU provider did not start (the driver, a library, a version), None when not found."""
        from captrt.runtime.engines.cuda_setup import diagnose

        return diagnose(self.cuda_setup, self.kind) if self.cuda_setup is not None else None

    def _check_io(self) -> None:
        def io(session: ort.InferenceSession) -> tuple[list[str], list[str], int | None]:
            cand = next((o.shape for o in session.get_outputs() if o.name == "cand_logp"), None)
            last = cand[-1] if cand and isinstance(cand[-1], int) else None
            return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()], last

        self.model.check_io(self.variant, {"encoder": io(self.encoder), "decoder_step": io(self.decoder)})

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def needs_verification(self) -> bool:
        # On GPUs the numerics are not the CPU's even in fp32: the CUDA provider may use TF32 and the
        # TensorRT provider picks its own kernels, so they are verified where they run.
        return self.precision != "fp32" or self.kind != "cpu"

    # -- the host path is SessionEngine's; IO binding keeps the state on the device -----------------
    def encode(self, images: np.ndarray) -> DecodeState:
        if self._cuda is not None:
            return self._cuda.encode(np.ascontiguousarray(images, dtype=np.uint8))
        return super().encode(images)

    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False,
             controls: StepControls | None = None, want_logp: bool = False) -> StepOutput:
        if self._cuda is not None:
            return self._cuda.step(state, np.ascontiguousarray(tokens, dtype=np.int64),
                                   np.ascontiguousarray(origin, dtype=np.int64), want_alpha,
                                   self.control_feeds(tokens, controls, want_logp), want_logp)
        return super().step(state, tokens, origin, want_alpha=want_alpha, controls=controls, want_logp=want_logp)

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        if self._cuda is not None:
            return self._cuda.select(state, rows)
        return super().select(state, rows)

    def release(self, state: DecodeState) -> None:
        if self._cuda is not None:
            self._cuda.release(state)

    def close(self) -> None:
        # Drop the sessions (their memory goes with them); calls after close fail with a clear message.
        self.encoder = self.decoder = self._cuda = _Closed()  # type: ignore[assignment]

    def describe(self) -> dict[str, Any]:
        facts = {**super().describe(), "providers": self.kind, "io_binding": self._cuda is not None,
                 "intra_op_num_threads": self.threads or os.cpu_count()}
        if self.cuda_setup is not None:  # what the GPU runs on: the driver and where each CUDA library came from
            facts["cuda_libraries"] = self.cuda_setup.facts()
        return facts
