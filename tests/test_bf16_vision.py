"""The vision encoder's bfloat16 linears (kernels/bf16gemm.h, MatMulBf16): the op against numpy, the
graph pass, and the image embeddings against transformers' (the external reference) in float32 and in
bfloat16. They run where the CPU has AVX512-BF16 (AMX-BF16 too: both paths are tested, the second in
a child process with INTERNVL_EDGE_BF16=avx512bf16); elsewhere the encoder runs in float32 as before,
which tests/test_reference.py covers."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import child_prints, run_tests_in_child
from onnx import TensorProto, helper, numpy_helper

from internvl_edge import kernels
from internvl_edge.backends.ort import OrtBackend
from internvl_edge.bundle import load_manifest
from internvl_edge.checkpoint.safetensors import bf16_bits

needs_bf16 = pytest.mark.skipif(kernels.bf16_path() is None, reason="this CPU has no AVX512-BF16 (or no kernels)")


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (ties to even), as float64: the reference's inputs."""
    bits = bf16_bits(np.asarray(x, np.float32)).astype(np.uint32) << 16
    return bits.view(np.float32).astype(np.float64)


def _linear_graph(k: int, n: int, w: np.ndarray, bias: np.ndarray | None, extra_reader: bool = False):
    """MatMul(X, Cast(W bfloat16)) [+ Add(bias)], as nets/linear.py writes the vision encoder's linears."""
    inits = [helper.make_tensor("W", TensorProto.BFLOAT16, [k, n], bf16_bits(w).tobytes(), raw=True)]
    nodes = [
        helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["X", "Wf"], ["XW"]),
    ]
    out = "XW"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        nodes.append(helper.make_node("Add", ["XW", "b"], ["Y"]))
        out = "Y"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    if extra_reader:  # the float weight also read elsewhere: the pass must leave the linear alone
        nodes.append(helper.make_node("Identity", ["Wf"], ["Wcopy"]))
        outputs.append(helper.make_tensor_value_info("Wcopy", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, k])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(kernels.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def test_rewrite_moves_the_linear_pattern_only():
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    model = _linear_graph(64, 48, w, b)
    assert kernels.rewrite_vision(model, threads=2) == {"MatMulBf16": 1, "MultiHeadAttention": 0}
    (node,) = model.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == (
        "MatMulBf16",
        kernels.DOMAIN,
        ["X", "W", "b"],
        ["Y"],
    )
    assert {a.name: a.i for a in node.attribute} == {"K": 64, "N": 48, "batches": 16}

    model = _linear_graph(64, 48, w, None)
    assert kernels.rewrite_vision(model)["MatMulBf16"] == 1
    assert [n.op_type for n in model.graph.node] == ["MatMulBf16"]

    model = _linear_graph(64, 48, w, b, extra_reader=True)  # a float copy is needed anyway: left as it is
    assert kernels.rewrite_vision(model)["MatMulBf16"] == 0
    assert [n.op_type for n in model.graph.node] == ["Cast", "MatMul", "Add", "Identity"]

    model = _linear_graph(64, 48, w, b)
    model.graph.initializer[0].data_type = TensorProto.FLOAT16  # not bfloat16: the float path stays
    assert kernels.rewrite_vision(model)["MatMulBf16"] == 0

    model = _attention_graph(64, 2)
    assert kernels.rewrite_vision(model) == {"MatMulBf16": 0, "MultiHeadAttention": 0}  # AMX only: asked for
    assert kernels.rewrite_vision(model, attention=True)["MultiHeadAttention"] == 1
    model = _attention_graph(64, 2)
    model.graph.node[0].attribute.append(helper.make_attribute("unidirectional", 1))  # not what ours computes
    assert kernels.rewrite_vision(model, attention=True)["MultiHeadAttention"] == 0


def _op_case(rows: int, k: int, n: int, with_bias: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if with_bias else None
    ref = bf16_round(x[0]) @ bf16_round(w) + (b if with_bias else 0.0)
    return x, w, b, ref


@needs_bf16
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows, k, n", [(1, 64, 48), (37, 100, 50), (300, 1024, 96), (33, 4096, 1024), (2, 8, 3)])
def test_matmul_bf16_matches_numpy(rows, k, n, with_bias):
    """bf16(X) @ W + b with float32 sums: equal to the float64 product of the same bfloat16 inputs within
    float32 summation error; shapes whose K, N and rows are not multiples of the kernel's blocks."""
    x, w, b, ref = _op_case(rows, k, n, with_bias)
    model = _linear_graph(k, n, w, b)
    assert kernels.rewrite_vision(model, threads=2)["MatMulBf16"] == 1
    y = _run(model, x)[0]
    scale = np.abs(bf16_round(x[0])) @ np.abs(bf16_round(w)) + 1e-30  # the sum of |terms| bounds the error
    assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-6), np.max(np.abs(y - ref) / scale)
    # and not the float32 product: the inputs were rounded (else this test could not tell)
    exact = x[0].astype(np.float64) @ w.astype(np.float64) + (b if with_bias else 0.0)
    if k >= 64:
        assert np.max(np.abs(y - exact)) > 10 * np.max(np.abs(y - ref))


@needs_bf16
def test_rows_do_not_depend_on_the_batch():
    """A row's result is the same alone or among others (a tile's embeddings alone or in a batch)."""
    x, w, b, _ = _op_case(70, 256, 96, True, seed=1)
    model = _linear_graph(256, 96, w, b)
    kernels.rewrite_vision(model, threads=2)
    together = _run(model, x)[0]
    for r in (0, 31, 32, 69):
        alone = _run(model, x[:, r : r + 1])[0]
        assert np.array_equal(alone[0], together[r])


def _attention_graph(width: int, heads: int):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None, width]) for n in "QKV"]
    node = helper.make_node("MultiHeadAttention", ["Q", "K", "V"], ["Y"], domain=kernels.SOURCE_DOMAIN, num_heads=heads)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


needs_amx = pytest.mark.skipif(kernels.bf16_path() != "amx", reason="the vision attention kernel runs on AMX only")


@needs_amx
@pytest.mark.parametrize(
    "batch, seq, heads, head_dim", [(1, 37, 2, 64), (2, 70, 3, 16), (1, 300, 1, 96), (1, 1, 2, 32)]
)
def test_vision_attention_matches_numpy(batch, seq, heads, head_dim):
    """softmax(bf16(Q) bf16(K)^T / sqrt(d)) rounded to bfloat16, times bf16(V): against float64 numpy
    on the same rounded inputs, within one bfloat16 rounding of the probabilities."""
    rng = np.random.default_rng(seq)
    q, k, v = (rng.standard_normal((batch, seq, heads * head_dim)).astype(np.float32) for _ in range(3))
    model = _attention_graph(heads * head_dim, heads)
    assert kernels.rewrite_vision(model, attention=True) == {"MatMulBf16": 0, "MultiHeadAttention": 1}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(kernels.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"Q": q, "K": k, "V": v})[0]

    def heads_of(x):
        return bf16_round(x).reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    s = heads_of(q) @ heads_of(k).transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    vh = heads_of(v)
    ref = (bf16_round(p) @ vh).transpose(0, 2, 1, 3).reshape(y.shape)
    bound = (2.0**-8 * p @ np.abs(vh)).transpose(0, 2, 1, 3).reshape(y.shape) + 1e-5
    assert np.all(np.abs(y - ref) <= bound), np.max(np.abs(y - ref) / bound)
    exact = (p @ heads_of(v)).transpose(0, 2, 1, 3).reshape(y.shape)
    if seq > 1:  # the probabilities were rounded (else this test could not tell)
        assert np.sqrt(np.mean((y - exact) ** 2)) > 10 * np.sqrt(np.mean((y - ref) ** 2))


@needs_bf16
def test_the_avx512bf16_path_too():
    """On a CPU with AMX, the AVX512-BF16 path (what CPUs without AMX run) passes the same tests,
    forced with INTERNVL_EDGE_BF16 in a child process."""
    if kernels.bf16_path() != "amx":
        pytest.skip("this CPU runs the AVX512-BF16 path already (no AMX)")
    env = {**os.environ, "INTERNVL_EDGE_BF16": "avx512bf16"}
    here = os.path.dirname(os.path.abspath(__file__))
    code = "from internvl_edge import kernels; print(kernels.bf16_path())"
    assert child_prints(code, env) == "avx512bf16"
    tests = [
        f"{here}/test_bf16_vision.py::test_matmul_bf16_matches_numpy",
        f"{here}/test_bf16_vision.py::test_rows_do_not_depend_on_the_batch",
    ]
    assert "skipped" not in run_tests_in_child(tests, env)


def _rel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, smallest cosine over the tokens) of a against ref."""
    a, ref = a.astype(np.float64).reshape(-1, a.shape[-1]), ref.astype(np.float64).reshape(-1, ref.shape[-1])
    rel = float(np.sqrt(((a - ref) ** 2).mean() / (ref**2).mean()))
    cos = (a * ref).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(ref, axis=-1)
    return rel, float(cos.min())


@needs_bf16
@pytest.mark.parametrize("ckpt", ["tiny_bf16", "tiny35_bf16"])
def test_image_embeddings_against_transformers(ckpt, checkpoint, bundle, images, monkeypatch):
    """The default bundle's vision encoder on the bfloat16 path: its weights held once, in bfloat16; its
    embeddings of two images (one tile; 2x2 tiles + thumbnail) against transformers' in float32, within
    what transformers itself gives running the model in bfloat16, and the float32 path (the same bundle
    with the bfloat16 path off) against the same reference."""
    from reference import load_reference
    from test_reference import reference_inputs

    bdir = bundle(ckpt, "w4bf16")
    _, pv = reference_inputs(checkpoint(ckpt), [images["square"], images["large"]])
    ref = load_reference(checkpoint(ckpt))
    with torch.no_grad():
        want = ref.model.get_image_features(pixel_values=torch.from_numpy(pv)).pooler_output.numpy()
        ref = ref.to(torch.bfloat16)
        hf_bf16 = ref.model.get_image_features(pixel_values=torch.from_numpy(pv).bfloat16()).pooler_output
        hf_bf16 = hf_bf16.float().numpy()

    packed_before = kernels.bf16_pack_stats()[0]
    backend = OrtBackend(load_manifest(bdir), threads=2)
    assert backend.vision_kernel.startswith(f"internvl-edge bf16 ({kernels.bf16_path()})")
    assert kernels.bf16_pack_stats()[0] > packed_before
    ours = backend.encode_images(pv)
    monkeypatch.setattr(kernels, "bf16_path", lambda: None)
    f32 = OrtBackend(load_manifest(bdir), threads=2)
    assert f32.vision_kernel == "onnxruntime"
    ours_f32 = f32.encode_images(pv)

    rel, cos = _rel(ours, want)
    rel_hf, cos_hf = _rel(hf_bf16, want)
    rel_f32, _ = _rel(ours_f32, want)
    assert rel_f32 < 1e-4  # the float32 path: the reference's function up to summation order
    assert rel > 10 * rel_f32  # the bfloat16 path is on (its rounding shows)
    assert rel <= rel_hf and cos >= cos_hf, (rel, rel_hf, cos, cos_hf)
    assert rel < 2e-2 and cos > 0.999
