"""What the TensorRT engine does before it runs: import tensorrt/CUDA (lazily, `load_backend`), the
local engine cache's keys, building engines from the ONNX graphs with the optimization profiles of
trt_shapes, and reading the built engines' I/O. Cache keys are pure Python; the cache store and its
secret are engine-neutral (captrt.runtime.signing).

Serialized engines are executable artifacts: they are built on this machine, and a cached one is
deserialized only if its sidecar holds exactly the requested key (graph sha256, TensorRT version,
compute capability, precision, profile, settings) and an HMAC made with a secret that never leaves
this machine, so a model directory copied from elsewhere with a `cache/` inside rebuilds.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Mapping

import numpy as np

from captrt.runtime.engines.trt_shapes import IoTable, Profile, Shape
# Kept importable from here for the code and tests that name them so (tb.MAX_CONTROL_IDS, tb.profiles_for_model).
from captrt.runtime.engines.trt_shapes import MAX_CONTROL_IDS, profiles_for_model  # noqa: F401
from captrt.runtime.errors import EngineUnavailableError, ModelDirError
from captrt.runtime.signing import SignedCache, canonical

log = logging.getLogger("captrt.runtime.trt")


def install_hint(cuda_major: int | None = None) -> str:
    """What engine 'trt' needs; the wheels for the CUDA major version the rest of the install uses
    (ONNX Runtime's build; 12 when unknown), so TensorRT does not bring a second CUDA."""
    if cuda_major is None:
        from captrt.runtime.engines.cuda_setup import onnxruntime_cuda_major

        cuda_major = onnxruntime_cuda_major() or 12
    return (f"engine 'trt' needs NVIDIA TensorRT 10 and a CUDA GPU: pip install tensorrt-cu{cuda_major} cuda-python "
            "(from NVIDIA's index), or use --engine ort")


_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


# ---------------------------------------------------------------- backend loading

def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _err_name(cudart: Any, err: Any) -> str:
    try:
        name = cudart.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def cuda_call(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python (err, *values) tuple; raise RuntimeError naming the call on failure."""
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {_err_name(cudart, err)}")
    return rest[0] if len(rest) == 1 else (rest or None)


def cuda_device_problem(cudart: Any) -> str | None:
    """Why no CUDA GPU can be used here, or None when at least one is visible."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return f"no usable CUDA GPU (cudaGetDeviceCount: {_err_name(cudart, err)})"
    if count < 1:
        return "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES)"
    return None


def load_backend() -> tuple[Any, Any]:
    """(tensorrt, cudart) or EngineUnavailableError listing everything that is missing, the driver first.
    pip's CUDA and TensorRT libraries are loaded before the imports that link them (cuda_setup.prepare)."""
    from captrt.runtime.engines.cuda_libs import NO_DRIVER
    from captrt.runtime.engines.cuda_setup import prepare

    setup = prepare(tensorrt=True)
    problems: list[str] = [NO_DRIVER] if setup.driver is None else []
    trt = cudart = None
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        problems.append(f"the tensorrt package cannot be imported ({exc})")
    else:
        if int(str(trt.__version__).split(".")[0]) < 10:
            problems.append(f"TensorRT {trt.__version__} is too old (10.x needed)")
    try:
        cudart = _import_cudart()
    except (ImportError, OSError) as exc:
        problems.append(f"the CUDA Python bindings cannot be imported ({exc})")
    else:
        why = cuda_device_problem(cudart) if setup.driver is not None else None  # no driver: said above
        if why:
            problems.append(why)
    if problems:
        raise EngineUnavailableError(f"{install_hint()} (missing here: {'; '.join(problems)})")
    return trt, cudart


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger for every builder and runtime of the process."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            _LOGGER = trt.Logger(trt.Logger.WARNING)
        return _LOGGER


# ---------------------------------------------------------------- cache keys

def cache_key(*, graph: str, graph_sha256: str, precision: str, trt_version: str, compute_capability: str,
              profile: Profile, build: Mapping[str, Any]) -> dict[str, Any]:
    """Everything an engine depends on. `build` holds builder settings (typing, flags, workspace)."""
    return {"graph": graph, "graph_sha256": graph_sha256.lower(), "precision": precision, "tensorrt": trt_version,
            "compute_capability": compute_capability, "build": dict(build),
            "profile": {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())}}


def cache_name(key: Mapping[str, Any]) -> str:
    """File stem of an engine: the sha256 of the canonical key (the sidecar holds the key itself)."""
    return hashlib.sha256(canonical(key).encode("utf-8")).hexdigest()[:40]


# ---------------------------------------------------------------- building (needs tensorrt)

def _check_inputs(source: str, found: Mapping[str, Shape], profile: Profile) -> None:
    """The graph's inputs must be exactly the profile's, with fixed dims equal to the manifest's."""
    if set(found) != set(profile):
        raise ModelDirError(f"{source}: inputs {sorted(found)} differ from the model format's {sorted(profile)}")
    for name, dims in found.items():
        want = profile[name][2]
        if len(dims) != len(want) or any(d != -1 and d != w for d, w in zip(dims, want)):
            raise ModelDirError(f"{source}: input {name!r} has shape {list(dims)}, which does not fit "
                                f"{list(want)} from captrt.json (-1 is dynamic)")


def build_serialized_engine(trt: Any, logger: Any, onnx_bytes: bytes, *, source: str, profile: Profile,
                            strongly_typed: bool, fp16: bool, workspace_bytes: int,
                            timing_cache: bytes | None) -> tuple[bytes, bytes | None]:
    """Parse ONNX and build one engine with one optimization profile. Returns (engine, timing cache).

    strongly_typed: the graph's own types decide every precision (fp16/QDQ-int8 variants, and fp32);
    TensorRT's docs ask for strong typing with explicit (Q/DQ) quantization and forbid precision flags
    with it. fp16 (weak typing only): TensorRT may pick fp16 kernels per layer.
    API (TensorRT 10 Python docs / samples): Builder.create_network(flags), OnnxParser.parse,
    create_builder_config, set_memory_pool_limit(MemoryPoolType.WORKSPACE), create_optimization_profile,
    set_shape(name, min, opt, max), add_optimization_profile, create_timing_cache / set_timing_cache /
    get_timing_cache().serialize(), build_serialized_network (None on failure).
    """
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        shown = "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else "")
        raise EngineUnavailableError(f"{source}: TensorRT {trt.__version__} cannot parse this graph ({shown}); "
                                     "try another --precision or use --engine ort")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    _check_inputs(source, {t.name: tuple(t.shape) for t in inputs}, profile)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = None
    try:  # a damaged timing cache only costs build time: start from an empty one
        cache = config.create_timing_cache(timing_cache) if timing_cache else None
    except Exception as exc:
        log.warning("%s: ignoring an unreadable timing cache (%s)", source, exc)
    # ignore_mismatch=False: entries from another GPU or TensorRT version are not applied.
    config.set_timing_cache(cache or config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineUnavailableError(f"{source}: TensorRT {trt.__version__} failed to build an engine "
                                     "(see the TensorRT log above); try another --precision or --engine ort")
    new_cache = config.get_timing_cache()
    cache_bytes = bytes(memoryview(new_cache.serialize())) if new_cache is not None else None
    return bytes(memoryview(serialized)), cache_bytes


def load_or_build_engine(trt: Any, runtime: Any, cache: SignedCache | None, model: Any, graph: str, *,
                         source_precision: str, key: dict[str, Any], profile: Profile,
                         build: Mapping[str, Any]) -> tuple[Any, str]:
    """(ICudaEngine, "cached" | "built"): a verified cache entry for `key`, else a fresh local build
    (stored in the cache together with the updated timing cache)."""
    name = cache_name(key)
    blob = cache.load(name, key) if cache else None
    if blob is not None:
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is not None:
            return engine, "cached"
        log.warning("cached TensorRT engine %s did not deserialize; rebuilding", name)
    source = str(model.graph_path(source_precision, graph))
    onnx = model.read_graph(source_precision, graph)  # sha256-checked bytes, external data refused
    log.info("building the TensorRT engine for %s; this takes a while once, then it is cached", source)
    tkey = {"kind": "timing-cache", "tensorrt": key["tensorrt"], "compute_capability": key["compute_capability"]}
    tname = "timing-" + cache_name(tkey)[:16]
    blob, timing = build_serialized_engine(
        trt, trt_logger(trt), onnx, source=source, profile=profile, strongly_typed=build["strongly_typed"],
        fp16=build["fp16_flag"], workspace_bytes=build["workspace_bytes"],
        timing_cache=cache.load(tname, tkey) if cache else None)
    try:
        if cache:
            cache.store(name, key, blob)
            if timing:
                cache.store(tname, tkey, timing)
    except OSError as exc:  # the engine is built: run it, just uncached
        log.warning("cannot write the TensorRT cache in %s: %s", cache.directory, exc)
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise EngineUnavailableError(f"{source}: TensorRT could not deserialize the engine it just built")
    return engine, "built"


def engine_io(trt: Any, engine: Any) -> IoTable:
    """An engine's I/O tensors. Dtypes are the engine's own (TopK indices may be int32, not int64)."""
    table: IoTable = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = engine.get_tensor_dtype(name)
        try:  # some 10.x releases' trt.nptype has no int64 entry
            dtype = np.dtype(np.int64 if kind == getattr(trt, "int64", object()) else trt.nptype(kind))
        except TypeError:
            raise EngineUnavailableError(f"TensorRT tensor {name!r} has dtype {kind}, which numpy cannot hold; "
                                         "use another --precision") from None
        table[name] = (engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, dtype,
                       tuple(engine.get_tensor_shape(name)))
    return table
