"""A minimal reader of the ONNX protobuf wire format: enough to refuse external data and read shapes.

onnx is not a runtime dependency, so this walks the serialized ModelProto directly. It visits every
TensorProto a graph can hold (initializers, sparse initializers, Constant/attribute tensors,
subgraphs of If/Loop/Scan, local functions, training-info graphs) without copying tensor payloads.

Field numbers (onnx.proto3):
  ModelProto: 7 graph, 20 training_info, 25 functions
  GraphProto: 1 node, 5 initializer, 15 sparse_initializer
  NodeProto: 1 input, 2 output, 4 op_type, 5 attribute
  AttributeProto: 5 t, 6 g, 10 tensors, 11 graphs, 22 sparse_tensor, 23 sparse_tensors
  TensorProto: 1 dims, 8 name, 13 external_data, 14 data_location (1 = EXTERNAL)
  SparseTensorProto: 1 values, 2 indices
  FunctionProto: 7 node
  TrainingInfoProto: 1 initialization, 2 algorithm (GraphProto)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DEPTH = 64  # nesting of subgraphs; deeper is malformed or hostile


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    external: bool


@dataclass
class NodeInfo:
    op_type: str
    inputs: list[str]
    outputs: list[str]


@dataclass
class GraphSummary:
    """Every tensor and node found anywhere in the model (main graph first)."""

    tensors: list[TensorInfo] = field(default_factory=list)
    nodes: list[NodeInfo] = field(default_factory=list)  # main graph only
    initializers: dict[str, TensorInfo] = field(default_factory=dict)  # main graph only

    @property
    def external_tensors(self) -> list[str]:
        return [t.name or "<unnamed>" for t in self.tensors if t.external]


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise OnnxParseError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) where value is an int or a memoryview for LEN fields."""
    for num, wire, value, _, _ in field_spans(buf):
        yield num, wire, value


def field_spans(buf: memoryview) -> Iterator[tuple[int, int, object, int, int]]:
    """(field number, wire type, value, start, stop) of each field of one message: value as in _fields,
    buf[start:stop] the field's whole encoding (key included), for editors that copy fields verbatim."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _I64:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == _I32:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise OnnxParseError("truncated length-delimited field")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise OnnxParseError(f"unsupported wire type {wire}")
        if pos > end:
            raise OnnxParseError("truncated field")
        yield num, wire, value, start, pos


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _tensor(buf: memoryview) -> TensorInfo:
    name, dims, external = "", [], False
    for num, wire, value in _fields(buf):
        if num == 1 and wire == _VARINT:
            dims.append(_signed64(value))
        elif num == 1 and wire == _LEN:  # packed dims
            pos = 0
            while pos < len(value):
                d, pos = _varint(value, pos)
                dims.append(_signed64(d))
        elif num == 8 and wire == _LEN:
            name = bytes(value).decode("utf-8", "replace")
        elif num == 13 and wire == _LEN:
            external = True  # an external_data entry (location/offset/length) is present
        elif num == 14 and wire == _VARINT and value == 1:
            external = True
    return TensorInfo(name, tuple(dims), external)


def _sparse(buf: memoryview, out: GraphSummary) -> None:
    for num, wire, value in _fields(buf):
        if num in (1, 2) and wire == _LEN:
            out.tensors.append(_tensor(value))


def _attribute(buf: memoryview, out: GraphSummary, depth: int) -> None:
    for num, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if num in (5, 10):
            out.tensors.append(_tensor(value))
        elif num in (6, 11):
            _graph(value, out, depth + 1, main=False)
        elif num in (22, 23):
            _sparse(value, out)


def _node(buf: memoryview, out: GraphSummary, depth: int) -> NodeInfo:
    op, inputs, outputs = "", [], []
    for num, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if num == 1:
            inputs.append(bytes(value).decode("utf-8", "replace"))
        elif num == 2:
            outputs.append(bytes(value).decode("utf-8", "replace"))
        elif num == 4:
            op = bytes(value).decode("utf-8", "replace")
        elif num == 5:
            _attribute(value, out, depth)
    return NodeInfo(op, inputs, outputs)


def _graph(buf: memoryview, out: GraphSummary, depth: int, main: bool) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxParseError("subgraphs nested too deeply")
    for num, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if num == 1:
            node = _node(value, out, depth)
            if main:
                out.nodes.append(node)
        elif num == 5:
            info = _tensor(value)
            out.tensors.append(info)
            if main:
                out.initializers[info.name] = info
        elif num == 15:
            _sparse(value, out)


def scan_model(data: bytes) -> GraphSummary:
    """Walk a serialized ModelProto. Raises OnnxParseError when it is not one (no graph found)."""
    buf = memoryview(data)
    out = GraphSummary()
    found_graph = False
    for num, wire, value in _fields(buf):
        if wire != _LEN:
            continue
        if num == 7:
            _graph(value, out, 0, main=not found_graph)
            found_graph = True
        elif num == 20:  # TrainingInfoProto
            for n2, w2, v2 in _fields(value):
                if n2 in (1, 2) and w2 == _LEN:
                    _graph(v2, out, 1, main=False)
        elif num == 25:  # FunctionProto: its nodes may carry Constant tensors
            for n2, w2, v2 in _fields(value):
                if n2 == 7 and w2 == _LEN:
                    _node(v2, out, 1)
    if not found_graph:
        raise OnnxParseError("no graph in the file")
    return out


_SHAPE_ONLY = ("Reshape", "Flatten", "Unsqueeze", "Squeeze", "Cast", "Identity", "Expand", "Transpose")
_VALUE_PRESERVING = ("DequantizeLinear", "Cast", "Identity")


def embedding_rows(summary: GraphSummary, tokens_input: str = "tokens") -> int | None:
    """Rows of the table gathered by `tokens` (the word embedding: the graph's V), or None if not found.

    The Gather's indices may be `tokens` reshaped (exporters flatten (N, K) first); its data input
    is followed back through value-preserving nodes (DequantizeLinear, Cast, Identity) to an
    initializer, so quantized tables are found too.
    """
    derived = {tokens_input}
    for node in summary.nodes:  # nodes are topologically sorted in a valid ONNX graph
        if node.op_type in _SHAPE_ONLY and node.inputs and node.inputs[0] in derived:
            derived.update(node.outputs)
    producers = {o: n for n in summary.nodes for o in n.outputs}
    for node in summary.nodes:
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[1] not in derived:
            continue
        name = node.inputs[0]
        for _ in range(8):
            if name in summary.initializers:
                dims = summary.initializers[name].dims
                return int(dims[0]) if dims else None
            prev = producers.get(name)
            if prev is None or prev.op_type not in _VALUE_PRESERVING or not prev.inputs:
                break
            name = prev.inputs[0]
    return None
