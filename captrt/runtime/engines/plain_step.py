"""The step graph without its decoding controls, cut at load time from a format-2 step graph's bytes.

The default path (no option that needs logit processing) feeds neutral controls, which leave fc's V + 1
logits exactly as they are, yet the processing still runs every step: ~20 small nodes and a scatter
over the logits, ~5% of a step at batch 1 (benchmarks/RESULTS.md, "Decoding controls"). The plain
step graph leaves them out:

- the scatter's output is replaced by its data input, the V + 1 logits. Under neutral controls the
  scatter writes -inf into column V, which fc's bias already set to -inf, and theta = 1 rewrites no
  real word, so its output equals its input bit for bit; log_softmax and TopK then see the very same
  numbers, and the candidates, scores and attention equal the format-2 graph's on the default path;
- Shape nodes that read the batch or beam count from a control input read it from `tokens`, which
  has those dimensions first too (tracers take a shape from whichever input shares the dimension);
- every node that then feeds no remaining output goes, with the control inputs, the `logp` output
  and initializers/value_info nobody uses any more.

The result has format 1's inputs and outputs (docs/model-format.md). It is cut from the verified
bytes (ModelDir.read_graph) by rewriting the protobuf wire format directly (onnx is not a runtime
dependency); fields are copied verbatim except the ones edited. Anything unexpected (no single
control-dependent scatter, a control input still needed, a subgraph) returns None, and the engine
runs the format-2 graph with neutral controls as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from captrt.runtime.graph_contract import CONTROL_INPUTS, LOGP_OUTPUT, leading_dims_shared
from captrt.runtime.onnx_scan import OnnxParseError, field_spans

_VARINT, _LEN = 0, 2
_TOKENS = "tokens"
# Per control input, the leading dimensions it shares with `tokens` (N, K): ban_ids/penalty_ids (N, K, .),
# penalty (N,).
_SHARED_DIMS = {name: leading_dims_shared(name, _TOKENS) for name in CONTROL_INPUTS}
# protobuf field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO, _GRAPH_SPARSE = 1, 5, 11, 12, 13, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_NAME, _ATTR_INT, _ATTR_GRAPH, _ATTR_GRAPHS = 1, 3, 6, 11
_NAMED_NAME, _TENSOR_NAME, _SPARSE_VALUES = 1, 8, 1


@dataclass
class _Node:
    raw: bytes
    op: str
    inputs: list[str]
    outputs: list[str]
    ints: dict[str, int] = field(default_factory=dict)  # integer attributes
    subgraph: bool = False


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | _LEN) + _varint(len(payload)) + payload


def _text(value: object) -> str:
    return bytes(value).decode("utf-8")  # type: ignore[arg-type]


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _node(raw: memoryview) -> _Node:
    node = _Node(bytes(raw), "", [], [])
    for num, wire, value, _, _ in field_spans(raw):
        if wire != _LEN:
            continue
        if num == _NODE_INPUT:
            node.inputs.append(_text(value))
        elif num == _NODE_OUTPUT:
            node.outputs.append(_text(value))
        elif num == _NODE_OP:
            node.op = _text(value)
        elif num == _NODE_ATTRIBUTE:
            name, number = "", None
            for n2, w2, v2, _, _ in field_spans(value):  # type: ignore[arg-type]
                if n2 == _ATTR_NAME and w2 == _LEN:
                    name = _text(v2)
                elif n2 == _ATTR_INT and w2 == _VARINT:
                    number = _signed(int(v2))  # type: ignore[arg-type]
                elif n2 in (_ATTR_GRAPH, _ATTR_GRAPHS):
                    node.subgraph = True  # a subgraph may read outer names implicitly: not cut
            if number is not None:
                node.ints[name] = number
    return node


def _with_inputs(node: _Node, inputs: list[str]) -> bytes:
    """The node's encoding with its inputs replaced (same count, same order), every other field verbatim."""
    out, i = bytearray(), 0
    buf = memoryview(node.raw)
    for num, wire, _, start, stop in field_spans(buf):
        if num == _NODE_INPUT and wire == _LEN:
            out += _len_field(_NODE_INPUT, inputs[i].encode())
            i += 1
        else:
            out += buf[start:stop]
    return bytes(out)


def _name_of(raw: memoryview, num: int) -> str:
    for n, wire, value, _, _ in field_spans(raw):
        if n == num and wire == _LEN:
            return _text(value)
    return ""


def plain_step_graph(data: bytes) -> bytes | None:
    """A format-2 step graph's bytes -> the same step without decoding controls (module docstring), or
    None when the graph is not one this cut understands (format 1, an older format 2, anything else)."""
    try:
        return _cut(memoryview(data))
    except (OnnxParseError, UnicodeDecodeError, IndexError, KeyError):
        return None


def _cut(buf: memoryview) -> bytes | None:
    model = list(field_spans(buf))
    graphs = [f for f in model if f[0] == _MODEL_GRAPH and f[1] == _LEN]
    if len(graphs) != 1:
        return None
    gbuf: memoryview = graphs[0][2]  # type: ignore[assignment]
    graph = list(field_spans(gbuf))
    nodes = {i: _node(f[2]) for i, f in enumerate(graph) if f[0] == _GRAPH_NODE and f[1] == _LEN}  # type: ignore[arg-type]
    inputs = {_name_of(f[2], _NAMED_NAME) for f in graph if f[0] == _GRAPH_INPUT}  # type: ignore[arg-type]
    outputs = [_name_of(f[2], _NAMED_NAME) for f in graph if f[0] == _GRAPH_OUTPUT]  # type: ignore[arg-type]
    controls = set(CONTROL_INPUTS)
    if not controls <= inputs or _TOKENS not in inputs or LOGP_OUTPUT not in outputs:
        return None
    # Shapes first: a batch or beam count read from a control input is read from `tokens` instead, so that
    # only the processing itself depends on the controls.
    new_inputs: dict[int, list[str]] = {}
    for i, node in nodes.items():
        if node.op == "Shape" and node.inputs and node.inputs[0] in controls:
            start, end = node.ints.get("start", 0), node.ints.get("end")
            if end is None or not 0 <= start < end <= _SHARED_DIMS[node.inputs[0]]:
                return None  # a dimension `tokens` does not have: not cut
            new_inputs[i] = [_TOKENS] + node.inputs[1:]
    # Tensors computed from a control input (nodes are topologically sorted in a valid graph).
    derived = set(controls)
    for i, node in nodes.items():
        if any(x in derived for x in new_inputs.get(i, node.inputs)):
            derived.update(node.outputs)
    scatters = [n for n in nodes.values() if n.op == "ScatterElements" and len(n.inputs) == 3
                and n.inputs[0] not in derived and (n.inputs[1] in derived or n.inputs[2] in derived)]
    if len(scatters) != 1:
        return None
    processed, logits = scatters[0].outputs[0], scatters[0].inputs[0]
    for i, node in nodes.items():  # every reader of the processed logits reads the logits
        ins = new_inputs.get(i, node.inputs)
        if processed in ins:
            new_inputs[i] = [logits if x == processed else x for x in ins]
    needed, keep = {o for o in outputs if o != LOGP_OUTPUT}, set()
    for i in sorted(nodes, reverse=True):
        node = nodes[i]
        if any(o in needed for o in node.outputs):
            if node.subgraph:
                return None
            keep.add(i)
            needed.update(x for x in new_inputs.get(i, node.inputs) if x)
    if needed & controls:
        return None  # a control input still feeds an output: the processing is not only the scatter's
    produced = {o for i in keep for o in nodes[i].outputs} | (inputs - controls)
    out = bytearray()
    for i, (num, _, value, start, stop) in enumerate(graph):
        name = _field_name(num, value)  # type: ignore[arg-type]
        if num == _GRAPH_NODE:
            if i in keep:
                out += _len_field(_GRAPH_NODE, _with_inputs(nodes[i], new_inputs[i])) if i in new_inputs \
                    else gbuf[start:stop]
        elif (num == _GRAPH_INPUT and name in controls) or (num == _GRAPH_OUTPUT and name == LOGP_OUTPUT) \
                or (num == _GRAPH_VALUE_INFO and name not in produced) \
                or (num in (_GRAPH_INITIALIZER, _GRAPH_SPARSE) and name not in needed):
            continue  # what only the processing used
        else:
            out += gbuf[start:stop]
    result = bytearray()
    for num, _, _, start, stop in model:
        result += _len_field(_MODEL_GRAPH, bytes(out)) if num == _MODEL_GRAPH else buf[start:stop]
    return bytes(result)


def _field_name(num: int, value: object) -> str:
    """The name a graph field declares: inputs/outputs/value_info (ValueInfoProto), initializers
    (TensorProto), sparse initializers (their values tensor's); "" for anything else."""
    if not isinstance(value, memoryview):
        return ""
    if num in (_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
        return _name_of(value, _NAMED_NAME)
    if num == _GRAPH_INITIALIZER:
        return _name_of(value, _TENSOR_NAME)
    if num == _GRAPH_SPARSE:
        for n, wire, v, _, _ in field_spans(value):
            if n == _SPARSE_VALUES and wire == _LEN:
                return _name_of(v, _TENSOR_NAME)  # type: ignore[arg-type]
    return ""
