"""Batch invariance: a sequence's greedy tokens and logits (so its logprobs) do not depend, to the
last bit, on which other sequences share its decoder calls, where in the batch it sits, how its
prefill was split into chunks, or whether its prefix came from a cache (README, "Serving").

The engine-level tests drive the decoder as the server's engine does (backends.ort.OrtBackend: a batch-1
prefill copied into a slot of a batched cache, then one row per sequence per decode call) on a
checkpoint with hidden size 1024 and three layers, where a reduction order that followed the batch
would show. The kernel-level ones check the 4-bit linear and the attention op on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_attention_kernel import _run as _attention_run
from test_attention_kernel import _session as _attention_session
from test_kernels import _graph, _swiglu_graph

from internvl_edge import kernels
from internvl_edge.api import load
from internvl_edge.generate import prefill
from internvl_edge.nets.quant import quantize
from internvl_edge.sampling import log_softmax

needs_kernel = pytest.mark.skipif(kernels.library_path() is None, reason="our kernels are not available here")
STEPS = 10  # decode steps compared per case


@pytest.fixture(scope="module")
def backend(bundle):
    return load(bundle("mid_bf16", "w4bf16", seq_length=256)).backend


def _prompt(backend, seed: int, length: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(10, 800, size=(1, length))
    return backend.embed(ids)[0]


def _decode(backend, cache, tokens: dict[int, int], steps: int) -> dict[int, list[np.ndarray]]:
    """`steps` greedy decode calls of every slot in `tokens` (slot -> its next token) together; each
    slot's logits row per step."""
    rows = {slot: [] for slot in tokens}
    for _ in range(steps):
        ids, lens = np.zeros((cache.batch, 1), np.int64), np.zeros(cache.batch, np.int64)
        for slot, token in tokens.items():
            ids[slot, 0], lens[slot] = token, 1
        logits = backend.forward(cache, backend.embed(ids), lens)
        for slot in tokens:
            rows[slot].append(logits[slot].copy())
            tokens[slot] = int(np.argmax(logits[slot]))
    return rows


def _alone(backend, embeds: np.ndarray, chunks: list[int] | None = None):
    """(KV rows, first logits row, decode logits rows) of one sequence decoded in a batch of 1, its
    prefill in one call or in `chunks` calls of those sizes."""
    cache = backend.new_cache(1)
    if chunks is None:
        first = prefill(backend, cache, embeds).copy()
    else:
        at = 0
        for n in chunks + [len(embeds) - sum(chunks)]:
            first = backend.forward(cache, embeds[None, at : at + n], np.array([n]))[0].copy()
            at += n
    kv = [b[0, :, : len(embeds)].copy() for b in cache.buffers]
    return kv, first, _decode(backend, cache, {0: int(np.argmax(first))}, STEPS)[0]


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _same(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    for step, (x, y) in enumerate(zip(a, b, strict=True)):
        if not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            raise AssertionError(
                f"{what}: step {step} differs, max |diff| {np.abs(x - y).max():.3g}, "
                f"tokens {np.argmax(x)} / {np.argmax(y)}"
            )
        assert np.array_equal(log_softmax(x).view(np.uint32), log_softmax(y).view(np.uint32))


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("size,slot", [(4, 2), (8, 5), (8, 0)])
def test_greedy_logits_do_not_depend_on_the_batch(backend, size, slot):
    """The target alone, then in a batch of `size` at `slot` with other prompts of other lengths
    (each prefilled alone and copied into its slot, as the engine does; two of them in one batched
    prefill call too): the same logits to the last bit at every step."""
    target = _prompt(backend, 0, 45)
    _, first, alone = _alone(backend, target)
    cache, pre = backend.new_cache(size), backend.new_cache(1)
    tokens = {}
    for s in range(size):
        embeds = target if s == slot else _prompt(backend, 100 + s, 20 + 7 * s)
        pre.reset()
        row = prefill(backend, pre, embeds)
        backend.copy_slot(pre, 0, cache, s)
        tokens[s] = int(np.argmax(row))
    assert tokens[slot] == int(np.argmax(first))
    _same(_decode(backend, cache, tokens, STEPS)[slot], alone, f"batch of {size}, slot {slot}")


@needs_kernel
@pytest.mark.slow
def test_prefill_in_a_batch_chunked_or_after_a_cached_prefix_gives_the_same_kv_and_logits(backend):
    """The same prompt prefilled in one call, in chunks of 1, 7 and 30 rows (both attention paths),
    after its first 24 rows were copied from another cache (a reused prefix), and in one batched
    prefill call beside two other prompts: its KV rows, first logits and decode logits bit-identical."""
    target = _prompt(backend, 0, 45)
    kv, first, alone = _alone(backend, target)
    for chunks in ([1, 7], [30], [9, 9, 9]):
        kv_c, first_c, decoded = _alone(backend, target, chunks)
        for a, b in zip(kv, kv_c, strict=True):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"KV differs with chunks {chunks}"
        _same([first_c] + decoded, [first] + alone, f"prefill in chunks {chunks}")

    prefix = backend.new_cache(1)
    backend.forward(prefix, target[None, :24], np.array([24]))
    cache = backend.new_cache(1)
    backend.copy_slot(prefix, 0, cache, 0)
    row = backend.forward(cache, target[None, 24:], np.array([len(target) - 24]))[0].copy()
    _same([row] + _decode(backend, cache, {0: int(np.argmax(row))}, STEPS)[0], [first] + alone, "cached prefix")

    others = [_prompt(backend, 7, 60), _prompt(backend, 8, 12)]
    cache = backend.new_cache(4)
    embeds = np.zeros((4, 60, target.shape[1]), np.float32)
    for s, e in ((0, others[0]), (1, target), (3, others[1])):
        embeds[s, : len(e)] = e
    logits = backend.forward(cache, embeds, np.array([60, len(target), 0, 12]))
    row = logits[1].copy()
    kv_b = [b[1, :, : len(target)] for b in cache.buffers]
    for a, b in zip(kv, kv_b, strict=True):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), "KV differs in a batched prefill"
    tokens = {0: int(np.argmax(logits[0])), 1: int(np.argmax(row)), 3: int(np.argmax(logits[3]))}
    _same([row] + _decode(backend, cache, tokens, STEPS)[1], [first] + alone, "batched prefill")


@pytest.mark.slow
def test_float_bundle_is_batch_invariant_too(bundle):
    """A float bundle's linears are ONNX Runtime's MatMul (MLAS), not ours: invariant by observation on
    the CPUs tested, not by construction (README, "Serving"); this is that observation."""
    backend = load(bundle("mid_bf16", "f16", seq_length=256)).backend
    test_greedy_logits_do_not_depend_on_the_batch(backend, 8, 5)
    target = _prompt(backend, 0, 45)
    kv, first, alone = _alone(backend, target)
    kv_c, first_c, decoded = _alone(backend, target, [1, 7, 20])
    assert all(_bits_equal(a, b) for a, b in zip(kv, kv_c, strict=True))
    _same([first_c] + decoded, [first] + alone, "f16 bundle, prefill in chunks")


# -- the kernels on their own ------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize(
    "K,N,block,with_bias",
    [
        (1024, 200, 128, True),
        (1152, 64, 128, False),
        (768, 48, 256, True),
        (640, 70, 64, False),
        (1536, 96, 256, False),
    ],
)
def test_linear_row_is_the_same_alone_and_anywhere_in_a_batch(K, N, block, with_bias):
    """A row of the 4-bit linear, alone (decode's 8-column tiles) and at the start, middle and end of
    2 .. 300 rows (2-7: decode batches, on AVX-512 two rows per tile and an odd one alone; from 8 the
    prefill tiles, their remainders, more rows than one task): the same bits.
    N = 70 leaves columns past the last group of 8; blocks of 64 have no scale table; K = 1152 (9
    blocks of 128) and 768 (3 of 256): decode reduces blocks two at a time and an odd last one alone."""
    rng = np.random.default_rng(K + N)
    w = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 4, block)
    sess = _graph(w, kernels.DOMAIN, rng.standard_normal(N).astype(np.float32) if with_bias else None)
    target = rng.standard_normal(K).astype(np.float32)
    alone = sess.run(None, {"A": target[None, None]})[0][0, 0]
    for rows in (2, 3, 4, 5, 8, 9, 17, 300):
        a = rng.standard_normal((1, rows, K)).astype(np.float32) * rng.uniform(0.1, 10.0, (1, rows, 1)).astype(
            np.float32
        )
        for at in sorted({0, rows // 2, rows - 1}):
            a[0, at] = target
            assert _bits_equal(sess.run(None, {"A": a})[0][0, at], alone), f"row {at} of {rows} differs"
            a[0, at] = rng.standard_normal(K)


@needs_kernel
def test_fused_swiglu_row_is_the_same_alone_and_in_a_batch():
    rng = np.random.default_rng(5)
    w = quantize(rng.standard_normal((2 * 176, 512)).astype(np.float32) * 0.1, 4, 128)
    sess = _swiglu_graph(w, fused=True)
    target = rng.standard_normal(512).astype(np.float32)
    alone = sess.run(None, {"A": target[None, None]})[0][0, 0]
    for rows, at in ((3, 1), (4, 3), (9, 8), (40, 17)):
        a = rng.standard_normal((1, rows, 512)).astype(np.float32)
        a[0, at] = target
        assert _bits_equal(sess.run(None, {"A": a})[0][0, at], alone), f"row {at} of {rows} differs"


def _attention_case(seed: int = 0, heads: int = 12, kv_heads: int = 2, head_dim: int = 128, capacity: int = 160):
    rng = np.random.default_rng(seed)
    cos, sin = (rng.standard_normal((capacity, head_dim // 2)).astype(np.float32) for _ in range(2))
    sess = _attention_session(kernels.DOMAIN, heads, kv_heads, cos, sin)
    qkv = rng.standard_normal((1, 100, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    empty = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
    return sess, qkv, empty


def _attention_step(sess, qkv: np.ndarray, k: np.ndarray, v: np.ndarray, past: np.ndarray, real: np.ndarray):
    """One call over batch entries with `past` cached rows and `real` new ones each."""
    totals = past + real
    feeds = {
        "qkv": qkv,
        "seqlens_k": (np.maximum(totals, 1) - 1).astype(np.int32),
        "total": np.array(max(int(totals.max()), qkv.shape[1]), np.int32),
        "query_lens": real.astype(np.int32),
    }
    return _attention_run(sess, feeds, k, v, in_place=True)


def _chunked_attention_matches() -> bool:
    """A 100-row prompt's attention in one call and in chunks of 1, 7, 8, 30 and 54 rows (the row
    path and, unless batch invariance is off, the tiled one): outputs and KV rows the same bits."""
    sess, qkv, empty = _attention_case()
    whole, k_whole, v_whole = _attention_step(sess, qkv, empty, empty, np.array([0]), np.array([100]))
    k, v, at, parts = empty, empty, 0, []
    for n in (1, 7, 8, 30, 54):
        out, k, v = _attention_step(
            sess, np.ascontiguousarray(qkv[:, at : at + n]), k, v, np.array([at]), np.array([n])
        )
        parts.append(out)
        at += n
    return _bits_equal(np.concatenate(parts, axis=1), whole) and _bits_equal(k, k_whole) and _bits_equal(v, v_whole)


@needs_kernel
def test_attention_prefill_chunked_or_whole_gives_the_same_kv_and_outputs():
    assert _chunked_attention_matches()


@needs_kernel
def test_attention_opt_out_takes_the_tiled_prefill_path():
    """INTERNVL_EDGE_BATCH_INVARIANT=0 lets chunks of 8 rows or more take the tiled path, whose order
    differs: the check above then fails (so it does look at the path), in a child process since the
    library reads the variable once."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import test_batch_invariance as t; "
        "print(t._chunked_attention_matches())"
    )
    env = {**os.environ, "INTERNVL_EDGE_BATCH_INVARIANT": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


@needs_kernel
def test_attention_decode_row_is_the_same_alone_and_in_a_batch():
    """A decode row against its 60 cached rows, alone and as entry 3 of 5 entries with other
    histories (one idle): the same output bits."""
    sess, qkv, empty = _attention_case(1)
    rng = np.random.default_rng(2)
    k1, v1 = (rng.standard_normal(empty.shape).astype(np.float32) for _ in range(2))
    row = np.ascontiguousarray(qkv[:, :1])
    alone = _attention_step(sess, row, k1, v1, np.array([60]), np.array([1]))[0][0]
    k5, v5 = (rng.standard_normal((5,) + empty.shape[1:]).astype(np.float32) for _ in range(2))
    k5[3], v5[3] = k1[0], v1[0]
    rows = rng.standard_normal((5, 1, qkv.shape[2])).astype(np.float32)
    rows[3] = row[0]
    out = _attention_step(sess, rows, k5, v5, np.array([10, 100, 0, 60, 33]), np.array([1, 1, 0, 1, 1]))[0]
    assert _bits_equal(out[3], alone)
