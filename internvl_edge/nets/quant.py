"""Block-quantised weights in ONNX Runtime's `MatMulNBits` layout.

MatMulNBits computes Y = A @ dequant(B)^T with B logically [N, K] quantised in blocks of `block_size`
along K: B uint8 [N, n_blocks, block_size * bits / 8] (for 4 bits the even k in the low nibble),
scales [N * n_blocks], zero_points uint8 packed along the blocks (low nibble first for 4 bits).
https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits

Two sources: AWQ int4 tensors, repacked bit for bit (same values, zero points and scales: no
dequantise-requantise round trip); or float weights, quantised here with asymmetric round-to-nearest
per block, the range widened to include 0 as MLAS's blockwise quantiser does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checkpoint.awq import AwqLinear


@dataclass
class NBitsWeight:
    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, n_blocks] (8 bits) or [N, ceil(n_blocks / 2)] (4 bits)
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def values(self) -> np.ndarray:
        """The quantised integers, uint8 [N, n_blocks * block_size]."""
        if self.bits == 8:
            return self.packed.reshape(self.N, -1)
        lo = self.packed & 0x0F
        hi = self.packed >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.N, -1)

    def zeros(self) -> np.ndarray:
        """Zero points, uint8 [N, n_blocks]."""
        if self.bits == 8:
            return self.zero_points
        lo = self.zero_points & 0x0F
        hi = self.zero_points >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.N, -1)[:, : self.n_blocks]

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: the weight this node multiplies by."""
        q = self.values().astype(np.float32).reshape(self.N, self.n_blocks, self.block_size)
        z = self.zeros().astype(np.float32)[:, :, None]
        w = (q - z) * self.scales[:, :, None]
        return w.reshape(self.N, -1)[:, : self.K]


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] (0..15) -> uint8 [..., m], element 2j in the low nibble."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.ascontiguousarray(zeros, dtype=np.uint8)
    n, blocks = zeros.shape
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
    return _pack_nibbles(zeros)


def from_awq(awq: AwqLinear) -> NBitsWeight:
    """Repack AWQ's [K, N] int4 values into MatMulNBits' [N, blocks, bytes] layout, losslessly."""
    k, n, g = awq.in_features, awq.out_features, awq.group_size
    if k % g:
        raise ValueError(f"AWQ input features {k} are not a multiple of the group size {g}")
    q = np.ascontiguousarray(awq.q.T).reshape(n, k // g, g)  # [N, blocks, G]
    return NBitsWeight(
        packed=_pack_nibbles(q),
        scales=np.ascontiguousarray(awq.scales.T, dtype=np.float32),
        zero_points=_pack_zero_points(np.ascontiguousarray(awq.zeros.T), 4),
        K=k,
        N=n,
        bits=4,
        block_size=g,
    )


CHUNK_ELEMENTS = 1 << 24  # quantise this many weights at a time: the temporaries stay ~0.3 GB


def quantize(weight_nk, bits: int = 4, block_size: int = 64) -> NBitsWeight:
    """Asymmetric round-to-nearest quantisation of a float weight [N, K] in blocks along K. The weight
    is a float array or a checkpoint tensor (RawTensor: bf16/f16 rows widened a chunk at a time), and
    is quantised in chunks of rows, so memory beyond the result stays small whatever the matrix (the
    lm_head of InternVL3-8B is 151674 x 3584: 2.2 GB in float32, ~4x that in whole-matrix temporaries)."""
    n, k = weight_nk.shape
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    if n <= rows:
        return _quantize_rows(_float_rows(weight_nk, 0, n), bits, block_size)
    parts = [_quantize_rows(_float_rows(weight_nk, i, min(i + rows, n)), bits, block_size) for i in range(0, n, rows)]
    return concat_outputs(parts)


def _float_rows(weight_nk, start: int, stop: int) -> np.ndarray:
    from ..checkpoint.safetensors import RawTensor

    if isinstance(weight_nk, RawTensor):
        return RawTensor(weight_nk.dtype, weight_nk.data[start:stop]).to_float32()
    return np.asarray(weight_nk[start:stop], dtype=np.float32)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int) -> NBitsWeight:
    n, k = w.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:  # pad K; the padding quantises to exactly 0
        w = np.concatenate([w, np.zeros((n, blocks * block_size - k), np.float32)], axis=1)
    w = w.reshape(n, blocks, block_size)
    qmax = (1 << bits) - 1
    lo = np.minimum(w.min(axis=2), 0.0)
    hi = np.maximum(w.max(axis=2), 0.0)
    scale = (hi - lo) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    scale = _float16_where_normal(scale)  # never below the exact step: the codes' range still fits qmax
    zero = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(w / scale[:, :, None]) + zero[:, :, None], 0, qmax).astype(np.uint8)
    packed = q if bits == 8 else _pack_nibbles(q)
    return NBitsWeight(
        packed=np.ascontiguousarray(packed),
        scales=scale,
        zero_points=_pack_zero_points(zero.astype(np.uint8), bits),
        K=k,
        N=n,
        bits=bits,
        block_size=block_size,
    )


def _float16_where_normal(scale: np.ndarray) -> np.ndarray:
    """Scales rounded to float16 values where float16 holds them as normal numbers (2^-14 .. 65504;
    the rest stay as they are), as AWQ checkpoints store theirs: our kernel then keeps a weight's
    scales as float16 in the table it reads with the weights every token (2% fewer bytes per token on
    InternVL3-2B: q4gemm.h, docs/performance-notes.md "4-bit linears"). Rounded up (the scales are positive), by at most
    2^-10 of themselves, so that a block's range never needs more than the largest code; the codes
    are computed with the rounded scale."""
    half = scale.astype(np.float16)
    half = np.where(half.astype(np.float32) < scale, np.nextafter(half, np.float16(np.inf)), half)
    normal = (scale >= np.float32(2.0**-14)) & (scale <= np.float32(65504.0))
    return np.where(normal, half.astype(np.float32), scale).astype(np.float32)


@dataclass
class Int8Weight:
    """Symmetric int8 weights with one scale per output column, for ONNX Runtime's
    DynamicQuantizeMatMul: activations are quantised per call (uint8, one scale for the tensor) and
    multiplied with MLAS's int8 GEMM (VNNI). The fast path for large matmuls such as the vision
    encoder's 1025-row ones, where MatMulNBits' blockwise int8 kernel is 2-3x slower."""

    q: np.ndarray  # int8 [K, N]
    scales: np.ndarray  # float32 [N]


def quantize_int8_columns(weight_nk: np.ndarray) -> Int8Weight:
    w = np.asarray(weight_nk, dtype=np.float32).T  # [K, N]
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return Int8Weight(np.ascontiguousarray(q), scale)


def concat_outputs(parts: list[NBitsWeight]) -> NBitsWeight:
    """Several linears over the same input (q, k, v; gate, up) as one with their outputs stacked."""
    first = parts[0]
    if any((p.K, p.bits, p.block_size) != (first.K, first.bits, first.block_size) for p in parts):
        raise ValueError("cannot fuse linears with different K, bits or block sizes")
    return NBitsWeight(
        packed=np.concatenate([p.packed for p in parts], axis=0),
        scales=np.concatenate([p.scales for p in parts], axis=0),
        zero_points=np.concatenate([p.zero_points for p in parts], axis=0),
        K=first.K,
        N=sum(p.N for p in parts),
        bits=first.bits,
        block_size=first.block_size,
    )
