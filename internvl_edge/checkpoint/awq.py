"""AutoAWQ "GEMM" int4 packing, unpacked exactly (no dequantise-requantise round trip).

AutoAWQ's WQLinear_GEMM stores, for a linear layer with K inputs and N outputs and group size G:
  qweight int32 [K, N/8]   eight 4-bit weights per int32, along N
  qzeros  int32 [K/G, N/8] eight 4-bit zero points per int32, along N
  scales  fp16  [K/G, N]
and W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], y = x @ W + bias.
Inside one int32 the eight columns are interleaved: nibble i (bits 4i..4i+3) holds column
AWQ_PACK_ORDER[i] of that group of eight.
https://github.com/casper-hansen/AutoAWQ/blob/main/awq/modules/linear/gemm.py (pack: order_map)
https://github.com/casper-hansen/AutoAWQ/blob/main/awq/utils/packing_utils.py (AWQ_REVERSE_ORDER)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_PACK_ORDER[i]
# nibble that holds column j: the inverse permutation (AutoAWQ's AWQ_REVERSE_ORDER)
AWQ_NIBBLE_OF_COLUMN = tuple(AWQ_PACK_ORDER.index(j) for j in range(8))


@dataclass
class AwqLinear:
    """One AWQ linear layer, unpacked to one uint8 per 4-bit value, layout [K, N] as AWQ keeps it."""

    q: np.ndarray  # uint8 [K, N], values 0..15
    zeros: np.ndarray  # uint8 [K/G, N], values 0..15
    scales: np.ndarray  # float16 [K/G, N]
    group_size: int

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 W [K, N] such that y = x @ W."""
        g = self.group_size
        z = np.repeat(self.zeros.astype(np.float32), g, axis=0)[: self.in_features]
        s = np.repeat(self.scales.astype(np.float32), g, axis=0)[: self.in_features]
        return (self.q.astype(np.float32) - z) * s


def unpack_int4_columns(packed: np.ndarray) -> np.ndarray:
    """int32 [R, C/8] in AWQ GEMM order -> uint8 [R, C] with values 0..15."""
    packed = np.ascontiguousarray(packed).view(np.uint32)
    rows, cols8 = packed.shape
    shifts = (4 * np.asarray(AWQ_NIBBLE_OF_COLUMN, dtype=np.uint32)).reshape(1, 1, 8)
    out = (packed[:, :, None] >> shifts) & 0xF
    return out.reshape(rows, cols8 * 8).astype(np.uint8)


def pack_int4_columns(values: np.ndarray) -> np.ndarray:
    """uint8 [R, C] (0..15) -> int32 [R, C/8] in AWQ GEMM order (the inverse of unpack)."""
    values = np.asarray(values, dtype=np.uint32)
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 columns per int32; got {cols} columns")
    grouped = values.reshape(rows, cols // 8, 8)
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        out |= grouped[:, :, column] << np.uint32(4 * nibble)
    return out.view(np.int32)


def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> AwqLinear:
    q = unpack_int4_columns(qweight)
    z = unpack_int4_columns(qzeros)
    k, n = q.shape
    groups = -(-k // group_size)
    if z.shape != (groups, n) or tuple(scales.shape) != (groups, n):
        raise ValueError(
            f"AWQ shapes disagree: qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape}, "
            f"group size {group_size}"
        )
    return AwqLinear(q=q, zeros=z, scales=np.asarray(scales, dtype=np.float16), group_size=group_size)
