"""Checkpoint tensors in the layouts TPU-MLIR's top dialect reads.

- float linears: `top.MatMul` takes the right operand as [K, N] (the transpose of torch's [N, K]);
- 4-bit linears: `top.A16MatMul` with `right_transpose = true` takes qweight uint8 [N, K/2] (two values
  per byte, even k in the low nibble), scales [N, K/G] and zero points uint8 [N, K/G], and computes
  y = x @ ((q - z) * s)^T. AWQ values are repacked as published (as TPU-MLIR's ModelHandle.unpack_weights
  does); bf16/f16 sources are quantised here with nets/quant.py's round-to-nearest groups, so the CPU
  and Sophgo targets hold the very same 4-bit values and the tests can hand them to the reference;
- the scales are rounded to the half precision the chip computes in (bf16 for w4bf16, f16 for w4f16),
  so `dequantize()` is exactly the weight the chip multiplies by;
- rotary tables: cos/sin [seq, 1, head_dim] picked by position ids with `top.Gather` (the seed's
  LlmConverter.rotary_embedding layout), computed in float32 as transformers does.
https://github.com/sophgo/tpu-mlir/blob/master/python/llm/LlmConverter.py (linear, apply_rotary_pos)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..checkpoint.awq import AwqLinear
from ..checkpoint.reader import DenseLinear, QuantLinear
from ..checkpoint.safetensors import bf16_bits
from ..errors import UserError
from ..nets.decoder import rotary_tables
from ..nets.quant import quantize


@dataclass
class A16Weight:
    """A 4-bit linear as `top.A16MatMul` reads it (N outputs, K inputs, groups of G along K)."""

    qweight: np.ndarray  # uint8 [N, K/2]
    scales: np.ndarray  # float32 [N, K/G], already rounded to the compute precision
    zeros: np.ndarray  # uint8 [N, K/G]
    group_size: int

    @property
    def N(self) -> int:
        return self.qweight.shape[0]

    @property
    def K(self) -> int:
        return self.qweight.shape[1] * 2

    def values(self) -> np.ndarray:
        """uint8 [N, K], 0..15."""
        q = np.empty((self.N, self.K), np.uint8)
        q[:, 0::2] = self.qweight & 0x0F
        q[:, 1::2] = self.qweight >> 4
        return q

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: the weight the chip multiplies by (torch layout)."""
        g = self.group_size
        q = self.values().astype(np.float32).reshape(self.N, -1, g)
        w = (q - self.zeros.astype(np.float32)[:, :, None]) * self.scales[:, :, None]
        return w.reshape(self.N, self.K)


def round_to(x: np.ndarray, half: str) -> np.ndarray:
    """float32 values rounded to bf16 or f16 (and back to float32)."""
    x = np.asarray(x, np.float32)
    if half == "bf16":
        return (bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    if half == "f16":
        return x.astype(np.float16).astype(np.float32)
    return x


def _pack(values: np.ndarray) -> np.ndarray:
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def from_awq(awq: AwqLinear, half: str) -> A16Weight:
    """AWQ's [K, N] values, zero points and float16 scales, transposed to [N, ...], values unchanged."""
    k, g = awq.in_features, awq.group_size
    if k % g or k % 2:
        raise UserError(f"AWQ input features {k} are not a multiple of the group size {g}")
    return A16Weight(
        qweight=np.ascontiguousarray(_pack(np.ascontiguousarray(awq.q.T))),
        scales=round_to(np.ascontiguousarray(awq.scales.T), half),
        zeros=np.ascontiguousarray(awq.zeros.T, dtype=np.uint8),
        group_size=g,
    )


def quantize_a16(weight_nk: np.ndarray, group_size: int, half: str) -> A16Weight:
    n, k = weight_nk.shape
    if k % group_size:
        raise UserError(
            f"a linear layer with {k} inputs cannot be split into 4-bit groups of {group_size}; "
            "choose another -g/--q_group_size"
        )
    nb = quantize(weight_nk, 4, group_size)  # [N, blocks, G/2] packed like ours: even k in the low nibble
    return A16Weight(
        qweight=np.ascontiguousarray(nb.packed.reshape(n, k // 2)),
        scales=round_to(nb.scales, half),
        zeros=np.ascontiguousarray(nb.zeros()),
        group_size=group_size,
    )


def decoder_linear(
    lin: DenseLinear | QuantLinear, four_bit: bool, group_size: int, half: str
) -> np.ndarray | A16Weight:
    """A decoder linear as the target stores it: 4-bit groups, or float32 [N, K] (lowered to `half`)."""
    if isinstance(lin, QuantLinear):
        if four_bit:
            return from_awq(lin.awq, half)
        return np.ascontiguousarray(lin.awq.dequantize().T)
    w = lin.weight.to_float32()
    return quantize_a16(w, group_size, half) if four_bit else w


def rotary(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, 1, head_dim]: both halves repeat the frequencies (rotate_half layout)."""
    cos, sin = rotary_tables(head_dim, theta, positions)
    full = lambda t: np.concatenate([t, t], axis=1).reshape(positions, 1, head_dim)  # noqa: E731
    return full(cos), full(sin)
