"""Our attention (internvl_edge/kernels/attention.c) against ONNX Runtime's GroupQueryAttention.

Both compute float32 causal attention with rotary embeddings over an in-place cache, so on the same
inputs they agree to float rounding: outputs and cache rows within 1e-5. Every case runs again with our
cache in float16 against ORT's on the same float16 values in float32: new cache rows within one float16
step, outputs within the rounding of the new keys and values. Cases cover decode (one row,
short and long contexts, chunk edges at 32 keys), prefill chunks from an empty cache and after history
(by default on the row path, batch invariance; with INTERNVL_EDGE_BATCH_INVARIANT=0 the tiled path
from 8 rows on, block edges at 16 and 64 keys, run again that way in a child process), right-padded
chunks (static bundles), batches whose entries have different histories and chunk lengths (the
server), head sizes 16/32/64/128, one query head per KV head, and a cache not bound in place (present
copied from past); Qwen3's per-head query/key norms as the decoder graph writes them (standard nodes
in front of ORT's op) against the same graph with the norms folded into ours. tests/test_kernels.py runs these
comparisons again on the AVX2 variant.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
from conftest import run_tests_in_child
from onnx import TensorProto, helper, numpy_helper

from internvl_edge import kernels

needs_kernel = pytest.mark.skipif(kernels.library_path() is None, reason="our kernels are not available here")
# where the runtime moves attention to our kernel (AVX-512; on AVX2 the op is tested but not used)
moves_attention = pytest.mark.skipif(
    kernels.isa() not in kernels.ATTENTION_ISAS, reason="attention stays on ORT's here"
)


def _session(domain: str, heads: int, kv_heads: int, cos: np.ndarray, sin: np.ndarray, cache=TensorProto.FLOAT):
    names = ["qkv", "past_k", "past_v", "seqlens_k", "total", "query_lens"]
    types = [TensorProto.FLOAT, cache, cache] + [TensorProto.INT32] * 3
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)]
    if domain == "com.microsoft":  # as nets/decoder.py writes it
        ins = ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"] + [""] * 7 + ["query_lens"]
        node = helper.make_node(
            "GroupQueryAttention",
            ins,
            ["out", "k", "v"],
            domain=domain,
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
    else:
        ins = ["qkv", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "query_lens"]
        node = helper.make_node(
            "GroupQueryAttention", ins, ["out", "k", "v"], domain=domain, num_heads=heads, kv_num_heads=kv_heads
        )
    graph = helper.make_graph(
        [node],
        "attention",
        inputs,
        [
            helper.make_tensor_value_info(n, t, None)
            for n, t in zip(("out", "k", "v"), (TensorProto.FLOAT, cache, cache), strict=True)
        ],
        [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if domain == kernels.DOMAIN:
        so.register_custom_ops_library(kernels.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(sess, feeds: dict, past_k: np.ndarray, past_v: np.ndarray, in_place: bool):
    if not in_place:
        return sess.run(None, {**feeds, "past_k": past_k, "past_v": past_v})
    k, v = past_k.copy(), past_v.copy()  # the runtime's binding: present written into past's buffer
    io = sess.io_binding()
    io.bind_output("out")  # first: get_outputs() lists outputs in the order they were bound
    for name, array in (("past_k", k), ("past_v", v)):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        io.bind_ortvalue_input(name, value)
        io.bind_ortvalue_output(name[-1], value)
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    sess.run_with_iobinding(io)
    return [io.get_outputs()[0].numpy(), k, v]


CASES = [  # (heads, kv_heads, head_dim, capacity, rows, past per entry, real rows per entry, in place)
    (12, 2, 128, 64, 1, [20], [1], True),  # decode
    (12, 2, 128, 2560, 1, [1499], [1], True),  # decode, long context
    (12, 2, 128, 128, 1, [63], [1], True),  # decode, keys filling whole chunks of 32
    (12, 2, 128, 128, 1, [32], [1], True),  # decode, one key past a chunk
    (12, 2, 128, 160, 37, [0], [37], True),  # prefill, tiled path
    (12, 2, 128, 256, 20, [50], [20], True),  # a chunk after history
    (12, 2, 128, 128, 64, [30], [50], True),  # right-padded chunk (static shapes), past a 64-key block
    (12, 2, 128, 64, 5, [3], [4], True),  # short padded chunk: row path
    (4, 2, 32, 128, 24, [3, 10, 0], [20, 24, 9], True),  # a batch of different lengths, tiled
    (4, 2, 32, 64, 1, [3, 40, 0], [1, 1, 0], True),  # batched decode with an idle entry
    (8, 8, 16, 200, 33, [7], [33], False),  # one query head per KV head, not in place
    (14, 2, 64, 96, 1, [70], [1], False),  # InternVL3-1B's heads, not in place
]


@needs_kernel
@pytest.mark.parametrize("cache", ["float32", "float16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,capacity,rows,past,real,in_place", CASES)
def test_matches_onnxruntime(heads, kv_heads, head_dim, capacity, rows, past, real, in_place, cache):
    """In float32 both agree to float rounding. With our cache in float16 (what the runtime uses for
    half-precision and 4-bit bundles), ORT's kernel runs on a float32 cache holding the same
    float16 values: the new cache rows are ORT's rounded to float16, and the outputs differ by the
    rounding of the new keys and values only."""
    rng = np.random.default_rng(heads * 100 + rows + capacity)
    batch = len(past)
    half = cache == "float16"
    cos, sin = (rng.standard_normal((capacity, head_dim // 2)).astype(np.float32) for _ in range(2))
    qkv = rng.standard_normal((batch, rows, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    past_k, past_v = (rng.standard_normal((batch, kv_heads, capacity, head_dim)).astype(cache) for _ in range(2))
    query_lens = np.array(real, np.int32)
    totals = np.array(past) + query_lens
    feeds = {
        "qkv": qkv,
        "seqlens_k": (np.maximum(totals, 1) - 1).astype(np.int32),
        "total": np.array(max(int(totals.max()), rows), np.int32),
        "query_lens": query_lens,
    }
    wide_k, wide_v = past_k.astype(np.float32), past_v.astype(np.float32)
    theirs = _run(_session("com.microsoft", heads, kv_heads, cos, sin), feeds, wide_k, wide_v, in_place)
    cache_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    ours = _run(_session(kernels.DOMAIN, heads, kv_heads, cos, sin, cache_type), feeds, past_k, past_v, in_place)
    assert ours[0].shape == theirs[0].shape == (batch, rows, heads * head_dim)
    assert ours[1].dtype == ours[2].dtype == np.dtype(cache)
    for b in range(batch):
        q, n = real[b], int(totals[b])
        # float16: the new keys' and values' rounding moves the outputs by up to ~2e-3 here
        atol, rtol = (5e-3, 1e-3) if half else (1e-5, 1e-5)
        np.testing.assert_allclose(ours[0][b, :q], theirs[0][b, :q], atol=atol, rtol=rtol)
        assert not ours[0][b, q:].any(), "padded rows must be zeros"
        # cache rows up to the new length: history kept, new rows rotated
        for mine, ref in zip(ours[1:], theirs[1:], strict=True):
            tolerance = 1e-3 if half else 1e-5  # within one float16 step either side
            ref = ref.astype(cache).astype(np.float32)
            np.testing.assert_allclose(mine[b, :, :n].astype(np.float32), ref[b, :, :n], atol=tolerance, rtol=tolerance)
            assert np.array_equal(mine[b, :, n:], (past_k if mine is ours[1] else past_v)[b, :, n:]), (
                "rows past the length are untouched"
            )


@needs_kernel
def test_tiled_prefill_path_matches_onnxruntime():
    """The same comparisons with batch invariance off, where chunks of 8 rows or more take the tiled
    path (the library reads the variable once per process: a child runs them)."""
    env = {**os.environ, "INTERNVL_EDGE_BATCH_INVARIANT": "0"}
    test = f"{os.path.abspath(__file__)}::test_matches_onnxruntime"
    run_tests_in_child([test], env)


@needs_kernel
def test_errors_are_reported():
    cos = sin = np.zeros((32, 16), np.float32)
    sess = _session(kernels.DOMAIN, 4, 2, cos, sin)
    cache = np.zeros((1, 2, 32, 32), np.float32)
    feeds = {
        "qkv": np.zeros((1, 1, 8 * 32), np.float32),
        "past_k": cache,
        "past_v": cache,
        "total": np.array(1, np.int32),
        "query_lens": np.array([1], np.int32),
    }
    with pytest.raises(Exception, match="does not fit 1 new rows in a cache of 32"):
        sess.run(None, {**feeds, "seqlens_k": np.array([40], np.int32)})
    with pytest.raises(Exception, match="qkv width 100 is not"):
        sess.run(None, {**feeds, "qkv": np.zeros((1, 1, 100), np.float32), "seqlens_k": np.array([0], np.int32)})


def _qk_norm_model(heads: int, kv_heads: int, head_dim: int, capacity: int, eps: float):
    """Qwen3's attention as nets/decoder.py writes it: the query/key norm nodes, then com.microsoft's
    GroupQueryAttention; gammas and rotary tables as constants."""
    from internvl_edge.nets.decoder import _qk_norms, rotary_tables
    from internvl_edge.nets.graph import MS_DOMAIN, Graph

    rng = np.random.default_rng(head_dim + heads)
    g = Graph("attention", None)
    qkv = g.input("qkv", TensorProto.FLOAT, ["batch", "rows", (heads + 2 * kv_heads) * head_dim])
    for name in ("past_k", "past_v"):
        g.input(name, TensorProto.FLOAT, ["batch", kv_heads, capacity, head_dim])
    for name, shape in (("seqlens_k", ["batch"]), ("total", []), ("query_lens", ["batch"])):
        g.input(name, TensorProto.INT32, shape)
    gammas = (1 + 0.3 * rng.standard_normal((2, head_dim))).astype(np.float32)
    normed = _qk_norms(g, qkv, "attn", gammas[0], gammas[1], heads, kv_heads, head_dim, eps)
    cos, sin = rotary_tables(head_dim, 10000.0, capacity)
    ins = [normed, "", "", "past_k", "past_v", "seqlens_k", "total", g.weight("cos", cos), g.weight("sin", sin)]
    g.op(
        "GroupQueryAttention",
        ins + [""] * 7 + ["query_lens"],
        "/attn/GroupQueryAttention",
        outputs=["out", "k", "v"],
        domain=MS_DOMAIN,
        num_heads=heads,
        kv_num_heads=kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
    )
    for name in ("out", "k", "v"):
        g.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return g.model()


@moves_attention
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rows,past", [(16, 8, 128, 1, 30), (4, 2, 64, 37, 5), (6, 2, 128, 20, 0)]
)
def test_query_key_norms_folded_into_ours(heads, kv_heads, head_dim, rows, past):
    """The rewrite folds the eight norm nodes into our node (which then reads the linear's qkv and the
    two gammas) and both compute the same: decode and prefill chunks, Qwen3-1.7B's 16/8 heads of 128."""
    capacity, eps = 64, 1e-6
    model = _qk_norm_model(heads, kv_heads, head_dim, capacity, eps)
    rng = np.random.default_rng(rows)
    qkv = (3 * rng.standard_normal((1, rows, (heads + 2 * kv_heads) * head_dim))).astype(np.float32)
    past_k, past_v = (rng.standard_normal((1, kv_heads, capacity, head_dim)).astype(np.float32) for _ in range(2))
    feeds = {
        "qkv": qkv,
        "seqlens_k": np.array([past + rows - 1], np.int32),
        "total": np.array(past + rows, np.int32),
        "query_lens": np.array([rows], np.int32),
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    theirs = _run(
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]),
        feeds,
        past_k,
        past_v,
        True,
    )
    moved = kernels.rewrite(model)
    assert moved["GroupQueryAttention"] == 1 and moved["qk_norm"] == 1
    (node,) = model.graph.node
    assert node.domain == kernels.DOMAIN and node.input[0] == "qkv" and len(node.input) == 10
    assert [a.f for a in node.attribute if a.name == "qk_norm_epsilon"] == [pytest.approx(eps)]
    so.register_custom_ops_library(kernels.library_path())
    ours = _run(
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]),
        feeds,
        past_k,
        past_v,
        True,
    )
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    for mine, ref in zip(ours[1:], theirs[1:], strict=True):
        np.testing.assert_allclose(mine[:, :, : past + rows], ref[:, :, : past + rows], atol=1e-5, rtol=1e-5)


def _attention_node(**changes):
    ins = ["qkv", "", "", "past_key_values.0.key", "past_key_values.0.value", "seqlens_k", "total", "cos", "sin"]
    ins += [""] * 7 + ["query_seqlens"]
    attrs = {"num_heads": 12, "kv_num_heads": 2, "do_rotary": 1, "rotary_interleaved": 0}
    inputs = changes.pop("inputs", ins)
    attrs.update(changes)
    return helper.make_node("GroupQueryAttention", inputs, ["o", "k", "v"], domain="com.microsoft", **attrs)


@moves_attention
def test_rewrite_takes_only_the_decoders_attention():
    kv = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, 64, 128])
    unpacked = ["q", "k_in", "v_in"] + _attention_node().input[3:]
    nodes = [
        _attention_node(),
        _attention_node(softcap=30.0),
        _attention_node(local_window_size=16),
        _attention_node(rotary_interleaved=1),
        _attention_node(inputs=unpacked),
        _attention_node(kv_num_heads=4),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [kv], []))
    expected = {
        "MatMulNBits": 0,
        "GroupQueryAttention": 1,
        "swiglu": 0,
        "norm": 0,
        "qk_norm": 0,
        "half_cache": 0,
        "layer": 0,
    }
    assert kernels.rewrite(model, half_cache=True) == expected, "one attention left on ORT's: the cache stays float32"
    assert [n.domain for n in model.graph.node] == [kernels.DOMAIN] + ["com.microsoft"] * 5
    moved = model.graph.node[0]
    assert list(moved.input) == [
        "qkv",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "seqlens_k",
        "total",
        "cos",
        "sin",
        "query_seqlens",
    ]
    assert {a.name for a in moved.attribute} == {"num_heads", "kv_num_heads"}
    odd = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, 64, 72])
    model = helper.make_model(helper.make_graph([_attention_node()], "g", [odd], []))
    assert kernels.rewrite(model)["GroupQueryAttention"] == 0, "head_dim 72 is not a multiple of 16"


def _cache_graph(extra_reader: bool = False):
    """Two decoder layers' attention nodes on graph inputs past_* and outputs present_*; with
    `extra_reader`, another node reads layer 1's past key too."""
    nodes, inputs, outputs = [], [], []
    for layer in range(2):
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        node = _attention_node()
        node.input[3:5] = past
        node.output[:] = [f"o{layer}", *present]
        nodes.append(node)
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 64, 128]) for n in past]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 64, 128]) for n in present]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["past_key_values.1.key"], ["copy"]))
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs))


@moves_attention
def test_rewrite_makes_the_cache_float16_when_asked():
    """With half_cache, every moved attention node's past inputs and present outputs become float16;
    without it, or when a past input has another reader, the types stay float32."""
    model = _cache_graph()
    assert kernels.rewrite(model, half_cache=True)["half_cache"] == 2
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert set(types.values()) == {TensorProto.FLOAT16}, types
    model = _cache_graph()
    assert kernels.rewrite(model)["half_cache"] == 0
    assert {v.type.tensor_type.elem_type for v in model.graph.input} == {TensorProto.FLOAT}
    model = _cache_graph(extra_reader=True)
    assert kernels.rewrite(model, half_cache=True)["half_cache"] == 0
    assert {v.type.tensor_type.elem_type for v in model.graph.input} == {TensorProto.FLOAT}
    model = _cache_graph()
    del model.graph.output[-1]  # layer 1's present value is not a graph output
    assert kernels.rewrite(model, half_cache=True)["half_cache"] == 0
    assert {v.type.tensor_type.elem_type for v in model.graph.input} == {TensorProto.FLOAT}


def _prefill_and_steps(model) -> np.ndarray:
    """Logits of a 37-token prefill and three decode steps after it."""
    backend = model.backend
    cache = backend.new_cache(1)
    ids = np.arange(3, 40, dtype=np.int64)[None]
    rows = [backend.forward(cache, backend.embed(ids), [ids.shape[1]]).copy()]
    for token in (5, 9, 11):
        rows.append(backend.forward(cache, backend.embed(np.array([[token]], np.int64)), [1]).copy())
    return np.concatenate(rows)


@moves_attention
@pytest.mark.parametrize("ckpt, quant", [("tiny_bf16", "w4bf16"), ("tiny35_bf16", "f16")])
def test_decoder_attention_is_ours_unless_disabled(ckpt, quant, bundle, monkeypatch):
    """The decoder's attention runs on our kernel by default and on ORT's with INTERNVL_EDGE_KERNELS=matmul;
    with the KV cache in float32 on both (ORT's is), a prefill and decode steps give the same logits
    within float rounding either way. InternVL3.5's
    query/key norms are folded into ours in every layer (and run as nodes of their own on ORT's). The
    InternVL3.5 bundle has float linears: with int8 activation blocks, a float-rounding difference in
    an attention output can move a value across a rounding boundary of its block, one whole
    quantisation step (seen: 0.5% of the logits' range on one random model)."""
    import os

    import onnx

    from internvl_edge.api import load

    path = bundle(ckpt, quant)
    decoder = onnx.load(os.path.join(path, "decoder.onnx"), load_external_data=False)
    layers = sum(n.op_type == "GroupQueryAttention" for n in decoder.graph.node)
    assert kernels.rewrite(decoder)["qk_norm"] == (layers if ckpt.startswith("tiny35") else 0)

    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", "float32")
    kernels.settings.cache_clear()
    ours = load(path)
    assert ours.backend.kv_dtype == np.float32
    assert ours.backend.attention_kernel == "internvl-edge"
    assert ours.backend.describe()["attention_kernel"] == "internvl-edge"
    mine = _prefill_and_steps(ours)
    monkeypatch.setenv("INTERNVL_EDGE_KERNELS", "matmul")
    kernels.settings.cache_clear()
    try:
        theirs_model = load(path)
        assert theirs_model.backend.attention_kernel == "onnxruntime"
        assert theirs_model.backend.kv_dtype == np.float32
        assert theirs_model.backend.q4_kernel.startswith("internvl-edge q4gemm") == quant.startswith("w4")
        theirs = _prefill_and_steps(theirs_model)
    finally:
        monkeypatch.delenv("INTERNVL_EDGE_KERNELS")
        monkeypatch.delenv("INTERNVL_EDGE_KV_CACHE")
        kernels.settings.cache_clear()
    np.testing.assert_allclose(mine, theirs, atol=1e-4 * np.abs(theirs).max())


@moves_attention
@pytest.mark.parametrize(
    "ckpt, quant, half", [("tiny_bf16", "w4bf16", True), ("tiny35_bf16", "f16", True), ("tiny_bf16", "f32", False)]
)
def test_kv_cache_type_follows_the_bundle(ckpt, quant, half, bundle, monkeypatch):
    """Where our attention runs, the KV cache is float16 for 4-bit and half-precision bundles and
    float32 for -q f32 ones (the reference's numerics); INTERNVL_EDGE_KV_CACHE overrides either way and
    a value it does not know is a one-line error. The float16 cache's logits stay within the float16
    rounding of the keys and values of the float32 cache's, and a prefix's rows copied out of one
    cache and into another (prefix reuse) keep their type and values."""
    from internvl_edge.api import load
    from internvl_edge.errors import UserError

    path = bundle(ckpt, quant)
    model = load(path)
    assert model.backend.kv_dtype == (np.float16 if half else np.float32)
    assert model.backend.describe()["kv_cache"] == ("float16" if half else "float32")
    assert model.backend.row_bytes == 2 * model.backend.layers * model.backend.kv_heads * model.backend.head_dim * (
        2 if half else 4
    )
    mine = _prefill_and_steps(model)
    backend = model.backend
    cache = backend.new_cache(1)
    backend.forward(cache, backend.embed(np.arange(3, 20, dtype=np.int64)[None]), [17])
    rows = backend.read_rows(cache, 0, 17)
    assert all(r.dtype == backend.kv_dtype for r in rows)
    other = backend.new_cache(1)
    backend.write_rows(other, 0, rows, 17)
    step = backend.embed(np.array([[7]], np.int64))
    assert np.array_equal(backend.forward(other, step, [1]), backend.forward(cache, step, [1])), (
        "a step after the copied rows gives the same logits as after the rows it was copied from"
    )

    flipped = "float32" if half else "float16"
    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", flipped)
    kernels.settings.cache_clear()
    try:
        flipped_model = load(path)
        assert flipped_model.backend.kv_dtype == np.dtype(flipped)
        theirs = _prefill_and_steps(flipped_model)
        monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", "f8")
        kernels.settings.cache_clear()
        with pytest.raises(UserError, match="^INTERNVL_EDGE_KV_CACHE=f8 is not a cache type; use float16 or"):
            load(path)
    finally:
        monkeypatch.delenv("INTERNVL_EDGE_KV_CACHE")
        kernels.settings.cache_clear()
    spread = np.abs(theirs).max()
    difference = np.abs(mine - theirs).max()
    assert 0 < difference < 2e-2 * spread, "float16 rounding of the cache moves the logits, but only a little"
