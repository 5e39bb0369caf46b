"""Small helpers to emit ONNX graphs whose weights live in one page-aligned external-data file.

Nodes are named after the source module path (`/model/layers.3/attn/qkv_proj/MatMulNBits`) as in
onnxruntime-genai's builder, so a profile or an error points at the layer it came from. Weights are
streamed into `<net>.data` as they are produced (never all held in memory), each at a 4096-byte aligned
offset so ONNX Runtime can memory-map them; small constants are inlined and de-duplicated.
https://onnx.ai/onnx/repo-docs/ExternalData.html
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 21
MS_DOMAIN = "com.microsoft"
ALIGN = 4096
INLINE_LIMIT = 256  # bytes; smaller tensors stay inside the .onnx file

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}
ONNX_TYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
    TensorProto.UINT8: "uint8",
}


class WeightFile:
    """Appends tensor bytes to one external-data file at aligned offsets."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        self._f = open(path, "wb")
        self.size = 0

    def append(self, data: np.ndarray) -> tuple[int, int]:
        pad = -self.size % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.size += pad
        offset = self.size
        buf = np.ascontiguousarray(data)
        self._f.write(buf.data)
        self.size += buf.nbytes
        return offset, buf.nbytes

    def close(self) -> None:
        self._f.close()


class Graph:
    """Collects nodes, inputs, outputs and initializers of one ONNX graph."""

    def __init__(self, name: str, weights: WeightFile | None):
        self.name = name
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._names: set[str] = set()
        self.io: dict[str, list[dict]] = {"inputs": [], "outputs": []}

    # -- interface ---------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self.io["inputs"].append({"name": name, "dtype": ONNX_TYPE_NAMES[elem_type], "shape": list(shape)})
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        if value != name:
            self.op("Identity", [value], f"/output/{name}", outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        self.io["outputs"].append({"name": name, "dtype": ONNX_TYPE_NAMES[elem_type], "shape": list(shape)})
        return name

    # -- tensors -----------------------------------------------------------------------------------
    def weight(self, name: str, data: np.ndarray, onnx_type: int | None = None) -> str:
        """An initializer; `onnx_type` overrides the element type (BFLOAT16 passed as uint16 bits)."""
        data = np.asarray(data)
        elem = onnx_type if onnx_type is not None else NP_TO_ONNX[data.dtype]
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name}")
        self._names.add(name)
        if self.weights is None or data.nbytes <= INLINE_LIMIT:
            t = TensorProto()
            t.name = name
            t.data_type = elem
            t.dims.extend(data.shape)
            t.raw_data = np.ascontiguousarray(data).tobytes()
        else:
            offset, length = self.weights.append(data)
            t = TensorProto()
            t.name = name
            t.data_type = elem
            t.dims.extend(data.shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.weights.name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key = key
                entry.value = value
        self.initializers.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by every node that asks for the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"/const/{arr.dtype.name}_{len(self._consts)}"
            self._consts[key] = self.weight(name, arr)
        return self._consts[key]

    # -- nodes -------------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list, name: str, outputs: list | int = 1, domain: str = "", **attrs):
        """Add a node named `name` (a module path plus the op). Returns its output name, or the list of
        them when `outputs` is a count above one or a list of names; "" inputs are omitted optionals."""
        if isinstance(outputs, int):
            out_names = [f"{name}/output_{k}" for k in range(outputs)]
        else:
            out_names = list(outputs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(
            op_type, [i or "" for i in inputs], out_names, name=name, domain=domain or None, **attrs
        )
        self.nodes.append(node)
        return out_names[0] if len(out_names) == 1 and isinstance(outputs, int) else out_names

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="internvl-edge")
        model.ir_version = 10
        return model


def save(graph: Graph, path: str) -> None:
    """Write the .onnx file (weights are already in the external-data file)."""
    if graph.weights is not None:
        graph.weights.close()
    onnx.save_model(graph.model(), path)
