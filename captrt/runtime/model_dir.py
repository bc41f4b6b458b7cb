"""Read and validate a model directory (docs/model-format.md, format versions 1 and 2).

`ModelDir.load` checks the manifest, the vocabulary and that every listed graph file exists;
`read_graph` returns a graph's bytes after checking its sha256 and refusing external data, so the
bytes that were verified are exactly the bytes the engine loads (no check-then-open race).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captrt.checks import check_int
from captrt.files import kind_of, read_regular
from captrt.runtime import graph_contract
from captrt.runtime.errors import ModelDirError
# The graphs' tensors are declared in graph_contract; their names stay importable from here, beside the directory's.
from captrt.runtime.graph_contract import (CONTROL_INPUTS, DECODER_INPUTS, DECODER_OUTPUTS,  # noqa: F401
                                           DECODER_STATE_INPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, GRAPHS,
                                           LOGP_OUTPUT, PLAIN_STEP)
from captrt.runtime.onnx_scan import OnnxParseError, embedding_rows, scan_model
from captrt.vocab import Vocab

# Precisions an engine computes in itself, with no graphs of their own in the model directory: OpenVINO
# runs the fp32 graphs in bf16 (INFERENCE_PRECISION_HINT), or the fp32 encoder in bf16 with the int8
# variant's step ("bf16-int8"). Every other precision names a graph variant.
ENGINE_PRECISIONS = {"bf16": ("openvino",), "bf16-int8": ("openvino",)}
# The graph variant an engine precision needs in the model directory (its step's: the encoder is fp32's).
ENGINE_VARIANTS = {"bf16": "fp32", "bf16-int8": "int8"}

FORMAT = "captrt-model"
FORMAT_VERSION = 2  # what the exporter writes: 2 added the step graph's decoding controls
READABLE_VERSIONS = (1, 2)  # version 1 directories still load and decode the default path
MAX_STEPS = 50  # default decoding length recorded by the exporter (the seed's 50)
MANIFEST = "captrt.json"
_MODEL_INT_FIELDS = ("enc_size", "image_size", "encoder_dim", "attention_dim", "embed_dim", "decoder_dim", "vocab_size")


@dataclass
class ModelDir:
    """A validated model directory. Fields mirror captrt.json; `manifest` keeps the whole dict."""

    path: Path
    manifest: dict[str, Any]
    vocab: Vocab
    grid: int
    max_beam: int
    max_steps: int
    image_size: int
    dims: dict[str, int]  # the manifest's "model" integers: encoder_dim, decoder_dim, vocab_size, ...
    graphs: dict[str, dict[str, dict[str, str]]]  # precision -> graph -> {"file", "sha256"}
    manifest_sha256: str = ""  # of captrt.json's bytes: it lists every graph's sha256, so it names the model
    _verified: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def model_id(self) -> str:
        """'<directory name>@<first 12 hex of captrt.json's sha256>': changes whenever any graph changes."""
        return f"{self.path.name}@{self.manifest_sha256[:12]}"

    @property
    def format_version(self) -> int:
        return int(self.manifest.get("format_version", FORMAT_VERSION))

    @property
    def controls(self) -> bool:
        """True when the step graph takes decoding controls (format version 2 and later)."""
        return self.format_version >= 2

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.graphs)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_pixels(self) -> int:
        return self.grid * self.grid

    @property
    def sizes(self) -> dict[str, int]:
        """The graphs' fixed dimensions (captrt.runtime.graph_contract), from captrt.json."""
        return graph_contract.sizes(image_size=self.image_size, num_pixels=self.num_pixels,
                                    encoder_dim=self.dims["encoder_dim"], attention_dim=self.dims["attention_dim"],
                                    decoder_dim=self.dims["decoder_dim"], max_beam=self.max_beam,
                                    vocab_size=self.vocab_size)

    def cache_dir(self, create: bool = True) -> Path:
        """MODEL_DIR/cache: TensorRT engines and timing caches (built locally, never shipped)."""
        d = self.path / "cache"
        if create:
            try:
                d.mkdir(exist_ok=True)
            except OSError as exc:
                raise ModelDirError(f"{d}: cannot create the engine cache directory: {exc}") from None
        return d

    def require_precision(self, precision: str) -> None:
        """Raise ModelDirError unless the graphs `precision` runs on are here. An engine precision (bf16:
        OpenVINO runs the fp32 graphs in bf16) needs the graphs of its variant (bf16: fp32's; bf16-int8: the
        int8 step beside the fp32 encoder); every other names a file variant."""
        precision = ENGINE_VARIANTS.get(precision, precision)
        refused = (self.manifest.get("refused") or {}).get(precision)
        if precision not in self.graphs and isinstance(refused, dict):
            raise ModelDirError(f"{self.manifest_path}: the {precision} variant was refused at export because it "
                                f"missed the quality budget: {refused.get('reason')} (captrt export --force writes it)")
        if precision not in self.graphs:
            raise ModelDirError(
                f"{self.manifest_path}: precision {precision!r} was not exported; this directory has "
                f"{', '.join(self.precisions)} (re-export with --{precision} to add it)")

    def graph_path(self, precision: str, graph: str) -> Path:
        """Path of `graph` ('encoder' | 'decoder_step') for `precision` (not yet verified: see read_graph)."""
        self.require_precision(precision)
        if precision not in self.graphs:
            raise ModelDirError(f"{self.manifest_path}: {precision!r} is an engine precision with no graph files of "
                                "its own; its engine reads the fp32 graphs")
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        return self.path / self.graphs[precision][graph]["file"]

    def read_graph(self, precision: str, graph: str) -> bytes:
        """The graph's bytes, after checking its sha256 against the manifest and refusing external data."""
        path = self.graph_path(precision, graph)
        try:
            data = read_regular(path)
        except OSError as exc:
            raise ModelDirError(f"{path}: cannot read graph: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        expected = self.graphs[precision][graph]["sha256"].lower()
        if digest != expected:
            raise ModelDirError(f"{path}: sha256 {digest} does not match captrt.json ({expected}); "
                                "the file was modified or corrupted: re-export the model")
        with self._lock:
            checked = self._verified.get((precision, graph)) == digest
        if not checked:
            self._check_graph(path, data, graph)
            with self._lock:
                self._verified[(precision, graph)] = digest
        return data

    def check_io(self, variant: str, ios: dict[str, tuple[list[str], list[str], int | None]]) -> None:
        """What an engine loaded follows the format (docs/model-format.md): per graph (input names,
        output names, cand_logp's static last dimension or None), exactly the format's inputs, at
        least its outputs, and C = captrt.json's max_beam. Raises ModelDirError naming each file."""
        problems = []
        for name, (inputs, outputs, cand) in ios.items():
            want = graph_contract.graph(name, self.format_version)  # PLAIN_STEP: format 1's step graph
            where = f"{self.graph_path(variant, 'decoder_step')} (cut without its decoding controls)" \
                if name == PLAIN_STEP else self.graph_path(variant, name)
            if sorted(inputs) != sorted(want.input_names):
                problems.append(f"{where}: inputs {inputs} (expected {list(want.input_names)} for format version "
                                f"{self.format_version})")
            missing = [n for n in want.output_names if n not in outputs]
            if missing:
                problems.append(f"{where}: outputs lack {missing}")
            if cand is not None and cand != self.max_beam:
                problems.append(f"{where}: returns {cand} candidates per beam but captrt.json max_beam is "
                                f"{self.max_beam}")
        if problems:
            raise ModelDirError(f"graphs do not follow the captrt format: {'; '.join(problems)}")

    def _check_graph(self, path: Path, data: bytes, graph: str) -> None:
        try:
            summary = scan_model(data)
        except OnnxParseError as exc:
            raise ModelDirError(f"{path}: not a valid ONNX model ({exc})") from None
        external = summary.external_tensors
        if external:
            shown = ", ".join(external[:5]) + (" ..." if len(external) > 5 else "")
            raise ModelDirError(f"{path}: refers to external data ({shown}); captrt model directories hold "
                                "self-contained graphs only (external data paths are a known attack vector)")
        if graph == "decoder_step":
            rows = embedding_rows(summary)
            if rows is not None and rows != self.vocab_size:
                raise ModelDirError(f"{path}: the graph's vocabulary has {rows} words but vocab.json has "
                                    f"{self.vocab_size}: vocab.json does not belong to this graph")

    @classmethod
    def load(cls, path: str | Path) -> "ModelDir":
        """Read MODEL_DIR/captrt.json and vocab.json; every problem is a ModelDirError naming the file/field."""
        root = Path(path)
        if not root.exists():
            raise ModelDirError(f"{root}: no such model directory")
        if not root.is_dir():
            raise ModelDirError(f"{root}: not a directory (expected a model directory from `captrt export`)")
        mpath = root / MANIFEST
        if mpath.exists() and not mpath.is_file():
            raise ModelDirError(f"{mpath}: not a regular file ({kind_of(mpath.stat().st_mode)})")
        if not mpath.is_file():
            raise ModelDirError(f"{mpath}: missing; {root} is not a captrt model directory "
                                "(create one with `captrt export`)")
        try:
            raw = read_regular(mpath)
            manifest = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelDirError(f"{mpath}: unreadable manifest: {exc}") from None
        if not isinstance(manifest, dict):
            raise ModelDirError(f"{mpath}: expected a JSON object")
        if manifest.get("format") != FORMAT:
            raise ModelDirError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        version = manifest.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ModelDirError(f"{mpath}: format_version {version!r} is not supported (this captrt reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))}); use a matching captrt version or "
                                "re-export the model")
        model_dir = cls._from_manifest(root, mpath, manifest)
        model_dir.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        return model_dir

    @classmethod
    def _from_manifest(cls, root: Path, mpath: Path, manifest: dict[str, Any]) -> "ModelDir":
        model = manifest.get("model")
        if not isinstance(model, dict):
            raise ModelDirError(f"{mpath}: 'model' must be an object")
        def positive(where: str, value: Any) -> int:
            return check_int(f"{mpath}: {where}", value, error=ModelDirError, expected=True)

        dims = {k: positive(f"model.{k}", model.get(k)) for k in _MODEL_INT_FIELDS}
        grid = positive("grid", manifest.get("grid"))
        max_beam = positive("max_beam", manifest.get("max_beam"))
        max_steps = positive("max_steps", manifest.get("max_steps", MAX_STEPS))
        if grid != dims["enc_size"]:
            raise ModelDirError(f"{mpath}: grid {grid} differs from model.enc_size {dims['enc_size']}")
        vocab = cls._load_vocab(root, mpath, manifest, dims["vocab_size"])
        graphs = cls._graphs(root, mpath, manifest)
        return cls(root, manifest, vocab, grid, max_beam, max_steps, dims["image_size"], dims, graphs)

    @staticmethod
    def _load_vocab(root: Path, mpath: Path, manifest: dict[str, Any], model_v: int) -> Vocab:
        spec = manifest.get("vocab")
        if not isinstance(spec, dict):
            raise ModelDirError(f"{mpath}: 'vocab' must be an object")
        name = spec.get("file", "vocab.json")
        if not isinstance(name, str) or Path(name).name != name:
            raise ModelDirError(f"{mpath}: vocab.file must be a plain file name inside the directory, got {name!r}")
        vpath = root / name
        try:
            vocab = Vocab.load(vpath)
        except ValueError as exc:
            raise ModelDirError(str(exc)) from None
        size = spec.get("size")
        if size != len(vocab):
            raise ModelDirError(f"{vpath}: has {len(vocab)} words but captrt.json vocab.size is {size!r}")
        if model_v != len(vocab):
            raise ModelDirError(f"{vpath}: has {len(vocab)} words but captrt.json model.vocab_size is {model_v}")
        for key in ("pad", "unk", "start", "end"):
            if key in spec and spec[key] != getattr(vocab, key):
                raise ModelDirError(f"{vpath}: <{key}> has id {getattr(vocab, key)} but captrt.json "
                                    f"vocab.{key} is {spec[key]!r}")
        return vocab

    @staticmethod
    def _graphs(root: Path, mpath: Path, manifest: dict[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
        graphs = manifest.get("graphs")
        if not isinstance(graphs, dict) or not graphs:
            raise ModelDirError(f"{mpath}: 'graphs' must be a non-empty object (precision -> graphs)")
        out: dict[str, dict[str, dict[str, str]]] = {}
        for precision, entry in graphs.items():
            if not isinstance(entry, dict):
                raise ModelDirError(f"{mpath}: graphs.{precision} must be an object")
            out[precision] = {}
            for graph in GRAPHS:
                spec = entry.get(graph)
                where = f"{mpath}: graphs.{precision}.{graph}"
                if not (isinstance(spec, dict) and isinstance(spec.get("file"), str)
                        and isinstance(spec.get("sha256"), str)):
                    raise ModelDirError(f"{where} must be {{'file': ..., 'sha256': ...}}")
                name = spec["file"]
                if Path(name).name != name or name in ("", ".", ".."):
                    raise ModelDirError(f"{where}.file must be a plain file name inside the directory, got {name!r}")
                if not (root / name).is_file():
                    what = "not a regular file" if (root / name).exists() else "missing"
                    raise ModelDirError(f"{root / name}: {what} (listed in captrt.json graphs.{precision}.{graph})")
                out[precision][graph] = {"file": name, "sha256": spec["sha256"]}
        return out
