"""`verify --reference transformers`: transformers' InternVLForConditionalGeneration as the reference.

An independent implementation of the model (float32, eager attention), for users who have torch and
transformers installed and the memory for the whole model in float32 (about 4 bytes per parameter:
9 GB for InternVL3-2B). The weights come from the same checkpoint through our reader (AWQ int4
dequantised exactly), renamed to transformers' names with the reader's own table
(checkpoint/reader.py, HF_NAME_TABLE); OpenGVLab's original config is translated as transformers'
conversion script does (vision tower, projector, text model).
https://github.com/huggingface/transformers/blob/main/src/transformers/models/internvl/convert_internvl_weights_to_hf.py
"""

from __future__ import annotations

import json

import numpy as np

from .checkpoint.config import HF
from .checkpoint.reader import HF_NAME_TABLE, Checkpoint, DenseLinear, _template_regex
from .errors import UserError
from .verify_reference import ReferenceProbe, ReferenceResult

# transformers' name -> (canonical template, which of the concatenated sources, how many)
_REVERSE = []
for _canonical, _source in HF_NAME_TABLE:
    _sources = _source if isinstance(_source, tuple) else (_source,)
    for _k, _s in enumerate(_sources):
        _REVERSE.append((_template_regex(_s), _canonical, _k, len(_sources)))


def _imports():
    try:
        import torch
        from transformers import InternVLConfig, InternVLForConditionalGeneration
    except ImportError:
        raise UserError(
            "--reference transformers needs torch and transformers installed "
            "(pip install torch transformers); or leave it out for the built-in reference"
        ) from None
    return torch, InternVLConfig, InternVLForConditionalGeneration


def _config(ckpt: Checkpoint, image_token_id: int, InternVLConfig):
    raw = json.loads(json.dumps(ckpt.config.raw))  # a deep copy
    if ckpt.config.format == HF:
        raw.get("text_config", {}).pop("quantization_config", None)
        cfg = InternVLConfig.from_dict(raw)
    else:
        v, t = raw["vision_config"], dict(raw["llm_config"])
        t.pop("quantization_config", None)
        t["model_type"] = "qwen2"
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
            "use_mean_pooling": not ckpt.config.vision.post_layernorm,
            "hidden_act": v["hidden_act"],
        }
        cfg = InternVLConfig(
            vision_config=vision,
            text_config=t,
            downsample_ratio=raw["downsample_ratio"],
            image_token_id=image_token_id,
            image_seq_length=ckpt.config.num_image_token,
            vision_feature_layer=raw.get("select_layer", -1),
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        )
    cfg._attn_implementation = "eager"
    return cfg


def _tensor(ckpt: Checkpoint, hf_name: str) -> np.ndarray:
    """transformers' parameter `hf_name`, in float32, from the checkpoint."""
    if hf_name == "lm_head.weight":
        head = ckpt.lm_head()
        if isinstance(head, DenseLinear):
            return head.weight.to_float32()
        return np.ascontiguousarray(head.awq.dequantize().T)
    for regex, canonical, part, parts in _REVERSE:
        m = regex.match(hf_name)
        if not m:
            continue
        name = canonical.format(**m.groupdict())
        if name.endswith(".weight") and ckpt.has(name[: -len(".weight")] + ".qweight"):
            return np.ascontiguousarray(ckpt.linear(name[: -len(".weight")]).awq.dequantize().T)
        x = ckpt.f32(name)
        return np.split(x, parts, axis=0)[part] if parts > 1 else x
    raise UserError(f"transformers' {hf_name} has no counterpart in the checkpoint's tensors")


class TransformersReference:
    name = "transformers InternVLForConditionalGeneration, float32, eager attention"

    def __init__(self, ckpt: Checkpoint, image_token_id: int, threads: int | None = None):
        torch, InternVLConfig, Model = _imports()
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        model = Model(_config(ckpt, image_token_id, InternVLConfig)).float().eval()
        with torch.no_grad():
            for name, param in model.state_dict().items():  # in place: one model's worth of memory
                param.copy_(torch.from_numpy(np.array(_tensor(ckpt, name), np.float32)))
                ckpt.release()
        self.model = model

    def generate(self, probes: list[ReferenceProbe], steps: int) -> list[ReferenceResult]:
        from transformers import GenerationConfig

        torch = self.torch
        cfg = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out = []
        with torch.no_grad():
            for p in probes:
                extra, img = {}, None
                if p.pixel_values is not None:
                    pv = torch.from_numpy(np.ascontiguousarray(p.pixel_values, np.float32))
                    extra["pixel_values"] = pv
                    feats = self.model.model.get_image_features(pixel_values=pv).pooler_output
                    img = feats.reshape(-1, feats.shape[-1]).numpy().astype(np.float32)
                res = self.model.generate(input_ids=torch.tensor([p.ids]), **extra, generation_config=cfg)
                tokens = res.sequences[0, len(p.ids) :].tolist()
                logits = torch.stack(res.logits)[:, 0].float().numpy()
                out.append(ReferenceResult(tokens, logits, img))
        return out
