"""A checkpoint folder: config, safetensors shards (memory-mapped) and one name table per source format.

Every tensor is asked for by its *canonical* name, which is OpenGVLab's original name (the seed's
format). The transformers-native format is translated by an explicit table; the vision attention's
separate q/k/v projections are concatenated into the original fused `attn.qkv`.
https://github.com/huggingface/transformers/blob/main/src/transformers/models/internvl/modeling_internvl.py
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError, reason
from .awq import AwqLinear, unpack_awq
from .config import HF, ModelConfig, load_config
from .safetensors import RawTensor, SafetensorsFile

# canonical (original-format) name -> source name(s) in transformers' format; several sources are
# concatenated along axis 0. "{i}" is a layer index, "{p}" a parameter name (weight, bias, ...).
_V = "model.vision_tower"
_L = "model.language_model"
HF_NAME_TABLE: list[tuple[str, str | tuple[str, ...]]] = [
    ("vision_model.embeddings.class_embedding", f"{_V}.embeddings.cls_token"),
    ("vision_model.embeddings.patch_embedding.{p}", f"{_V}.embeddings.patch_embeddings.projection.{{p}}"),
    ("vision_model.embeddings.position_embedding", f"{_V}.embeddings.position_embeddings"),
    (
        "vision_model.encoder.layers.{i}.attn.qkv.{p}",
        tuple(f"{_V}.encoder.layer.{{i}}.attention.{x}_proj.{{p}}" for x in "qkv"),
    ),
    ("vision_model.encoder.layers.{i}.attn.q_norm.{p}", f"{_V}.encoder.layer.{{i}}.attention.q_norm.{{p}}"),
    ("vision_model.encoder.layers.{i}.attn.k_norm.{p}", f"{_V}.encoder.layer.{{i}}.attention.k_norm.{{p}}"),
    ("vision_model.encoder.layers.{i}.attn.proj.{p}", f"{_V}.encoder.layer.{{i}}.attention.projection_layer.{{p}}"),
    ("vision_model.encoder.layers.{i}.norm1.{p}", f"{_V}.encoder.layer.{{i}}.layernorm_before.{{p}}"),
    ("vision_model.encoder.layers.{i}.norm2.{p}", f"{_V}.encoder.layer.{{i}}.layernorm_after.{{p}}"),
    ("vision_model.encoder.layers.{i}.ls1", f"{_V}.encoder.layer.{{i}}.lambda_1"),
    ("vision_model.encoder.layers.{i}.ls2", f"{_V}.encoder.layer.{{i}}.lambda_2"),
    ("vision_model.encoder.layers.{i}.mlp.fc1.{p}", f"{_V}.encoder.layer.{{i}}.mlp.fc1.{{p}}"),
    ("vision_model.encoder.layers.{i}.mlp.fc2.{p}", f"{_V}.encoder.layer.{{i}}.mlp.fc2.{{p}}"),
    ("vision_model.post_layernorm.{p}", f"{_V}.layernorm.{{p}}"),  # only with use_mean_pooling=False
    ("mlp1.0.{p}", "model.multi_modal_projector.layer_norm.{p}"),
    ("mlp1.1.{p}", "model.multi_modal_projector.linear_1.{p}"),
    ("mlp1.3.{p}", "model.multi_modal_projector.linear_2.{p}"),
    ("language_model.model.{rest}", f"{_L}.{{rest}}"),
    ("language_model.lm_head.{p}", "lm_head.{p}"),
]

# checkpoints saved by transformers 4.x keep the pre-refactor prefixes; read them as the current ones
# https://github.com/huggingface/transformers/blob/main/src/transformers/conversion_mapping.py ("llava")
HF_LEGACY_PREFIXES = [
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", f"{_L}."),
    ("vision_tower.", f"{_V}."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[A-Za-z0-9_]+)")
    pattern = pattern.replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + "$")


_HF_COMPILED = [(_template_regex(c), s) for c, s in HF_NAME_TABLE]


def hf_sources(canonical: str) -> tuple[str, ...] | None:
    """The transformers-format name(s) holding a canonical tensor, or None if the table has no row."""
    for regex, source in _HF_COMPILED:
        m = regex.match(canonical)
        if m:
            sources = source if isinstance(source, tuple) else (source,)
            return tuple(s.format(**m.groupdict()) for s in sources)
    return None


@dataclass
class DenseLinear:
    """weight [N, K] as stored (torch layout), optional bias [N]."""

    weight: RawTensor
    bias: np.ndarray | None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class QuantLinear:
    """An AWQ int4 linear layer as published (unpacked to one value per byte) plus its bias."""

    awq: AwqLinear
    bias: np.ndarray | None

    @property
    def in_features(self) -> int:
        return self.awq.in_features

    @property
    def out_features(self) -> int:
        return self.awq.out_features


class Checkpoint:
    """Read access to a checkpoint folder by canonical tensor names."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.config: ModelConfig = load_config(model_dir)
        self._files: dict[str, SafetensorsFile] = {}
        self._key_file: dict[str, str] = {}
        self._index_shards()
        if self.config.format == HF:
            renamed = {}
            for key, f in self._key_file.items():
                for old, new in HF_LEGACY_PREFIXES:
                    if key.startswith(old):
                        renamed[new + key[len(old) :]] = (f, key)
                        break
                else:
                    renamed[key] = (f, key)
            self._source = renamed
        else:
            self._source = {k: (f, k) for k, f in self._key_file.items()}

    # -- files ------------------------------------------------------------------------------------
    def _index_shards(self) -> None:
        index_path = os.path.join(self.model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"cannot read {index_path}: {reason(e)}") from None
            for key, shard in weight_map.items():
                self._key_file[key] = os.path.join(self.model_dir, shard)
            missing = sorted({p for p in self._key_file.values() if not os.path.isfile(p)})
            if missing:
                raise UserError(f"checkpoint shard listed in the index is missing: {missing[0]}")
        else:
            shards = sorted(glob.glob(os.path.join(self.model_dir, "*.safetensors")))
            if not shards:
                if glob.glob(os.path.join(self.model_dir, "*.bin")) or glob.glob(os.path.join(self.model_dir, "*.pt")):
                    raise UserError(
                        f"{self.model_dir} holds PyTorch .bin weights; only safetensors checkpoints are supported"
                    )
                raise UserError(f"{self.model_dir} has no .safetensors weights")
            for shard in shards:
                for key in self._file(shard).keys():
                    self._key_file[key] = shard

    def release(self) -> None:
        """Unmap the shards (their pages leave this process's memory once no array views them);
        the next tensor asked for maps its shard again. Readers that stream a large checkpoint call
        it after each part, so the whole file never counts as resident at once."""
        for f in self._files.values():
            f._mm = None

    def _file(self, path: str) -> SafetensorsFile:
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    # -- tensors ----------------------------------------------------------------------------------
    def _sources(self, name: str) -> tuple[str, ...]:
        if self.config.format == HF:
            sources = hf_sources(name)
            if sources is None:
                raise KeyError(name)
            return sources
        return (name,)

    def has(self, name: str) -> bool:
        try:
            return all(s in self._source for s in self._sources(name))
        except KeyError:
            return False

    def raw(self, name: str) -> RawTensor:
        parts = []
        for s in self._sources(name):
            if s not in self._source:
                raise UserError(f"checkpoint {self.model_dir} is missing tensor {s}")
            path, key = self._source[s]
            parts.append(self._file(path).get(key))
        if len(parts) == 1:
            return parts[0]
        if len({p.dtype for p in parts}) != 1:
            raise UserError(f"checkpoint tensors for {name} mix dtypes")
        return RawTensor(parts[0].dtype, np.concatenate([p.data for p in parts], axis=0))

    def f32(self, name: str) -> np.ndarray:
        return self.raw(name).to_float32()

    def optional_f32(self, name: str) -> np.ndarray | None:
        return self.f32(name) if self.has(name) else None

    def linear(self, prefix: str) -> DenseLinear | QuantLinear:
        bias = self.optional_f32(f"{prefix}.bias")
        if self.has(f"{prefix}.qweight"):
            awq_cfg = self.config.text.awq
            if awq_cfg is None:
                raise UserError(f"{prefix} holds AWQ weights but the config has no quantization_config")
            try:
                awq = unpack_awq(
                    self.raw(f"{prefix}.qweight").data,
                    self.raw(f"{prefix}.qzeros").data,
                    self.raw(f"{prefix}.scales").to_float32().astype(np.float16),
                    awq_cfg.group_size,
                )
            except ValueError as e:
                raise UserError(f"{prefix}: {e}") from None
            return QuantLinear(awq, bias)
        return DenseLinear(self.raw(f"{prefix}.weight"), bias)

    def lm_head(self) -> DenseLinear | QuantLinear:
        if self.has("language_model.lm_head.weight") or self.has("language_model.lm_head.qweight"):
            return self.linear("language_model.lm_head")
        if self.config.text.tie_word_embeddings:
            return DenseLinear(self.raw("language_model.model.embed_tokens.weight"), None)
        raise UserError(f"checkpoint {self.model_dir} has no lm_head and does not tie it to the embeddings")

    @property
    def storage_dtype(self) -> str:
        """The half-precision type the unquantised weights are stored in (BF16, F16 or F32)."""
        return self.raw("language_model.model.embed_tokens.weight").dtype
