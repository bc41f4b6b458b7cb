"""The graphs' tensors, declared once: every input and output of encoder.onnx and decoder_step.onnx with
its dtype and symbolic shape (the tables of docs/model-format.md), for format versions 1 and 2 and for the
plain step graph an engine cuts at load (captrt.runtime.engines.plain_step: format 1's inputs and outputs).

The exporter names the dynamic axes from here and checks what it traced against it, ModelDir.check_io
holds what an engine loaded to these names, and the TensorRT engine's optimisation profiles and device
workspace are shaped from it. Each axis is a dimension or the literal 3 (RGB). A dynamic dimension varies
from call to call and the ONNX graphs carry its name as their dim_param; a fixed one is a size of the
model directory (`sizes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Dim:
    name: str  # dynamic: the graphs' dim_param; fixed: its key in sizes()
    letter: str  # docs/model-format.md's symbol
    dynamic: bool


BATCH = Dim("batch", "N", True)
BEAMS = Dim("beams", "K", True)
PREV_BEAMS = Dim("prev_beams", "K_prev", True)  # beams of the incoming state: 1 at the first step (h0/c0)
BANNED = Dim("banned", "B", True)  # longest ban list of a slot this step (>= 1: padded with V)
PENALIZED = Dim("penalized", "R", True)  # longest repetition-penalty list of a slot this step
IMAGE_SIZE = Dim("image_size", "S", False)
PIXELS = Dim("pixels", "P", False)  # grid^2
ENCODER_DIM = Dim("encoder_dim", "E", False)
ATTENTION_DIM = Dim("attention_dim", "A", False)
DECODER_DIM = Dim("decoder_dim", "H", False)
CANDIDATES = Dim("candidates", "C", False)  # captrt.json's max_beam: a beam of K <= C keeps <= K words per parent
LOGP_COLUMNS = Dim("logp_columns", "V + 1", False)  # every word, then the padding column V (always -inf)
DYNAMIC_DIMS = (BATCH, BEAMS, PREV_BEAMS, BANNED, PENALIZED)


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy's name for the ONNX element type
    shape: tuple[Dim | int, ...]
    version: int = 1  # the model format version that added it (2: the decoding controls and logp)

    def dims(self, sizes: Mapping[str, int]) -> list[int | str]:
        """The shape as an ONNX graph declares it: fixed dimensions as numbers from `sizes`, dynamic ones by name."""
        return [axis if isinstance(axis, int) else sizes[axis.name] if not axis.dynamic else axis.name
                for axis in self.shape]

    def resolve(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape in numbers; `sizes` gives the dynamic dimensions too (e.g. a profile's maxima)."""
        return tuple(axis if isinstance(axis, int) else sizes[axis.name] for axis in self.shape)


@dataclass(frozen=True)
class Graph:
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.inputs + self.outputs if t.name == name)


N, K, KP, S, P, E, A, H = BATCH, BEAMS, PREV_BEAMS, IMAGE_SIZE, PIXELS, ENCODER_DIM, ATTENTION_DIM, DECODER_DIM
FORMAT_GRAPHS: dict[str, Graph] = {  # what the exporter writes (format version 2)
    "encoder": Graph(
        inputs=(Tensor("image", "uint8", (N, S, S, 3)),),  # RGB pixels; normalization is in the graph
        outputs=(Tensor("features", "float32", (N, P, E)), Tensor("att_proj", "float32", (N, P, A)),
                 Tensor("h0", "float32", (N, H)), Tensor("c0", "float32", (N, H)))),
    "decoder_step": Graph(
        inputs=(Tensor("tokens", "int64", (N, K)), Tensor("origin", "int64", (N, K)),
                Tensor("h", "float32", (N, KP, H)), Tensor("c", "float32", (N, KP, H)),
                Tensor("features", "float32", (N, P, E)), Tensor("att_proj", "float32", (N, P, A)),
                Tensor("ban_ids", "int64", (N, K, BANNED), 2), Tensor("penalty_ids", "int64", (N, K, PENALIZED), 2),
                Tensor("penalty", "float32", (N,), 2)),
        outputs=(Tensor("h_out", "float32", (N, K, H)), Tensor("c_out", "float32", (N, K, H)),
                 Tensor("alpha", "float32", (N, K, P)), Tensor("cand_logp", "float32", (N, K, CANDIDATES)),
                 Tensor("cand_ids", "int64", (N, K, CANDIDATES)), Tensor("logp", "float32", (N, K, LOGP_COLUMNS), 2))),
}
GRAPHS = tuple(FORMAT_GRAPHS)  # the graph files of a precision variant
PLAIN_STEP = "decoder_step_plain"  # the step graph cut without its decoding controls (format 1's I/O)
LATEST_VERSION = max(t.version for g in FORMAT_GRAPHS.values() for t in g.inputs + g.outputs)

# What a decode carries from one graph run to the next: step input -> (the encoder output that holds it before
# the first step, the step output that holds it after each step or None when no step changes it). An engine that
# keeps the state on a device gives each one buffer, and two to a state every step rewrites (read one, write
# the other), so these pairs must agree on dtype.
CARRIED = {"features": ("features", None), "att_proj": ("att_proj", None), "h": ("h0", "h_out"), "c": ("c0", "c_out")}


def graph(name: str, version: int = LATEST_VERSION) -> Graph:
    """The inputs and outputs of graph `name` ('encoder', 'decoder_step' or PLAIN_STEP) in format `version`."""
    if name == PLAIN_STEP:
        name, version = "decoder_step", 1
    full = FORMAT_GRAPHS[name]
    return Graph(tuple(t for t in full.inputs if t.version <= version),
                 tuple(t for t in full.outputs if t.version <= version))


def dynamic_axes(name: str, version: int = LATEST_VERSION) -> dict[str, dict[int, str]]:
    """Input name -> {axis: dimension name} of every dynamic input axis: what the exporter marks dynamic."""
    return {t.name: {i: axis.name for i, axis in enumerate(t.shape) if isinstance(axis, Dim) and axis.dynamic}
            for t in graph(name, version).inputs}


def sizes(*, image_size: int, num_pixels: int, encoder_dim: int, attention_dim: int, decoder_dim: int,
          max_beam: int, vocab_size: int) -> dict[str, int]:
    """The fixed dimensions of a model (its captrt.json, or the exporter's model config)."""
    return {IMAGE_SIZE.name: image_size, PIXELS.name: num_pixels, ENCODER_DIM.name: encoder_dim,
            ATTENTION_DIM.name: attention_dim, DECODER_DIM.name: decoder_dim, CANDIDATES.name: max_beam,
            LOGP_COLUMNS.name: vocab_size + 1}


def leading_dims_shared(name: str, other: str, graph_name: str = "decoder_step") -> int:
    """How many leading axes input `name` shares with input `other` (the same dimensions, in the same places)."""
    g = FORMAT_GRAPHS[graph_name]
    a, b = g.tensor(name).shape, g.tensor(other).shape
    count = 0
    while count < min(len(a), len(b)) and a[count] == b[count]:
        count += 1
    return count


# The names the engines feed and fetch, derived from the tables above.
ENCODER_INPUTS = FORMAT_GRAPHS["encoder"].input_names
ENCODER_OUTPUTS = FORMAT_GRAPHS["encoder"].output_names
DECODER_INPUTS = FORMAT_GRAPHS["decoder_step"].input_names
DECODER_STATE_INPUTS = graph("decoder_step", 1).input_names
# Format version 2's logit processing per slot, and its (N, K, V + 1) log-probs for prefixes and sampling.
CONTROL_INPUTS = tuple(n for n in DECODER_INPUTS if n not in DECODER_STATE_INPUTS)
DECODER_OUTPUTS = graph("decoder_step", 1).output_names  # what every step fetches
(LOGP_OUTPUT,) = (n for n in FORMAT_GRAPHS["decoder_step"].output_names if n not in DECODER_OUTPUTS)
