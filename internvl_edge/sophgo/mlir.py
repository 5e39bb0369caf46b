"""Top-dialect MLIR text and weights for every net of the seed's split, from our checkpoint reader.

TPU-MLIR's `tpuc-opt` reads the generic MLIR form: one `func.func @main`, ops such as
`"top.MatMul"(%x, %w, %none) {do_relu = false} : (...) -> tensor<...> loc("name")`, weights as
`"top.Weight"()` ops whose location names a tensor of the `.npz` file named by `module.weight_file`.
Every op's location is the checkpoint module path it computes (`language_model.model.layers.3.mlp.up_proj`),
plus a suffix for helper ops; the op set and attributes are those of the top dialect's TopOps.td and
of the seed's converter (python/llm/LlmConverter.py, InternVL3Converter.py), which we follow net by net:

    vit              pixel_values [1,3,448,448] -> image embeddings [256, hidden]
    embedding        input_ids [1, max_input_length] -> [1, max_input_length, hidden]     (embedding_cache: [1, 1])
    block_i          input_states [1,L,hidden], position_ids [1,L], attention_mask [1,1,L,L]
                     -> hidden [1,L,hidden], k [1,L,kv_heads,head_dim], v (layer i, prefill)
    block_cache_i    one token + history_k/v [1,seq,kv_heads,head_dim], mask [1,1,1,seq+1] -> the same three
    block_kv_i       (--use_block_with_kv) L rows + history, mask [1,1,L,seq+L]
    lm_head          hidden_states [1, hidden] -> logits [1, vocab] (the last block applies the final norm)
    greedy_head      logits -> token id [1, 1]
Floats are float32 in the text and the npz; the lowering (`--convert-top-to-tpu`, mode F16/BF16/W4*)
converts them to the chip's precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..checkpoint.reader import Checkpoint
from ..nets.vision import MLP1_LAYERNORM_EPS  # nn.LayerNorm's default (the seed's converter passes the ViT's 1e-6)
from .weights import A16Weight, decoder_linear, rotary

_DTYPES = {np.dtype(np.float32): "f32", np.dtype(np.uint8): "ui8", np.dtype(np.int32): "si32"}


class SI32(int):
    """An integer attribute the dialect declares as SI32Attr (axis of Concat, Softmax, Gather, ...)."""


@dataclass(frozen=True)
class V:
    """An SSA value: its name, shape and element type."""

    ref: str
    shape: tuple[int, ...]
    dtype: str = "f32"

    @property
    def type(self) -> str:
        if self.dtype == "none":
            return "none"
        return f"tensor<{'x'.join(map(str, self.shape))}x{self.dtype}>"


def _attr(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, SI32):
        return f"{int(v)} : si32"
    if isinstance(v, (int, np.integer)):
        return f"{int(v)} : i64"
    if isinstance(v, float):
        text = repr(float(v))
        if "." not in text and "inf" not in text and "nan" not in text:  # tpuc-opt wants 1.0e-06, not 1e-06
            text = text.replace("e", ".0e") if "e" in text else text + ".0"
        return f"{text} : f64"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(int(x)) for x in v) + "]"
    raise TypeError(f"unsupported attribute {v!r}")


def _loc(names: str | list[str]) -> str:
    if isinstance(names, str):
        return f'loc("{names}")'
    return "loc(fused[" + ", ".join(f'"{n}"' for n in names) + "])"


class Module:
    """One net being written: inputs, weights (kept for the npz), ops in order, outputs."""

    def __init__(self, name: str, weight_file: str, platform: str = "LLM"):
        self.name, self.weight_file, self.platform = name, weight_file, platform
        self.args: list[V] = []
        self.body: list[str] = []
        self.weights: dict[str, np.ndarray] = {}
        self.outputs: list[V] = []
        self._names: set[str] = set()
        self._n = 0
        self._none: V | None = None

    def _new(self, shape, dtype="f32") -> V:
        self._n += 1
        return V(f"%{self._n}", tuple(int(s) for s in shape), dtype)

    def _claim(self, loc: str) -> None:
        if loc in self._names:
            raise ValueError(f"{self.name}: location {loc!r} is used twice")
        self._names.add(loc)

    def input(self, loc: str, shape, dtype: str = "f32") -> V:
        """A net input; integer inputs (position ids, token ids) stay int32, floats are f32."""
        self._claim(loc)
        arg = V(f"%arg{len(self.args)}", tuple(shape), dtype)
        self.args.append(arg)
        out = self._new(shape)  # top.Input always yields f32 in the top dialect
        self.body.append(f'{out.ref} = "top.Input"({arg.ref}) : ({arg.type}) -> {out.type} {_loc(loc)}')
        return out

    def weight(self, loc: str, data: np.ndarray) -> V:
        if loc in self.weights:
            raise ValueError(f"{self.name}: weight {loc!r} declared twice")
        self._claim(loc)
        data = np.ascontiguousarray(data)
        self.weights[loc] = data
        out = self._new(data.shape, _DTYPES[data.dtype])
        self.body.append(f'{out.ref} = "top.Weight"() : () -> {out.type} {_loc(loc)}')
        return out

    def none(self) -> V:
        if self._none is None:
            self._none = self._new((), "none")
            self.body.append(f'{self._none.ref} = "top.None"() : () -> none loc(unknown)')
        return self._none

    def op(self, kind: str, operands: list[V], shape, loc: str, /, **attrs) -> V:
        return self.ops(kind, operands, [shape], [loc], **attrs)[0]

    def ops(self, kind: str, operands: list[V], shapes: list, locs: list[str], /, **attrs) -> list[V]:
        """An op with one result per shape (top.TopK has two)."""
        for name in locs:
            self._claim(name)
        outs = [self._new(s) for s in shapes]
        base = self._new(()) if len(outs) > 1 else outs[0]
        if len(outs) > 1:
            outs = [V(f"{base.ref}#{i}", o.shape) for i, o in enumerate(outs)]
        lhs = outs[0].ref if len(outs) == 1 else f"{base.ref}:{len(outs)}"
        attr = ", ".join(f"{k} = {_attr(v)}" for k, v in sorted(attrs.items()))
        types_in = ", ".join(o.type for o in operands)
        types_out = outs[0].type if len(outs) == 1 else "(" + ", ".join(o.type for o in outs) + ")"
        self.body.append(
            f'{lhs} = "top.{kind}"({", ".join(o.ref for o in operands)})'
            f"{' {' + attr + '}' if attr else ''} : ({types_in}) -> {types_out} "
            f"{_loc(locs[0] if len(locs) == 1 else locs)}"
        )
        return outs

    def ret(self, *values: V) -> None:
        self.outputs = list(values)

    def text(self) -> str:
        args = ", ".join(f"{a.ref}: {a.type}" for a in self.args)
        results = ", ".join(v.type for v in self.outputs)
        attrs = (
            f'module.weight_file = "{self.weight_file}", module.platform = "{self.platform}", '
            'module.state = "TOP_F32", module.chip = "ALL", module.top_run_mode = "STATIC"'
        )
        lines = [f"module @{self.name} attributes {{{attrs}}} {{", f"  func.func @main({args}) -> ({results}) {{"]
        lines += [f"    {b}" for b in self.body]
        lines.append(f"    return {', '.join(v.ref for v in self.outputs)} : {results} loc(unknown)")
        lines += ["  } loc(unknown)", "} loc(unknown)", ""]
        return "\n".join(lines)


@dataclass
class Net:
    """One net to compile: its module and how the seed deploys it (model_deploy.py flags)."""

    name: str
    module: Module
    mode: str  # F32 | F16 | BF16 | W4F16 | W4BF16 (processor-assign mode)
    quant_input: bool = False  # inputs become the half type (else f32 / int32 as declared)
    quant_output: bool = False
    addr_mode: str = "basic"  # io_alone for nets whose I/O the runtime keeps in its own buffers
    q_group_size: int = 0
    dynamic: bool = False
    io: dict = field(default_factory=dict)


# -- layers ------------------------------------------------------------------------------------------
def _bias_shape(rank: int, n: int) -> tuple[int, ...]:
    return (1,) * (rank - 1) + (n,)


def linear(m: Module, x: V, path: str, w: np.ndarray | A16Weight, bias: np.ndarray | None) -> V:
    """y = x @ W^T + b for W [N, K] float (top.MatMul, right operand [K, N]) or 4-bit (top.A16MatMul)."""
    n = w.N if isinstance(w, A16Weight) else w.shape[0]
    out = (*x.shape[:-1], n)
    b = (
        m.weight(f"{path}.bias", bias.astype(np.float32).reshape(_bias_shape(len(out), n)))
        if bias is not None
        else m.none()
    )
    if isinstance(w, A16Weight):
        q = m.weight(f"{path}.qweight", w.qweight)
        s = m.weight(f"{path}.scales", w.scales.astype(np.float32))
        z = m.weight(f"{path}.qzeros", w.zeros)
        return m.op(
            "A16MatMul", [x, q, s, z, b], out, path, right_transpose=True, q_group_size=w.group_size, weight_bits=4
        )
    wt = m.weight(f"{path}.weight", np.ascontiguousarray(np.asarray(w, np.float32).T))
    return m.op("MatMul", [x, wt, b], out, path, do_relu=False)


def layer_norm(m: Module, x: V, path: str, weight: np.ndarray, bias: np.ndarray, eps: float) -> V:
    c = x.shape[-1]
    w = m.weight(f"{path}.weight", weight.reshape(_bias_shape(len(x.shape), c)))
    b = m.weight(f"{path}.bias", bias.reshape(_bias_shape(len(x.shape), c)))
    return m.op(
        "LayerNorm", [x, w, b], x.shape, path, normalized_shape=[c], axis=SI32(len(x.shape) - 1), eps=float(eps)
    )


def rms_norm(m: Module, x: V, path: str, weight: np.ndarray, eps: float, loc: str | None = None) -> V:
    w = m.weight(f"{path}.weight", weight.reshape(_bias_shape(len(x.shape), x.shape[-1])))
    return m.op("RMSNorm", [x, w], x.shape, loc or path, eps=float(eps))


def _vit_norm(m, ckpt, x, prefix, v) -> V:
    if v.norm_type == "rms_norm":
        return rms_norm(m, x, prefix, ckpt.f32(f"{prefix}.weight"), v.layer_norm_eps)
    return layer_norm(m, x, prefix, ckpt.f32(f"{prefix}.weight"), ckpt.f32(f"{prefix}.bias"), v.layer_norm_eps)


# -- vit ---------------------------------------------------------------------------------------------
def vit(ckpt: Checkpoint, weight_file: str) -> Module:
    """InternViT + CLS drop + pixel shuffle + mlp1 for one 448x448 tile (InternVL3Converter.gen_vit_mlir).

    Conv p x p / p -> [1, C, g, g] -> [1, g*g, C]; prepend class token; + position embedding
    per layer: x += ls1 * proj(attention(norm1(x))); x += ls2 * fc2(gelu(fc1(norm2(x))))
    (attention as one top.FAttention: the seed spells it out with MatMul/Softmax; the fused op
    computes the same and runs faster, on the simulator too)
    drop CLS -> pixel shuffle 0.5 -> [1, (g/2)^2, 4C] -> LayerNorm -> Linear -> GELU -> Linear
    """
    cfg = ckpt.config
    v = cfg.vision
    C, heads, d, p = v.hidden_size, v.num_attention_heads, v.head_dim, v.patch_size
    g = v.image_size // p
    T = g * g + 1
    m = Module("vit", weight_file)
    e = "vision_model.embeddings"
    x = m.input("pixel_values", (1, v.num_channels, v.image_size, v.image_size))
    w = m.weight(f"{e}.patch_embedding.weight", ckpt.f32(f"{e}.patch_embedding.weight"))
    b = m.weight(f"{e}.patch_embedding.bias", ckpt.f32(f"{e}.patch_embedding.bias"))
    x = m.op(
        "Conv",
        [x, w, b],
        (1, C, g, g),
        f"{e}.patch_embedding",
        kernel_shape=[p, p],
        strides=[p, p],
        pads=[0, 0, 0, 0],
        dilations=[1, 1],
    )
    x = m.op("Reshape", [x], (1, C, g * g), f"{e}.patch_embedding.reshape", shape=[1, C, g * g])
    x = m.op("Permute", [x], (1, g * g, C), f"{e}.patch_embedding.permute", order=[0, 2, 1])
    cls = m.weight(f"{e}.class_embedding", ckpt.f32(f"{e}.class_embedding").reshape(1, 1, C))
    x = m.op("Concat", [cls, x], (1, T, C), f"{e}.concat", axis=SI32(1))
    pos = m.weight(f"{e}.position_embedding", ckpt.f32(f"{e}.position_embedding").reshape(1, T, C))
    x = m.op("Add", [x, pos], (1, T, C), f"{e}.add")

    for i in range(cfg.vision_layers_used):
        lp = f"vision_model.encoder.layers.{i}"
        h = _vit_norm(m, ckpt, x, f"{lp}.norm1", v)
        qkv_w, qkv_b = ckpt.f32(f"{lp}.attn.qkv.weight"), ckpt.optional_f32(f"{lp}.attn.qkv.bias")
        parts = []
        for j, name in enumerate("qkv"):  # the fused qkv as three matmuls: no slicing needed
            t = linear(
                m,
                h,
                f"{lp}.attn.qkv.{name}",
                qkv_w[j * C : (j + 1) * C],
                None if qkv_b is None else qkv_b[j * C : (j + 1) * C],
            )
            if v.qk_normalization and name in "qk":  # RMSNorm over all heads at once, before the head split
                t = rms_norm(
                    m, t, f"{lp}.attn.{name}_norm", ckpt.f32(f"{lp}.attn.{name}_norm.weight"), v.layer_norm_eps
                )
            parts.append(m.op("Reshape", [t], (1, T, heads, d), f"{lp}.attn.{name}.reshape", shape=[1, T, heads, d]))
        q, k, val = parts
        fa = {"batch": 1, "q_head": heads, "kv_head": heads, "dim": d, "mq": T, "mk": T, "keep_dims": False}
        fa.update(scale=float(d**-0.5), mask_size=SI32(0))
        o = m.op("FAttention", [q, k, val, m.none(), m.none()], (1, T, C), f"{lp}.attn.fattention", **fa)
        o = linear(
            m, o, f"{lp}.attn.proj", ckpt.f32(f"{lp}.attn.proj.weight"), ckpt.optional_f32(f"{lp}.attn.proj.bias")
        )
        o = m.op("Mul", [o, m.weight(f"{lp}.ls1", ckpt.f32(f"{lp}.ls1").reshape(1, 1, C))], o.shape, f"{lp}.ls1.mul")
        x = m.op("Add", [x, o], x.shape, f"{lp}.attn.add")
        h = _vit_norm(m, ckpt, x, f"{lp}.norm2", v)
        h = linear(m, h, f"{lp}.mlp.fc1", ckpt.f32(f"{lp}.mlp.fc1.weight"), ckpt.f32(f"{lp}.mlp.fc1.bias"))
        h = m.op("GELU", [h], h.shape, f"{lp}.mlp.act")  # approx_mode "normal": the exact erf GELU
        h = linear(m, h, f"{lp}.mlp.fc2", ckpt.f32(f"{lp}.mlp.fc2.weight"), ckpt.f32(f"{lp}.mlp.fc2.bias"))
        h = m.op("Mul", [h, m.weight(f"{lp}.ls2", ckpt.f32(f"{lp}.ls2").reshape(1, 1, C))], h.shape, f"{lp}.ls2.mul")
        x = m.op("Add", [x, h], x.shape, f"{lp}.mlp.add")
    if v.post_layernorm:
        x = layer_norm(
            m,
            x,
            "vision_model.post_layernorm",
            ckpt.f32("vision_model.post_layernorm.weight"),
            ckpt.f32("vision_model.post_layernorm.bias"),
            v.layer_norm_eps,
        )

    # drop CLS; pixel shuffle (modeling_internvl_chat.pixel_shuffle, ps_version v2):
    # [1, g, g, C] -> [1, g, g/f, Cf] -> swap -> [1, g/f, g, Cf] -> [1, g/f, g/f, Cf^2] -> swap back
    f = int(round(1 / cfg.downsample_ratio))
    x = m.op(
        "Slice",
        [x, m.none(), m.none(), m.none()],
        (1, g * g, C),
        "mlp1.drop_cls",
        offset=[0, 1, 0],
        steps=[1, 1, 1],
        ends=[1, T, C],
    )
    x = m.op("Reshape", [x], (1, g, g // f, C * f), "mlp1.pixel_shuffle.reshape0", shape=[1, g, g // f, C * f])
    x = m.op("Permute", [x], (1, g // f, g, C * f), "mlp1.pixel_shuffle.permute0", order=[0, 2, 1, 3])
    x = m.op(
        "Reshape",
        [x],
        (1, g // f, g // f, C * f * f),
        "mlp1.pixel_shuffle.reshape1",
        shape=[1, g // f, g // f, C * f * f],
    )
    if cfg.ps_version != "v1":
        x = m.op("Permute", [x], x.shape, "mlp1.pixel_shuffle.permute1", order=[0, 2, 1, 3])
    n_img, c4 = (g // f) ** 2, C * f * f
    x = m.op("Reshape", [x], (1, n_img, c4), "mlp1.pixel_shuffle.reshape2", shape=[1, n_img, c4])
    x = layer_norm(m, x, "mlp1.0", ckpt.f32("mlp1.0.weight"), ckpt.f32("mlp1.0.bias"), MLP1_LAYERNORM_EPS)
    x = linear(m, x, "mlp1.1", ckpt.f32("mlp1.1.weight"), ckpt.f32("mlp1.1.bias"))
    x = m.op("GELU", [x], x.shape, "mlp1.2")
    x = linear(m, x, "mlp1.3", ckpt.f32("mlp1.3.weight"), ckpt.f32("mlp1.3.bias"))
    hidden = cfg.text.hidden_size
    m.ret(m.op("Reshape", [x], (n_img, hidden), "mlp1.reshape", shape=[n_img, hidden]))
    return m


# -- embedding and heads -----------------------------------------------------------------------------
def embedding(table: np.ndarray, name: str, length: int, weight_file: str) -> Module:
    """Token ids [1, length] (int32) -> rows of embed_tokens [1, length, hidden]."""
    m = Module(name, weight_file)
    ids = m.input("input_ids", (1, length), "si32")
    w = m.weight("language_model.model.embed_tokens.weight", table)
    m.ret(
        m.op("Gather", [w, ids], (1, length, table.shape[1]), f"language_model.model.embed_tokens.{name}", axis=SI32(0))
    )
    return m


def lm_head(table: np.ndarray, weight_file: str) -> Module:
    """hidden [1, hidden] -> logits [1, vocab]: W [vocab, hidden] @ x^T, as the seed's gen_lm_head."""
    vocab, hidden = table.shape
    m = Module("lm_head", weight_file)
    x = m.input("hidden_states", (1, hidden))
    w = m.weight("language_model.lm_head.weight", table)
    y = m.op("MatMul", [w, x, m.none()], (vocab, 1), "language_model.lm_head", do_relu=False, right_transpose=True)
    m.ret(m.op("Reshape", [y], (1, vocab), "language_model.lm_head.reshape", shape=[1, vocab]))
    return m


def greedy_head(vocab: int) -> Module:
    m = Module("greedy_head", "")
    x = m.input("m_logits", (1, vocab))
    _, ids = m.ops("TopK", [x], [(1, 1), (1, 1)], ["token_value", "token_id"], axis=1, K=1)
    m.ret(ids)
    return m


MAX_TOP_K = 50  # candidates the sampling head returns (the seed's max_top_k)


def sample_head(vocab: int, penalty_rows: int, weight_file: str) -> Module:
    """The seed's sample_head, with the CPU target's semantics (nets/heads.py, sampling.candidates):

        logits [1, V], seen ids [1, n] -> penalty (positive / p, negative * p) scattered back
        TopK 50 -> / temperature -> keep the first top_k -> Softmax -> keep the smallest prefix whose
        mass reaches top_p -> renormalise -> probs [1, 50], token ids [1, 50]
    Static shapes: top_k and top_p are masks over the 50 candidates (the seed feeds top_k as a dynamic
    TopK size), so top_k is at most 50, as in the seed."""
    m = Module("sample_head", weight_file)
    K = MAX_TOP_K
    logits = m.input("m_logits", (1, vocab))
    ids = m.input("input_ids", (1, penalty_rows), "si32")
    penalty = m.input("penalty", (1, 1))
    temperature = m.input("temperature", (1, 1))
    top_k = m.input("top_k", (1, 1))
    top_p = m.input("top_p", (1, 1))
    iota = m.weight("sample_head.candidate_index", np.arange(K, dtype=np.float32).reshape(1, K))
    seen = m.op("GatherElements", [logits, ids], (1, penalty_rows), "sample_head.penalty.gather", axis=1)
    positive = m.op(
        "CompareConst",
        [seen],
        seen.shape,
        "sample_head.penalty.positive",
        mode="Greater",
        const_val=0.0,
        inversed=False,
    )
    divided = m.op("Div", [seen, penalty], seen.shape, "sample_head.penalty.div")
    multiplied = m.op("Mul", [seen, penalty], seen.shape, "sample_head.penalty.mul")
    seen = m.op("Where", [positive, divided, multiplied], seen.shape, "sample_head.penalty.where")
    logits = m.op("ScatterElements", [logits, ids, seen], logits.shape, "sample_head.penalty.scatter", axis=1)
    values, tokens = m.ops("TopK", [logits], [(1, K), (1, K)], ["sample_head.topk.values", "token_ids"], axis=1, K=K)
    scaled = m.op("Div", [values, temperature], (1, K), "sample_head.temperature")
    within_k = m.op("Compare", [iota, top_k], (1, K), "sample_head.top_k", mode="Less")
    scaled = m.op(
        "Where", [within_k, scaled, m.none()], (1, K), "sample_head.top_k.where", y_is_const=True, y_const_val=-10000.0
    )
    probs = m.op("Softmax", [scaled], (1, K), "sample_head.softmax", axis=SI32(1))
    upto = m.op("CumSum", [probs, m.none()], (1, K), "sample_head.top_p.cumsum", axis=1)
    before = m.op("Sub", [upto, probs], (1, K), "sample_head.top_p.before")  # mass of the better candidates
    keep = m.op("Compare", [before, top_p], (1, K), "sample_head.top_p", mode="Less")
    kept = m.op("Mul", [probs, keep], (1, K), "sample_head.top_p.mul")
    total = m.op("Reduce", [kept], (1, 1), "sample_head.top_p.sum", axes=[1], keepdims=True, mode="ReduceSum")
    m.ret(m.op("Div", [kept, total], (1, K), "probs"), tokens)
    return m


# -- decoder blocks ----------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    """One decoder layer's tensors, prepared once and shared by its block nets (one npz: the combined
    bmodel then stores them once)."""

    index: int
    linears: dict  # name -> float32 [N, K] or A16Weight
    biases: dict
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    final_norm: np.ndarray | None  # the model's last norm, applied by the last layer's blocks
    cos: np.ndarray
    sin: np.ndarray
    q_norm: np.ndarray | None = None  # Qwen3 (InternVL3.5): one weight per head dimension, shared by the heads
    k_norm: np.ndarray | None = None


LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def layer_weights(ckpt: Checkpoint, i: int, four_bit: bool, group_size: int, half: str, seq: int) -> LayerWeights:
    t = ckpt.config.text
    p = f"language_model.model.layers.{i}"
    lins = {n: ckpt.linear(f"{p}.{n}") for n in LINEARS}
    cos, sin = rotary(t.head_dim, t.rope_theta, seq)
    qk = {n: ckpt.f32(f"{p}.self_attn.{n}.weight") for n in ("q_norm", "k_norm")} if t.qk_norm else {}
    return LayerWeights(
        index=i,
        linears={n: decoder_linear(lin, four_bit, group_size, half) for n, lin in lins.items()},
        biases={n: lin.bias for n, lin in lins.items()},
        input_layernorm=ckpt.f32(f"{p}.input_layernorm.weight"),
        post_attention_layernorm=ckpt.f32(f"{p}.post_attention_layernorm.weight"),
        final_norm=ckpt.f32("language_model.model.norm.weight") if i == t.num_hidden_layers - 1 else None,
        cos=cos,
        sin=sin,
        **qk,
    )


def is_quantized(lw: LayerWeights) -> bool:
    return any(isinstance(w, A16Weight) for w in lw.linears.values())


def block(
    ckpt: Checkpoint, lw: LayerWeights, kind: str, rows: int, seq: int, weight_file: str, small_mask: int = 0
) -> Module:
    """One Qwen2 or Qwen3 decoder layer (the seed's LlmConverter._gen_block_mlir_impl), `kind` one of
    "block" (prefill from position 0), "block_cache" (one token after `seq` history rows) or
    "block_kv" (`rows` tokens after `seq` history rows). With `small_mask` (--dynamic prefill blocks,
    whose row count follows the prompt) the causal mask is a [small_mask]^2 weight that FAttention
    tiles (its mask_size), not an input, as in the seed's dynamic flow:

        x ── RMSNorm ── q/k/v proj ── [q/k RMSNorm per head] ── Rope(q, k at position_ids) ──┐  k, v: outputs
                                  history_k/v ── Concat ──────── FAttention(mask) ── o_proj ── + x = h
        h ── RMSNorm ── silu(gate_proj) * up_proj ── down_proj ── + h   (last layer: + final RMSNorm)

    Qwen3 (InternVL3.5) normalises each query and key head over head_dim before the rotary embedding, one
    weight vector shared by the heads (modeling_qwen3.Qwen3Attention; the seed's converter does the same
    with top.RMSNorm on the [1, rows, heads, head_dim] tensors); it has no q/k/v biases.
    """
    t = ckpt.config.text
    H, nh, kvh, hd = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim
    i = lw.index
    name = f"{kind}_{i}"
    m = Module(name, weight_file, "LLM_QUANTIZED" if is_quantized(lw) else "LLM")
    history = kind != "block"
    keys = seq + rows if history else rows
    x = m.input("input_states", (1, rows, H))
    pos = m.input("position_ids", (1, rows), "si32")
    if not small_mask:
        mask = m.input("attention_mask", (1, 1, rows, keys))
    if history:
        past_k = m.input("history_k", (1, seq, kvh, hd))
        past_v = m.input("history_v", (1, seq, kvh, hd))
    p = f"language_model.model.layers.{i}"
    a = f"{p}.self_attn"
    # weights in one fixed order for every kind, so the lowered coefficients are identical
    cos = m.weight("rotary_cos", lw.cos)
    sin = m.weight("rotary_sin", lw.sin)
    if small_mask:  # 0 on and below the diagonal (LlmConverter.create_small_attn_mask)
        mask = m.weight("attention_mask.weight", np.triu(np.full((small_mask, small_mask), -1.0e9, np.float32), k=1))
    h = rms_norm(m, x, f"{p}.input_layernorm", lw.input_layernorm, t.rms_norm_eps)
    q = linear(m, h, f"{a}.q_proj", lw.linears["self_attn.q_proj"], lw.biases["self_attn.q_proj"])
    k = linear(m, h, f"{a}.k_proj", lw.linears["self_attn.k_proj"], lw.biases["self_attn.k_proj"])
    v = linear(m, h, f"{a}.v_proj", lw.linears["self_attn.v_proj"], lw.biases["self_attn.v_proj"])
    q = m.op("Reshape", [q], (1, rows, nh, hd), f"{a}.q_proj.reshape", shape=[1, -1, nh, hd])
    k = m.op("Reshape", [k], (1, rows, kvh, hd), f"{a}.k_proj.reshape", shape=[1, -1, kvh, hd])
    v = m.op("Reshape", [v], (1, rows, kvh, hd), f"{a}.v_cache", shape=[1, -1, kvh, hd])
    if lw.q_norm is not None:
        q = rms_norm(m, q, f"{a}.q_norm", lw.q_norm, t.rms_norm_eps)
        k = rms_norm(m, k, f"{a}.k_norm", lw.k_norm, t.rms_norm_eps)
    c = m.op("Gather", [cos, pos], (1, rows, 1, hd), f"{a}.rotary_emb.cos", axis=SI32(0))
    s = m.op("Gather", [sin, pos], (1, rows, 1, hd), f"{a}.rotary_emb.sin", axis=SI32(0))
    q = m.op("Rope", [q, s, c], q.shape, f"{a}.q_rope", rope_mode="contiguous_halves")
    k = m.op("Rope", [k, s, c], k.shape, f"{a}.k_cache", rope_mode="contiguous_halves")
    new_k, new_v = k, v
    if history:
        k = m.op("Concat", [past_k, k], (1, keys, kvh, hd), f"{a}.k_concat", axis=SI32(1), only_merge=True)
        v = m.op("Concat", [past_v, v], (1, keys, kvh, hd), f"{a}.v_concat", axis=SI32(1), only_merge=True)
    fa = {"batch": 1, "q_head": nh, "kv_head": kvh, "dim": hd, "mq": rows, "mk": keys, "keep_dims": False}
    fa.update(scale=float(hd**-0.5), mask_size=SI32(small_mask))
    o = m.op("FAttention", [q, k, v, mask, m.none()], (1, rows, nh * hd), f"{a}.fattention", **fa)
    o = linear(m, o, f"{a}.o_proj", lw.linears["self_attn.o_proj"], lw.biases["self_attn.o_proj"])
    x = m.op("Add", [x, o], x.shape, f"{a}.add")
    h = rms_norm(m, x, f"{p}.post_attention_layernorm", lw.post_attention_layernorm, t.rms_norm_eps)
    gate = linear(m, h, f"{p}.mlp.gate_proj", lw.linears["mlp.gate_proj"], lw.biases["mlp.gate_proj"])
    gate = m.op("SiLU", [gate], gate.shape, f"{p}.mlp.act")
    up = linear(m, h, f"{p}.mlp.up_proj", lw.linears["mlp.up_proj"], lw.biases["mlp.up_proj"])
    h = m.op("Mul", [gate, up], up.shape, f"{p}.mlp.mul")
    h = linear(m, h, f"{p}.mlp.down_proj", lw.linears["mlp.down_proj"], lw.biases["mlp.down_proj"])
    x = m.op("Add", [x, h], x.shape, f"{p}.mlp.add")
    if lw.final_norm is not None:
        x = rms_norm(m, x, "language_model.model.norm", lw.final_norm, t.rms_norm_eps)
    m.ret(x, new_k, new_v)
    return m


def lm_head_table(ckpt: Checkpoint) -> np.ndarray:
    return decoder_linear(ckpt.lm_head(), False, 0, "f32")  # float32 [vocab, hidden], AWQ dequantised
