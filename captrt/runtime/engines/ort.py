"""ONNX Runtime engine: CPU, CUDA (IO binding keeps the decoding state on the GPU) and the TensorRT EP.

The graphs are loaded from the verified bytes of the model directory (sha256 checked, external data
refused: see model_dir.read_graph). The provider that actually runs is reported, and a GPU request
that ORT would silently serve on the CPU is an error instead.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnxruntime as ort

from captrt.checks import check_int
from captrt.runtime.engines.base import DecodeState, Engine, StepControls, StepOutput
from captrt.runtime.errors import EngineUnavailableError, ModelDirError
from captrt.runtime.model_dir import CONTROL_INPUTS, DECODER_OUTPUTS, ENCODER_OUTPUTS, LOGP_OUTPUT, PLAIN_STEP
from captrt.runtime.engines.plain_step import plain_step_graph

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
    The profiles are the native engine's (trt_shapes.profiles_for_model), in the EP's string form."""
    from captrt.runtime.engines.trt_shapes import profiles_for_model

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


def cpu_session(data: bytes, path: Any, so: ort.SessionOptions) -> ort.InferenceSession:
    """An ONNX Runtime CPU session over a graph's verified bytes (so: session_options()); a graph ONNX Runtime
    cannot load is a ModelDirError naming `path`."""
    try:
        return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelDirError(f"{path}: ONNX Runtime cannot load this graph: {str(exc)[:500]}") from None


def session_io(session: Any) -> tuple[list[str], list[str], int | None]:
    """(input names, output names, cand_logp's static last dimension or None) of an ONNX Runtime session:
    what ModelDir.check_io compares with the model format."""
    outs = session.get_outputs()
    cand = next((o.shape for o in outs if o.name == "cand_logp"), None)
    last = cand[-1] if cand and isinstance(cand[-1], int) else None
    return [i.name for i in session.get_inputs()], [o.name for o in outs], last


def input_names(graph: Any) -> list[str]:
    """Input names of an ONNX Runtime session or of a runner with io() (OpenVINO's OvGraph/OrtGraph)."""
    if hasattr(graph, "get_inputs"):
        return [i.name for i in graph.get_inputs()]
    return list(graph.io()[0])


def plain_step_bytes(model: "ModelDir", data: bytes) -> bytes | None:
    """The step graph without its decoding controls (captrt.runtime.engines.plain_step) when the model's step has
    them (format 2) and the cut applies; None otherwise (the engine then runs `data` as it is)."""
    return plain_step_graph(data) if model.controls else None


class ClosedEngine:
    """Stands in for a closed engine's sessions: any later use says the engine was closed (not a None error)."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("this Captioner/engine was closed")


class SessionEngine(Engine):
    """ONNX Runtime decoding on the host over two sessions: numpy in, numpy out.

    `decoder` runs the default path. With `controlled` (a runner) or `open_controlled` (a zero-argument
    callable that opens it on first use), `decoder` is the plain step graph (captrt.runtime.engines.plain_step:
    no processing nodes) and the controlled one the model's format-2 step graph, run only for steps
    with decoding controls or logp; without either, `decoder` is the model's step graph itself (format
    1, or format 2 fed neutral controls).
    OrtEngine opens its sessions from a model directory; the exporter's parity gate uses this class
    on graphs that are not in a model directory yet, so it checks the very search users run."""

    name = "ort"

    def __init__(self, encoder: Any, decoder: Any, max_beam: int, *, model: "ModelDir | None" = None,
                 device: str = "cpu", precision: str = "fp32", threads: int | None = None,
                 controlled: Any = None, open_controlled: Callable[[], Any] | None = None):
        super().__init__(model, device=device, precision=precision, threads=threads)  # type: ignore[arg-type]
        self.encoder, self.decoder, self._max_beam = encoder, decoder, int(max_beam)
        self._controlled, self._open_controlled = controlled, open_controlled
        self._controlled_lock = threading.Lock()
        self.plain = controlled is not None or open_controlled is not None  # `decoder` is the plain step graph
        self._controls = self.plain or set(CONTROL_INPUTS) <= set(input_names(decoder))  # format version 2
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

    def controlled_step(self) -> Any:
        """The step graph with decoding controls: `decoder` itself, or the format-2 graph beside the plain one
        (opened on the first step that needs it; later steps, from any thread, reuse it)."""
        if not self.plain:
            return self.decoder
        if self._controlled is None:
            with self._controlled_lock:
                if self._controlled is None:
                    self._controlled = self._open_controlled()  # type: ignore[misc]
        return self._controlled

    @property
    def controlled_open(self) -> bool:
        """True when the step graph with decoding controls is open (always, unless a plain one serves the
        default path and no step has needed the controls yet)."""
        return not self.plain or self._controlled is not None

    def step_graph(self, controls: StepControls | None) -> Any:
        """The step graph that runs a step fed `controls` (None: no control inputs)."""
        return self.decoder if controls is None else self.controlled_step()

    def resolve(self, tokens: np.ndarray, controls: StepControls | None, want_logp: bool) -> StepControls | None:
        return self.step_controls(*tokens.shape, controls, want_logp, plain=self.plain)

    @property
    def vocab_size(self) -> int:
        """V, the padding id of the control inputs."""
        if self._vocab_size is None:
            outputs = self.controlled_step().get_outputs()
            self._vocab_size = int(next(o.shape[-1] for o in outputs if o.name == LOGP_OUTPUT)) - 1
        return self._vocab_size

    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *, want_alpha: bool = False,
             controls: StepControls | None = None, want_logp: bool = False) -> StepOutput:
        assert isinstance(state, HostState)
        resolved = self.resolve(tokens, controls, want_logp)
        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64),
                 "origin": np.ascontiguousarray(origin, dtype=np.int64), "h": state.h, "c": state.c,
                 "features": state.features, "att_proj": state.att_proj,
                 **(resolved.feeds() if resolved is not None else {})}
        names = list(DECODER_OUTPUTS) + ([LOGP_OUTPUT] if want_logp else [])
        h, c, alpha, cand_logp, cand_ids, *logp = self.step_graph(resolved).run(names, feeds)
        state.h, state.c, state.beams = h, c, tokens.shape[1]
        return StepOutput(cand_logp, cand_ids, alpha if want_alpha else None, self.word_logp(logp[0]) if logp else None)

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        assert isinstance(state, HostState)
        state.features, state.att_proj = state.features[rows], state.att_proj[rows]
        state.h, state.c, state.batch = state.h[rows], state.c[rows], len(rows)
        return state


class OrtEngine(SessionEngine):
    """ONNX Runtime. Options: providers ('cpu' | 'cuda' | 'tensorrt'; default from device),
    device_id (0), max_batch / opt_batch / opt_beam (TensorRT profiles), log_level (3),
    io_binding (default: on for the GPU, off for the CPU, where plain run() is as fast), plain_step
    (True: the default path runs the step graph cut without its decoding controls; False: the format-2
    graph with neutral controls, as benchmarks compare)."""

    name = "ort"

    def __init__(self, model: "ModelDir", *, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, providers: str | None = None, device_id: int = 0,
                 max_batch: int = 32, opt_batch: int = 8, opt_beam: int = 5, log_level: int = 3,
                 io_binding: bool | None = None, plain_step: bool = True, **options: Any):
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
            check_int(name, value, expected=True)
        self.cuda_setup = None
        if kind != "cpu":  # pip's CUDA/cuDNN libraries loaded before ONNX Runtime looks for them
            from captrt.runtime.engines.cuda_setup import prepare

            self.cuda_setup = prepare(tensorrt=kind == "tensorrt")
            problem = self.cuda_setup.problem()
            if problem:
                raise EngineUnavailableError(f"device='cuda': {problem}")
        trt = tensorrt_options(model, precision, max_batch, opt_batch, opt_beam) if kind == "tensorrt" else None
        encoder = self._session(model.read_graph(variant, "encoder"), model.graph_path(variant, "encoder"),
                                so, trt and trt["encoder"])
        step, step_path = model.read_graph(variant, "decoder_step"), model.graph_path(variant, "decoder_step")
        # The default path runs the step graph cut without its decoding controls; the format-2 graph opens on the
        # first step that has options. Not under the TensorRT EP: a second graph there is a second engine build
        # (minutes), for a processing that costs a few small kernels on the GPU.
        plain = plain_step_bytes(model, step) if kind != "tensorrt" and plain_step else None

        def open_controlled() -> ort.InferenceSession:
            session = self._session(model.read_graph(variant, "decoder_step"), step_path, so, None)
            model.check_io(variant, {"decoder_step": session_io(session)})
            return session

        if plain is not None:
            decoder = self._session(plain, step_path, so, None)
        else:
            decoder = self._session(step, step_path, so, trt and trt["decoder_step"])
        del step  # the sessions hold the weights; the graph's bytes need not stay in memory too
        super().__init__(encoder, decoder, model.max_beam, model=model, device=device, precision=precision,
                         threads=threads, open_controlled=open_controlled if plain is not None else None)
        model.check_io(variant, {"encoder": session_io(self.encoder),
                                 (PLAIN_STEP if self.plain else "decoder_step"): session_io(self.decoder)})
        self._provider = self.decoder.get_providers()[0]
        self._cuda = None
        if io_binding if io_binding is not None else kind != "cpu":
            from captrt.runtime.engines.ort_cuda import CudaBinding

            self._cuda = CudaBinding(self.encoder, device_id, "cpu" if kind == "cpu" else "cuda")

    def _session(self, data: bytes, path: Any, so: ort.SessionOptions,
                 trt: dict[str, Any] | None) -> ort.InferenceSession:
        """A session of this engine's provider over a graph's bytes (trt: the TensorRT EP's options of that graph)."""
        if self.kind == "cpu":
            return cpu_session(data, path, so)
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
        providers = [("TensorrtExecutionProvider", {"device_id": self.device_id, **trt}), cuda] if trt else [cuda]
        from captrt.runtime.engines.cuda_setup import quiet_onnxruntime

        try:
            with quiet_onnxruntime():  # its multi-line provider warnings would bury our one line
                session = ort.InferenceSession(data, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            why = self._gpu_problem()
            raise EngineUnavailableError(f"device='cuda': {why}" if why else
                                         f"{path}: ONNX Runtime could not create a {self.kind} session: {exc}") from None
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
            resolved = self.resolve(tokens, controls, want_logp)
            return self._cuda.step(self.step_graph(resolved), state, np.ascontiguousarray(tokens, dtype=np.int64),
                                   np.ascontiguousarray(origin, dtype=np.int64), want_alpha,
                                   resolved.feeds() if resolved is not None else {}, want_logp)
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
        self.encoder = self.decoder = self._cuda = self._controlled = ClosedEngine()  # type: ignore[assignment]

    def describe(self) -> dict[str, Any]:
        facts = {**super().describe(), "providers": self.kind, "io_binding": self._cuda is not None,
                 "intra_op_num_threads": self.threads or os.cpu_count()}
        if self.cuda_setup is not None:  # what the GPU runs on: the driver and where each CUDA library came from
            facts["cuda_libraries"] = self.cuda_setup.facts()
        return facts
