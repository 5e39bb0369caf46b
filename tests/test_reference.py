"""End to end against the external reference, transformers' InternVLForConditionalGeneration.

- f32 bundles: greedy tokens identical to the reference's for 32 steps, text-only, one tile, 2x2 tiles
  + thumbnail, and two images; the prompt token ids identical to the reference tokenizer's. On
  InternVL3 (Qwen2.5) and InternVL3.5 (Qwen3) checkpoints, original and transformers formats (the
  shapes: tests/conftest.py). Random models with tied embeddings tend to repeat one token (the residual
  stream carries the input token's embedding, which is also its output row), so there the top-5
  log-probabilities at every step carry the comparison.
- bf16/f16 and w4/AWQ bundles: teacher forcing on the reference's greedy tokens; our logits at every
  step against the reference's, run in float32 on the same weights (the bundle's own 4-bit weights,
  dequantised, when we quantised them; AWQ dequantised independently). On a CPU with AVX512-BF16 the
  vision encoder's bfloat16 weights run as bfloat16 products by default (kernels/bf16gemm.h): the
  float32-activation cases turn that off (its own comparison: tests/test_bf16_vision.py), the int8 ones
  keep it.

Tolerances (log-probabilities of the reference's top-5 tokens at every step):
- float weights, float32 activations (f32/bf16/f16, and w4 at accuracy level 1): 1e-3. Both sides
  compute the same float32 function; only summation order differs (measured ~3e-5).
- w4 at the default accuracy level 4: MatMulNBits quantises each block of activations to int8, which
  perturbs a linear layer's output by about (max/rms of the block) / (127 * sqrt(12)), 0.8-2% RMS,
  compounding little over layers thanks to the residual stream (measured RMS logit error 1-2% of the
  logits' spread with 2 to 28 layers; largest top-5 log-prob deviation 4-8%). We allow 15% of the row's
  logit standard deviation, and require top-1 agreement at every step whose reference margin (top-1
  minus top-2 logit) exceeds 6 standard deviations of the measured logit error, i.e. wherever the
  quantisation noise cannot flip the order (random-weight logits have close calls that a trained model's
  rarely has; such steps are exempt, and must stay a minority).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import (
    apply_bundle_quantisation,
    float16_cache,
    greedy,
    load_reference,
    prompt_text,
    reference_tokenizer,
)
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_edge import kernels
from internvl_edge.api import load
from internvl_edge.generate import prefill
from internvl_edge.sampling import log_softmax

QUESTION = "Describe the image."
STEPS = 32
MEDIA = {"text": [], "one_tile": ["square"], "five_tiles": ["large"], "two_images": ["wide", "tall"]}

_references: dict = {}


def reference(ckpt: str):
    if ckpt not in _references:
        _references.clear()  # one model at a time keeps memory flat
        _references[ckpt] = load_reference(ckpt)
    return _references[ckpt]


def reference_inputs(ckpt: str, paths: list[str], max_tiles: int = 4):
    tok = reference_tokenizer(ckpt)
    pv, tiles = None, []
    if paths:
        proc = GotOcr2ImageProcessorPil(
            crop_to_patches=True,
            min_patches=1,
            max_patches=max_tiles,
            size={"height": 448, "width": 448},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
        out = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="np")
        pv, tiles = out["pixel_values"], [int(n) for n in out["num_patches"]]
    return tok(prompt_text(QUESTION, tiles)).input_ids, pv


# every media case on each family's factory shape and InternVL3's other formats and shapes; InternVL3.5's
# -HF format and odd shape on two each (CI time: they repeat paths the others cover)
F32_CASES = [(c, m) for c in ("tiny_bf16", "tiny_hf", "odd_bf16", "tiny35_bf16") for m in MEDIA]
F32_CASES += [("tiny35_hf", "text"), ("tiny35_hf", "two_images"), ("odd35_bf16", "text"), ("odd35_bf16", "five_tiles")]


@pytest.mark.parametrize("ckpt, media", F32_CASES)
def test_f32_bundle_greedy_tokens_identical(ckpt, media, checkpoint, bundle, images):
    paths = [images[n] for n in MEDIA[media]]
    ids, pv = reference_inputs(checkpoint(ckpt), paths)
    ref_tokens, ref_logits = greedy(reference(checkpoint(ckpt)), ids, pv, STEPS)
    model = load(bundle(ckpt, "f32"))
    ours = model.generate(QUESTION, images=paths, max_new_tokens=STEPS, ignore_eos=True, logprobs=5)
    assert ours.prompt_token_ids == ids
    assert ours.token_ids == ref_tokens
    assert len(ours.token_ids) == STEPS
    # --logprobs are log-softmax of the logits: the reference's, within float32 noise
    ref_lp = log_softmax(ref_logits)
    for step, top in enumerate(ours.logprobs):
        assert [t for t, _ in top] == list(np.argsort(-ref_logits[step], kind="stable")[:5])
        assert max(abs(lp - ref_lp[step, t]) for t, lp in top) < 1e-3


def teacher_forced_logits(model, paths: list[str], tokens: list[int]) -> tuple[list[int], np.ndarray]:
    """Our logits after the prompt and after each of the given tokens (fed regardless of ours)."""
    media = model.images_to_media(paths)
    prepared = model.prepare(model.question(QUESTION, media), media)
    cache = model.backend.new_cache(1)
    rows = [prefill(model.backend, cache, prepared.embeds).copy()]
    for t in tokens[:-1]:
        rows.append(model.backend.forward(cache, model.backend.embed(np.array([[t]])), [1])[0].copy())
    return prepared.input_ids, np.array(rows)


CASES = [
    ("tiny_bf16", "bf16", {}),
    ("tiny_bf16", "f16", {}),
    ("tiny_bf16", "w4bf16", {}),
    ("tiny_bf16", "w4bf16", {"accuracy_level": 1}),
    ("tiny_awq", "w4f16", {}),
    ("tiny_awq", "w4f16", {"accuracy_level": 1}),
    ("odd_bf16", "w4bf16", {}),
    ("tiny_hf", "w4bf16", {"static": True}),
    ("tiny35_bf16", "f16", {}),
    ("tiny35_bf16", "w4bf16", {}),
    ("odd35_bf16", "w4bf16", {}),
    # InternVL3.5's decoder with AWQ int4 linears (as LMDeploy publishes them)
    ("tiny35_awq", "w4f16", {}),
    ("tiny35_awq", "w4f16", {"accuracy_level": 1}),
]


@pytest.mark.parametrize("media", ["text", "two_images"])
@pytest.mark.parametrize(
    "ckpt, quant, options",
    CASES,
    ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())) or "default",
)
def test_teacher_forced_against_reference(ckpt, quant, options, media, checkpoint, bundle, images, monkeypatch):
    paths = [images[n] for n in MEDIA[media]]
    int8_activations = quant.startswith("w4") and options.get("accuracy_level", 4) == 4
    if not int8_activations:  # float32 activations throughout: the vision encoder's too, where a CPU would
        monkeypatch.setattr(kernels, "bf16_path", lambda: None)  # take bfloat16 (tests/test_bf16_vision.py)
    bdir = bundle(ckpt, quant, **options)
    ref = load_reference(checkpoint(ckpt))
    if quant.startswith("w4"):  # the reference computes with the bundle's own 4-bit (and 8-bit lm_head)
        # weights; AWQ layers are kept as dequantised independently from the checkpoint
        apply_bundle_quantisation(ref, bdir, layers="awq" not in ckpt)
    ids, pv = reference_inputs(checkpoint(ckpt), paths)
    model = load(bdir)
    # the runtime keeps these bundles' KV cache in float16 where our attention runs: the reference too
    with float16_cache(model.backend.kv_dtype == np.float16):
        ref_tokens, ref_logits = greedy(ref, ids, pv, STEPS)
    our_ids, ours = teacher_forced_logits(model, paths, ref_tokens)
    assert our_ids == ids

    top5 = np.argsort(-ref_logits, axis=-1)[:, :5]
    dlp = np.abs(
        np.take_along_axis(log_softmax(ours), top5, -1) - np.take_along_axis(log_softmax(ref_logits), top5, -1)
    )
    agree = ours.argmax(-1) == ref_logits.argmax(-1)
    if not int8_activations:
        assert dlp.max() < 1e-3
        assert agree.all()
        return
    spread = ref_logits.std(axis=-1)
    assert np.all(dlp.max(axis=-1) < 0.15 * spread), (dlp.max(axis=-1) / spread).max()
    noise = (ours - ref_logits).std(axis=-1)
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 6 * noise
    assert agree[decisive].all()
    assert decisive.mean() >= 0.4, decisive.mean()  # the check above is not vacuous
    assert agree.mean() >= 0.85, agree.mean()


def test_f32_bundle_with_warm_caches_equals_reference(checkpoint, bundle, images):
    """A question asked after another about the same pictures (their embeddings from the image cache,
    the system prompt and images' KV rows from the prefix cache) still gives the reference's tokens."""
    paths = [images["wide"], images["tall"]]
    ids, pv = reference_inputs(checkpoint("tiny_bf16"), paths)
    ref_tokens, _ = greedy(reference(checkpoint("tiny_bf16")), ids, pv, STEPS)
    model = load(bundle("tiny_bf16", "f32"))
    model.generate("What is shown?", images=paths, max_new_tokens=1)
    ours = model.generate(QUESTION, images=paths, max_new_tokens=STEPS, ignore_eos=True)
    assert ours.stats.cached_tokens > 5 * 256 and ours.stats.vision_s == 0
    assert ours.prompt_token_ids == ids and ours.token_ids == ref_tokens
