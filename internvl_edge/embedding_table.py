"""The embedding net's table lookup in numpy, for the plain lookup the converter writes.

nets/heads.build_embedding writes the net as one Gather of the token table (axis 0) and, for a
half-precision table, a Cast of the gathered rows to float32 (and graph.py an Identity naming the
output). When a bundle's net is exactly that, the CPU backend reads the table's rows straight from
the bundle's data file (memory-mapped, as ONNX Runtime maps it) instead of running a session: right
after a decode step has streamed ~1 GB of weights through the caches, a session run of the net took
0.10 ms (median), the lookup 0.06 ms (`benchmarks/embedding_lookup.py`; docs/performance-notes.md, "Python
around the decoder"). Any other graph keeps the session.

The results are the same bits: a gather copies rows, and widening float16 or bfloat16 to float32 is
exact (bfloat16 is the upper half of a float32, as ONNX's Cast defines it).
https://onnx.ai/onnx/operators/onnx__Gather.html, https://onnx.ai/onnx/operators/onnx__Cast.html
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto

# how each table type is held: bfloat16 has no numpy type, so its 16-bit patterns are read as uint16
TABLE_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: np.uint16}


class TableLookup:
    """input_ids [...] -> float32 embeddings [..., hidden] from a [vocab, hidden] table."""

    def __init__(self, table: np.ndarray, bfloat16: bool):
        self.table = table
        self.bfloat16 = bfloat16
        self.vocab, self.hidden = table.shape

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        try:  # numpy's bounds are ONNX Gather's: [-vocab, vocab - 1], negative ones counting from the end
            rows = self.table[np.asarray(input_ids, dtype=np.int64)]  # a copy of the rows, ids.shape + (hidden,)
        except IndexError:
            raise ValueError(f"token ids must lie in [{-self.vocab}, {self.vocab - 1}]") from None
        if self.bfloat16:
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return rows.astype(np.float32, copy=False)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _table_array(tensor: onnx.TensorProto, folder: str) -> np.ndarray | None:
    """The initializer's data as a read-only array: memory-mapped from its external file, or from the
    graph's raw bytes; None for any other layout."""
    dtype = np.dtype(TABLE_DTYPES[tensor.data_type])
    shape = tuple(int(d) for d in tensor.dims)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if tensor.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        path = os.path.join(folder, info.get("location", ""))
        offset, length = int(info.get("offset", 0)), int(info.get("length", nbytes))
        if length != nbytes or not os.path.isfile(path) or os.path.getsize(path) < offset + nbytes:
            return None
        # a plain ndarray view: indexing a np.memmap makes memmap objects, a cost at every token
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape).view(np.ndarray)
    if len(tensor.raw_data) == nbytes:
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
    return None


def plain_table(path: str) -> TableLookup | None:
    """The lookup for the embedding net at `path` if it is a plain table lookup (one Gather along
    axis 0 of a 2-D float32/float16/bfloat16 initializer by the graph's one input, then a chain of
    at most one Cast to float32 and any Identity nodes ending in the graph's one output); None
    otherwise."""
    graph = onnx.load(path, load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1 or not graph.node:
        return None
    gather, *rest = graph.node
    table = inits.get(gather.input[0]) if gather.op_type == "Gather" and gather.domain in ("", "ai.onnx") else None
    if table is None or list(gather.input[1:]) != inputs or _attribute(gather, "axis", 0) != 0:
        return None
    if len(table.dims) != 2 or table.data_type not in TABLE_DTYPES:
        return None
    value, widened = gather.output[0], table.data_type == TensorProto.FLOAT
    for node in rest:  # graph.py names outputs through Identity nodes
        if node.domain not in ("", "ai.onnx") or list(node.input) != [value]:
            return None
        if node.op_type == "Cast" and not widened and _attribute(node, "to", 0) == TensorProto.FLOAT:
            widened = True
        elif node.op_type != "Identity":
            return None
        value = node.output[0]
    if not widened or value != graph.output[0].name:
        return None
    data = _table_array(table, os.path.dirname(path))
    if data is None:
        return None
    return TableLookup(data, bfloat16=table.data_type == TensorProto.BFLOAT16)
