"""The decoder graph's rewrites onto our kernels, in memory at load (graph only, in place): the nodes
our kernels compute moved to our domain (`takes`, `takes_attention`, `rewrite`), then the nodes around
them folded into them (`fold_qk_norms`, `fuse_swiglu`, `fuse_norms`). Every pass looks the graph up in
one `GraphIndex`, built once per model and kept current by the edits the passes make through it.

onnx is imported where it is used: the runtime imports this package whether or not a graph is rewritten.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .library import EIGHT_BIT_ISAS, isa
from .settings import KernelSettings, settings

if TYPE_CHECKING:
    import numpy as np
    from onnx import ModelProto, NodeProto

DOMAIN = "ai.internvl_edge"
SOURCE_DOMAIN = "com.microsoft"
OP = "MatMulNBits"
ATTENTION_OP = "GroupQueryAttention"
BF16_OP = "MatMulBf16"
VISION_ATTENTION_OP = "MultiHeadAttention"
LAYER_OP = "DecoderLayer"
BF16_MAX_HEAD = 256  # bf16gemm.h: BF16_ATTN_MAX_HEAD
CHUNK = 64  # q4gemm.c reads B 64 weights at a time: blocks must be a multiple of it
LANES = 16  # attention.c: head_dim a multiple of its vector width, at most 256, <= 16 query heads per KV head
# where the runtime moves attention to attention.c: every ISA it is built for. Its AVX2 build (8-float
# vectors) decodes as fast as the AVX-512 one and prefills 1.5-2.2x slower than ONNX Runtime's AVX-512
# kernel (benchmarks/attention.py with INTERNVL_EDGE_ISA=avx2; docs/performance-notes.md), against which
# an AVX2-only CPU's ORT would also be slower; take "avx2" and "avxvnni" out here to keep ORT's attention
ATTENTION_ISAS = ("avx512vnni", "avxvnni", "avx2")
NORM_OPS = {("SkipSimplifiedLayerNormalization", SOURCE_DOMAIN), ("SimplifiedLayerNormalization", "")}


def attrs(node: NodeProto) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class GraphIndex:
    """One model's graph as the passes look it up: the node that writes each tensor, the nodes that read
    it, the initializers and the declared shapes by name. Built once per model; the passes edit node
    inputs, outputs and the node list through it (`set_inputs`, `set_outputs`, `remove`) so that it
    stays current. Attributes and domains they edit on the nodes directly: the index does not hold them."""

    def __init__(self, model: ModelProto):
        graph = model.graph
        self.model = model
        self.producer: dict[str, NodeProto] = {}
        self.readers: dict[str, list[NodeProto]] = {}
        for node in graph.node:
            self._link(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.shapes: dict[str, list[int | None]] = {}
        for value in list(graph.input) + list(graph.value_info):
            dims = value.type.tensor_type.shape.dim
            self.shapes.setdefault(value.name, [d.dim_value if d.HasField("dim_value") else None for d in dims])

    def _link(self, node: NodeProto) -> None:
        for name in node.input:
            if name:
                self.readers.setdefault(name, []).append(node)
        for name in node.output:
            if name:
                self.producer[name] = node

    def _unlink(self, node: NodeProto) -> None:
        for name in set(node.input):
            if name in self.readers:
                self.readers[name] = [n for n in self.readers[name] if n is not node]
        for name in node.output:
            if self.producer.get(name) is node:
                del self.producer[name]

    # lookups

    def read_by(self, name: str) -> list[NodeProto]:
        return self.readers.get(name, [])

    def read_only_by(self, name: str, node: NodeProto) -> bool:
        """Whether `node` alone reads `name` (and it is not an output of the graph)."""
        found = self.read_by(name)
        return len(found) == 1 and found[0] is node and name not in self.outputs

    def only_reader(self, name: str, op_type: str) -> NodeProto | None:
        """The one node that reads `name`, when it is an `op_type` and `name` is not a graph output."""
        found = self.read_by(name)
        if len(found) == 1 and found[0].op_type == op_type and name not in self.outputs:
            return found[0]
        return None

    def unused(self, name: str) -> bool:
        return not self.read_by(name) and name not in self.outputs

    def float_dims(self, name: str) -> list[int] | None:
        """The dimensions of the float initializer `name`, or None when there is none of that name."""
        from onnx import TensorProto

        t = self.initializers.get(name)
        return list(t.dims) if t is not None and t.data_type == TensorProto.FLOAT else None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` when it is an inline initializer (small constants are), else None."""
        from onnx import numpy_helper

        t = self.initializers.get(name)
        return numpy_helper.to_array(t) if t is not None and not t.data_location else None

    def shape(self, name: str) -> list[int | None] | None:
        """The declared shape of a graph input or value_info (None for a symbolic dimension)."""
        return self.shapes.get(name)

    # edits

    def set_inputs(self, node: NodeProto, names: list[str]) -> None:
        self._unlink(node)
        del node.input[:]
        node.input.extend(names)
        self._link(node)

    def set_outputs(self, node: NodeProto, names: list[str]) -> None:
        self._unlink(node)
        del node.output[:]
        node.output.extend(names)
        self._link(node)

    def remove(self, *nodes: NodeProto) -> None:
        for node in nodes:
            self._unlink(node)
            self.model.graph.node.remove(node)

    def replace(self, nodes: list[NodeProto], node: NodeProto) -> NodeProto:
        """Put `node` where the first of `nodes` stood (its inputs are computed before it) and remove
        them all; returns the node as the graph holds it (the graph keeps a copy)."""
        graph = self.model.graph.node
        position = next(i for i, n in enumerate(graph) if n is nodes[0])
        self.remove(*nodes)
        graph.insert(position, node)
        kept = graph[position]
        self._link(kept)
        return kept

    def ours(self, op_type: str) -> list[NodeProto]:
        """The nodes of `op_type` in our domain (a list: the caller may remove others meanwhile)."""
        return [n for n in self.model.graph.node if n.domain == DOMAIN and n.op_type == op_type]


def takes(node: NodeProto, index: GraphIndex | None = None) -> bool:
    """Whether q4gemm computes this node: a com.microsoft MatMulNBits with int8 activations
    (accuracy_level 4: what the kernel does), blocks of a multiple of 64 and no g_idx, and 4-bit
    weights; or 8-bit ones (the decoder's lm_head at --lm-head-bits 8) on a VNNI CPU when B, scales and
    zero points are initializers of the indexed model (the kernel packs them once; q4gemm.h)."""
    if node.op_type != OP or node.domain != SOURCE_DOMAIN:
        return False
    a = attrs(node)
    block = a.get("block_size", 0)
    has_g_idx = len(node.input) > 4 and node.input[4] != ""
    if a.get("accuracy_level", 0) != 4 or block % CHUNK or block > 1024 or has_g_idx:
        return False
    if a.get("bits") == 8:
        if index is None or isa() not in EIGHT_BIT_ISAS:
            return False
        return all(name in index.initializers for name in node.input[1:4] if name)
    return a.get("bits") == 4


def takes_attention(node: NodeProto, index: GraphIndex) -> bool:
    """Whether attention.c computes this node: a com.microsoft GroupQueryAttention as nets/decoder.py
    writes it (packed QKV, rotate-half rotary from cos/sin caches, query_seqlens, nothing else: no
    softcap, window, custom scale, position ids or bias) on float caches whose head size it takes."""
    if node.op_type != ATTENTION_OP or node.domain != SOURCE_DOMAIN:
        return False
    a = attrs(node)
    ins = list(node.input)
    used = (0, 3, 4, 5, 6, 7, 8, 16)
    if len(ins) != 17 or ins[1] or ins[2] or any(ins[9:16]) or not all(ins[i] for i in used):
        return False
    plain = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"}
    if set(a) - plain or a.get("do_rotary") != 1 or a.get("rotary_interleaved", 0) != 0:
        return False
    heads, kv_heads = a.get("num_heads", 0), a.get("kv_num_heads", 0)
    shape = index.shape(ins[3])  # past_key [batch, kv_heads, capacity, head_dim]
    if not shape or len(shape) != 4 or not shape[3] or shape[1] != kv_heads:
        return False
    head_dim = shape[3]
    grouped = kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 16
    return grouped and head_dim % LANES == 0 and head_dim <= 256


# DecoderLayer's linears: attribute prefix and the node inputs of scales and zero points, as ort_layer.c's
# enum of inputs numbers them (and fuse_layers writes them)
LAYER_LINEARS = {"qkv_": (3, 4), "o_": (17, 18), "gate_up_": (20, 21), "down_": (24, 25)}


def table_inputs(model: ModelProto) -> list[str]:
    """The scales and zero-point initializers of our MatMulNBits nodes in `model` (after rewrite), and of
    the linears of our DecoderLayer nodes, that q4gemm replaces by its own table, which is what decode
    then reads (q4gemm.h, q4_blocks_bytes: for constant scales, 8-bit weights, or 4-bit ones in blocks of
    a multiple of 128 and N >= 8)."""
    constants = {t.name for t in model.graph.initializer}

    def tabled(a: dict, prefix: str) -> bool:
        bits, block, n = (a.get(prefix + x, 0) for x in ("bits", "block_size", "N"))
        return bits == 8 or (block % 128 == 0 and n >= 8)

    names = []
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        if node.op_type == OP and node.input[2] in constants and tabled(attrs(node), ""):
            names += [name for name in node.input[2:4] if name]
        elif node.op_type == LAYER_OP:
            a = attrs(node)
            for prefix, (scales, zero_points) in LAYER_LINEARS.items():
                if node.input[scales] in constants and tabled(a, prefix):
                    names += [name for name in node.input[scales : zero_points + 1] if name]
    return names


def fuse_swiglu(index: GraphIndex) -> int:
    """Fold silu(gate) * up into the gate/up linear that feeds it (our MatMulNBits, attribute swiglu=1):
    the pattern nets/decoder.py writes, MatMulNBits -> Split in two equal halves -> Sigmoid(gate),
    Mul(gate, sigmoid) -> Mul(silu, up), each intermediate used by that pattern only. The separate
    nodes cost 0.8 ms per decoded token on InternVL3-2B shapes (docs/performance-notes.md,
    "4-bit linears") and a round trip of the [rows, 2 x intermediate] result through memory in
    prefill. Returns how many."""
    from onnx import helper

    fused = 0
    for mm in index.ours(OP):
        a = attrs(mm)
        if "swiglu" in a or a.get("bits") != 4:  # the fused epilogue is the 4-bit path's
            continue
        split = index.only_reader(mm.output[0], "Split")
        if split is None or len(split.output) != 2 or len(split.input) != 2 or attrs(split).get("axis", 0) != -1:
            continue
        sizes = index.constant(split.input[1])
        n = a.get("N", 0)
        if sizes is None or list(sizes) != [n // 2, n // 2] or n % 16:
            continue
        gate, up = split.output
        gate_readers = index.read_by(gate)
        sigmoid = next((r for r in gate_readers if r.op_type == "Sigmoid"), None)
        silu = next((r for r in gate_readers if r.op_type == "Mul"), None)
        if len(gate_readers) != 2 or gate in index.outputs or sigmoid is None or silu is None:
            continue
        if sorted(silu.input) != sorted([gate, sigmoid.output[0]]):
            continue
        if index.only_reader(sigmoid.output[0], "Mul") is not silu:
            continue
        product = index.only_reader(silu.output[0], "Mul")
        if product is None or sorted(product.input) != sorted([silu.output[0], up]):
            continue
        if index.only_reader(up, "Mul") is not product:
            continue
        out = product.output[0]
        index.remove(split, sigmoid, silu, product)
        index.set_outputs(mm, [out, *mm.output[1:]])
        mm.attribute.append(helper.make_attribute("swiglu", 1))
        fused += 1
    return fused


def fuse_norms(index: GraphIndex) -> int:
    """Fold the RMS norm that feeds one of our MatMulNBits into it (attribute norm_epsilon, inputs
    skip and gamma, the residual sum as the node's second output; rms_norm.h): a
    SkipSimplifiedLayerNormalization (com.microsoft) with input, skip and gamma only, or a
    SimplifiedLayerNormalization over the last axis, whose normed output that linear alone reads, whose
    mean and inverse-deviation outputs nothing reads, whose gamma is a float constant of K values and
    whose skip is computed (ours takes a skip of the input's shape; a constant one may be broadcast).
    nets/decoder.py writes two per layer plus the final norm; without them as nodes of their own,
    decode on InternVL3-2B shapes is up to 1.03x faster (docs/performance-notes.md, "4-bit linears").
    Returns how many."""
    from onnx import helper

    fused = 0
    for mm in index.ours(OP):
        a = attrs(mm)
        if "norm_epsilon" in a:
            continue
        norm = index.producer.get(mm.input[0])
        if norm is None or (norm.op_type, norm.domain) not in NORM_OPS or norm.output[0] != mm.input[0]:
            continue
        if not index.read_only_by(mm.input[0], mm):
            continue
        skipped = norm.op_type.startswith("Skip")
        ins = list(norm.input)
        width = 3 if skipped else 2
        if len(ins) < width or any(ins[width:]) or index.float_dims(ins[width - 1]) != [a["K"]]:
            continue
        if skipped and index.float_dims(ins[1]) is not None:  # a constant skip may broadcast; ours takes A's shape
            continue
        na = attrs(norm)
        if not skipped and na.get("axis", -1) != -1:
            continue
        outs = list(norm.output)
        if not all(index.unused(o) for o in outs[1:3] if o):
            continue
        total = outs[3] if skipped and len(outs) > 3 and outs[3] and not index.unused(outs[3]) else ""
        index.remove(norm)
        inputs = list(mm.input) + [""] * (6 - len(mm.input))
        inputs[0] = ins[0]
        index.set_inputs(mm, inputs + [ins[1] if skipped else "", ins[width - 1]])
        if total:
            index.set_outputs(mm, list(mm.output) + [total])
        mm.attribute.append(helper.make_attribute("norm_epsilon", float(na.get("epsilon", 1e-5))))
        fused += 1
    return fused


def halve_caches(model: ModelProto, index: GraphIndex) -> int:
    """Make the KV cache float16 (attention.h, kv_half): the past key and value inputs and present
    outputs of every one of our attention nodes become float16 graph inputs and outputs, when every
    GroupQueryAttention of the graph is ours and each of those tensors is a graph input (output)
    that only that node reads (writes); else nothing changes, and the cache stays float32. The
    runtime allocates the cache with the types the session then declares (backends/ort.py). Returns
    how many nodes' caches."""
    from onnx import TensorProto

    nodes = [n for n in model.graph.node if n.op_type == ATTENTION_OP]
    if not nodes or any(n.domain != DOMAIN for n in nodes):
        return 0
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    changed = []
    for node in nodes:
        past, present = list(node.input[1:3]), list(node.output[1:3])
        if not all(name in inputs and index.read_only_by(name, node) for name in past):
            return 0
        if not all(name in outputs for name in present):
            return 0
        changed += [inputs[name] for name in past] + [outputs[name] for name in present]
    if any(v.type.tensor_type.elem_type != TensorProto.FLOAT for v in changed):
        return 0
    for value in changed:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return len(nodes)


def fold_qk_norms(index: GraphIndex, attention: NodeProto) -> bool:
    """Fold Qwen3's per-head query and key norms into our attention node `attention` (already moved, its
    first input the packed qkv): the pattern nets/decoder.py writes, Split(qkv) in q, k, v ->
    Reshape [0, 0, heads, head_dim] -> SimplifiedLayerNormalization over the last axis with a float
    constant gamma of head_dim values -> Reshape [0, 0, heads x head_dim] for q and for k -> Concat(q, k,
    v), each intermediate used by that pattern only and both norms with one epsilon. The node then reads
    the linear's qkv itself, with inputs q_norm, k_norm and attribute qk_norm_epsilon (attention.h), so
    the queries and keys are normed in the pass that rotates them instead of by eight nodes, two of
    them copies. Returns whether it did (when the pattern is not there, nothing changes)."""
    from onnx import helper

    def only(name: str, reader: NodeProto, op_type: str) -> NodeProto | None:
        """The producer of `name`, of `op_type`, when `reader` alone reads it."""
        node = index.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", None):
            return None
        return node if index.read_only_by(name, reader) else None

    a = attrs(attention)
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    concat = only(attention.input[0], attention, "Concat")
    if concat is None or len(concat.input) != 3 or attrs(concat).get("axis") not in (-1, 2):
        return False
    split = index.producer.get(concat.input[2])
    if split is None or split.op_type != "Split" or len(split.output) != 3 or concat.input[2] != split.output[2]:
        return False
    sizes = index.constant(split.input[1]) if len(split.input) > 1 else None
    if sizes is None or len(sizes) != 3 or sizes[0] % heads or attrs(split).get("axis") not in (-1, 2):
        return False
    hd = int(sizes[0]) // heads
    if list(sizes) != [heads * hd, kv_heads * hd, kv_heads * hd] or not index.read_only_by(split.output[2], concat):
        return False
    chain, gammas, epsilons = [concat, split], [], set()
    for k, n_heads in ((0, heads), (1, kv_heads)):
        back = only(concat.input[k], concat, "Reshape")
        norm = back and only(back.input[0], back, "SimplifiedLayerNormalization")
        into = norm and only(norm.input[0], norm, "Reshape")
        if not into or into.input[0] != split.output[k] or not index.read_only_by(split.output[k], into):
            return False
        shapes = [index.constant(into.input[1]), index.constant(back.input[1])]
        if any(x is None for x in shapes) or [list(x) for x in shapes] != [[0, 0, n_heads, hd], [0, 0, n_heads * hd]]:
            return False
        na = attrs(norm)
        if na.get("axis", -1) not in (-1, 3) or len(norm.input) != 2 or index.float_dims(norm.input[1]) != [hd]:
            return False
        if any(not index.unused(o) for o in norm.output[1:] if o):
            return False
        chain += [back, norm, into]
        gammas.append(norm.input[1])
        epsilons.add(float(na.get("epsilon", 1e-5)))
    if len(epsilons) != 1:
        return False
    qkv = split.input[0]
    index.remove(*chain)
    index.set_inputs(attention, [qkv, *attention.input[1:], *gammas])
    attention.attribute.append(helper.make_attribute("qk_norm_epsilon", epsilons.pop()))
    return True


def fuse_layers(model: ModelProto, index: GraphIndex) -> int:
    """Fuse each decoder layer's five nodes of ours into one DecoderLayer (ort_layer.c): the qkv linear
    with its input norm -> attention -> o_proj -> the gate/up linear with its post-attention norm (whose
    skip is the qkv norm's sum, or the layer's input where the qkv norm has no skip) and SwiGLU -> down,
    as the passes before leave them, each intermediate read by the next node alone and nothing but the
    qkv linear's bias, the norms' weights and Qwen3's query/key norms besides the 4-bit weights, all of
    them constant initializers. ONNX Runtime then runs one node per layer instead of five, and a layer's
    values between its kernels never pass through its allocator: decode 1.01x, prefill faster
    (docs/performance-notes.md, "One node per decoder layer"). Returns how many layers."""
    from onnx import helper

    graph_inputs = {v.name for v in model.graph.input}

    def constant(name: str) -> bool:
        return name in index.initializers and name not in graph_inputs

    def nbits_inputs(node: NodeProto) -> list[str]:
        return list(node.input) + [""] * (8 - len(node.input))

    def next_of(node: NodeProto, op_type: str) -> NodeProto | None:
        found = index.only_reader(node.output[0], op_type)
        return found if found is not None and found.domain == DOMAIN and found.input[0] == node.output[0] else None

    fused = 0
    for qkv in index.ours(OP):
        attention = next_of(qkv, ATTENTION_OP)
        o = attention and next_of(attention, OP)
        gate_up = o and next_of(o, OP)
        down = gate_up and next_of(gate_up, OP)
        if down is None:
            continue
        la = [attrs(n) for n in (qkv, o, gate_up, down)]
        at = attrs(attention)
        if any("norm_epsilon" in x for x in (la[1], la[3])) or any(x.get("swiglu") for x in (la[0], la[1], la[3])):
            continue
        if not la[2].get("swiglu") or "norm_epsilon" not in la[0] or "norm_epsilon" not in la[2]:
            continue
        if len({(x.get("batches"), x.get("pack", 1)) for x in la}) != 1:
            continue
        qi, oi, gi, di = (nbits_inputs(n) for n in (qkv, o, gate_up, down))
        if any(x[4] for x in (qi, oi, gi, di)) or any(x[5] or x[6] or x[7] for x in (oi, di)) or gi[5]:
            continue
        h = qkv.output[1] if len(qkv.output) > 1 else ""
        if qi[6]:  # the qkv norm sums a skip: the gate/up norm's skip is that sum, read by it alone
            if not h or gi[6] != h or not index.read_only_by(h, gate_up):
                continue
        elif h or gi[6] != qi[0]:  # the first layer: the gate/up norm's skip is the layer's input
            continue
        if len(gate_up.output) < 2 or not gate_up.output[1]:
            continue
        qk_norms = list(attention.input[8:10]) + [""] * (2 - len(attention.input[8:10]))
        weights = [*qi[1:4], qi[5], qi[7], *oi[1:4], *gi[1:4], gi[7], *di[1:4], *qk_norms]
        if not all(constant(name) for name in weights if name) or not all(qi[1:3] + oi[1:3] + gi[1:3] + di[1:3]):
            continue
        inputs = [qi[0], qi[6], *qi[1:4], qi[5], qi[7], *attention.input[1:8], *qk_norms, *oi[1:4], *gi[1:4], gi[7]]
        inputs += di[1:4]
        outputs = [down.output[0], gate_up.output[1], *attention.output[1:3]]
        layer = helper.make_node(LAYER_OP, inputs, outputs, name=f"{qkv.name or 'layer'}/DecoderLayer", domain=DOMAIN)
        kept = {"num_heads": at["num_heads"], "kv_num_heads": at["kv_num_heads"], "batches": la[0].get("batches")}
        kept["pack"] = la[0].get("pack")
        kept["qk_norm_epsilon"] = at.get("qk_norm_epsilon")
        for prefix, a in zip(("qkv_", "o_", "gate_up_", "down_"), la, strict=True):
            for name in ("K", "N", "bits", "block_size", "norm_epsilon", "swiglu"):
                kept[prefix + name] = a.get(name)
        layer.attribute.extend(helper.make_attribute(k, v) for k, v in kept.items() if v is not None)
        index.replace([qkv, attention, o, gate_up, down], layer)
        fused += 1
    return fused


def takes_vision_attention(node: NodeProto, index: GraphIndex) -> bool:
    """Whether bf16gemm.h's AMX attention computes this node: a com.microsoft MultiHeadAttention as
    nets/vision.py writes it (query, key and value only: no mask, bias or past; attributes num_heads and
    scale only), whose heads are at most 256 wide where the Split that makes the query says so."""
    if node.op_type != "MultiHeadAttention" or node.domain != SOURCE_DOMAIN:
        return False
    if len(node.input) != 3 or not all(node.input) or len(node.output) != 1:
        return False
    a = attrs(node)
    if set(a) - {"num_heads", "scale"} or a.get("num_heads", 0) <= 0:
        return False
    split = index.producer.get(node.input[0])
    sizes = (
        index.constant(split.input[1])
        if split is not None and split.op_type == "Split" and len(split.input) > 1
        else None
    )
    return sizes is None or int(sizes[0]) // a["num_heads"] <= BF16_MAX_HEAD


def rewrite_vision(model: ModelProto, threads: int | None = None, attention: bool = False) -> dict:
    """Move the vision encoder's bfloat16 linears to our MatMulBf16 (in place, graph only): the pattern
    nets/linear.py writes, MatMul(x, Cast(W) to float) with W a bfloat16 initializer [K, N] that this
    Cast alone reads, and the Add of a float constant bias [N] that follows when the MatMul's result
    goes to it alone. The Cast goes (no float32 copy of W is ever made: ONNX Runtime would fold it into
    one) and the bias is added by the kernel. With `attention` (the AMX path), its MultiHeadAttention
    nodes move to ours too (takes_vision_attention). Call it only where `bf16_path()` names a path.
    Returns how many moved: {"MatMulBf16": linears, "MultiHeadAttention": attention nodes}.
    `threads`: the session's intra-op threads; each linear splits its work into 8 contiguous ranges per
    thread (attribute `batches`)."""
    from onnx import TensorProto, helper

    index = GraphIndex(model)
    moved = 0
    heads = 0
    if attention:
        for node in model.graph.node:
            if takes_vision_attention(node, index):
                node.domain = DOMAIN
                heads += 1
    for mm in [n for n in model.graph.node if n.op_type == "MatMul" and n.domain in ("", None)]:
        cast = index.producer.get(mm.input[1])
        if cast is None or cast.op_type != "Cast" or attrs(cast).get("to") != TensorProto.FLOAT:
            continue
        w = index.initializers.get(cast.input[0])
        if (
            w is None
            or w.data_type != TensorProto.BFLOAT16
            or len(w.dims) != 2
            or not index.read_only_by(cast.output[0], mm)
        ):
            continue
        if not index.read_only_by(cast.input[0], cast):
            continue
        k, n = (int(x) for x in w.dims)
        inputs, out = [mm.input[0], cast.input[0]], mm.output[0]
        add = index.only_reader(out, "Add")
        if add is not None:
            bias = next((x for x in add.input if x != out), None)
            if bias is not None and index.float_dims(bias) == [n] and sorted(add.input) == sorted([out, bias]):
                inputs.append(bias)
                out = add.output[0]
                index.remove(add)
        index.remove(cast)
        index.set_inputs(mm, inputs)
        index.set_outputs(mm, [out])
        mm.op_type, mm.domain = BF16_OP, DOMAIN
        mm.attribute.extend([helper.make_attribute("K", k), helper.make_attribute("N", n)])
        if threads:
            mm.attribute.append(helper.make_attribute("batches", 8 * int(threads)))
        moved += 1
    if (moved or heads) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return {BF16_OP: moved, VISION_ATTENTION_OP: heads}


def rewrite(
    model: ModelProto,
    threads: int | None = None,
    kernel_settings: KernelSettings | None = None,
    half_cache: bool = False,
) -> dict:
    """Move the nodes our kernels take to our domain (in place, graph only), fold Qwen3's query/key
    norms into the moved attention nodes, then fuse SwiGLU into the moved gate/up linears and the
    norms that feed moved linears into them; with `half_cache`, make the KV cache float16
    (halve_caches). Returns how many moved, by op type, how many of each were fused, and how many
    attention nodes' caches are float16 ("half_cache").
    `threads`: the session's intra-op threads; each MatMulNBits node then splits its work into 2
    contiguous ranges per thread (attribute `batches`; the op's default is 8).
    `kernel_settings`: which of our kernels may run (default: the process's, settings.py).
    Last, each decoder layer's five nodes of ours become one DecoderLayer (fuse_layers; "layer": how many)."""
    from onnx import helper

    s = kernel_settings or settings()
    index = GraphIndex(model)
    moved = {OP: 0, ATTENTION_OP: 0, "swiglu": 0, "norm": 0, "qk_norm": 0, "half_cache": 0, "layer": 0}
    attention_here = s.attention and isa() in ATTENTION_ISAS
    for node in list(model.graph.node):
        if s.matmul and takes(node, index):
            node.domain = DOMAIN
            if threads:
                node.attribute.append(helper.make_attribute("batches", 2 * int(threads)))
            if not s.repack:
                node.attribute.append(helper.make_attribute("pack", 0))
            moved[OP] += 1
        elif attention_here and takes_attention(node, index):
            # ours takes the used inputs only: qkv, past k/v, seqlens_k, total length, cos, sin, query_seqlens
            index.set_inputs(node, [node.input[i] for i in (0, 3, 4, 5, 6, 7, 8, 16)])
            for name in ("do_rotary", "rotary_interleaved"):
                for attr in [x for x in node.attribute if x.name == name]:
                    node.attribute.remove(attr)
            node.domain = DOMAIN
            moved[ATTENTION_OP] += 1
            moved["qk_norm"] += fold_qk_norms(index, node)
    moved["swiglu"] = fuse_swiglu(index)
    moved["norm"] = fuse_norms(index) if s.fold_norms else 0
    moved["half_cache"] = halve_caches(model, index) if half_cache else 0
    moved["layer"] = fuse_layers(model, index) if s.fuse_layers and moved["norm"] else 0
    if any(moved.values()) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return moved
