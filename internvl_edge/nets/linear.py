"""Emitting weights and linear layers in the precision a bundle stores them in.

On the CPU every activation is float32. A weight is stored as float32, float16, bfloat16 (widened by
a Cast that ONNX Runtime folds when the session loads) or 4/8-bit blocks for `MatMulNBits`, whose
`accuracy_level=4` lets MLAS quantise the activations to int8 blocks and use the VNNI int8 kernels:
the fast path for memory-bound decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..checkpoint.safetensors import bf16_bits
from .graph import MS_DOMAIN, Graph
from .quant import Int8Weight, NBitsWeight

Weight = np.ndarray | NBitsWeight | Int8Weight  # float [N, K] (torch layout) or quantised

STORE_TYPES = {"f32": TensorProto.FLOAT, "f16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def stored(x: np.ndarray, store: str) -> tuple[np.ndarray, int]:
    """float32 data -> (array as written, ONNX element type) for a storage precision."""
    if store == "f32":
        return np.ascontiguousarray(x, dtype=np.float32), TensorProto.FLOAT
    if store == "f16":
        return np.ascontiguousarray(x, dtype=np.float16), TensorProto.FLOAT16
    if store == "bf16":
        return bf16_bits(x), TensorProto.BFLOAT16
    raise ValueError(f"unknown storage precision {store}")


def stored_rows(raw, store: str, rows: int = 1 << 14) -> tuple[np.ndarray, int]:
    """stored() of a checkpoint tensor (RawTensor), widened and rounded a block of rows at a time, so
    a large table (InternVL3-8B's embeddings: 1.1 GB in bf16) never exists as float32 whole."""
    elem = STORE_TYPES[store]
    out = None
    for start in range(0, raw.shape[0], rows):
        part, _ = stored(type(raw)(raw.dtype, raw.data[start : start + rows]).to_float32(), store)
        if out is None:
            out = np.empty(raw.shape, part.dtype)
        out[start : start + rows] = part
    return out, elem


def tensor(g: Graph, name: str, x: np.ndarray, store: str) -> str:
    """A float weight used as float32 by the graph, stored in `store` precision."""
    data, elem = stored(x, store)
    w = g.weight(name, data, elem)
    if elem == TensorProto.FLOAT:
        return w
    return g.op("Cast", [w], f"{name}/Cast", to=TensorProto.FLOAT)


@dataclass(frozen=True)
class Linear:
    """How a net emits its linear layers: float weights stored in `store` precision, 4/8-bit blocks run
    by MatMulNBits at `accuracy_level` (4: int8 activations, the fast path; 1: float32 activations)."""

    store: str  # f32 | f16 | bf16
    accuracy_level: int = 4

    def __call__(self, g: Graph, x: str, path: str, weight: Weight, bias: np.ndarray | None) -> str:
        """y = x @ W^T + b for W [N, K] (torch layout) or a quantised W. `path` is the module path."""
        if isinstance(weight, Int8Weight):
            return self._int8(g, x, path, weight, bias)
        if isinstance(weight, NBitsWeight):
            return self._nbits(g, x, path, weight, bias)
        wt = tensor(g, f"{path}.weight_t", np.ascontiguousarray(np.asarray(weight, np.float32).T), self.store)
        y = g.op("MatMul", [x, wt], f"/{path}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, _bias(g, path, bias)], f"/{path}/Add")
        return y

    def _int8(self, g: Graph, x: str, path: str, weight: Int8Weight, bias: np.ndarray | None) -> str:
        q = g.weight(f"{path}.weight_int8", weight.q)
        s = g.weight(f"{path}.scales", weight.scales)
        z = g.const(np.zeros(weight.q.shape[1], np.int8), dtype=np.int8)
        b = _bias(g, path, bias) if bias is not None else ""
        return g.op("DynamicQuantizeMatMul", [x, q, s, z, b], f"/{path}/DynamicQuantizeMatMul", domain=MS_DOMAIN)

    def _nbits(self, g: Graph, x: str, path: str, weight: NBitsWeight, bias: np.ndarray | None) -> str:
        w = g.weight(f"{path}.weight_q{weight.bits}", weight.packed)
        s = g.weight(f"{path}.scales", weight.scales.reshape(-1).astype(np.float32))
        z = g.weight(f"{path}.zero_points", weight.zero_points.reshape(-1))
        b = _bias(g, path, bias) if bias is not None else ""
        return g.op(
            "MatMulNBits",
            [x, w, s, z, "", b],
            f"/{path}/MatMulNBits",
            domain=MS_DOMAIN,
            K=weight.K,
            N=weight.N,
            bits=weight.bits,
            block_size=weight.block_size,
            accuracy_level=self.accuracy_level,
        )


def _bias(g: Graph, path: str, bias: np.ndarray) -> str:
    return g.weight(f"{path}.bias", np.asarray(bias, np.float32))


def rms_norm(g: Graph, x: str, path: str, weight: np.ndarray, eps: float) -> str:
    w = g.weight(f"{path}.weight", np.asarray(weight, np.float32))
    name = f"/{path}/SimplifiedLayerNormalization"
    return g.op("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=float(eps), stash_type=1)


def layer_norm(g: Graph, x: str, path: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> str:
    w = g.weight(f"{path}.weight", np.asarray(weight, np.float32))
    b = g.weight(f"{path}.bias", np.asarray(bias, np.float32))
    return g.op("LayerNormalization", [x, w, b], f"/{path}/LayerNormalization", axis=-1, epsilon=float(eps))
