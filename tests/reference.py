"""The external reference: transformers' InternVLForConditionalGeneration, loaded without our code.

- transformers-format checkpoints load with `from_pretrained` (transformers' own name handling);
- OpenGVLab original-format checkpoints are mapped here, independently of internvl_edge's tables,
  following the published key layouts (AWQ int4 dequantised with AutoAWQ's bit order);
- w4 bundles we quantised ourselves: the reference runs on those very weights, read back from the
  bundle's MatMulNBits tensors and dequantised per ONNX Runtime's documented layout.
Everything runs in float32 with eager attention.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import load_file
from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2TokenizerFast

SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def _load_tensors(ckpt_dir: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(os.path.join(ckpt_dir, "*.safetensors"))):
        out.update(load_file(f))
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """AutoAWQ GEMM: nibble i of each int32 holds column [0, 2, 4, 6, 1, 3, 5, 7][i] of its 8."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(x):
        rows, cols = x.shape
        out = torch.empty(rows, cols * 8, dtype=torch.int32)
        for nibble, col in enumerate(order):
            out[:, col::8] = (x >> (4 * nibble)) & 0xF
        return out

    q = unpack(qweight).float()
    z = unpack(qzeros).float().repeat_interleave(group, dim=0)
    s = scales.float().repeat_interleave(group, dim=0)
    return ((q - z) * s).T.contiguous()  # [N, K] as nn.Linear keeps it


def _hf_config(raw: dict, image_token_id: int) -> InternVLConfig:
    v, t = raw["vision_config"], dict(raw["llm_config"])
    t.pop("quantization_config", None)
    t["model_type"] = "qwen3" if "Qwen3ForCausalLM" in t.get("architectures", []) else "qwen2"
    size = raw.get("force_image_size") or v["image_size"]
    vision = {
        "hidden_size": v["hidden_size"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "intermediate_size": v["intermediate_size"],
        "image_size": [size, size],
        "patch_size": [v["patch_size"]] * 2,
        "norm_type": v["norm_type"],
        "layer_norm_eps": v["layer_norm_eps"],
        "attention_bias": v["qkv_bias"],
        "use_qk_norm": v["qk_normalization"],
        "use_mean_pooling": True,
        "hidden_act": v["hidden_act"],
    }
    patches = (size // v["patch_size"]) ** 2
    return InternVLConfig(
        vision_config=vision,
        text_config=t,
        downsample_ratio=raw["downsample_ratio"],
        image_token_id=image_token_id,
        image_seq_length=int(patches * raw["downsample_ratio"] ** 2),
        vision_feature_layer=raw["select_layer"],
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )


def original_state_dict(ckpt_dir: str, raw: dict) -> dict[str, torch.Tensor]:
    src = _load_tensors(ckpt_dir)
    group = (raw["llm_config"].get("quantization_config") or {}).get("group_size", 128)
    sd = {}
    for name, t in src.items():
        t = t.float() if t.is_floating_point() else t
        if name.startswith("vision_model."):
            n = name.replace("vision_model.", "model.vision_tower.")
            n = n.replace("embeddings.class_embedding", "embeddings.cls_token")
            n = n.replace("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection.")
            n = n.replace("embeddings.position_embedding", "embeddings.position_embeddings")
            n = n.replace("encoder.layers.", "encoder.layer.")
            n = n.replace(".attn.proj.", ".attention.projection_layer.")
            n = n.replace(".attn.q_norm.", ".attention.q_norm.").replace(".attn.k_norm.", ".attention.k_norm.")
            n = n.replace(".norm1.", ".layernorm_before.").replace(".norm2.", ".layernorm_after.")
            n = n.replace(".ls1", ".lambda_1").replace(".ls2", ".lambda_2")
            if ".attn.qkv." in n:
                for part, chunk in zip("qkv", torch.chunk(t, 3, dim=0), strict=True):
                    sd[n.replace(".attn.qkv.", f".attention.{part}_proj.")] = chunk.clone()
                continue
            sd[n] = t
        elif name.startswith("mlp1."):
            idx, param = name.split(".")[1:]
            sd[
                f"model.multi_modal_projector.{ {'0': 'layer_norm', '1': 'linear_1', '3': 'linear_2'}[idx] }.{param}"
            ] = t
        elif name == "language_model.lm_head.weight":
            sd["lm_head.weight"] = t
        elif name.startswith("language_model.model."):
            n = "model.language_model." + name[len("language_model.model.") :]
            if n.endswith(".qweight"):
                base = name[: -len(".qweight")]
                sd[n[: -len(".qweight")] + ".weight"] = awq_dequantize(
                    t, src[base + ".qzeros"], src[base + ".scales"], group
                )
            elif n.endswith((".qzeros", ".scales")):
                continue
            else:
                sd[n] = t
        else:
            raise KeyError(f"unexpected tensor {name}")
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    return sd


def reference_tokenizer(ckpt_dir: str) -> Qwen2TokenizerFast:
    """transformers' Qwen2 tokenizer on the checkpoint's files (the class named in tokenizer_config.json;
    AutoTokenizer would ask about the original format's remote code)."""
    return Qwen2TokenizerFast.from_pretrained(ckpt_dir)


def load_reference(ckpt_dir: str) -> InternVLForConditionalGeneration:
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        raw = json.load(f)
    if "InternVLForConditionalGeneration" in raw.get("architectures", []):
        model, info = InternVLForConditionalGeneration.from_pretrained(
            ckpt_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        assert not any(info.values()), info
        return model.eval()
    tok = reference_tokenizer(ckpt_dir)
    cfg = _hf_config(raw, tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    cfg._attn_implementation = "eager"
    model = InternVLForConditionalGeneration(cfg).float().eval()  # float32 before the weights arrive
    model.load_state_dict(original_state_dict(ckpt_dir, raw), strict=True)
    return model


def matmulnbits_dequantize(
    packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, K: int, N: int, bits: int, block: int
) -> np.ndarray:
    """ORT MatMulNBits layout -> float32 [N, K] (ContribOperators.md: low nibble first)."""
    blocks = -(-K // block)
    b = packed.reshape(N, blocks, -1)
    if bits == 4:
        q = np.empty((N, blocks, block), np.float32)
        q[:, :, 0::2] = b & 0xF
        q[:, :, 1::2] = b >> 4
        zp = np.empty((N, 2 * zeros.reshape(N, -1).shape[1]), np.float32)
        zp[:, 0::2] = zeros.reshape(N, -1) & 0xF
        zp[:, 1::2] = zeros.reshape(N, -1) >> 4
        zp = zp[:, :blocks]
    else:
        q = b.astype(np.float32)
        zp = zeros.reshape(N, blocks).astype(np.float32)
    w = (q - zp[:, :, None]) * scales.reshape(N, blocks)[:, :, None]
    return w.reshape(N, -1)[:, :K]


def bundle_linear_weights(bundle_dir: str) -> dict[str, np.ndarray]:
    """{HF linear name: dequantised float32 [N, K]} for every MatMulNBits node of the decoder bundle."""
    model = onnx.load(os.path.join(bundle_dir, "decoder.onnx"), load_external_data=True)
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        arr = [numpy_helper.to_array(inits[i]) for i in node.input[1:4]]
        out[node.name] = matmulnbits_dequantize(
            arr[0], arr[1], arr[2], attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        )
    return out


def apply_bundle_quantisation(model: InternVLForConditionalGeneration, bundle_dir: str, layers: bool = True) -> None:
    """Give the reference exactly the block-quantised weights our bundle computes with (the decoder
    layers' 4-bit weights unless `layers` is False, and lm_head when the bundle quantised it)."""
    cfg = model.config.text_config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q_rows, kv_rows = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    weights = bundle_linear_weights(bundle_dir)
    lm = model.model.language_model
    with torch.no_grad():
        for i, layer in enumerate(lm.layers if layers else []):
            qkv = weights[f"/model/layers.{i}/attn/qkv_proj/MatMulNBits"]
            layer.self_attn.q_proj.weight.copy_(torch.from_numpy(qkv[:q_rows]))
            layer.self_attn.k_proj.weight.copy_(torch.from_numpy(qkv[q_rows : q_rows + kv_rows]))
            layer.self_attn.v_proj.weight.copy_(torch.from_numpy(qkv[q_rows + kv_rows :]))
            layer.self_attn.o_proj.weight.copy_(torch.from_numpy(weights[f"/model/layers.{i}/attn/o_proj/MatMulNBits"]))
            gu = weights[f"/model/layers.{i}/mlp/gate_up_proj/MatMulNBits"]
            layer.mlp.gate_proj.weight.copy_(torch.from_numpy(gu[: cfg.intermediate_size]))
            layer.mlp.up_proj.weight.copy_(torch.from_numpy(gu[cfg.intermediate_size :]))
            layer.mlp.down_proj.weight.copy_(torch.from_numpy(weights[f"/model/layers.{i}/mlp/down_proj/MatMulNBits"]))
        if "/lm_head/MatMulNBits" in weights:
            model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(weights["/lm_head/MatMulNBits"]))


def prompt_text(question: str, tiles_per_image: list[int], tokens_per_tile: int = 256, system: str = SYSTEM) -> str:
    """InternVL2.5/3's chat template (OpenGVLab conversation.py, internvl2_5), written out by hand."""
    if len(tiles_per_image) == 1:
        question = "<image>\n" + question
    elif len(tiles_per_image) > 1:
        question = "".join(f"Image-{i + 1}: <image>\n" for i in range(len(tiles_per_image))) + question
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    for n in tiles_per_image:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * n) + "</img>", 1)
    return text


@contextlib.contextmanager
def float16_cache(enabled: bool = True):
    """transformers' models, while inside, keep their KV cache rounded to float16 (to nearest even, as
    F16C rounds), computing in float32 as before: the runtime's cache for 4-bit and half-precision
    bundles (kernels/settings.py). Every row is rounded as it enters the cache, before attention reads
    it, as our kernel writes a step's rows and then reads them back. The rounding sits in
    `Cache.update`, through which every layer type's cache is updated."""
    from transformers import cache_utils

    original = cache_utils.Cache.update
    layers = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layers.add(layer_idx)
        rounded = (t.to(torch.float16).to(key_states.dtype) for t in (key_states, value_states))
        return original(self, *rounded, layer_idx, *args, **kwargs)

    if enabled:
        cache_utils.Cache.update = update
    try:
        yield
    finally:
        cache_utils.Cache.update = original
    assert layers or not enabled, "the reference's cache never went through Cache.update"


@torch.no_grad()
def greedy(model, input_ids: list[int], pixel_values=None, steps: int = 32):
    """The reference's greedy tokens (end-of-turn tokens do not stop it) and its logits at every step."""
    from transformers import GenerationConfig

    ids = torch.tensor([input_ids])
    extra = {} if pixel_values is None else {"pixel_values": torch.as_tensor(pixel_values, dtype=torch.float32)}
    cfg = GenerationConfig(max_new_tokens=steps, min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = model.generate(
        input_ids=ids, **extra, generation_config=cfg, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[0, len(input_ids) :].tolist()
    logits = torch.stack(out.logits)[:, 0].float().numpy()
    return tokens, logits


@torch.no_grad()
def logits_for(model, input_ids: list[int], pixel_values=None, start: int | None = None) -> np.ndarray:
    """One forward pass over the whole sequence; logits of positions start-1 .. end-1 (what predicts
    tokens start .. end), float32 numpy."""
    ids = torch.tensor([input_ids])
    pv = None if pixel_values is None else torch.as_tensor(pixel_values, dtype=torch.float32)
    extra = {} if pv is None else {"pixel_values": pv}
    logits = model(input_ids=ids, **extra).logits[0].float().numpy()
    return logits[(start or len(input_ids)) - 1 :]
