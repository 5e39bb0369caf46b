"""Our own kernels for ONNX Runtime's CPU provider: the decoder's 4-bit (and 8-bit) linears and its attention.

Why a kernel of our own (the architecture says "ORT contrib ops where they are the fast path"):
ONNX Runtime 1.32's MatMulNBits re-packs every 4-bit weight when a session is created (most of a
2B bundle's load time: 2.35 s against 0.55 s with this kernel) and its prefill path is slower here;
decode speed is the same for both, memory-bound (docs/performance-notes.md, "4-bit
linears"). `q4gemm.c` computes the same thing (int8 activations per block, results equal to MLAS's
within float rounding): each constant weight copied once at load into one sequential stream per 8
columns on 2 MB pages (ORT's memory-mapped original handed back; decode 1.1x faster than on the
stored layout: docs/performance-notes.md), scales and zero points laid out once,
weight loads prefetched ahead, a column-major int8 GEMM for prefill; on VNNI CPUs also 8-bit
weights (the lm_head at --lm-head-bits 8).

Attention (`attention.c`): ONNX Runtime's CPU GroupQueryAttention works one query head at a time,
reading a KV head's cache once for each of the query heads that share it. Ours reads each KV head
once for the query heads that share it, with a running softmax; on InternVL3-2B shapes the decoder's
28 attention nodes take 1.3 ms per token at context 300 against ORT's 2.6, and decode at context 1500
is 1.17x faster (docs/performance-notes.md, "Attention"). Prefill
rows take the decode row path one by one, so that a prompt's KV rows do not depend on how it was
chunked (batch invariance, the default); with INTERNVL_EDGE_BATCH_INVARIANT=0 chunks of 8 rows and
more take a tiled path instead (keys turned around once per call, 4 queries x 64 keys of
multiply-add chains), faster on long prompts. The 4-bit linears compute every row in one order
whatever tile computes it, with no opt-out (q4gemm.c, q4_block_end).

It is a custom-op library (`ort_op.c`, `ort_attention.c`: plain C against ONNX Runtime's C ABI)
built by `pip install` as `_q4*.so`. The bundle keeps standard `com.microsoft` nodes; at load the
decoder's 4-bit MatMulNBits with int8 activations (accuracy_level 4) and its GroupQueryAttention
nodes of the form nets/decoder.py writes are moved to the `ai.internvl_edge` domain in memory when
the library is here and the CPU can run it (x86-64 with AVX2+FMA+F16C; VNNI when present). Elsewhere
(another CPU, no compiler at install, INTERNVL_EDGE_KERNELS=0) nothing changes: the same bundle runs
on ONNX Runtime's kernels. INTERNVL_EDGE_KERNELS=matmul or =attention keeps only that one of ours
(to compare them one at a time).
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import cache

DOMAIN = "ai.internvl_edge"
SOURCE_DOMAIN = "com.microsoft"
OP = "MatMulNBits"
ATTENTION_OP = "GroupQueryAttention"
CHUNK = 64  # q4gemm.c reads B 64 weights at a time: blocks must be a multiple of it
LANES = 16  # attention.c: head_dim a multiple of its vector width, at most 256, <= 16 query heads per KV head
# where the runtime moves attention to attention.c: every ISA it is built for. Its AVX2 build (8-float
# vectors) decodes as fast as the AVX-512 one and prefills 1.5-2.2x slower than ONNX Runtime's AVX-512
# kernel (benchmarks/attention.py with INTERNVL_EDGE_ISA=avx2; docs/performance-notes.md), against which an AVX2-only
# CPU's ORT would also be slower; take "avx2" and "avxvnni" out here to keep ORT's attention there
ATTENTION_ISAS = ("avx512vnni", "avxvnni", "avx2")


def enabled(kind: str) -> bool:
    """Whether our kernel of this kind ("matmul", "attention") may replace ONNX Runtime's, by
    INTERNVL_EDGE_KERNELS: 1 (default) both, 0 neither, or the one kind to keep; "unpacked" is 1
    with the 4-bit weights read as stored instead of repacked (to measure what the repacking gives),
    "unfused" is 1 with the norms left as nodes of their own (what folding them gives: fuse_norms)."""
    setting = os.environ.get("INTERNVL_EDGE_KERNELS", "1")
    return setting in ("1", "unpacked", "unfused") or setting == kind


def folds_norms() -> bool:
    """Whether the rewrite folds norms into our linears (fuse_norms): unless INTERNVL_EDGE_KERNELS=unfused."""
    return os.environ.get("INTERNVL_EDGE_KERNELS", "1") != "unfused"


def repacks() -> bool:
    """Whether our MatMulNBits copies constant 4-bit weights into its sequential layout: unless
    INTERNVL_EDGE_KERNELS=unpacked."""
    return os.environ.get("INTERNVL_EDGE_KERNELS", "1") != "unpacked"


def _counters(symbol: str, count: int) -> tuple[int, ...]:
    """The `count` uint64 counters the library's `symbol` reports (0s without the library): the same
    library ORT loaded, so one copy of them."""
    found = _library()
    if found is None:
        return (0,) * count
    values = [ctypes.c_uint64() for _ in range(count)]
    getattr(ctypes.CDLL(found[0]), symbol)(*(ctypes.byref(v) for v in values))
    return tuple(v.value for v in values)


def pack_stats() -> tuple[int, int]:
    """(bytes of 4- and 8-bit weights our MatMulNBits kernels copied into their sequential layout in
    this process, bytes of ONNX Runtime's memory-mapped originals handed back to the page cache)."""
    return _counters("internvl_edge_pack_stats", 2)


def table_stats() -> tuple[int, int]:
    """(bytes of scale tables with float16 scales, bytes with float ones) our MatMulNBits kernels made
    in this process: float16 where every scale of a weight is a float16 value (q4gemm.h)."""
    return _counters("internvl_edge_table_stats", 2)


def paired_swiglus() -> int:
    """How many fused SwiGLU linears our kernels made in this process hold each task's gate and up
    weights side by side (q4gemm.h, q4_pair_swiglu): those with a packed B, a table and no bias."""
    return _counters("internvl_edge_paired_count", 1)[0]


@cache
def _library() -> tuple[str, str] | None:
    """(path, instruction set) of the compiled library when it is installed, loadable and the CPU
    can run it (its ISA is not "none"); else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_q4*.so")) + glob.glob(os.path.join(here, "_q4*.pyd"))):
        try:
            lib = ctypes.CDLL(path)
            lib.internvl_edge_kernel_isa.restype = ctypes.c_char_p
            name = lib.internvl_edge_kernel_isa().decode()
        except (OSError, AttributeError):
            continue
        if name != "none":
            return path, name
    return None


@cache
def library_path() -> str | None:
    """The compiled library when it is installed, loadable, the CPU can run it and
    INTERNVL_EDGE_KERNELS allows any of it; else None."""
    if not (enabled("matmul") or enabled("attention")):
        return None
    found = _library()
    return found[0] if found else None


def isa() -> str | None:
    """The instruction set the kernels run with here ("avx512vnni", "avxvnni", "avx2"), or None: the
    best this CPU has, or the one INTERNVL_EDGE_ISA names (the tests run every variant that way)."""
    return _library()[1] if library_path() is not None else None


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


EIGHT_BIT_ISAS = ("avx512vnni", "avxvnni")  # q4gemm's 8-bit path needs u8 x s8 products summed in int32
PACKED_4BIT_ISAS = ("avx512vnni", "avxvnni", "avx2")  # where q4gemm repacks 4-bit weights


def takes(node, model=None) -> bool:
    """Whether q4gemm computes this node: a com.microsoft MatMulNBits with int8 activations
    (accuracy_level 4: what the kernel does), blocks of a multiple of 64 and no g_idx, and 4-bit
    weights; or 8-bit ones (the decoder's lm_head at --lm-head-bits 8) on a VNNI CPU when B, scales and
    zero points are initializers of `model` (the kernel packs them once; q4gemm.h)."""
    if node.op_type != OP or node.domain != SOURCE_DOMAIN:
        return False
    a = _attrs(node)
    has_g_idx = len(node.input) > 4 and node.input[4] != ""
    if a.get("accuracy_level", 0) != 4 or a.get("block_size", 0) % CHUNK or a.get("block_size", 0) > 1024 or has_g_idx:
        return False
    if a.get("bits") == 8:
        if model is None or isa() not in EIGHT_BIT_ISAS:
            return False
        constants = {t.name for t in model.graph.initializer}
        return all(name in constants for name in node.input[1:4] if name)
    return a.get("bits") == 4


def _shape(model, name: str) -> list[int | None] | None:
    for value in list(model.graph.input) + list(model.graph.value_info):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return None


def takes_attention(node, model) -> bool:
    """Whether attention.c computes this node: a com.microsoft GroupQueryAttention as nets/decoder.py
    writes it (packed QKV, rotate-half rotary from cos/sin caches, query_seqlens, nothing else: no
    softcap, window, custom scale, position ids or bias) on float caches whose head size it takes."""
    if node.op_type != ATTENTION_OP or node.domain != SOURCE_DOMAIN:
        return False
    a = _attrs(node)
    ins = list(node.input)
    if len(ins) != 17 or ins[1] or ins[2] or any(ins[9:16]) or not all(ins[i] for i in (0, 3, 4, 5, 6, 7, 8, 16)):
        return False
    plain = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved"}
    if set(a) - plain or a.get("do_rotary") != 1 or a.get("rotary_interleaved", 0) != 0:
        return False
    heads, kv_heads = a.get("num_heads", 0), a.get("kv_num_heads", 0)
    shape = _shape(model, ins[3])  # past_key [batch, kv_heads, capacity, head_dim]
    if not shape or len(shape) != 4 or not shape[3] or shape[1] != kv_heads:
        return False
    return (kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 16 and shape[3] % LANES == 0
            and shape[3] <= 256)  # fmt: skip


def _constant(model, name: str):
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name == name and not t.data_location:  # an inline initializer (small constants are)
            return numpy_helper.to_array(t)
    return None


def table_inputs(model) -> list[str]:
    """The scales and zero-point initializers of our MatMulNBits nodes in `model` (after rewrite) that
    q4gemm replaces by its own table, which is what decode then reads (q4gemm.h, q4_blocks_bytes: for
    constant scales, 8-bit weights, or 4-bit ones in blocks of a multiple of 128 and N >= 8)."""
    constants = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP or node.input[2] not in constants:
            continue
        a = _attrs(node)
        if a.get("bits") == 8 or (a.get("block_size", 0) % 128 == 0 and a.get("N", 0) >= 8):
            names += [name for name in node.input[2:4] if name]
    return names


def fuse_swiglu(model) -> int:
    """Fold silu(gate) * up into the gate/up linear that feeds it (our MatMulNBits, attribute swiglu=1):
    the pattern nets/decoder.py writes, MatMulNBits -> Split in two equal halves -> Sigmoid(gate),
    Mul(gate, sigmoid) -> Mul(silu, up), each intermediate used by that pattern only. The separate
    nodes cost 0.8 ms per decoded token on InternVL3-2B shapes (docs/performance-notes.md,
    "4-bit linears") and a round trip of the [rows, 2 x intermediate] result through memory in
    prefill. Returns how many."""
    from onnx import helper

    nodes = model.graph.node
    users: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}

    def only_user(name: str, op_type: str):
        found = users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type and name not in graph_outputs else None

    fused, dropped = 0, []
    for mm in nodes:
        if mm.domain != DOMAIN or mm.op_type != OP or any(a.name == "swiglu" for a in mm.attribute):
            continue
        if _attrs(mm).get("bits") != 4:  # the fused epilogue is the 4-bit path's
            continue
        split = only_user(mm.output[0], "Split")
        if split is None or len(split.output) != 2 or len(split.input) != 2 or _attrs(split).get("axis", 0) != -1:
            continue
        sizes = _constant(model, split.input[1])
        n = _attrs(mm).get("N", 0)
        if sizes is None or list(sizes) != [n // 2, n // 2] or n % 16:
            continue
        gate, up = split.output
        gate_users = users.get(gate, [])
        sigmoid = next((u for u in gate_users if u.op_type == "Sigmoid"), None)
        silu = next((u for u in gate_users if u.op_type == "Mul"), None)
        if (len(gate_users) != 2 or gate in graph_outputs or sigmoid is None or silu is None
                or sorted(silu.input) != sorted([gate, sigmoid.output[0]])):  # fmt: skip
            continue
        if only_user(sigmoid.output[0], "Mul") is not silu:
            continue
        product = only_user(silu.output[0], "Mul")
        if (
            product is None
            or sorted(product.input) != sorted([silu.output[0], up])
            or only_user(up, "Mul") is not product
        ):
            continue
        mm.output[0] = product.output[0]
        mm.attribute.append(helper.make_attribute("swiglu", 1))
        dropped += [split, sigmoid, silu, product]
        fused += 1
    for n in dropped:
        nodes.remove(n)
    return fused


NORM_OPS = {("SkipSimplifiedLayerNormalization", SOURCE_DOMAIN), ("SimplifiedLayerNormalization", "")}


def fuse_norms(model) -> int:
    """Fold the RMS norm that feeds one of our MatMulNBits into it (attribute norm_epsilon, inputs
    skip and gamma, the residual sum as the node's second output; rms_norm.h): a
    SkipSimplifiedLayerNormalization (com.microsoft) with input, skip and gamma only, or a
    SimplifiedLayerNormalization over the last axis, whose normed output that linear alone reads, whose
    mean and inverse-deviation outputs nothing reads, whose gamma is a float constant of K values and
    whose skip is computed (ours takes a skip of the input's shape; a constant one may be broadcast).
    nets/decoder.py writes two per layer plus the final norm; without them as nodes of their own,
    decode on InternVL3-2B shapes is up to 1.03x faster (docs/performance-notes.md, "4-bit linears").
    Returns how many."""
    from onnx import TensorProto, helper

    nodes = model.graph.node
    users: dict[str, list] = {}
    producer = {}
    for n in nodes:
        for name in n.input:
            users.setdefault(name, []).append(n)
        for name in n.output:
            producer[name] = n
    graph_outputs = {o.name for o in model.graph.output}
    floats = {t.name: list(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}

    def unused(name: str) -> bool:
        return not users.get(name) and name not in graph_outputs

    fused, dropped = 0, []
    for mm in nodes:
        if mm.domain != DOMAIN or mm.op_type != OP or any(a.name == "norm_epsilon" for a in mm.attribute):
            continue
        norm = producer.get(mm.input[0])
        if norm is None or (norm.op_type, norm.domain) not in NORM_OPS or norm.output[0] != mm.input[0]:
            continue
        if users.get(mm.input[0]) != [mm] or mm.input[0] in graph_outputs:
            continue
        skipped = norm.op_type.startswith("Skip")
        ins = list(norm.input)
        width = 3 if skipped else 2
        if len(ins) < width or any(ins[width:]) or floats.get(ins[width - 1]) != [_attrs(mm)["K"]]:
            continue
        if skipped and ins[1] in floats:  # a constant skip may broadcast; ours takes one of A's shape
            continue
        a = _attrs(norm)
        if not skipped and a.get("axis", -1) != -1:
            continue
        outs = list(norm.output)
        if not all(unused(o) for o in outs[1:3] if o):
            continue
        total = outs[3] if skipped and len(outs) > 3 and outs[3] and not unused(outs[3]) else ""
        while len(mm.input) < 6:
            mm.input.append("")
        mm.input[0] = ins[0]
        mm.input.extend([ins[1] if skipped else "", ins[width - 1]])
        if total:
            mm.output.append(total)
        mm.attribute.append(helper.make_attribute("norm_epsilon", float(a.get("epsilon", 1e-5))))
        dropped.append(norm)
        fused += 1
    for n in dropped:
        nodes.remove(n)
    return fused


def fold_qk_norms(model, attention) -> list:
    """Fold Qwen3's per-head query and key norms into our attention node `attention` (already moved, its
    first input the packed qkv): the pattern nets/decoder.py writes, Split(qkv) in q, k, v ->
    Reshape [0, 0, heads, head_dim] -> SimplifiedLayerNormalization over the last axis with a float
    constant gamma of head_dim values -> Reshape [0, 0, heads x head_dim] for q and for k -> Concat(q, k,
    v), each intermediate used by that pattern only and both norms with one epsilon. The node then reads
    the linear's qkv itself, with inputs q_norm, k_norm and attribute qk_norm_epsilon (attention.h), so
    the queries and keys are normed in the pass that rotates them instead of by eight nodes, two of
    them copies. Returns the nodes to drop ([] when the pattern is not there: then nothing changes)."""
    from onnx import TensorProto, helper

    producer, users = {}, {}
    for n in model.graph.node:
        for name in n.output:
            producer[name] = n
        for name in n.input:
            users.setdefault(name, []).append(n)
    graph_outputs = {o.name for o in model.graph.output}
    floats = {t.name: list(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}

    def only(name: str, user, op_type: str):
        """The producer of `name`, of `op_type`, when `user` alone reads it."""
        node = producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", None):
            return None
        return node if users.get(name) == [user] and name not in graph_outputs else None

    a = _attrs(attention)
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    concat = only(attention.input[0], attention, "Concat")
    if concat is None or len(concat.input) != 3 or _attrs(concat).get("axis") not in (-1, 2):
        return []
    split = producer.get(concat.input[2])
    if split is None or split.op_type != "Split" or len(split.output) != 3 or concat.input[2] != split.output[2]:
        return []
    sizes = _constant(model, split.input[1]) if len(split.input) > 1 else None
    if sizes is None or len(sizes) != 3 or sizes[0] % heads or _attrs(split).get("axis") not in (-1, 2):
        return []
    hd = int(sizes[0]) // heads
    if list(sizes) != [heads * hd, kv_heads * hd, kv_heads * hd] or users.get(split.output[2]) != [concat]:
        return []
    chain, gammas, epsilons = [concat, split], [], set()
    for k, n_heads in ((0, heads), (1, kv_heads)):
        back = only(concat.input[k], concat, "Reshape")
        norm = back and only(back.input[0], back, "SimplifiedLayerNormalization")
        into = norm and only(norm.input[0], norm, "Reshape")
        if not into or into.input[0] != split.output[k] or users.get(split.output[k]) != [into]:
            return []
        shapes = _constant(model, into.input[1]), _constant(model, back.input[1])
        if any(x is None for x in shapes) or [list(x) for x in shapes] != [[0, 0, n_heads, hd], [0, 0, n_heads * hd]]:
            return []
        na = _attrs(norm)
        if na.get("axis", -1) not in (-1, 3) or len(norm.input) != 2 or floats.get(norm.input[1]) != [hd]:
            return []
        if any(users.get(o) or o in graph_outputs for o in norm.output[1:] if o):
            return []
        chain += [back, norm, into]
        gammas.append(norm.input[1])
        epsilons.add(float(na.get("epsilon", 1e-5)))
    if len(epsilons) != 1:
        return []
    attention.input[0] = split.input[0]
    attention.input.extend(gammas)
    attention.attribute.append(helper.make_attribute("qk_norm_epsilon", epsilons.pop()))
    return chain


def rewrite(model, threads: int | None = None) -> dict[str, int]:
    """Move the nodes our kernels take to our domain (in place, graph only), fold Qwen3's query/key
    norms into the moved attention nodes, then fuse SwiGLU into the moved gate/up linears and the
    norms that feed moved linears into them. Returns how many moved, by op type, and how many of each
    were fused.
    `threads`: the session's intra-op threads; each MatMulNBits node then splits its work into 2
    contiguous ranges per thread (attribute `batches`; the op's default is 8)."""
    from onnx import helper

    moved = {OP: 0, ATTENTION_OP: 0, "swiglu": 0, "norm": 0, "qk_norm": 0}
    folded = []
    for node in model.graph.node:
        if enabled("matmul") and takes(node, model):
            node.domain = DOMAIN
            if threads:
                node.attribute.append(helper.make_attribute("batches", 2 * int(threads)))
            if not repacks():
                node.attribute.append(helper.make_attribute("pack", 0))
            moved[OP] += 1
        elif enabled("attention") and isa() in ATTENTION_ISAS and takes_attention(node, model):
            # ours takes the used inputs only: qkv, past k/v, seqlens_k, total length, cos, sin, query_seqlens
            kept = [node.input[i] for i in (0, 3, 4, 5, 6, 7, 8, 16)]
            del node.input[:]
            node.input.extend(kept)
            for name in ("do_rotary", "rotary_interleaved"):
                for attr in [x for x in node.attribute if x.name == name]:
                    node.attribute.remove(attr)
            node.domain = DOMAIN
            moved[ATTENTION_OP] += 1
            chain = fold_qk_norms(model, node)
            folded += chain
            moved["qk_norm"] += bool(chain)
    for node in folded:
        model.graph.node.remove(node)
    moved["swiglu"] = fuse_swiglu(model)
    moved["norm"] = fuse_norms(model) if folds_norms() else 0
    if any(moved.values()) and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return moved
