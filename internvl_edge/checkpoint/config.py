"""Model configuration read from a checkpoint's config.json: separate vision, text and top-level parts.

Two source layouts describe the same model:
- OpenGVLab's original format (`InternVLChatModel`): `vision_config`, `llm_config`, `downsample_ratio`,
  `force_image_size`, `select_layer`, `ps_version`, `template`.
  https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/model/internvl_chat/configuration_internvl_chat.py
- transformers' native format (`InternVLForConditionalGeneration`): `vision_config`, `text_config`,
  `vision_feature_layer`, `image_token_id`, `projector_hidden_act`.
  https://github.com/huggingface/transformers/blob/main/src/transformers/models/internvl/configuration_internvl.py
Unknown keys are ignored; anything we cannot run faithfully is refused with a one-line error.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..errors import UserError, reason

ORIGINAL = "original"
HF = "hf"
SUPPORTED_FORMATS_TEXT = (
    "OpenGVLab's original InternVL format (architectures: InternVLChatModel, bf16/f16 or AWQ int4) and "
    "transformers' native format (InternVLForConditionalGeneration), with a Qwen2 (InternVL3) or dense Qwen3 "
    "(InternVL3.5) language model"
)

# Language models by config.json's `architectures` / `model_type`: the dense decoders we build, and the
# mixture-of-experts ones InternVL3.5 also ships (30B-A3B, 241B-A28B, GPT-OSS-20B-A4B), which we refuse.
# https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat_gpt_oss/internvl/model/internvl_chat/configuration_internvl_chat.py
QWEN2, QWEN3 = "Qwen2ForCausalLM", "Qwen3ForCausalLM"
_DENSE = {"qwen2": QWEN2, "qwen3": QWEN3}
_MIXTURE_OF_EXPERTS = {"qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


@dataclass
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"  # or "rms_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    hidden_act: str = "gelu"
    post_layernorm: bool = False  # hf format with use_mean_pooling=False has a final LayerNorm

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class AwqConfig:
    bits: int
    group_size: int
    version: str = "gemm"
    zero_point: bool = True


@dataclass
class TextConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    architecture: str = QWEN2
    awq: AwqConfig | None = None

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each head's query and key (RMS norm over head_dim, one weight vector per
        projection) before the rotary embedding; Qwen2 does not.
        https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3/modeling_qwen3.py"""
        return self.architecture == QWEN3

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class ModelConfig:
    format: str
    vision: VisionConfig
    text: TextConfig
    downsample_ratio: float = 0.5
    select_layer: int = -1
    ps_version: str = "v2"
    template: str = "internvl2_5"
    projector_hidden_act: str = "gelu"
    torch_dtype: str = "bfloat16"
    image_token_id: int | None = None  # hf format records it; the original format looks it up in the tokenizer
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """Embeddings per 448x448 tile after pixel shuffle (256 for InternVL3).
        https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py
        (num_image_token = (image_size // patch_size) ** 2 * downsample_ratio ** 2)"""
        return int(self.vision.num_patches * self.downsample_ratio**2)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers whose output feeds the projector: hidden_states[select_layer], where
        hidden_states[0] is the embedding output and hidden_states[-1] the last layer's."""
        n = self.vision.num_hidden_layers
        used = n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 1 <= used <= n:
            raise UserError(f"select_layer {self.select_layer} does not pick an encoder layer of {n}")
        return used

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _first(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _int_size(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise UserError(f"non-square image or patch size {v} is not supported")
        return int(v[0])
    return int(v)


def _architecture(d: dict, where: str) -> str:
    archs = d.get("architectures") or []
    model_type = d.get("model_type", "")
    for arch in archs:
        if arch in _DENSE.values():
            return arch
    if model_type in _DENSE:
        return _DENSE[model_type]
    moe = [a for a in archs if a in _MIXTURE_OF_EXPERTS.values()] or [_MIXTURE_OF_EXPERTS.get(model_type)]
    if moe[0]:
        raise UserError(
            f"{where}: {moe[0]} is a mixture-of-experts language model (InternVL3.5-30B-A3B, -241B-A28B, "
            "-GPT-OSS-20B-A4B), which is not supported; use a dense one (InternVL3.5-1B/2B/4B/8B) or InternVL3"
        )
    raise UserError(
        f"{where}: language model {archs or model_type!r} is not supported; supported are Qwen2 "
        "(InternVL3 1B/2B/8B, InternVL2.5 1B/4B) and Qwen3 (InternVL3.5 1B/2B/4B/8B)"
    )


def _text_config(d: dict, where: str) -> TextConfig:
    arch = _architecture(d, where)
    if d.get("use_sliding_window"):
        raise UserError(f"{where}: sliding-window attention (use_sliding_window) is not supported")
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    # dynamic NTK scaling only changes anything beyond max_position_embeddings, which convert refuses;
    # https://github.com/huggingface/transformers/blob/main/src/transformers/modeling_rope_utils.py
    if rope_type not in ("default", "dynamic"):
        raise UserError(f"{where}: rope scaling {rope_type!r} is not supported (default and dynamic are)")
    theta = _first(d, "rope_theta", default=None) or rope.get("rope_theta") or 10000.0
    q = d.get("quantization_config")
    awq = _awq_config(q, where) if q else None
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: activation {act!r} is not supported (Qwen2 and Qwen3 use silu)")
    return TextConfig(
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(_first(d, "num_key_value_heads", "num_attention_heads")),
        intermediate_size=int(d["intermediate_size"]),
        vocab_size=int(d["vocab_size"]),
        head_dim=int(d.get("head_dim") or 0),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        hidden_act=act,
        architecture=arch,
        awq=awq,
    )


def _awq_config(q: dict, where: str) -> AwqConfig:
    method = str(q.get("quant_method", "")).lower()
    if method != "awq":
        raise UserError(f"{where}: quantization {method or q!r} is not supported (AWQ int4 GEMM is)")
    bits = int(q.get("bits", q.get("w_bit", 4)))
    version = str(q.get("version", "gemm")).lower()
    zero_point = bool(q.get("zero_point", True))
    if bits != 4 or version != "gemm" or not zero_point:
        raise UserError(
            f"{where}: AWQ bits={bits} version={version} zero_point={zero_point} is not supported "
            "(4-bit GEMM with zero points is)"
        )
    return AwqConfig(bits=bits, group_size=int(q.get("group_size", q.get("q_group_size", 128))), version=version)


def _vision_original(d: dict, image_size: int) -> VisionConfig:
    return VisionConfig(
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        intermediate_size=int(d["intermediate_size"]),
        image_size=image_size,
        patch_size=_int_size(d.get("patch_size", 14)),
        num_channels=int(d.get("num_channels", 3)),
        norm_type=d.get("norm_type", "rms_norm"),  # InternViT's default; 300M configs say layer_norm
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(d.get("qkv_bias", False)),
        qk_normalization=bool(d.get("qk_normalization", False)),
        hidden_act=d.get("hidden_act", "gelu"),
    )


def _vision_hf(d: dict) -> VisionConfig:
    return VisionConfig(
        hidden_size=int(d["hidden_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        intermediate_size=int(d["intermediate_size"]),
        image_size=_int_size(d.get("image_size", 448)),
        patch_size=_int_size(d.get("patch_size", 14)),
        num_channels=int(d.get("num_channels", 3)),
        norm_type=d.get("norm_type", "layer_norm"),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(d.get("attention_bias", False)),
        qk_normalization=bool(d.get("use_qk_norm", False)),
        hidden_act=d.get("hidden_act", "gelu"),
        post_layernorm=not bool(d.get("use_mean_pooling", True)),
    )


def detect_format(raw: dict) -> str:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type", "")
    if "InternVLChatModel" in archs or model_type == "internvl_chat":
        return ORIGINAL
    if "InternVLForConditionalGeneration" in archs or model_type == "internvl":
        return HF
    found = ", ".join(archs) or model_type or "no architectures"
    raise UserError(f"unsupported checkpoint ({found}); supported: {SUPPORTED_FORMATS_TEXT}")


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    fmt = detect_format(raw)
    try:
        if fmt == ORIGINAL:
            vision_raw, llm_raw = raw["vision_config"], raw["llm_config"]
            image_size = int(raw.get("force_image_size") or _int_size(vision_raw.get("image_size", 448)))
            text = _text_config(llm_raw, f"{where} llm_config")
            if text.awq is None and raw.get("quantization_config"):
                text.awq = _awq_config(raw["quantization_config"], where)
            cfg = ModelConfig(
                format=fmt,
                vision=_vision_original(vision_raw, image_size),
                text=text,
                downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
                select_layer=int(raw.get("select_layer", -1)),
                ps_version=str(raw.get("ps_version", "v2")),
                template=str(raw.get("template") or "internvl2_5"),
                torch_dtype=str(raw.get("torch_dtype") or llm_raw.get("torch_dtype") or "bfloat16"),
                raw=raw,
            )
        else:
            text_raw = dict(raw["text_config"])
            text_raw.setdefault("model_type", "qwen2")  # transformers' InternVLConfig default
            text = _text_config(text_raw, f"{where} text_config")
            if text.awq is None and raw.get("quantization_config"):
                text.awq = _awq_config(raw["quantization_config"], where)
            strategy = raw.get("vision_feature_select_strategy", "default")
            if strategy != "default":
                raise UserError(f"{where}: vision_feature_select_strategy {strategy!r} is not supported")
            layer = raw.get("vision_feature_layer", -1)
            if isinstance(layer, list):
                raise UserError(f"{where}: several vision_feature_layer values are not supported")
            cfg = ModelConfig(
                format=fmt,
                vision=_vision_hf(raw["vision_config"]),
                text=text,
                downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
                select_layer=int(layer),
                ps_version="v2",
                template="internvl2_5",  # the -hf checkpoints are InternVL2.5/3/3.5, whose template this is
                projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
                torch_dtype=str(
                    raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("torch_dtype") or "bfloat16"
                ),
                image_token_id=raw.get("image_token_id"),
                raw=raw,
            )
    except KeyError as e:
        raise UserError(f"{where}: missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: malformed value ({e})") from None
    _validate(cfg, where)
    return cfg


def _validate(cfg: ModelConfig, where: str) -> None:
    v, t = cfg.vision, cfg.text
    if v.norm_type not in ("layer_norm", "rms_norm"):
        raise UserError(f"{where}: vision norm_type {v.norm_type!r} is not supported")
    if v.hidden_act != "gelu" or cfg.projector_hidden_act != "gelu":
        raise UserError(f"{where}: only the exact gelu activation is supported in the vision tower and projector")
    if v.hidden_size % v.num_attention_heads:
        raise UserError(f"{where}: vision hidden_size is not a multiple of its heads")
    side = v.image_size // v.patch_size
    scale = cfg.downsample_ratio
    if v.image_size % v.patch_size or (side * scale) != int(side * scale) or int(1 / scale) != 1 / scale:
        raise UserError(f"{where}: image size {v.image_size}, patch {v.patch_size} and downsample {scale} do not tile")
    if t.num_attention_heads % t.num_key_value_heads:
        raise UserError(f"{where}: attention heads are not a multiple of key/value heads")
    if cfg.ps_version not in ("v1", "v2"):
        raise UserError(f"{where}: ps_version {cfg.ps_version!r} is not supported")
    cfg.vision_layers_used  # noqa: B018 (validates select_layer)


def load_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise UserError(f"checkpoint folder not found: {model_dir}")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir} has no config.json; expected a Hugging Face checkpoint folder")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {reason(e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return parse_config(raw, path)
