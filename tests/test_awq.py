"""AWQ GEMM unpacking (bit order), and its lossless repacking into MatMulNBits, on hand-made tensors."""

import numpy as np
import pytest

from internvl_edge.checkpoint.awq import AWQ_PACK_ORDER, pack_int4_columns, unpack_awq, unpack_int4_columns
from internvl_edge.nets.quant import from_awq, quantize


def test_unpack_follows_autoawq_interleaved_order():
    # One int32 holding nibbles 0x0..0x7 in bit positions 0..7: AutoAWQ puts column order_map[i]
    # in nibble i, with order_map = [0, 2, 4, 6, 1, 3, 5, 7].
    word = sum(i << (4 * i) for i in range(8))
    got = unpack_int4_columns(np.array([[word]], dtype=np.int64).astype(np.int32))
    expected = np.zeros(8, np.uint8)
    for nibble, column in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
        expected[column] = nibble
    assert got.tolist() == [expected.tolist()]
    assert list(AWQ_PACK_ORDER) == [0, 2, 4, 6, 1, 3, 5, 7]


def test_unpack_high_nibble_is_unsigned():
    word = np.array([[np.uint32(0xF0000000).view(np.int32)]])  # nibble 7 = 15 -> column 7
    assert unpack_int4_columns(word)[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 15]


def test_pack_is_inverse_of_unpack():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 16, size=(5, 24), dtype=np.uint8)
    assert np.array_equal(unpack_int4_columns(pack_int4_columns(values)), values)


def test_dequantize_hand_example():
    # K=4 rows, N=8 columns, group 2: two groups of zero points and scales
    q = np.arange(32, dtype=np.uint8).reshape(4, 8) % 16
    z = np.array([[1] * 8, [2] * 8], dtype=np.uint8)
    s = np.array([[0.5] * 8, [0.25] * 8], dtype=np.float16)
    awq = unpack_awq(pack_int4_columns(q), pack_int4_columns(z), s, group_size=2)
    w = awq.dequantize()
    assert w[0, 3] == (3 - 1) * 0.5
    assert w[3, 7] == ((31 % 16) - 2) * 0.25
    assert w.shape == (4, 8)


def test_shapes_are_checked():
    with pytest.raises(ValueError):
        unpack_awq(np.zeros((4, 1), np.int32), np.zeros((3, 1), np.int32), np.zeros((2, 8), np.float16), 2)


def test_repacking_for_matmulnbits_is_lossless():
    rng = np.random.default_rng(1)
    k, n, g = 256, 16, 128
    q = rng.integers(0, 16, (k, n), dtype=np.uint8)
    z = rng.integers(0, 16, (k // g, n), dtype=np.uint8)
    s = (rng.random((k // g, n)) + 0.1).astype(np.float16)
    awq = unpack_awq(pack_int4_columns(q), pack_int4_columns(z), s, g)
    nb = from_awq(awq)
    assert nb.bits == 4 and nb.block_size == g and (nb.N, nb.K) == (n, k)
    assert np.array_equal(nb.values()[:, :k], q.T)  # the very same 4-bit values
    assert np.array_equal(nb.zeros(), z.T)
    assert np.array_equal(nb.dequantize(), awq.dequantize().T)
    # the MatMulNBits byte layout: element 2j in the low nibble, 2j+1 in the high nibble
    assert nb.packed[0, 0, 0] == (q[0, 0] | (q[1, 0] << 4))


def test_own_quantisation_error_is_bounded_and_zero_is_exact():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 100)).astype(np.float32)  # K not a multiple of the block
    nb = quantize(w, bits=4, block_size=32)
    err = np.abs(nb.dequantize() - w)
    step = nb.scales.repeat(32, axis=1)[:, :100]
    assert np.all(err <= step / 2 + 1e-6)  # round to nearest: at most half a step
    zeros = quantize(np.zeros((2, 64), np.float32), 4, 32)
    assert np.array_equal(zeros.dequantize(), np.zeros((2, 64)))


def test_our_4bit_scales_are_float16_values_where_float16_holds_them():
    """nets/quant.py rounds its scales to float16 (as AWQ stores them), so that our kernel keeps them as
    float16; scales below float16's normal range stay as computed; the codes follow the rounded scale."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256)).astype(np.float32) * 0.05
    w[3] *= 1e-4  # a row of tiny weights: scales below 2^-14
    nb = quantize(w, 4, 128)
    scales = nb.scales.reshape(16, 2)
    normal = np.abs(scales) >= 2.0**-14
    assert normal[0].all() and not normal[3].any()
    assert np.array_equal(scales[normal].astype(np.float16).astype(np.float32), scales[normal])
    exact = (w[3].reshape(2, 128).max(axis=1) - np.minimum(w[3].reshape(2, 128).min(axis=1), 0)) / 15
    np.testing.assert_allclose(scales[3], exact, rtol=1e-6)
    err = np.abs(nb.dequantize() - w)
    assert (err <= nb.scales.reshape(16, 2).repeat(128, axis=1) * 0.5001).all()  # half a step at most
