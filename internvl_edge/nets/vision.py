"""InternViT + CLS drop + pixel shuffle + `mlp1` as one ONNX graph: pixels -> image embeddings.

https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py
https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
(extract_feature, pixel_shuffle)

    pixel_values [N, 3, 448, 448]
      Conv 14x14/14 -> [N, C, 32, 32] -> [N, 1024, C]; prepend class token; + position embedding
      per layer:  x += ls1 * proj(attention(norm1(x)));  x += ls2 * fc2(gelu(fc1(norm2(x))))
      drop CLS -> [N, 32, 32, C] -> pixel shuffle 0.5 -> [N, 16, 16, 4C] -> [N, 256, 4C]
      mlp1: LayerNorm -> Linear -> GELU -> Linear -> image_embeds [N, 256, hidden of the LLM]
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from ..checkpoint.reader import Checkpoint
from .graph import MS_DOMAIN, Graph
from .linear import Linear, layer_norm, rms_norm, tensor
from .quant import quantize_int8_columns

MLP1_LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which mlp1.0 uses


@dataclass
class VisionOptions:
    store: str  # f32 | f16 | bf16
    weight_bits: int = 0  # 8: the encoder's linears as int8 (DynamicQuantizeMatMul, int8 activations)
    accuracy_level: int = 4
    static: bool = False  # a fixed [1, 3, 448, 448] input (static bundles feed one tile per call)


def _params(ckpt: Checkpoint, prefix: str, opts: VisionOptions, optional_bias: bool = False) -> tuple:
    """An encoder linear's (weight, bias), the weight as int8 columns with weight_bits 8."""
    w = ckpt.f32(f"{prefix}.weight")
    b = ckpt.optional_f32(f"{prefix}.bias") if optional_bias else ckpt.f32(f"{prefix}.bias")
    return (quantize_int8_columns(w) if opts.weight_bits == 8 else w), b


def _norm(g: Graph, ckpt: Checkpoint, x: str, prefix: str, path: str, norm_type: str, eps: float) -> str:
    if norm_type == "rms_norm":
        return rms_norm(g, x, path, ckpt.f32(f"{prefix}.weight"), eps)
    return layer_norm(g, x, path, ckpt.f32(f"{prefix}.weight"), ckpt.f32(f"{prefix}.bias"), eps)


def build_vision(ckpt: Checkpoint, opts: VisionOptions, weights, progress=None) -> Graph:
    cfg = ckpt.config
    v = cfg.vision
    C, heads = v.hidden_size, v.num_attention_heads
    grid = v.image_size // v.patch_size
    g = Graph("vision", weights)
    linear = Linear(opts.store, opts.accuracy_level)
    tiles_dim = 1 if opts.static else "tiles"
    px = g.input("pixel_values", TensorProto.FLOAT, [tiles_dim, v.num_channels, v.image_size, v.image_size])

    e = "vision_model.embeddings"
    patch_w = tensor(g, f"{e}.patch_embedding.weight", ckpt.f32(f"{e}.patch_embedding.weight"), opts.store)
    patch_b = g.weight(f"{e}.patch_embedding.bias", ckpt.f32(f"{e}.patch_embedding.bias"))
    patch = [v.patch_size] * 2
    conv = "/vision/embeddings/patch_embedding/Conv"
    x = g.op("Conv", [px, patch_w, patch_b], conv, kernel_shape=patch, strides=patch)
    x = g.op("Reshape", [x, g.const([0, C, grid * grid])], "/vision/embeddings/Reshape")
    x = g.op("Transpose", [x], "/vision/embeddings/Transpose", perm=[0, 2, 1])  # [N, patches, C]
    tiles = g.op("Shape", [px], "/vision/embeddings/Shape", start=0, end=1)
    cls_shape = g.op("Concat", [tiles, g.const([1, C])], "/vision/embeddings/Concat_shape", axis=0)
    cls = tensor(g, f"{e}.class_embedding", ckpt.f32(f"{e}.class_embedding"), opts.store)
    cls = g.op("Expand", [cls, cls_shape], "/vision/embeddings/Expand")
    x = g.op("Concat", [cls, x], "/vision/embeddings/Concat", axis=1)
    pos = tensor(g, f"{e}.position_embedding", ckpt.f32(f"{e}.position_embedding"), opts.store)
    x = g.op("Add", [x, pos], "/vision/embeddings/Add")

    n_layers = cfg.vision_layers_used
    for i in range(n_layers):
        p = f"vision_model.encoder.layers.{i}"
        m = f"vision/layers.{i}"
        h = _norm(g, ckpt, x, f"{p}.norm1", f"{m}/norm1", v.norm_type, v.layer_norm_eps)
        qkv = linear(g, h, f"{m}/attn/qkv", *_params(ckpt, f"{p}.attn.qkv", opts, optional_bias=True))
        q, k, val = g.op("Split", [qkv, g.const([C, C, C])], f"/{m}/attn/Split", outputs=3, axis=-1)
        if v.qk_normalization:  # RMSNorm over all heads at once, before the head split
            q = rms_norm(g, q, f"{m}/attn/q_norm", ckpt.f32(f"{p}.attn.q_norm.weight"), v.layer_norm_eps)
            k = rms_norm(g, k, f"{m}/attn/k_norm", ckpt.f32(f"{p}.attn.k_norm.weight"), v.layer_norm_eps)
        mha = f"/{m}/attn/MultiHeadAttention"
        attn = g.op("MultiHeadAttention", [q, k, val], mha, domain=MS_DOMAIN, num_heads=heads)
        o = linear(g, attn, f"{m}/attn/proj", *_params(ckpt, f"{p}.attn.proj", opts, optional_bias=True))
        o = g.op("Mul", [o, g.weight(f"{p}.ls1", ckpt.f32(f"{p}.ls1"))], f"/{m}/ls1/Mul")
        x = g.op("Add", [x, o], f"/{m}/residual1/Add")
        h = _norm(g, ckpt, x, f"{p}.norm2", f"{m}/norm2", v.norm_type, v.layer_norm_eps)
        h = linear(g, h, f"{m}/mlp/fc1", *_params(ckpt, f"{p}.mlp.fc1", opts))
        h = g.op("Gelu", [h], f"/{m}/mlp/act/Gelu", domain=MS_DOMAIN)
        h = linear(g, h, f"{m}/mlp/fc2", *_params(ckpt, f"{p}.mlp.fc2", opts))
        h = g.op("Mul", [h, g.weight(f"{p}.ls2", ckpt.f32(f"{p}.ls2"))], f"/{m}/ls2/Mul")
        x = g.op("Add", [x, h], f"/{m}/residual2/Add")
        if progress:
            progress(i + 1, n_layers)
    if v.post_layernorm:
        w, b = ckpt.f32("vision_model.post_layernorm.weight"), ckpt.f32("vision_model.post_layernorm.bias")
        x = layer_norm(g, x, "vision/post_layernorm", w, b, v.layer_norm_eps)

    # drop CLS, then pixel shuffle: [N, w, h, c] -> [N, w, h/2, 2c] -> swap -> [N, h/2, w/2, 4c] -> swap back (v2)
    x = g.op("Slice", [x, g.const([1]), g.const([grid * grid + 1]), g.const([1])], "/vision/drop_cls/Slice")
    r = cfg.downsample_ratio
    f = int(round(1 / r))
    x = g.op("Reshape", [x, g.const([0, grid, grid // f, C * f])], "/vision/pixel_shuffle/Reshape_1")
    x = g.op("Transpose", [x], "/vision/pixel_shuffle/Transpose_1", perm=[0, 2, 1, 3])
    x = g.op("Reshape", [x, g.const([0, grid // f, grid // f, C * f * f])], "/vision/pixel_shuffle/Reshape_2")
    if cfg.ps_version != "v1":
        x = g.op("Transpose", [x], "/vision/pixel_shuffle/Transpose_2", perm=[0, 2, 1, 3])
    x = g.op("Reshape", [x, g.const([0, (grid // f) ** 2, C * f * f])], "/vision/pixel_shuffle/Reshape_3")

    x = layer_norm(g, x, "mlp1.0", ckpt.f32("mlp1.0.weight"), ckpt.f32("mlp1.0.bias"), MLP1_LAYERNORM_EPS)
    x = linear(g, x, "mlp1.1", ckpt.f32("mlp1.1.weight"), ckpt.f32("mlp1.1.bias"))  # float even with weight_bits 8
    x = g.op("Gelu", [x], "/mlp1.2/Gelu", domain=MS_DOMAIN)
    x = linear(g, x, "mlp1.3", ckpt.f32("mlp1.3.weight"), ckpt.f32("mlp1.3.bias"))
    g.output(x, "image_embeds", TensorProto.FLOAT, [tiles_dim, cfg.num_image_token, cfg.text.hidden_size])
    return g
