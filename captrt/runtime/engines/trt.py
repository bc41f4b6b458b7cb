"""The native TensorRT engine: execute_async_v3 over device buffers that persist for a whole decode.

Per decode (`encode` ... `release`) one workspace of max-shape device buffers holds image, features,
att_proj, tokens/origin, the step outputs and two h and two c buffers (ping-pong: a step reads h[a]
and writes h[b], the next reads h[b]). Only tokens/origin go up and cand_logp/cand_ids (and alpha
when asked) come down; `select` compacts finished images' rows on the device. Each thread gets its
own execution contexts and CUDA stream (TensorRT: one context per thread); workspaces come from a
pool. Every call ends with a stream synchronize, so a state may change threads between calls.

tensorrt and cuda-python are imported lazily (trt_build.load_backend). APIs relied on, from
TensorRT 10's Python docs and NVIDIA's samples/python/common_runtime.py: create_execution_context,
set_input_shape, set_tensor_address(name, int), execute_async_v3(stream_handle: int) (the binding
casts a size_t to cudaStream_t, hence int(stream)), get_tensor_shape; cuda.bindings.runtime calls
return (err, *values): cudaMalloc(size) -> ptr, cudaMemcpyAsync(dst, src, count, kind, stream).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from captrt.runtime import graph_contract as gc
from captrt.runtime.engines import trt_build as tb
from captrt.runtime.engines.trt_shapes import (REWRITTEN, SIDES, Shape, check_engine_io, profiles_for_model,
                                               workspace_buffers)
from captrt.runtime.engines.base import DecodeState, Engine, StepControls, StepOutput
from captrt.checks import check_int
from captrt.runtime.errors import EngineUnavailableError, ModelDirError
from captrt.runtime.signing import SignedCache, local_secret
from captrt.runtime.model_dir import ModelDir

log = logging.getLogger("captrt.runtime.trt")

OPTIONS = {"max_batch": 32, "opt_batch": None, "opt_beam": None, "workspace_mb": 1024, "cache_dir": None,
           "device_id": 0}
_ALIGN = 256  # TensorRT wants I/O addresses aligned; 256 bytes suits every dtype
_cuda = tb.cuda_call


def compaction_copies(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """In-place row compaction x[:m] = x[rows] as (src, dst, count) block copies, applied in order.

    rows is strictly increasing, so every row moves left (or stays). Runs of consecutive rows are
    copied in chunks of at most `shift` rows, so no copy overlaps itself (cudaMemcpy forbids it)
    and every source is read before any later copy writes over it.
    """
    copies: list[tuple[int, int, int]] = []
    i, m = 0, len(rows)
    while i < m:
        src = int(rows[i])
        j = i + 1
        while j < m and int(rows[j]) == src + (j - i):
            j += 1
        shift, run = src - i, j - i
        for off in range(0, run, max(shift, 1)) if shift > 0 else ():
            copies.append((src + off, i + off, min(shift, run - off)))
        i = j
    return copies


def _positive(options: dict[str, Any], name: str, allow_none: bool = False) -> Any:
    low = 0 if name == "device_id" else 1
    return check_int(name, options[name], low=low, allow_none=allow_none, expected=True,
                     what=f"an integer >= {low}{' or None' if allow_none else ''}")


# ---------------------------------------------------------------- device objects
class _Workspace:
    """One device allocation holding every buffer of a decode, at the profile's max shapes."""

    def __init__(self, cudart: Any, layout: dict[str, int], total: int, owner: int):
        self.base = int(_cuda(cudart, cudart.cudaMalloc(total), f"cudaMalloc({total} bytes)"))
        self.addr = {name: self.base + off for name, off in layout.items()}
        # Per side, each buffer by the tensor it holds: a state every step rewrites (h: h_a or h_b) by its side.
        self.sides = [{**self.addr, **{name: self.addr[name + side] for name in REWRITTEN}} for side in SIDES]
        self.owner, self.cur = owner, 0  # cur: the side of each rewritten state the next step reads
        self._free = weakref.finalize(self, cudart.cudaFree, self.base)  # also if never freed explicitly
        self._free.atexit = False  # the process exit frees device memory; no CUDA calls during shutdown

    def free(self) -> None:
        self.owner = None
        self._free()


class _Slot:
    """Per-thread execution contexts and stream, and the input shapes last set on each context."""

    def __init__(self, cudart: Any, enc: Any, dec: Any, stream: Any):
        self.enc, self.dec, self.stream, self.handle = enc, dec, stream, int(stream)
        self.shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.finalizer = weakref.finalize(self, cudart.cudaStreamDestroy, stream)
        self.finalizer.atexit = False


@dataclass
class TrtState(DecodeState):
    """DecodeState whose h/c/features/att_proj live in `workspace` on the GPU."""

    workspace: _Workspace | None = field(default=None, repr=False)
    releaser: Any = field(default=None, repr=False)


# ---------------------------------------------------------------- the engine

class TrtEngine(Engine):
    """TensorRT 10 engine. Options: max_batch (32), opt_batch (8), opt_beam (5), workspace_mb (1024),
    cache_dir (MODEL_DIR/cache), device_id (0)."""

    name = "trt"

    def __init__(self, model: ModelDir, *, device: str = "cuda", precision: str = "fp32", threads: int | None = None,
                 **options: Any):
        super().__init__(model, device=device, precision=precision, threads=threads)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"engine 'trt': unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
        if device != "cuda":
            raise EngineUnavailableError(f"engine 'trt' runs on NVIDIA GPUs only (device {device!r}): "
                                         "use --device cuda, or --engine ort on the CPU")
        opts = {**OPTIONS, **options}
        self.max_batch = _positive(opts, "max_batch")
        self._device_id = _positive(opts, "device_id")
        workspace = _positive(opts, "workspace_mb") << 20
        self._trt, self._cudart = trt, cudart = tb.load_backend()
        from captrt.runtime.engines.cuda_setup import prepare

        self.cuda_setup = prepare(tensorrt=True)  # done by load_backend: here for describe()
        self._closed = False
        _cuda(cudart, cudart.cudaSetDevice(self._device_id), f"cudaSetDevice({self._device_id})")
        attr = cudart.cudaDeviceAttr
        cc = [_cuda(cudart, cudart.cudaDeviceGetAttribute(a, self._device_id), "cudaDeviceGetAttribute")
              for a in (attr.cudaDevAttrComputeCapabilityMajor, attr.cudaDevAttrComputeCapabilityMinor)]
        self.compute_capability = f"{cc[0]}.{cc[1]}"
        self._profiles = profiles_for_model(model, max_batch=self.max_batch,
                                               opt_batch=_positive(opts, "opt_batch", True),
                                               opt_beam=_positive(opts, "opt_beam", True))
        if precision in model.graphs:  # the exporter's variant: its own types decide (strong typing)
            self._source, build = precision, {"strongly_typed": True, "fp16_flag": False}
        elif precision == "fp16" and "fp32" in model.graphs:  # no fp16 export: let TensorRT pick fp16 kernels
            self._source, build = "fp32", {"strongly_typed": False, "fp16_flag": True}
        else:
            model.require_precision(precision)  # raises ModelDirError naming the manifest
        self._build = {**build, "workspace_bytes": workspace}
        self._cache = self._open_cache(opts["cache_dir"])
        self._runtime = trt.Runtime(tb.trt_logger(trt))
        self.status: dict[str, str] = {}
        self._engines = {}
        for graph in ("encoder", "decoder_step"):
            key = tb.cache_key(graph=graph, graph_sha256=model.graphs[self._source][graph]["sha256"],
                               precision=precision, trt_version=str(trt.__version__),
                               compute_capability=self.compute_capability, profile=self._profiles[graph],
                               build={**self._build, "source_precision": self._source})
            self._engines[graph], self.status[graph] = tb.load_or_build_engine(
                trt, self._runtime, self._cache, model, graph, source_precision=self._source, key=key,
                profile=self._profiles[graph], build=self._build)
        self._io = {g: tb.engine_io(trt, e) for g, e in self._engines.items()}
        check_engine_io(self._io, model.max_beam, model.format_version)
        self._step_io, self._sizes = gc.graph("decoder_step", model.format_version), model.sizes
        # The step's outputs that a later step reads as its input (h_out -> h): they go to the other side's buffer.
        self._refill = {out: reader for reader, (_, out) in gc.CARRIED.items() if out}
        self._step_shapes: dict[tuple[int, int, int], tuple[list[tuple[str, Shape]], dict[str, Shape]]] = {}
        self._layout, self._arena = self._plan()
        self._local = threading.local()
        self._lock = threading.RLock()  # finalizers (state dropped during GC) may re-enter _give_back
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()
        self._pool: list[_Workspace] = []
        self._workspaces: list[_Workspace] = []

    @property
    def provider(self) -> str:
        return "tensorrt"

    @property
    def needs_verification(self) -> bool:
        # TensorRT chooses kernels (and TF32 for fp32 on Ampere and later) when it builds: every build is checked.
        return True

    # -------------------------------------------------------- building / loading

    def _open_cache(self, cache_dir: Any) -> SignedCache | None:
        if cache_dir is not None:
            path = Path(cache_dir)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ModelDirError(f"{path}: cannot create the TensorRT cache directory: {exc}") from None
        else:
            try:
                path = self.model.cache_dir(create=True)
            except ModelDirError as exc:  # e.g. a read-only model directory: still runs, rebuilds each time
                log.warning("%s; TensorRT engines will not be cached (pass cache_dir=...)", exc)
                return None
        return SignedCache(path, local_secret())

    def _plan(self) -> tuple[dict[str, int], int]:
        """One workspace's layout (name -> byte offset) and size (workspace_buffers)."""
        layout, total = {}, 0
        for name, (shape, dtype) in workspace_buffers(self.model, self._io, self.max_batch).items():
            layout[name] = total
            total += -(-int(np.prod(shape)) * dtype.itemsize // _ALIGN) * _ALIGN
        return layout, total

    # -------------------------------------------------------- per-thread and per-decode resources

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("engine 'trt' is closed")

    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            self._check_open()
            cudart = self._cudart
            _cuda(cudart, cudart.cudaSetDevice(self._device_id), "cudaSetDevice")  # per thread in CUDA
            stream = _cuda(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                           "cudaStreamCreateWithFlags")
            enc = self._engines["encoder"].create_execution_context()
            dec = self._engines["decoder_step"].create_execution_context()
            if enc is None or dec is None:
                cudart.cudaStreamDestroy(stream)
                raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
            slot = self._local.slot = _Slot(cudart, enc, dec, stream)
            with self._lock:
                self._slots.add(slot)
        return slot

    def _acquire(self) -> _Workspace:
        with self._lock:
            self._check_open()
            if self._pool:
                return self._pool.pop()
        ws = _Workspace(self._cudart, self._layout, self._arena, id(self))
        with self._lock:
            self._workspaces.append(ws)
        return ws

    def _give_back(self, ws: _Workspace) -> None:
        with self._lock:
            if not self._closed and ws.owner is not None:
                ws.cur = 0
                self._pool.append(ws)

    def _live(self, state: DecodeState) -> _Workspace:
        self._check_open()
        ws = state.workspace if isinstance(state, TrtState) else None
        if ws is None or ws.owner != id(self):
            raise ValueError("state: not a live decode state of this TensorRT engine (released, or from another engine)")
        return ws

    # -------------------------------------------------------- transfers and execution

    def _set_shape(self, slot: _Slot, which: str, name: str, shape: tuple[int, ...]) -> None:
        if slot.shapes.get((which, name)) != shape:  # re-setting an unchanged shape is skipped
            if not (slot.enc if which == "enc" else slot.dec).set_input_shape(name, shape):
                raise ValueError(f"{name}: shape {shape} is outside the TensorRT profile "
                                 f"(max_batch={self.max_batch}, max_beam={self.model.max_beam})")
            slot.shapes[(which, name)] = shape

    def _copy(self, slot: _Slot, dst: int, src: int, nbytes: int, kind: str) -> None:
        cudart = self._cudart
        k = getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}")
        _cuda(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, k, slot.stream), f"cudaMemcpyAsync({kind})")

    def _download(self, slot: _Slot, src: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._copy(slot, out.ctypes.data, src, out.nbytes, "DeviceToHost")
        return out

    def _run(self, slot: _Slot, ctx: Any, addresses: dict[str, int], what: str) -> None:
        for name, addr in addresses.items():
            ctx.set_tensor_address(name, addr)
        if not ctx.execute_async_v3(slot.handle):
            raise RuntimeError(f"TensorRT {what}: execute_async_v3 failed (see the TensorRT log)")

    @contextlib.contextmanager
    def _on_stream(self, slot: _Slot, uploads: Sequence[tuple[int, np.ndarray]] = ()) -> Iterator[None]:
        """Upload (device address, host array) pairs, run the block, synchronize the stream. The
        CUDA docs ("API synchronization behavior") only say async copies from pageable memory *might*
        be synchronous, so the host arrays stay referenced until the stream is idle, even on errors."""
        try:
            for dst, arr in uploads:
                self._copy(slot, dst, arr.ctypes.data, arr.nbytes, "HostToDevice")
            yield
        finally:
            _cuda(self._cudart, self._cudart.cudaStreamSynchronize(slot.stream), "cudaStreamSynchronize")

    # -------------------------------------------------------- the Engine interface

    def encode(self, images: np.ndarray) -> TrtState:
        s = self.model.image_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images: expected uint8 (N, {s}, {s}, 3), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
        n = images.shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"images: batch {n} is outside 1..max_batch={self.max_batch} of this TensorRT engine "
                             "(create it with a larger max_batch, or send smaller batches)")
        slot, ws = self._slot(), self._acquire()
        host = np.ascontiguousarray(images, dtype=self._io["encoder"]["image"][1])
        try:
            with self._on_stream(slot, [(ws.addr["image"], host)]):
                self._set_shape(slot, "enc", "image", tuple(images.shape))
                # Each output lands where the first step reads it (h0/c0 (N, H): as h/c of shape (N, 1, H)).
                outputs = {source: ws.sides[0][reader] for reader, (source, _) in gc.CARRIED.items()}
                self._run(slot, slot.enc, {"image": ws.addr["image"], **outputs}, "encoder")
        except BaseException:
            self._give_back(ws)
            raise
        state = TrtState(batch=n, beams=1, workspace=ws)
        state.releaser = weakref.finalize(state, self._give_back, ws)  # also when a state is just dropped
        state.releaser.atexit = False
        return state

    def step(self, state: DecodeState, tokens: np.ndarray, origin: np.ndarray, *,
             want_alpha: bool = False, controls: StepControls | None = None, want_logp: bool = False) -> StepOutput:
        ws = self._live(state)
        n, kp, m = state.batch, state.beams, self.model
        for name, arr in (("tokens", tokens), ("origin", origin)):
            if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iu" or arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"{name}: expected an integer array (N={n}, K), got "
                                 f"{getattr(arr, 'dtype', type(arr).__name__)} {getattr(arr, 'shape', '')}")
        k, c = tokens.shape[1], m.max_beam
        if origin.shape != tokens.shape or not 1 <= k <= c:
            raise ValueError(f"tokens/origin: shapes {tokens.shape}/{origin.shape} must be equal (N, K), K in 1..{c}")
        # Out-of-range indices would make TensorRT's gathers read outside their tensors.
        if tokens.min() < 0 or tokens.max() >= m.vocab_size:
            raise ValueError(f"tokens: word ids must be in 0..{m.vocab_size - 1}")
        if origin.min() < 0 or origin.max() >= kp:
            raise ValueError(f"origin: slots must be in 0..{kp - 1} (the state holds {kp} beams)")
        io, slot = self._io["decoder_step"], self._slot()
        up_t = np.ascontiguousarray(tokens, dtype=io["tokens"][1])  # int32 if the engine says so
        up_o = np.ascontiguousarray(origin, dtype=io["origin"][1])
        uploads = [(ws.addr["tokens"], up_t), (ws.addr["origin"], up_o)]
        inputs, out_shapes = self._shapes_at(n, k, kp)
        shapes, read, write = list(inputs), ws.sides[ws.cur], ws.sides[1 - ws.cur]
        addresses = {name: read[name] for name, _ in inputs}
        for name, arr in self._control_arrays(n, k, controls, want_logp).items():
            up = np.ascontiguousarray(arr, dtype=io[name][1])
            uploads.append((ws.addr[name], up))
            shapes.append((name, up.shape))
            addresses[name] = ws.addr[name]
        with self._on_stream(slot, uploads):
            for name, shape in shapes:
                self._set_shape(slot, "dec", name, shape)
            cand = out_shapes["cand_logp"]
            if tuple(slot.dec.get_tensor_shape("cand_logp")) != cand:
                raise RuntimeError(f"TensorRT decoder_step: cand_logp is not {cand} for these inputs")
            # Every output needs an address (logp too: it comes down only when asked).
            outputs = {name: write[self._refill.get(name, name)] for name in out_shapes}
            self._run(slot, slot.dec, {**addresses, **outputs}, "decoder_step")

            def fetch(name: str) -> np.ndarray:
                return self._download(slot, ws.addr[name], out_shapes[name], io[name][1])

            logp, ids = fetch("cand_logp"), fetch("cand_ids")
            alpha = fetch("alpha") if want_alpha else None
            full = self.word_logp(fetch("logp")) if want_logp else None
        ws.cur, state.beams = 1 - ws.cur, k
        return StepOutput(logp.astype(np.float32, copy=False), ids.astype(np.int64, copy=False),
                          None if alpha is None else alpha.astype(np.float32, copy=False),
                          None if full is None else full.astype(np.float32, copy=False))

    def _shapes_at(self, n: int, k: int, kp: int) -> tuple[list[tuple[str, Shape]], dict[str, Shape]]:
        """The step's inputs but the controls (shaped by their lists), in order, and its outputs, with their shapes
        at batch n, beams k and incoming beams kp; remembered, as a decode repeats a few of them."""
        got = self._step_shapes.get((n, k, kp))
        if got is None:
            now = {**self._sizes, gc.BATCH.name: n, gc.BEAMS.name: k, gc.PREV_BEAMS.name: kp}
            got = self._step_shapes[(n, k, kp)] = (
                [(t.name, t.resolve(now)) for t in self._step_io.inputs if t.name in gc.DECODER_STATE_INPUTS],
                {t.name: t.resolve(now) for t in self._step_io.outputs})
        return got

    def _control_arrays(self, n: int, k: int, controls: StepControls | None, want_logp: bool) -> dict[str, np.ndarray]:
        """The control inputs to upload ({} for a format-1 engine), checked against the profile. The engine
        builds one TensorRT engine per graph, the format-2 step with its controls (neutral on the default
        path): a plain step graph beside it would be a second build for a few small kernels' work."""
        controls = self.step_controls(n, k, controls, want_logp)
        if controls is None:
            return {}
        for name, arr in (("ban_ids", controls.ban_ids), ("penalty_ids", controls.penalty_ids)):
            if arr.shape[:2] != (n, k) or not 1 <= arr.shape[2] <= tb.MAX_CONTROL_IDS:
                raise ValueError(f"{name}: shape {arr.shape}; this TensorRT profile takes (N={n}, K={k}, 1.."
                                 f"{tb.MAX_CONTROL_IDS}) ids per slot (fewer suppressed words, or a smaller "
                                 "no_repeat_ngram_size / max_steps)")
        return controls.feeds()

    def select(self, state: DecodeState, rows: np.ndarray) -> DecodeState:
        ws = self._live(state)
        n, kp = state.batch, state.beams
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and (rows.dtype.kind not in "iu" or rows[0] < 0 or rows[-1] >= n
                                             or np.any(np.diff(rows) <= 0))):
            raise ValueError(f"rows: expected strictly increasing image indices in 0..{n - 1}, got {rows!r}")
        copies = compaction_copies(rows.tolist())
        if copies:
            slot, io = self._slot(), self._io["decoder_step"]
            row = {**self._sizes, gc.BATCH.name: 1, gc.PREV_BEAMS.name: kp}  # one image's part of a carried tensor
            buffers = [(ws.sides[ws.cur][name],
                        int(np.prod(self._step_io.tensor(name).resolve(row))) * io[name][1].itemsize)
                       for name in gc.CARRIED]
            with self._on_stream(slot):  # device-to-device copies, in order on one stream
                for src, dst, count in copies:
                    for base, block in buffers:
                        self._copy(slot, base + dst * block, base + src * block, count * block, "DeviceToDevice")
        state.batch = int(rows.size)
        return state

    def release(self, state: DecodeState) -> None:
        if isinstance(state, TrtState) and state.releaser is not None:
            state.releaser()  # a weakref.finalize runs once: the workspace goes back to the pool
            state.workspace = None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            slots, workspaces = list(self._slots), self._workspaces
            self._pool, self._workspaces = [], []
        for slot in slots:  # contexts before engines before the runtime, as TensorRT requires
            slot.enc = slot.dec = None
            slot.finalizer()
        for ws in workspaces:
            ws.free()
        self._engines.clear()
        self._runtime = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_batch": self.max_batch, "tensorrt": str(self._trt.__version__),
                "compute_capability": self.compute_capability, "graphs": self._source, "engines": dict(self.status),
                "cache_dir": str(self._cache.directory) if self._cache else None,
                "cuda_libraries": self.cuda_setup.facts()}
