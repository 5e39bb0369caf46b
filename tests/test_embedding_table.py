"""The numpy table lookup that replaces the embedding session (embedding_table.py), against ONNX
Runtime running the same net, and the page-aligned buffers the CPU backend's caches live in."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from internvl_edge.api import load
from internvl_edge.backends.ort import aligned_zeros
from internvl_edge.embedding_table import plain_table


def ort_session(path_or_bytes):
    return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("quantize", ["bf16", "f16", "f32"])
def test_lookup_matches_the_embedding_net_bit_for_bit(bundle, quantize):
    path = bundle("tiny_bf16", quantize, seq_length=256) + "/embedding.onnx"
    lookup = plain_table(path)
    assert lookup is not None
    vocab = lookup.vocab
    ids = np.array([[0, 1, vocab - 1, 7, 7], [-1, -vocab, 123, vocab // 2, 3]], np.int64)
    expected = ort_session(path).run(None, {"input_ids": ids})[0]
    got = lookup(ids)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_ids_outside_the_table_are_refused(bundle):
    lookup = plain_table(bundle("tiny_bf16", "bf16", seq_length=256) + "/embedding.onnx")
    for bad in (lookup.vocab, -lookup.vocab - 1):
        with pytest.raises(ValueError, match="token ids must lie in"):
            lookup(np.array([[1, bad]], np.int64))


def test_the_backend_uses_the_lookup_instead_of_a_session(bundle):
    model = load(bundle("tiny_bf16", "w4bf16", seq_length=256), threads=1)
    backend = model.backend
    assert backend.embedding_lookup is not None and "embedding" not in backend.sessions
    assert backend.describe()["embedding"] == "numpy table lookup"
    ids = np.array([[5, 9, 11]], np.int64)
    expected = ort_session(backend.manifest.net_path("embedding")).run(None, {"input_ids": ids})[0]
    assert np.array_equal(backend.embed(ids), expected)


def small_net(nodes, table: np.ndarray, out_type=TensorProto.FLOAT) -> bytes:
    graph = helper.make_graph(
        nodes,
        "embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("inputs_embeds", out_type, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([2.0], np.float32), "two")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_only_the_plain_lookup_is_taken(tmp_path):
    table = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    gather = helper.make_node("Gather", ["table", "input_ids"], ["rows"], axis=0)
    cases = {
        "plain": [gather, helper.make_node("Identity", ["rows"], ["inputs_embeds"])],
        "scaled": [gather, helper.make_node("Mul", ["rows", "two"], ["inputs_embeds"])],
        "axis 1": [helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"], axis=1)],
        "cast to half": [gather, helper.make_node("Cast", ["rows"], ["inputs_embeds"], to=TensorProto.FLOAT16)],
    }
    found = {}
    for name, nodes in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.onnx"
        out = TensorProto.FLOAT16 if name == "cast to half" else TensorProto.FLOAT
        path.write_bytes(small_net(nodes, table, out))
        found[name] = plain_table(str(path))
    assert found["plain"] is not None
    assert [name for name, lookup in found.items() if lookup is None] == ["scaled", "axis 1", "cast to half"]
    ids = np.array([[3, 49, -2]], np.int64)
    expected = ort_session(str(tmp_path / "plain.onnx")).run(None, {"input_ids": ids})[0]
    assert np.array_equal(found["plain"](ids), expected)


def test_half_precision_table_without_a_cast_is_not_taken(tmp_path):
    table = np.ones((10, 4), np.float16)
    path = tmp_path / "half.onnx"
    path.write_bytes(
        small_net([helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"])], table, TensorProto.FLOAT16)
    )
    assert plain_table(str(path)) is None


@pytest.mark.parametrize("align", [64, 4096])
def test_aligned_zeros(align):
    for shape in [(3, 5), (1, 2, 300, 128), (7,)]:
        a = aligned_zeros(shape, np.float32, align=align)
        assert a.ctypes.data % align == 0 and a.shape == shape and a.dtype == np.float32
        assert a.flags.c_contiguous and a.flags.writeable and not a.any()


def test_the_caches_start_on_page_boundaries(bundle):
    """numpy's own large arrays start 16 bytes past a 64-byte boundary, which made every vector load
    of a cache row straddle two cache lines."""
    backend = load(bundle("tiny_bf16", "w4bf16", seq_length=256), threads=1).backend
    cache = backend.new_cache(2)
    assert all(b.ctypes.data % 4096 == 0 for b in cache.buffers)
    assert cache.binding["logits"].ctypes.data % 4096 == 0
