"""Our 4-bit matmul (internvl_edge/kernels) against ONNX Runtime's own MatMulNBits and numpy.
(Our attention kernel: tests/test_attention_kernel.py.)

The kernel quantises activations to int8 per block as MatMulNBits' accuracy_level 4 does, so on the
same inputs the two independent implementations agree to float rounding (different summation
order); against the float product of the dequantised weights they differ by the int8 activation
error (~0.3-1% RMS). Shapes cover decode (1 row), the server's batches (2-5: decode tiles, two rows
at a time on AVX-512), prefill tiles (4-row groups and remainders, more rows than one task's 256), K
that is not a multiple of the block (the padded last block of nets/quant.py), odd block counts (a
half-used zero-point byte) and bias.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from conftest import MID, child_prints, run_tests_in_child
from onnx import TensorProto, helper, numpy_helper

from internvl_edge import kernels
from internvl_edge.nets.quant import quantize

MID_INTERMEDIATE = MID.text_intermediate
X86_LINUX = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def test_library_is_built_here():
    """On x86-64 Linux (this project's CI) the install must have compiled the kernel: the build
    is optional so that other machines still install, which would otherwise hide a broken build."""
    if not X86_LINUX:
        pytest.skip("the kernel is built for x86-64 Linux")
    assert kernels.library_path() is not None
    assert kernels.isa() in ("avx512vnni", "avxvnni", "avx2")


needs_kernel = pytest.mark.skipif(kernels.library_path() is None, reason="q4gemm kernel not available here")


def _nbits_node(inputs: list[str], output: str, w, domain: str, bits: int | None = None, **attrs):
    """A MatMulNBits node for the quantised weight `w` (accuracy level 4 unless given)."""
    attrs.setdefault("accuracy_level", 4)
    bits = w.bits if bits is None else bits
    return helper.make_node(
        "MatMulNBits", inputs, [output], domain=domain, K=w.K, N=w.N, bits=bits, block_size=w.block_size, **attrs
    )


def _graph(w, domain: str, bias: np.ndarray | None, accuracy_level: int = 4, b_fed: bool = False, **attrs):
    """One MatMulNBits node; `b_fed`: B is a graph input (fed with each run), not a constant."""
    inits = [numpy_helper.from_array(w.scales.reshape(-1).astype(np.float32), "S")]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points.reshape(-1), "Z"))
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)]
    if b_fed:
        graph_inputs.append(helper.make_tensor_value_info("B", TensorProto.UINT8, list(w.packed.shape)))
    else:
        inits.append(numpy_helper.from_array(w.packed, "B"))
    inputs = ["A", "B", "S", "Z" if w.zero_points is not None else ""]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs += ["", "bias"]
    node = _nbits_node(inputs, "Y", w, domain, accuracy_level=accuracy_level, **attrs)
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "q4", graph_inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if domain == kernels.DOMAIN:
        so.register_custom_ops_library(kernels.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


CASES = [  # (rows, K, N, block, bias)
    (1, 256, 96, 128, False),
    (1, 1536, 200, 128, True),
    (1, 1152, 72, 128, True),  # decode over an odd number of blocks: pairs, then the last one alone
    (1, 768, 48, 256, False),  # the same with blocks of 256
    (2, 640, 37, 64, False),
    (3, 192, 33, 128, True),  # K padded to 256 in B
    (4, 384, 64, 128, False),  # three blocks: the last zero-point byte half used
    (5, 512, 41, 256, True),
    (9, 320, 70, 64, False),
    (300, 256, 40, 128, True),  # more rows than one task holds
]


@needs_kernel
@pytest.mark.parametrize("rows,K,N,block,with_bias", CASES)
def test_matches_onnxruntime_and_numpy(rows, K, N, block, with_bias):
    rng = np.random.default_rng(rows * 1000 + K + N)
    w = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 4, block)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    a = rng.standard_normal((1, rows, K)).astype(np.float32)
    a[0, 0, : K // 3] *= 20.0  # blocks of very different ranges in one row
    ours = _graph(w, kernels.DOMAIN, bias).run(None, {"A": a})[0]
    theirs = _graph(w, "com.microsoft", bias).run(None, {"A": a})[0]
    exact = a @ w.dequantize().T + (bias if bias is not None else 0)
    assert ours.shape == theirs.shape == (1, rows, N)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 2e-4 * scale, "differs from MatMulNBits accuracy_level 4"
    rel_rms = np.sqrt(np.mean((ours - exact) ** 2)) / np.sqrt(np.mean(exact**2))
    assert rel_rms < 0.02, f"int8 activation error {rel_rms:.4f} is too large"
    assert rel_rms > 0, "the kernel cannot be exact with int8 activations: is it being run at all?"


@needs_kernel
@pytest.mark.parametrize("rows,N", [(1, 64), (1, 40), (12, 40), (9, 56)])
def test_weights_repacked_or_not_give_the_same_result(rows, N):
    """A constant B whose shapes the sequential layout takes (q4_pack: N a multiple of 8, blocks of
    128 or 256) is repacked once; a fed B, or pack=0, is read as stored. All three agree with ORT.
    Rows cover decode (its 8-column tiles), prefill's 16-column tiles, and the 8 columns left over
    past the last 16 (N=40, 56), which take the generic tile on the packed layout."""
    rng = np.random.default_rng(rows + N)
    for K, block in ((512, 128), (640, 256)):  # 640: the last block of 256 half padding
        w = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 4, block)
        a = rng.standard_normal((1, rows, K)).astype(np.float32)
        theirs = _graph(w, "com.microsoft", None).run(None, {"A": a})[0]
        before = kernels.pack_stats()[0]
        packed = _graph(w, kernels.DOMAIN, None).run(None, {"A": a})[0]
        repacked = w.packed.size if kernels.isa() in kernels.PACKED_4BIT_ISAS else 0
        assert kernels.pack_stats()[0] - before == repacked, "a constant B is repacked once"
        as_stored = _graph(w, kernels.DOMAIN, None, pack=0).run(None, {"A": a})[0]
        fed = _graph(w, kernels.DOMAIN, None, b_fed=True).run(None, {"A": a, "B": w.packed})[0]
        assert kernels.pack_stats()[0] - before == repacked, "pack=0 and a fed B are not repacked"
        scale = np.abs(theirs).max()
        for ours in (packed, as_stored, fed):
            assert np.abs(ours - theirs).max() <= 2e-4 * scale


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 12])
def test_scale_table_in_float16_or_float(bits, rows):
    """Weights whose scales are all float16 values (what nets/quant.py and AWQ give) get the table of
    float16 scales, any other the table of float ones; both agree with ONNX Runtime, which reads the
    same float32 scales. Rows: decode's 8-column tiles and prefill's 16-column ones."""
    if bits == 8 and kernels.isa() not in kernels.EIGHT_BIT_ISAS:
        pytest.skip("8-bit weights run on the VNNI instruction sets")
    rng = np.random.default_rng(rows + bits)
    w = quantize(rng.standard_normal((48, 512)).astype(np.float32) * 0.05, bits, 128)
    assert np.array_equal(w.scales.astype(np.float16).astype(np.float32), w.scales)
    off = dataclasses.replace(
        w, scales=(w.scales * np.float32(1 + 2.0**-20)).astype(np.float32)
    )  # no float16 holds these
    a = rng.standard_normal((1, rows, 512)).astype(np.float32)
    sizes = []
    for weight, table in ((w, 0), (off, 1)):
        before = kernels.table_stats()
        ours = _graph(weight, kernels.DOMAIN, None).run(None, {"A": a})[0]
        made = [now - then for now, then in zip(kernels.table_stats(), before, strict=True)]
        assert made[table] > 0 and made[1 - table] == 0, made
        sizes.append(made[table])
        theirs = _graph(weight, "com.microsoft", None).run(None, {"A": a})[0]
        assert np.abs(ours - theirs).max() <= 2e-4 * np.abs(theirs).max()
    assert sizes[0] * 40 == sizes[1] * 24  # 24 bytes per 8 columns and block instead of 40


EIGHT_BIT_CASES = [  # (rows, K, N, block, bias, zero points given)
    (1, 256, 96, 128, False, True),
    (1, 1536, 203, 128, True, True),  # N not a multiple of 8: the last group padded
    (3, 200, 33, 64, False, True),  # K padded to 256 in B
    (5, 640, 40, 256, True, False),  # no zero points: 128, as MatMulNBits' default
    (40, 128, 8, 64, False, True),  # more rows than decode has (the server's batches)
]


def eight_bit_results(path: str) -> None:
    """Our kernel's results for every EIGHT_BIT_CASES case and four more (16 and 33 rows: one and more
    AMX tiles of rows; 300: a second task of rows; blocks of 1024) saved to `path` (.npz): run in a
    child process with INTERNVL_EDGE_AMX set either way."""
    cases = EIGHT_BIT_CASES + [
        (16, 384, 40, 128, True, True),
        (33, 512, 24, 128, False, True),
        (300, 256, 24, 128, True, True),  # a second task of rows
        (2, 2048, 40, 1024, False, True),  # the largest block taken
    ]
    results = {}
    for i, (rows, K, N, block, with_bias, zero_points) in enumerate(cases):
        rng = np.random.default_rng(rows * 7 + K + N)
        w = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 8, block)
        if not zero_points:
            w = dataclasses.replace(w, zero_points=None)
        bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
        a = rng.standard_normal((1, rows, K)).astype(np.float32)
        a[0, 0, : K // 3] *= 20.0
        results[f"case{i}"] = _graph(w, kernels.DOMAIN, bias).run(None, {"A": a})[0]
    np.savez(path, **results)


@needs_kernel
def test_8bit_weights_give_the_same_bits_on_amx_and_vnni_tiles(tmp_path):
    """Where the CPU has AMX-INT8, 8-bit weights run on its tiles (16 columns, up to 16 rows per
    multiply); INTERNVL_EDGE_AMX=0 keeps them on the 8-column VNNI tiles. Both sum the same int32 dot
    products and end each block in the same two float steps, so every output is the same bit for bit:
    decode's greedy tokens do not depend on which one a CPU has."""
    on = {**os.environ, "INTERNVL_EDGE_AMX": "1"}
    if child_prints("from internvl_edge import kernels; print(kernels.path8())", on) != "amx":
        pytest.skip("no AMX-INT8 here")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {here!r}); import test_kernels as t; t.eight_bit_results(sys.argv[1])"
    outputs = {}
    for setting in ("1", "0"):
        env = {**os.environ, "INTERNVL_EDGE_AMX": setting}
        assert child_prints("from internvl_edge import kernels; print(kernels.path8())", env) == (
            "amx" if setting == "1" else "vnni"
        )
        out = str(tmp_path / f"amx{setting}.npz")
        subprocess.run([sys.executable, "-c", code, out], env=env, check=True, timeout=300)
        outputs[setting] = np.load(out)
    for name in outputs["1"].files:
        assert np.array_equal(outputs["1"][name], outputs["0"][name]), name


@needs_kernel
@pytest.mark.parametrize("rows,K,N,block,with_bias,zero_points", EIGHT_BIT_CASES)
def test_8bit_weights_match_onnxruntime(rows, K, N, block, with_bias, zero_points):
    """8-bit weights (the decoder's lm_head at --lm-head-bits 8) on the VNNI instruction sets: equal to
    ONNX Runtime's MatMulNBits bits=8 within float rounding; elsewhere the op refuses them (the
    runtime leaves such nodes to ONNX Runtime)."""
    rng = np.random.default_rng(rows * 7 + K + N)
    w = quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, 8, block)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    a = rng.standard_normal((1, rows, K)).astype(np.float32)
    a[0, 0, : K // 3] *= 20.0
    if kernels.isa() not in kernels.EIGHT_BIT_ISAS:
        with pytest.raises(Exception, match="bits=8 needs"):
            _graph(w, kernels.DOMAIN, bias)
        return
    if not zero_points:  # the node without its zero-point input: both kernels then take 128
        w = dataclasses.replace(w, zero_points=None)
    before = kernels.pack_stats()[0]
    ours = _graph(w, kernels.DOMAIN, bias).run(None, {"A": a})[0]
    assert kernels.pack_stats()[0] - before == w.packed.size
    theirs = _graph(w, "com.microsoft", bias).run(None, {"A": a})[0]
    assert ours.shape == theirs.shape == (1, rows, N)
    assert np.abs(ours - theirs).max() <= 2e-4 * np.abs(theirs).max()
    if zero_points:  # against the float product of the dequantised weights: the int8 activation error only
        exact = a @ w.dequantize().T + (bias if bias is not None else 0)
        assert np.sqrt(np.mean((ours - exact) ** 2)) / np.sqrt(np.mean(exact**2)) < 0.02


@needs_kernel
@pytest.mark.parametrize("batches", [1, 2, 3, 8, 64, 200])
def test_every_task_runs_once_for_any_number_of_ranges(batches):
    """The op splits its tasks (32 columns each) into `batches` ranges for the thread pool, and the
    threads take what is left of each other's ranges from their ends (ort_glue.c, ort_parallel_ranges):
    every column is computed, whatever the split (one range; fewer ranges than threads; more than
    tasks; above the 64 it takes). Many runs with different inputs, so that the threads meet inside
    ranges in some of them, and a column left out keeps an earlier run's value (ORT reuses the
    output buffer) or holds garbage."""
    rng = np.random.default_rng(batches)
    w = quantize(rng.standard_normal((2056, 1024)).astype(np.float32) * 0.05, 4, 128)  # 65 tasks, the last of 8 columns
    ours_sess = _graph(w, kernels.DOMAIN, None, batches=batches)
    theirs_sess = _graph(w, "com.microsoft", None)
    for rows in [1] * 20 + [6] * 5:
        a = rng.standard_normal((1, rows, 1024)).astype(np.float32)
        ours, theirs = ours_sess.run(None, {"A": a})[0], theirs_sess.run(None, {"A": a})[0]
        assert np.abs(ours - theirs).max() <= 2e-4 * np.abs(theirs).max()


@needs_kernel
def test_shapes_and_errors():
    w = quantize(np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32), 4, 128)
    sess = _graph(w, kernels.DOMAIN, None)
    assert sess.run(None, {"A": np.zeros((2, 0, 128), np.float32)})[0].shape == (2, 0, 24)
    assert sess.run(None, {"A": np.ones((128,), np.float32)})[0].shape == (24,)
    with pytest.raises(Exception, match="A's last dimension is 100, expected K=128"):
        sess.run(None, {"A": np.ones((1, 100), np.float32)})


@needs_kernel
def test_a_misshapen_weight_is_refused_constant_or_fed():
    """B with the right bytes in the wrong shape ([N, blocks * 64] instead of [N, blocks, 64]): a constant
    is checked once, when the session is made (decode then skips describing the weights on every
    call), and a B fed with each run is checked on that run."""
    w = quantize(np.random.default_rng(0).standard_normal((24, 256)).astype(np.float32), 4, 128)
    flat = dataclasses.replace(w, packed=w.packed.reshape(w.N, -1))
    with pytest.raises(Exception, match=r"B must be uint8 \[N=24, 2, 64\], got rank 2"):
        _graph(flat, kernels.DOMAIN, None)
    sess = _graph(flat, kernels.DOMAIN, None, b_fed=True)
    with pytest.raises(Exception, match=r"B must be uint8 \[N=24, 2, 64\], got rank 2"):
        sess.run(None, {"A": np.ones((1, 256), np.float32), "B": flat.packed})


def test_rewrite_takes_only_what_the_kernel_computes():
    def node(bits=4, level=4, block=128, g_idx=""):
        return helper.make_node(
            "MatMulNBits",
            ["A", "B", "S", "Z", g_idx],
            ["Y"],
            domain="com.microsoft",
            K=256,
            N=8,
            bits=bits,
            block_size=block,
            accuracy_level=level,
        )

    nodes = [
        node(),
        node(bits=8),
        node(level=1),
        node(block=32),
        node(g_idx="g"),
        helper.make_node("MatMul", ["A", "W"], ["Y"]),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    moved = {
        "MatMulNBits": 1,
        "GroupQueryAttention": 0,
        "swiglu": 0,
        "norm": 0,
        "qk_norm": 0,
        "half_cache": 0,
        "layer": 0,
    }
    assert kernels.rewrite(model) == moved
    assert [n.domain for n in model.graph.node] == [kernels.DOMAIN, *["com.microsoft"] * 4, ""]
    assert any(o.domain == kernels.DOMAIN for o in model.opset_import)


@needs_kernel
def test_the_passes_keep_one_index_current(bundle, monkeypatch):
    """rewrite builds one GraphIndex for a w4 decoder, and after every pass has edited the graph through it
    (attention moved, SwiGLU and norms folded into the linears), it says what one built afresh from the
    rewritten graph says: each tensor's producer and readers."""
    import onnx

    from internvl_edge.kernels import passes

    built = []

    class Recorded(kernels.GraphIndex):
        def __init__(self, model):
            super().__init__(model)
            built.append(self)

    monkeypatch.setattr(passes, "GraphIndex", Recorded)
    decoder = onnx.load(os.path.join(bundle("tiny_bf16", "w4bf16"), "decoder.onnx"), load_external_data=False)
    moved = kernels.rewrite(decoder, 2)
    assert moved["MatMulNBits"] and moved["swiglu"] and moved["norm"], moved

    def links(index):
        producers = {name: id(node) for name, node in index.producer.items()}
        readers = {name: sorted(map(id, nodes)) for name, nodes in index.readers.items() if nodes}
        return producers, readers

    (kept,) = built
    assert links(kept) == links(kernels.GraphIndex(decoder))


@needs_kernel
@pytest.mark.parametrize("lm_head_bits", [0, 8])
def test_decoder_runs_on_the_kernel_unless_disabled(bundle, monkeypatch, lm_head_bits):
    """A w4 bundle's decoder runs on q4gemm by default, its weights repacked and held once (an 8-bit
    lm_head too, on VNNI CPUs; each gate/up pair side by side); INTERNVL_EDGE_KERNELS=0 and accuracy
    level 1 keep MatMulNBits (MLAS); both give logits within the int8 activation noise of each other."""
    import onnx

    from internvl_edge.api import load

    path = bundle("tiny_bf16", "w4bf16", **({"lm_head_bits": lm_head_bits} if lm_head_bits else {}))
    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", "float32")  # as ORT's attention keeps it: linears compared alone
    kernels.settings.cache_clear()
    if lm_head_bits:  # the lm_head node is moved where the 8-bit path runs, left to ORT elsewhere
        decoder = onnx.load(os.path.join(path, "decoder.onnx"), load_external_data=False)
        kernels.rewrite(decoder, 2)
        head = next(n for n in decoder.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
        assert head.domain == (kernels.DOMAIN if kernels.isa() in kernels.EIGHT_BIT_ISAS else "com.microsoft")
    packed, released = kernels.pack_stats()
    paired = kernels.paired_swiglus()
    fast = load(path)
    assert fast.backend.q4_kernel.startswith("internvl-edge q4gemm")
    # a w4 bundle's lm_head is 8-bit unless converted otherwise: which tiles run it is named
    assert (f"8-bit weights on {kernels.path8()}" in fast.backend.q4_kernel) == (
        kernels.isa() in kernels.EIGHT_BIT_ISAS
    )
    # the 4-bit weights were repacked, and ORT's memory-mapped originals handed back (whole pages)
    packed, released = (now - then for now, then in zip(kernels.pack_stats(), (packed, released), strict=True))
    if kernels.isa() in kernels.PACKED_4BIT_ISAS:
        assert packed > 0 and released >= 0.9 * packed
        assert kernels.paired_swiglus() - paired == 2, "each layer's fused gate/up weights side by side"
    ids = np.arange(3, 40, dtype=np.int64)[None]
    cache = fast.backend.new_cache(1)
    ours = fast.backend.forward(cache, fast.backend.embed(ids), [ids.shape[1]]).copy()

    monkeypatch.setenv("INTERNVL_EDGE_KERNELS", "0")
    kernels.settings.cache_clear()
    try:
        mlas = load(path)
        assert mlas.backend.q4_kernel == "onnxruntime"
        cache = mlas.backend.new_cache(1)
        theirs = mlas.backend.forward(cache, mlas.backend.embed(ids), [ids.shape[1]])
    finally:
        monkeypatch.delenv("INTERNVL_EDGE_KERNELS")
        kernels.settings.cache_clear()
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    assert load(bundle("tiny_bf16", "w4bf16", accuracy_level=1)).backend.q4_kernel == "onnxruntime"


def _fuse_swiglu(model) -> int:
    return kernels.fuse_swiglu(kernels.GraphIndex(model))


def _fuse_norms(model) -> int:
    return kernels.fuse_norms(kernels.GraphIndex(model))


def _weight_initializers(w) -> list:
    """B, S and Z: the packed weights, their scales and zero points as MatMulNBits reads them."""
    scales = w.scales.reshape(-1).astype(np.float32)
    return [
        numpy_helper.from_array(w.packed, "B"),
        numpy_helper.from_array(scales, "S"),
        numpy_helper.from_array(w.zero_points.reshape(-1), "Z"),
    ]


def _swiglu_graph(w, fused: bool, bias: np.ndarray | None = None):
    """gate/up linear then silu(gate) * up: as nets/decoder.py writes it, or fused into our node;
    `bias` on the linear if given."""
    half = w.N // 2
    inits = _weight_initializers(w) + [numpy_helper.from_array(np.array([half, half]), "halves")]
    inputs = ["A", "B", "S", "Z"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs += ["", "bias"]
    mm = _nbits_node(inputs, "GU", w, kernels.DOMAIN, bits=4)
    nodes = [
        mm,
        helper.make_node("Split", ["GU", "halves"], ["gate", "up"], axis=-1),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "swiglu",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)]
    )
    if fused:
        assert _fuse_swiglu(model) == 1
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(kernels.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 40, 300])
def test_fused_swiglu_matches_the_unfused_graph(rows):
    """The fused node computes the same columns with the same kernel, so it matches the graph of
    separate nodes to float rounding (our vector exp against ONNX Runtime's Sigmoid). Its weights are
    put side by side per task (q4_pair_swiglu; 176 columns: a full task of 128 and a short one); with
    a bias they stay in the stored order, and the results are the same."""
    rng = np.random.default_rng(rows)
    w = quantize(rng.standard_normal((2 * 176, 256)).astype(np.float32) * 0.1, 4, 128)
    a = rng.standard_normal((1, rows, 256)).astype(np.float32)
    for bias in (None, rng.standard_normal(2 * 176).astype(np.float32)):
        before = kernels.paired_swiglus()
        fused = _swiglu_graph(w, fused=True, bias=bias)
        assert kernels.paired_swiglus() - before == (1 if bias is None else 0)
        ours = fused.run(None, {"A": a})[0]
        theirs = _swiglu_graph(w, fused=False, bias=bias).run(None, {"A": a})[0]
        assert ours.shape == theirs.shape == (1, rows, 176)
        np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=1e-5)


def test_swiglu_is_fused_only_where_the_pattern_is_whole():
    w = quantize(np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32), 4, 128)

    def model(extra_use: bool = False, sizes=(32, 32)):
        nodes = [
            helper.make_node(
                "MatMulNBits", ["A", "B", "S", "Z"], ["GU"], domain=kernels.DOMAIN, K=128, N=64, bits=4, block_size=128
            ),
            helper.make_node("Split", ["GU", "halves"], ["gate", "up"], axis=-1),
            helper.make_node("Sigmoid", ["gate"], ["sig"]),
            helper.make_node("Mul", ["sig", "gate"], ["silu"]),
            helper.make_node("Mul", ["up", "silu"], ["Y"]),
        ]
        outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
        if extra_use:  # the gate half is needed elsewhere: it must stay
            outputs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, None))
        inits = [numpy_helper.from_array(np.array(sizes), "halves"), numpy_helper.from_array(w.packed, "B")]
        return helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits))

    fused = model()
    assert _fuse_swiglu(fused) == 1 and [n.op_type for n in fused.graph.node] == ["MatMulNBits"]
    assert fused.graph.node[0].output[0] == "Y"
    assert _fuse_swiglu(model(extra_use=True)) == 0
    assert _fuse_swiglu(model(sizes=(40, 24))) == 0


def _norm_graph(w, skipped: bool, fused: bool, extra_use: str = "", constant_skip: bool = False):
    """An RMS norm (with a skip: its residual sum a second graph output) feeding one of our linears, as
    nets/decoder.py writes it; `fused`: folded into the linear (asserted). `extra_use`: one of the
    norm's outputs is a graph output too, so it must stay a node."""
    rng = np.random.default_rng(1)
    gamma = (1 + 0.1 * rng.standard_normal(w.K)).astype(np.float32)
    inits = _weight_initializers(w) + [numpy_helper.from_array(gamma, "gamma")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)]
    if skipped:
        if constant_skip:
            inits.append(numpy_helper.from_array(rng.standard_normal(w.K).astype(np.float32), "R"))
        else:
            inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, None))
        norm = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            ["X", "R", "gamma"],
            ["H", "mean", "inv", "sum"],
            domain="com.microsoft",
            epsilon=1e-6,
        )
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, None))
    else:
        norm = helper.make_node(
            "SimplifiedLayerNormalization", ["X", "gamma"], ["H"], axis=-1, epsilon=1e-6, stash_type=1
        )
    if extra_use:
        outputs.append(helper.make_tensor_value_info(extra_use, TensorProto.FLOAT, None))
    mm = _nbits_node(["H", "B", "S", "Z"], "Y", w, kernels.DOMAIN, bits=4)
    graph = helper.make_graph([norm, mm], "norm", inputs, outputs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 18),
            helper.make_opsetid(kernels.DOMAIN, 1),
            helper.make_opsetid("com.microsoft", 1),
        ],
    )
    if fused:
        assert _fuse_norms(model) == 1
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    return model


def _session(model):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(kernels.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_kernel
@pytest.mark.parametrize("skipped", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 40, 300])
def test_fused_norm_matches_the_unfused_graph(skipped, rows):
    """The norm folded into our linear gives ONNX Runtime's norm node's residual sum bit for bit and,
    through the same 4-bit kernel, the same product to float rounding (the squares are summed in
    another order); 40 and 300 rows are split over the thread pool."""
    rng = np.random.default_rng(rows)
    w = quantize(rng.standard_normal((96, 320)).astype(np.float32) * 0.1, 4, 64)
    feeds = {"X": rng.standard_normal((1, rows, 320)).astype(np.float32) * 3}
    if skipped:
        feeds["R"] = rng.standard_normal((1, rows, 320)).astype(np.float32)
    ours = _session(_norm_graph(w, skipped, fused=True)).run(None, feeds)
    theirs = _session(_norm_graph(w, skipped, fused=False)).run(None, feeds)
    assert ours[0].shape == theirs[0].shape == (1, rows, 96)
    # a product 1e-7 apart can round to the neighbouring int8 step of the activation quantisation
    np.testing.assert_allclose(ours[0], theirs[0], atol=2e-3 * np.abs(theirs[0]).max())
    assert np.median(np.abs(ours[0] - theirs[0])) <= 1e-5 * np.abs(theirs[0]).max()
    if skipped:
        np.testing.assert_array_equal(ours[1], feeds["X"] + feeds["R"])
        np.testing.assert_array_equal(ours[1], theirs[1])


@needs_kernel
def test_fused_norm_of_no_rows():
    w = quantize(np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32), 4, 128)
    empty = np.zeros((1, 0, 128), np.float32)
    y, total = _session(_norm_graph(w, True, fused=True)).run(None, {"X": empty, "R": empty})
    assert y.shape == (1, 0, 32) and total.shape == (1, 0, 128)


def test_norm_is_fused_only_where_the_pattern_is_whole():
    w = quantize(np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32), 4, 128)
    assert _fuse_norms(_norm_graph(w, True, fused=False)) == 1
    assert _fuse_norms(_norm_graph(w, False, fused=False)) == 1
    assert _fuse_norms(_norm_graph(w, True, fused=False, extra_use="H")) == 0  # normed rows read elsewhere
    assert _fuse_norms(_norm_graph(w, True, fused=False, extra_use="mean")) == 0
    assert _fuse_norms(_norm_graph(w, True, fused=False, constant_skip=True)) == 0  # may broadcast
    other = _norm_graph(w, True, fused=False)
    other.graph.node[1].domain = "com.microsoft"  # ONNX Runtime's MatMulNBits: not ours to change
    assert _fuse_norms(other) == 0
    fused = _norm_graph(w, True, fused=False)
    _fuse_norms(fused)
    node = fused.graph.node[0]
    assert list(node.input) == ["X", "B", "S", "Z", "", "", "R", "gamma"] and list(node.output) == ["Y", "sum"]


@needs_kernel
def test_fused_norm_refuses_what_it_does_not_take():
    w = quantize(np.random.default_rng(0).standard_normal((32, 128)).astype(np.float32), 4, 128)
    sess = _session(_norm_graph(w, True, fused=True))
    x = np.ones((1, 2, 128), np.float32)
    with pytest.raises(Exception, match=r"skip must have A's shape \(256 elements, 128 given\)"):
        sess.run(None, {"X": x, "R": np.ones((128,), np.float32)})
    model = _norm_graph(w, True, fused=True)
    attr = next(a for a in model.graph.node[0].attribute if a.name == "norm_epsilon")
    model.graph.node[0].attribute.remove(attr)
    with pytest.raises(Exception, match="skip and gamma need attribute norm_epsilon"):
        _session(model).run(None, {"X": x, "R": x})


@needs_kernel
@pytest.mark.parametrize("variant", ["avx2", "avxvnni"])
def test_every_instruction_set_variant(variant):
    """The AVX2 and AVX-VNNI variants (what CPUs without AVX-512 run) pass the same comparisons with
    ONNX Runtime's kernels, forced on this CPU with INTERNVL_EDGE_ISA in a child process."""
    env = {**os.environ, "INTERNVL_EDGE_ISA": variant}
    if child_prints("from internvl_edge import kernels; print(kernels.isa())", env) != variant:
        pytest.skip(f"this CPU cannot run {variant}")
    here = os.path.dirname(os.path.abspath(__file__))
    tests = [
        f"{here}/test_kernels.py::test_matches_onnxruntime_and_numpy",
        f"{here}/test_kernels.py::test_weights_repacked_or_not_give_the_same_result",
        f"{here}/test_kernels.py::test_8bit_weights_match_onnxruntime",
        f"{here}/test_kernels.py::test_fused_swiglu_matches_the_unfused_graph",
        f"{here}/test_kernels.py::test_scale_table_in_float16_or_float[1-4]",  # 8 bits: VNNI only
        f"{here}/test_kernels.py::test_scale_table_in_float16_or_float[12-4]",
        f"{here}/test_kernels.py::test_fused_norm_matches_the_unfused_graph",
        f"{here}/test_attention_kernel.py::test_matches_onnxruntime",
        f"{here}/test_batch_invariance.py::test_linear_row_is_the_same_alone_and_anywhere_in_a_batch",
    ]
    assert "skipped" not in run_tests_in_child(tests, env)


def _cpu_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":")[1].strip() for line in f if line.startswith("vendor_id")), "")


@needs_kernel
@pytest.mark.parametrize("hint", ["nta", "t2"])
def test_either_prefetch_hint(hint):
    """The prefetch of what is read once per token is non-temporal on AMD and into L2 elsewhere
    (isa.h: Intel's cores run the 4-bit linears at half speed with NTA); INTERNVL_EDGE_PREFETCH
    names the other one, and the kernels pass the same comparisons with ONNX Runtime's under it."""
    code = "from internvl_edge import kernels; print(kernels.prefetch_hint())"
    default = {k: v for k, v in os.environ.items() if k != "INTERNVL_EDGE_PREFETCH"}
    assert child_prints(code, default) == ("nta" if _cpu_vendor() == "AuthenticAMD" else "t2")
    env = {**os.environ, "INTERNVL_EDGE_PREFETCH": hint}
    assert child_prints(code, env) == hint
    here = os.path.dirname(os.path.abspath(__file__))
    tests = [
        f"{here}/test_kernels.py::test_matches_onnxruntime_and_numpy",
        f"{here}/test_kernels.py::test_weights_repacked_or_not_give_the_same_result",
        f"{here}/test_kernels.py::test_8bit_weights_match_onnxruntime",
        f"{here}/test_attention_kernel.py::test_matches_onnxruntime",
    ]
    run_tests_in_child(tests, env)


def _decoder_logits(path: str, mode: str, monkeypatch, cache: str) -> list[np.ndarray]:
    """Logits of a batch of two prompts of different lengths (a padded prefill), then of three decode
    steps, with INTERNVL_EDGE_KERNELS=mode and the KV cache in `cache`."""
    from internvl_edge.api import load

    monkeypatch.setenv("INTERNVL_EDGE_KERNELS", mode)
    monkeypatch.setenv("INTERNVL_EDGE_KV_CACHE", cache)
    kernels.settings.cache_clear()
    backend = load(path).backend
    assert backend.q4_kernel.endswith("one node per layer") == (mode == "1")
    ids = np.arange(3, 3 + 2 * 21, dtype=np.int64).reshape(2, 21)
    kv = backend.new_cache(2)
    out = [backend.forward(kv, backend.embed(ids), [21, 13]).copy()]
    for step in range(3):
        out.append(backend.forward(kv, backend.embed(np.array([[50 + step], [60 + step]], np.int64)), [1, 1]).copy())
    return out


@needs_kernel
@pytest.mark.parametrize("ckpt", ["tiny_bf16", "tiny35_bf16"])
@pytest.mark.parametrize("cache", ["float16", "float32"])
def test_one_node_per_layer_computes_what_the_five_nodes_compute(bundle, monkeypatch, ckpt, cache):
    """fuse_layers makes each decoder layer one DecoderLayer node (ort_layer.c) of our linears and attention
    run back to back: InternVL3's qkv bias and InternVL3.5's query/key norms, the first layer without a
    skip, either cache type; a padded batch's prefill and its decode steps give the very logits of the five
    nodes per layer (INTERNVL_EDGE_KERNELS=unlayered), which the other tests hold against ONNX Runtime's
    kernels and transformers."""
    import onnx

    if kernels.isa() not in kernels.ATTENTION_ISAS:
        pytest.skip("our attention does not run here")
    path = bundle(ckpt, "w4bf16")
    decoder = onnx.load(os.path.join(path, "decoder.onnx"), load_external_data=False)
    moved = kernels.rewrite(decoder, 2, half_cache=cache == "float16")
    ops = [n.op_type for n in decoder.graph.node if n.domain == kernels.DOMAIN]
    assert moved["layer"] == 2 and ops.count(kernels.LAYER_OP) == 2, moved
    assert kernels.ATTENTION_OP not in ops and ops.count(kernels.OP) <= 1  # the lm_head's linear, if 4- or 8-bit
    fused = _decoder_logits(path, "1", monkeypatch, cache)
    nodes = _decoder_logits(path, "unlayered", monkeypatch, cache)
    for a, b in zip(fused, nodes, strict=True):
        np.testing.assert_array_equal(a, b)


@needs_kernel
def test_a_layer_is_fused_only_where_the_pattern_is_whole(bundle):
    """fuse_layers leaves a layer as five nodes where another node reads one of its intermediate values,
    a weight is fed instead of constant, or its qkv linear has no norm; the other layers are fused."""
    import onnx

    if kernels.isa() not in kernels.ATTENTION_ISAS:
        pytest.skip("our attention does not run here")
    path = os.path.join(bundle("tiny_bf16", "w4bf16"), "decoder.onnx")
    settings = dataclasses.replace(kernels.settings(), fuse_layers=False)

    def rewritten():
        model = onnx.load(path, load_external_data=False)
        kernels.rewrite(model, 2, kernel_settings=settings)
        return model, kernels.GraphIndex(model)

    def attention_of_layer(model, layer: int):
        return [n for n in model.graph.node if n.op_type == kernels.ATTENTION_OP][layer]

    model, index = rewritten()
    assert kernels.fuse_layers(model, index) == 2

    model, index = rewritten()  # the first layer's attention output also a graph output
    model.graph.output.append(
        helper.make_tensor_value_info(attention_of_layer(model, 0).output[0], TensorProto.FLOAT, None)
    )
    assert kernels.fuse_layers(model, kernels.GraphIndex(model)) == 1

    model, index = rewritten()  # the second layer's o_proj weight fed with each run
    o_proj = index.only_reader(attention_of_layer(model, 1).output[0], kernels.OP)
    weight = index.initializers[o_proj.input[1]]
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    assert kernels.fuse_layers(model, kernels.GraphIndex(model)) == 1

    model, index = rewritten()  # the first layer's qkv linear without its norm
    qkv = index.producer[attention_of_layer(model, 0).input[0]]
    for attr in [a for a in qkv.attribute if a.name == "norm_epsilon"]:
        qkv.attribute.remove(attr)
    assert kernels.fuse_layers(model, kernels.GraphIndex(model)) == 1


@needs_kernel
def test_the_room_of_a_prefill_is_not_held_while_decoding(bundle):
    """The blocks a prefill's linears and layers share (ort_room_take) are handed back by a decode step
    (a call of one row trims them: the lm_head's at the end of the prefill where it is ours, else the
    next step's linears), so decoding does not hold a prefill's activations."""
    from internvl_edge.api import load

    backend = load(bundle("mid_bf16", "w4bf16")).backend
    kv = backend.new_cache(1)
    rows, intermediate = 512, MID_INTERMEDIATE  # one forward call takes at most 512 rows
    largest = rows * 2 * intermediate * 4  # the gate/up pair of one layer, in floats
    assert largest > 8 << 20
    backend.forward(kv, backend.embed(np.arange(3, 3 + rows, dtype=np.int64)[None]), [rows])
    backend.forward(kv, backend.embed(np.array([[7]], np.int64)), [1])
    assert kernels.room_held() <= 8 << 20, kernels.room_held()
