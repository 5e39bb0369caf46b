"""The Qwen2 / Qwen3 decoder as one ONNX graph: embeddings + KV cache in, next-token logits + KV cache out.

It knows nothing about images: the runtime scatters image embeddings into `inputs_embeds`.

One layer (HF: Qwen2DecoderLayer, https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen2/modeling_qwen2.py):

    residual ──SkipSimplifiedLayerNorm(input_layernorm)── h
    h ──qkv_proj (q, k, v fused)── GroupQueryAttention(rotary, KV cache in place) ── o_proj ── a
    (a + residual) ──SkipSimplifiedLayerNorm(post_attention_layernorm)── h2, residual
    h2 ──gate_up_proj── split ── silu(gate) * up ── down_proj ── m      (m + residual feeds the next layer)

Qwen3 (HF: Qwen3DecoderLayer,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3/modeling_qwen3.py)
is the same layer with no q/k/v biases, a head size of its own (head_dim x heads need not be the hidden
size) and an RMS norm over each query and key head before the rotary embedding:

    qkv ──Split── q, k, v;  q ──Reshape [.., heads, head_dim]──SimplifiedLayerNorm(q_norm)──Reshape
    (k likewise with k_norm) ──Concat(q, k, v)── GroupQueryAttention

written with standard nodes, so ONNX Runtime's own GroupQueryAttention can run it; where our attention
kernel runs, the load folds these nodes into it (kernels/passes.py, fold_qk_norms).

GroupQueryAttention (com.microsoft) reads and writes the cache buffer in place (past and present
are bound to the same buffer), applies rotary embeddings at each row's absolute position, and with
`query_seqlens` accepts right-padded chunks, so static (padded) and dynamic shapes use one graph:
for batch entry b, `seqlens_k[b] + 1` tokens are in the cache after the step and the first
`query_seqlens[b]` rows of the chunk are real. Only the last real row goes through the final norm
and lm_head: the output is one logits row per batch entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..checkpoint.reader import Checkpoint, DenseLinear, QuantLinear
from .graph import MS_DOMAIN, Graph
from .linear import Linear, rms_norm
from .quant import NBitsWeight, concat_outputs, from_awq, quantize


@dataclass
class DecoderOptions:
    weight_bits: int  # 4: MatMulNBits blocks; 0: float weights in `store` precision
    store: str  # f32 | f16 | bf16: precision of float weights
    group_size: int = 64  # block size when we quantise float weights ourselves
    lm_head_bits: int = 0  # 0 keeps lm_head as float; 8 or 4 quantises it
    accuracy_level: int = 4
    kv_capacity: int = 2048  # rows of the KV buffer and of the rotary tables


def rotary_tables(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2], computed in float32 as transformers does (inv_freq, then
    position * inv_freq), so long positions round the same way.
    https://github.com/huggingface/transformers/blob/main/src/transformers/modeling_rope_utils.py"""
    exponent = (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)).astype(np.float32)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def _prepare(lin: DenseLinear | QuantLinear, opts: DecoderOptions) -> np.ndarray | NBitsWeight:
    """A checkpoint linear in the form the bundle stores: float [N, K] or MatMulNBits blocks."""
    if isinstance(lin, QuantLinear):
        if opts.weight_bits == 4:
            return from_awq(lin.awq)  # the published 4-bit values, repacked as they are
        return np.ascontiguousarray(lin.awq.dequantize().T)
    if opts.weight_bits:
        return quantize(lin.weight, opts.weight_bits, opts.group_size)
    return lin.weight.to_float32()


def _fuse(parts: list[np.ndarray | NBitsWeight]) -> np.ndarray | NBitsWeight:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, NBitsWeight) for p in parts):
        if len({(p.block_size, p.bits) for p in parts}) == 1:
            return concat_outputs(parts)
    if any(isinstance(p, NBitsWeight) for p in parts):
        raise ValueError("cannot fuse quantised and float linears")
    return np.concatenate(parts, axis=0)


def _bias(lins) -> np.ndarray | None:
    if all(lin.bias is None for lin in lins):
        return None
    if len(lins) == 1:
        return lins[0].bias
    return np.concatenate(
        [lin.bias if lin.bias is not None else np.zeros(lin.out_features, np.float32) for lin in lins]
    )


def kv_names(layer: int) -> tuple[str, str, str, str]:
    return (
        f"past_key_values.{layer}.key",
        f"past_key_values.{layer}.value",
        f"present.{layer}.key",
        f"present.{layer}.value",
    )


def build_decoder(ckpt: Checkpoint, opts: DecoderOptions, weights, progress=None) -> Graph:
    cfg = ckpt.config.text
    H, nh, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = Graph("decoder", weights)
    linear = Linear(opts.store, opts.accuracy_level)

    def proj(x: str, path: str, *lins: DenseLinear | QuantLinear) -> str:
        """One linear from checkpoint linears over the same input (q, k, v; gate, up), outputs stacked."""
        return linear(g, x, path, _fuse([_prepare(t, opts) for t in lins]), _bias(lins))

    FLOAT, INT32 = TensorProto.FLOAT, TensorProto.INT32
    x = g.input("inputs_embeds", FLOAT, ["batch", "sequence", H])
    seqlens_k = g.input("seqlens_k", INT32, ["batch"])
    total_len = g.input("total_sequence_length", INT32, [])
    query_lens = g.input("query_seqlens", INT32, ["batch"])
    cos, sin = rotary_tables(hd, cfg.rope_theta, opts.kv_capacity)
    cos_cache = g.weight("model.rotary_emb.cos_cache", cos)
    sin_cache = g.weight("model.rotary_emb.sin_cache", sin)

    # the layer's source pages leave this process once its weights are written: converting an 8B
    # checkpoint then holds one layer of it, not all 16 GB (Checkpoint.release)
    release = getattr(ckpt, "release", lambda: None)
    kv_outputs: list[tuple[str, list]] = []
    residual, pending = x, None  # pending: the last sub-block's output, not yet added to residual
    for i in range(cfg.num_hidden_layers):
        p = f"language_model.model.layers.{i}"
        m = f"model/layers.{i}"
        ln_in = ckpt.f32(f"{p}.input_layernorm.weight")
        if pending is None:
            h = rms_norm(g, residual, f"{m}/input_layernorm", ln_in, cfg.rms_norm_eps)
        else:
            h, residual = _skip_norm(g, pending, residual, f"{m}/input_layernorm", ln_in, cfg.rms_norm_eps)

        qkv = proj(h, f"{m}/attn/qkv_proj", *(ckpt.linear(f"{p}.self_attn.{n}_proj") for n in "qkv"))
        if cfg.qk_norm:
            norms = [ckpt.f32(f"{p}.self_attn.{n}_norm.weight") for n in "qk"]
            qkv = _qk_norms(g, qkv, f"{m}/attn", *norms, nh, kvh, hd, cfg.rms_norm_eps)
        past_k, past_v, present_k, present_v = kv_names(i)
        kv_shape = ["batch", kvh, opts.kv_capacity, hd]
        g.input(past_k, FLOAT, kv_shape)
        g.input(past_v, FLOAT, kv_shape)
        # inputs 1-2 (a separate key and value) and 9-15 (optional inputs not used here) stay empty
        inputs = [qkv, "", "", past_k, past_v, seqlens_k, total_len, cos_cache, sin_cache] + [""] * 7 + [query_lens]
        attn = g.op(
            "GroupQueryAttention",
            inputs,
            f"/{m}/attn/GroupQueryAttention",
            outputs=[f"/{m}/attn/output", present_k, present_v],
            domain=MS_DOMAIN,
            num_heads=nh,
            kv_num_heads=kvh,
            do_rotary=1,
            rotary_interleaved=0,
        )[0]
        kv_outputs += [(present_k, kv_shape), (present_v, kv_shape)]
        a = proj(attn, f"{m}/attn/o_proj", ckpt.linear(f"{p}.self_attn.o_proj"))

        ln_post = ckpt.f32(f"{p}.post_attention_layernorm.weight")
        h2, residual = _skip_norm(g, a, residual, f"{m}/post_attention_layernorm", ln_post, cfg.rms_norm_eps)
        gu = proj(h2, f"{m}/mlp/gate_up_proj", ckpt.linear(f"{p}.mlp.gate_proj"), ckpt.linear(f"{p}.mlp.up_proj"))
        halves = g.const([cfg.intermediate_size] * 2)
        gate_out, up_out = g.op("Split", [gu, halves], f"/{m}/mlp/Split", outputs=2, axis=-1)
        silu = g.op("Mul", [gate_out, g.op("Sigmoid", [gate_out], f"/{m}/mlp/act/Sigmoid")], f"/{m}/mlp/act/Mul")
        act = g.op("Mul", [silu, up_out], f"/{m}/mlp/Mul")
        pending = proj(act, f"{m}/mlp/down_proj", ckpt.linear(f"{p}.mlp.down_proj"))
        release()
        if progress:
            progress(i + 1, cfg.num_hidden_layers)

    hidden = g.op("Add", [pending, residual], "/model/layers.last/Add")
    last = _last_rows(g, hidden, query_lens, H)
    normed = rms_norm(g, last, "model/norm", ckpt.f32("language_model.model.norm.weight"), cfg.rms_norm_eps)
    head = ckpt.lm_head()
    head_w = head.weight if isinstance(head, DenseLinear) else np.ascontiguousarray(head.awq.dequantize().T)
    # lm_head stays in float unless asked: 4-bit logits are visibly worse (llama.cpp keeps it at 6 bits);
    # quantised from the stored tensor a chunk of rows at a time (quantize)
    if opts.lm_head_bits:
        head_w = quantize(head_w, opts.lm_head_bits, opts.group_size)
    elif isinstance(head, DenseLinear):
        head_w = head_w.to_float32()
    logits = linear(g, normed, "lm_head", head_w, head.bias)
    g.output(logits, "logits", FLOAT, ["batch", cfg.vocab_size])
    for name, shape in kv_outputs:
        g.output(name, name, FLOAT, shape)
    return g


def _qk_norms(
    g: Graph, qkv: str, path: str, q_norm: np.ndarray, k_norm: np.ndarray, nh: int, kvh: int, hd: int, eps: float
) -> str:
    """Packed qkv [B, S, (nh + 2 kvh) hd] with each query and key head RMS-normed (Qwen3's q_norm, k_norm:
    one weight vector of head_dim values per projection, the same for every head)."""
    q, k, v = g.op("Split", [qkv, g.const([nh * hd, kvh * hd, kvh * hd])], f"/{path}/qkv/Split", outputs=3, axis=-1)

    def per_head(x: str, heads: int, name: str, weight: np.ndarray) -> str:
        heads_x = g.op("Reshape", [x, g.const([0, 0, heads, hd])], f"/{path}/{name}/Reshape")
        normed = rms_norm(g, heads_x, f"{path}/{name}", weight, eps)
        return g.op("Reshape", [normed, g.const([0, 0, heads * hd])], f"/{path}/{name}/Reshape_out")

    q, k = per_head(q, nh, "q_norm", q_norm), per_head(k, kvh, "k_norm", k_norm)
    return g.op("Concat", [q, k, v], f"/{path}/qkv/Concat", axis=-1)


def _skip_norm(g: Graph, x: str, skip: str, path: str, weight: np.ndarray, eps: float) -> tuple[str, str]:
    """(normed(x + skip), x + skip) in one fused node."""
    w = g.weight(f"{path}.weight", np.asarray(weight, np.float32))
    name = f"/{path}/SkipSimplifiedLayerNormalization"
    out = g.op("SkipSimplifiedLayerNormalization", [x, skip, w], name, outputs=4, domain=MS_DOMAIN, epsilon=float(eps))
    return out[0], out[3]


def _last_rows(g: Graph, hidden: str, query_lens: str, width: int) -> str:
    """hidden [B, S, W] -> [B, W]: row query_lens[b] - 1 of each batch entry."""
    lens = g.op("Cast", [query_lens], "/model/last/Cast", to=TensorProto.INT64)
    idx = g.op("Sub", [lens, g.const(1)], "/model/last/Sub")
    idx = g.op("Reshape", [idx, g.const([-1, 1, 1])], "/model/last/Reshape")
    batch = g.op("Shape", [hidden], "/model/last/Shape", start=0, end=1)
    shape = g.op("Concat", [batch, g.const([1, width])], "/model/last/Concat", axis=0)
    idx = g.op("Expand", [idx, shape], "/model/last/Expand")
    rows = g.op("GatherElements", [hidden, idx], "/model/last/GatherElements", axis=1)
    return g.op("Reshape", [rows, g.const([-1, width])], "/model/last/Reshape_out")
