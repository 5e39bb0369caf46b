"""Random-weight InternVL3 and InternVL3.5 checkpoints in the real file formats, from tiny (tests, demo)
to 8B shapes.

Weights cannot be downloaded here, so tests, the demo and the benchmarks use checkpoints made by this
module: the same config.json keys, tensor names, dtypes, AWQ packing, sharding and tokenizer files as
OpenGVLab's published InternVL3 / InternVL3.5 checkpoints (original format, bf16/f16 or AWQ int4) or
transformers' -hf checkpoints. No torch needed. InternVL3 has a Qwen2.5 decoder (q/k/v biases, head
size hidden/heads); InternVL3.5 a Qwen3 one (no biases, head size 128 whatever the width, an RMS norm
on each query and key head).

The initialisation makes the language model's next-token distribution peaked (a large lm_head), so
that greedy tokens are decided by clear margins and implementations can be compared token by token;
the rows of the stop tokens are damped so a random model talks for a while before it stops.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .awq import pack_int4_columns
from .reader import HF_LEGACY_PREFIXES, hf_sources
from .safetensors import bf16_bits
from .synthetic_tokenizer import build_tokenizer, write_tokenizer_files


@dataclass
class Shapes:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int = 0  # 0: exactly the tokenizer's size
    image_size: int = 448
    patch_size: int = 14
    tie_word_embeddings: bool = False
    tokenizer_vocab: int = 1000
    awq_group_size: int = 128
    llm: str = "qwen2"  # qwen2 (InternVL3: Qwen2.5) or qwen3 (InternVL3.5)
    text_head_dim: int = 0  # 0: text_hidden / text_heads (Qwen2); Qwen3 says it (128)

    @property
    def head_dim(self) -> int:
        return self.text_head_dim or self.text_hidden // self.text_heads


QWEN3 = {"llm": "qwen3", "text_head_dim": 128, "vocab_size": 151936}
# Published shapes: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B/1.5B/7B (config.json of InternVL3-1B/2B/8B;
# Qwen2.5-0.5B ties lm_head to the embeddings) and + Qwen3-0.6B/1.7B/4B/8B (InternVL3.5-1B/2B/4B/8B;
# Qwen3's configs: the three small ones tie, 8B does not).
# https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
# https://huggingface.co/Qwen/Qwen3-1.7B/blob/main/config.json
SIZES: dict[str, Shapes] = {
    "tiny": Shapes(64, 2, 4, 128, 128, 2, 4, 2, 256),
    "1b": Shapes(1024, 24, 16, 4096, 896, 24, 14, 2, 4864, vocab_size=151674, tie_word_embeddings=True),
    "2b": Shapes(1024, 24, 16, 4096, 1536, 28, 12, 2, 8960, vocab_size=151674),
    "8b": Shapes(1024, 24, 16, 4096, 3584, 28, 28, 4, 18944, vocab_size=151674),
    # InternVL3.5 in small: tied embeddings, 4 heads of 64 (wider than the hidden size, as Qwen3's), 2 KV heads
    "3.5-tiny": Shapes(64, 2, 4, 128, 128, 2, 4, 2, 256, tie_word_embeddings=True, llm="qwen3", text_head_dim=64),
    "3.5-1b": Shapes(1024, 24, 16, 4096, 1024, 28, 16, 8, 3072, tie_word_embeddings=True, **QWEN3),
    "3.5-2b": Shapes(1024, 24, 16, 4096, 2048, 28, 16, 8, 6144, tie_word_embeddings=True, **QWEN3),
    "3.5-4b": Shapes(1024, 24, 16, 4096, 2560, 36, 32, 8, 9728, tie_word_embeddings=True, **QWEN3),
    "3.5-8b": Shapes(1024, 24, 16, 4096, 4096, 36, 32, 8, 12288, **QWEN3),
}
WEIGHT_KINDS = ("bf16", "f16", "awq")
FORMATS = ("original", "hf")


@dataclass
class _Init:
    kind: str  # normal | around_one | const | awq
    std: float = 0.0
    value: float = 0.0


@dataclass
class _Spec:
    name: str  # canonical (original-format) name
    shape: tuple[int, ...]
    init: _Init
    quantized: bool = False  # an LLM linear weight that AWQ packs
    extra: dict = field(default_factory=dict)


def _plan(s: Shapes, vocab: int) -> list[_Spec]:
    """Every tensor of the model, in canonical names, with how to initialise it."""
    C, Iv = s.vision_hidden, s.vision_intermediate
    H, It, nh, kvh = s.text_hidden, s.text_intermediate, s.text_heads, s.text_kv_heads
    hd, qwen3 = s.head_dim, s.llm == "qwen3"
    n_pos = (s.image_size // s.patch_size) ** 2 + 1
    specs = [
        _Spec("vision_model.embeddings.class_embedding", (1, 1, C), _Init("normal", 0.5)),
        _Spec(
            "vision_model.embeddings.patch_embedding.weight",
            (C, 3, s.patch_size, s.patch_size),
            _Init("normal", 1.0 / np.sqrt(3 * s.patch_size**2)),
        ),
        _Spec("vision_model.embeddings.patch_embedding.bias", (C,), _Init("normal", 0.05)),
        _Spec("vision_model.embeddings.position_embedding", (1, n_pos, C), _Init("normal", 0.5)),
    ]
    for i in range(s.vision_layers):
        p = f"vision_model.encoder.layers.{i}"
        specs += [
            _Spec(f"{p}.norm1.weight", (C,), _Init("around_one", 0.1)),
            _Spec(f"{p}.norm1.bias", (C,), _Init("normal", 0.05)),
            _Spec(f"{p}.attn.qkv.weight", (3 * C, C), _Init("normal", 1.0 / np.sqrt(C))),
            _Spec(f"{p}.attn.qkv.bias", (3 * C,), _Init("normal", 0.05)),
            _Spec(f"{p}.attn.proj.weight", (C, C), _Init("normal", 1.0 / np.sqrt(C))),
            _Spec(f"{p}.attn.proj.bias", (C,), _Init("normal", 0.05)),
            _Spec(f"{p}.ls1", (C,), _Init("around_one", 0.2)),
            _Spec(f"{p}.norm2.weight", (C,), _Init("around_one", 0.1)),
            _Spec(f"{p}.norm2.bias", (C,), _Init("normal", 0.05)),
            _Spec(f"{p}.mlp.fc1.weight", (Iv, C), _Init("normal", 1.0 / np.sqrt(C))),
            _Spec(f"{p}.mlp.fc1.bias", (Iv,), _Init("normal", 0.05)),
            _Spec(f"{p}.mlp.fc2.weight", (C, Iv), _Init("normal", 1.0 / np.sqrt(Iv))),
            _Spec(f"{p}.mlp.fc2.bias", (C,), _Init("normal", 0.05)),
            _Spec(f"{p}.ls2", (C,), _Init("around_one", 0.2)),
        ]
    C4 = 4 * C
    # A tied lm_head reads the embeddings back: at unit scale a token's own embedding dominates the last
    # hidden state, so the random model repeats its input ("\n" after the prompt) and answers blank text.
    # At 2/sqrt(H) the layers dominate even with two of them (logits' std ~2; tests/test_cli_everyday.py).
    embed_std = 2.0 / np.sqrt(H) if s.tie_word_embeddings else 1.0
    specs += [
        _Spec("mlp1.0.weight", (C4,), _Init("around_one", 0.1)),
        _Spec("mlp1.0.bias", (C4,), _Init("normal", 0.05)),
        _Spec("mlp1.1.weight", (H, C4), _Init("normal", 1.0 / np.sqrt(C4))),
        _Spec("mlp1.1.bias", (H,), _Init("normal", 0.05)),
        _Spec("mlp1.3.weight", (H, H), _Init("normal", 1.0 / np.sqrt(H))),
        _Spec("mlp1.3.bias", (H,), _Init("normal", 0.05)),
        _Spec("language_model.model.embed_tokens.weight", (vocab, H), _Init("normal", embed_std)),
    ]
    for i in range(s.text_layers):
        p = f"language_model.model.layers.{i}"
        qkv_bias = not qwen3  # Qwen2 has q/k/v biases, Qwen3 none
        lin = [
            ("self_attn.q_proj", nh * hd, H, qkv_bias),
            ("self_attn.k_proj", kvh * hd, H, qkv_bias),
            ("self_attn.v_proj", kvh * hd, H, qkv_bias),
            ("self_attn.o_proj", H, nh * hd, False),
            ("mlp.gate_proj", It, H, False),
            ("mlp.up_proj", It, H, False),
            ("mlp.down_proj", H, It, False),
        ]
        specs += [
            _Spec(f"{p}.input_layernorm.weight", (H,), _Init("around_one", 0.1)),
            _Spec(f"{p}.post_attention_layernorm.weight", (H,), _Init("around_one", 0.1)),
        ]
        for name, n_out, n_in, bias in lin:
            specs.append(_Spec(f"{p}.{name}.weight", (n_out, n_in), _Init("normal", 1.0 / np.sqrt(n_in)), True))
            if bias:
                specs.append(_Spec(f"{p}.{name}.bias", (n_out,), _Init("normal", 0.2)))
        if qwen3:  # one weight per head dimension, shared by the heads
            specs += [
                _Spec(f"{p}.self_attn.q_norm.weight", (hd,), _Init("around_one", 0.3)),
                _Spec(f"{p}.self_attn.k_norm.weight", (hd,), _Init("around_one", 0.3)),
            ]
    specs.append(_Spec("language_model.model.norm.weight", (H,), _Init("around_one", 0.1)))
    if not s.tie_word_embeddings:
        # peaked logits: each logit has a standard deviation of ~8 for unit-variance hidden states
        specs.append(_Spec("language_model.lm_head.weight", (vocab, H), _Init("normal", 8.0 / np.sqrt(H))))
    return specs


def _generate(spec: _Spec, seed: int, damp_rows: list[int]) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    init = spec.init
    if init.kind == "normal":
        x = rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(init.std)
    elif init.kind == "around_one":
        x = 1.0 + rng.standard_normal(spec.shape, dtype=np.float32) * np.float32(init.std)
    else:
        x = np.full(spec.shape, init.value, dtype=np.float32)
    if spec.name == "language_model.lm_head.weight" and damp_rows:
        x[damp_rows] *= 0.25  # stop tokens rarely win, so random models produce long answers
    return x


def _awq_parts(spec: _Spec, seed: int, group: int) -> dict[str, np.ndarray]:
    """Random AWQ tensors whose dequantised weight has about the spec's standard deviation."""
    n_out, n_in = spec.shape
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode()), 1])
    groups = -(-n_in // group)
    q = rng.integers(0, 16, size=(n_in, n_out), dtype=np.uint8)
    z = rng.integers(6, 11, size=(groups, n_out), dtype=np.uint8)
    # (q - z) has a standard deviation of ~4.8 for q uniform on 0..15
    scales = (np.abs(rng.standard_normal((groups, n_out))) * 0.5 + 0.75) * spec.init.std / 4.8
    return {
        "qweight": pack_int4_columns(q),
        "qzeros": pack_int4_columns(z),
        "scales": scales.astype(np.float16),
    }


def _hf_name(canonical: str) -> tuple[str, ...]:
    """transformers' names for a canonical tensor, with the prefixes -hf checkpoints were published with."""
    out = []
    for name in hf_sources(canonical):
        for old, new in HF_LEGACY_PREFIXES:
            if name.startswith(new):
                name = old + name[len(new) :]
                break
        out.append(name)
    return tuple(out)


def _to_storage(x: np.ndarray, dtype: str):
    from .safetensors import RawTensor

    if dtype == "bf16":
        return RawTensor("BF16", bf16_bits(x))
    if dtype == "f16":
        return x.astype(np.float16)
    return x.astype(np.float32)


class _ShardedWriter:
    """Writes tensors into safetensors shards of at most `shard_bytes`, plus the index when sharded."""

    def __init__(self, out_dir: str, entries: list[tuple[str, str, tuple[int, ...], int]], shard_bytes: int):
        # entries: (name, safetensors dtype, shape, nbytes) in writing order
        self.out_dir = out_dir
        self.shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for e in entries:
            if self.shards[-1] and size + e[3] > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(e)
            size += e[3]

    def write(self, produce) -> None:
        import struct

        n = len(self.shards)
        weight_map = {}
        for k, shard in enumerate(self.shards):
            fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {}, 0
            for name, dtype, shape, nbytes in shard:
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = fname
            header["__metadata__"] = {"format": "pt"}
            head = json.dumps(header, separators=(",", ":")).encode()
            head += b" " * (-len(head) % 8)
            with open(os.path.join(self.out_dir, fname), "wb") as f:
                f.write(struct.pack("<Q", len(head)))
                f.write(head)
                for name, *_, nbytes in shard:
                    data = produce(name)
                    assert data.nbytes == nbytes, name
                    f.write(np.ascontiguousarray(data).tobytes())
        if n > 1:
            total = sum(e[3] for shard in self.shards for e in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)


def _configs(s: Shapes, vocab: int, fmt: str, weights: str, ids: dict[str, int]) -> dict:
    torch_dtype = "bfloat16" if weights == "bf16" else "float16"
    llm = (
        _qwen3_config(s)
        if s.llm == "qwen3"
        else {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": s.text_hidden,
            "intermediate_size": s.text_intermediate,
            "num_attention_heads": s.text_heads,
            "num_hidden_layers": s.text_layers,
            "num_key_value_heads": s.text_kv_heads,
            "max_position_embeddings": 32768,
            "max_window_layers": s.text_layers,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "hidden_act": "silu",
            "vocab_size": vocab,
            "tie_word_embeddings": s.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": 32768,
            "attention_dropout": 0.0,
        }
    )
    llm.update(
        {
            "vocab_size": vocab,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "use_cache": True,
            "torch_dtype": torch_dtype,
        }
    )
    if weights == "awq":
        # OpenGVLab's -AWQ checkpoints keep quantization_config inside llm_config
        llm["quantization_config"] = {
            "bits": 4,
            "group_size": s.awq_group_size,
            "modules_to_not_convert": ["vision_model", "mlp1", "lm_head"],
            "quant_method": "awq",
            "version": "gemm",
            "zero_point": True,
        }
    if fmt == "original":
        vision = {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate,
            "num_attention_heads": s.vision_heads,
            "num_hidden_layers": s.vision_layers,
            "image_size": s.image_size,
            "patch_size": s.patch_size,
            "num_channels": 3,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "qk_normalization": False,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
            "torch_dtype": torch_dtype,
        }
        return {
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "auto_map": {
                "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
            },
            "downsample_ratio": 0.5,
            "dynamic_image_size": True,
            "force_image_size": s.image_size,
            "max_dynamic_patch": 12,
            "min_dynamic_patch": 1,
            "ps_version": "v2",
            "select_layer": -1,
            "template": "internvl2_5",
            "torch_dtype": torch_dtype,
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "use_thumbnail": True,
            "llm_config": llm,
            "vision_config": vision,
        }
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": s.vision_hidden,
        "intermediate_size": s.vision_intermediate,
        "num_attention_heads": s.vision_heads,
        "num_hidden_layers": s.vision_layers,
        "image_size": [s.image_size, s.image_size],
        "patch_size": [s.patch_size, s.patch_size],
        "num_channels": 3,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "attention_bias": True,
        "use_qk_norm": False,
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.1,
        "hidden_act": "gelu",
    }
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_seq_length": (s.image_size // s.patch_size) ** 2 // 4,
        "image_token_id": ids["<IMG_CONTEXT>"],
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": s.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "text_config": llm,
        "vision_config": vision,
    }


def _qwen3_config(s: Shapes) -> dict:
    """llm_config / text_config of an InternVL3.5 (Qwen3ForCausalLM, as Qwen3's own config.json)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": s.text_hidden,
        "intermediate_size": s.text_intermediate,
        "num_attention_heads": s.text_heads,
        "num_hidden_layers": s.text_layers,
        "num_key_value_heads": s.text_kv_heads,
        "head_dim": s.head_dim,
        "attention_bias": False,
        "max_position_embeddings": 40960,
        "max_window_layers": s.text_layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": s.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_dropout": 0.0,
    }


def _preprocessor_config(s: Shapes, fmt: str) -> dict:
    """As the published checkpoints ship it (ImageNet mean/std, bicubic, 448)."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if fmt == "original":
        return {
            "crop_size": s.image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": mean,
            "image_std": std,
            "resample": 3,
            "size": s.image_size,
        }
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": False,
        "min_patches": 1,
        "max_patches": 12,
        "do_resize": True,
        "size": {"height": s.image_size, "width": s.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }


def make_checkpoint(
    out_dir: str,
    size: str | Shapes = "tiny",
    fmt: str = "original",
    weights: str = "bf16",
    seed: int = 0,
    shard_bytes: int = 2 * 1024**3,
    generation: dict | None = None,
    overwrite: bool = False,
    progress=None,
) -> str:
    """Write a random-weight checkpoint folder; returns its path. `weights`: bf16, f16 or awq (int4
    decoder linears, f16 elsewhere, as OpenGVLab's -AWQ checkpoints). Written to a temporary folder
    and renamed, so an interrupted run leaves nothing behind."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}")
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}")
    if fmt == "hf" and weights == "awq":
        raise ValueError("AWQ checkpoints are published in the original format only")
    shapes = SIZES[size] if isinstance(size, str) else size
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ckpt-", dir=parent)
    try:
        # the published shapes' vocabulary is covered whole, so that every id a random model picks is text
        tok = build_tokenizer(shapes.tokenizer_vocab, total=shapes.vocab_size)
        ids = write_tokenizer_files(tok, tmp)
        vocab = shapes.vocab_size or tok.get_vocab_size(with_added_tokens=True)
        if vocab < tok.get_vocab_size(with_added_tokens=True):
            raise ValueError("vocab_size is smaller than the tokenizer")
        config = _configs(shapes, vocab, fmt, weights, ids)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
        gen.update(generation or {})
        gen["transformers_version"] = "4.51.3"
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(gen, f, indent=2)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(_preprocessor_config(shapes, fmt), f, indent=2)
        with open(os.path.join(tmp, "internvl_edge_factory.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "size": size if isinstance(size, str) else "custom",
                    "shapes": asdict(shapes),
                    "format": fmt,
                    "weights": weights,
                    "seed": seed,
                },
                f,
                indent=2,
            )
        _write_weights(
            tmp, shapes, vocab, fmt, weights, seed, shard_bytes, [ids["<|im_end|>"], ids["<|endoftext|>"]], progress
        )
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(tmp, shapes, vocab, fmt, weights, seed, shard_bytes, damp_rows, progress) -> None:
    specs = _plan(shapes, vocab)
    store = "f16" if weights == "awq" else weights
    st_dtype = {"bf16": "BF16", "f16": "F16"}[store]
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    producers: dict[str, tuple] = {}
    for spec in specs:
        if weights == "awq" and spec.quantized:
            n_out, n_in = spec.shape
            groups = -(-n_in // shapes.awq_group_size)
            base = spec.name[: -len(".weight")]
            for part, dtype, shape, nbytes in (
                ("qweight", "I32", (n_in, n_out // 8), n_in * n_out // 2),
                ("qzeros", "I32", (groups, n_out // 8), groups * n_out // 2),
                ("scales", "F16", (groups, n_out), groups * n_out * 2),
            ):
                entries.append((f"{base}.{part}", dtype, shape, nbytes))
                producers[f"{base}.{part}"] = ("awq", spec, part)
            continue
        names = _hf_name(spec.name) if fmt == "hf" else (spec.name,)
        if len(names) == 1:
            entries.append((names[0], st_dtype, spec.shape, int(np.prod(spec.shape)) * 2))
            producers[names[0]] = ("dense", spec, None)
        else:  # a fused tensor that transformers keeps as equal parts (the vision qkv)
            part_shape = (spec.shape[0] // len(names),) + spec.shape[1:]
            for k, name in enumerate(names):
                entries.append((name, st_dtype, part_shape, int(np.prod(part_shape)) * 2))
                producers[name] = ("part", spec, (k, len(names)))
    cache: dict[str, object] = {}
    done = [0]

    def produce(name: str) -> np.ndarray:
        kind, spec, arg = producers[name]
        if kind == "awq":
            if spec.name not in cache:
                cache.clear()
                cache[spec.name] = _awq_parts(spec, seed, shapes.awq_group_size)
            out = cache[spec.name][arg]
        else:
            if spec.name not in cache:
                cache.clear()
                cache[spec.name] = _to_storage(_generate(spec, seed, damp_rows), store)
            full = cache[spec.name]
            data = full.data if hasattr(full, "data") and not isinstance(full, np.ndarray) else full
            if kind == "part":
                k, n = arg
                rows = data.shape[0] // n
                data = data[k * rows : (k + 1) * rows]
            out = data
        done[0] += 1
        if progress:
            progress(done[0], len(entries), name)
        return out

    _ShardedWriter(tmp, entries, shard_bytes).write(produce)


def shapes_with(size: str, **changes) -> Shapes:
    """A named size with some fields changed (tests use odd shapes so nothing depends on one fixture)."""
    return replace(SIZES[size], **changes)
