"""Net-by-net checks of a Sophgo bundle on the chip simulator, against transformers and our ONNX f32 bundle.

Importable by test_sophgo.py, and runnable as a script (a process can hold one chip's simulator only,
so the BM1688 checks run in a child process and print their measurements as JSON):

    python tests/sophgo_checks.py nets BUNDLE CHECKPOINT ONNX_BUNDLE IMAGE [CHECK_VIT (1|0)]
    python tests/sophgo_checks.py tokens BUNDLE CHECKPOINT STEPS [IMAGE]

Every net gets the reference's own inputs (teacher forcing per net), so an error is that net's alone:
    embedding        token ids -> rows of embed_tokens
    vit              one tile -> image embeddings (transformers' get_image_features; our ONNX vision net)
    block_i          the reference's hidden states entering layer i -> the states leaving it, and K/V
                     (after rotary) as transformers' cache holds them
    block_cache_i    one more token, the reference's K/V history -> the same three outputs
    lm_head          the reference's final (normed) hidden row -> logits
    greedy_head      logits -> argmax
and the decoder as the runtime drives it (prefill, then teacher-forced steps): logits against
transformers and against an ONNX bundle (f32, or for 4-bit bundles one with the same 4-bit values).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))

from reference import greedy, load_reference, prompt_text, reference_tokenizer  # noqa: E402

from internvl_edge.api import load  # noqa: E402
from internvl_edge.checkpoint.reader import Checkpoint  # noqa: E402
from internvl_edge.generate import prefill  # noqa: E402
from internvl_edge.sophgo.mlir import LINEARS  # noqa: E402
from internvl_edge.sophgo.weights import decoder_linear  # noqa: E402

QUESTION = "Describe the image."
STEPS = 4  # teacher-forced decode steps through the whole decoder


def rel(a, b) -> float:
    """Relative RMS error of `a` against the reference `b`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def reference_for(ckpt_dir: str, manifest) -> torch.nn.Module:
    """transformers on the checkpoint; for 4-bit bundles quantised by us, with the very 4-bit weights
    the bundle holds (the same deterministic quantisation, dequantised: what the chip multiplies by)."""
    ref = load_reference(ckpt_dir)
    quantize, target = manifest.settings.quantize, manifest.target
    ckpt = Checkpoint(ckpt_dir)
    if not quantize.startswith("w4") or ckpt.config.text.awq is not None:
        return ref  # float bundles, and AWQ (dequantised independently by reference.py)
    half = "bf16" if quantize == "w4bf16" else "f16"
    group = target["weights"]["q_group_size"]
    with torch.no_grad():
        for i, layer in enumerate(ref.model.language_model.layers):
            for name in LINEARS:
                w = decoder_linear(
                    ckpt.linear(f"language_model.model.layers.{i}.{name}"), True, group, half
                ).dequantize()
                module = layer.get_submodule(name)
                module.weight.copy_(torch.from_numpy(w))
    return ref


def reference_pixels(path: str, size: int, max_tiles: int = 1) -> np.ndarray:
    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        size={"height": size, "width": size},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return proc(images=[Image.open(path).convert("RGB")], return_tensors="np")["pixel_values"]


def prompt_ids(ckpt_dir: str, tiles: list[int], tokens_per_tile: int) -> list[int]:
    return reference_tokenizer(ckpt_dir)(prompt_text(QUESTION, tiles, tokens_per_tile)).input_ids


@torch.no_grad()
def net_errors(bundle_dir: str, ckpt_dir: str, cpu_dir: str, image: str, check_vit: bool = True) -> dict[str, float]:
    model, cpu = load(bundle_dir), load(cpu_dir)
    be, m = model.backend, model.manifest
    ref = reference_for(ckpt_dir, m)
    lm = ref.model.language_model
    errors: dict[str, float] = {}
    started = time.perf_counter()

    # embedding: the prompt's ids (padded to the net's rows by embed())
    ids = prompt_ids(ckpt_dir, [], 0)
    ours = be.embed(np.asarray([ids]))[0]
    emb = lm.embed_tokens(torch.tensor([ids]))[0].numpy()
    errors["embedding"] = rel(ours, emb)
    errors["embedding_cache"] = rel(be.embed(np.asarray([[ids[3]]]))[0, 0], emb[3])

    # vit: one tile
    if check_vit:
        pv = reference_pixels(image, m.facts.image_size)
        ours = be.encode_images(pv)
        errors["vit"] = rel(ours, ref.model.get_image_features(torch.from_numpy(pv)).pooler_output.numpy())
        errors["vit_vs_onnx"] = rel(ours, cpu.backend.encode_images(pv))

    # blocks, teacher forced layer by layer on the reference's prompt states
    n, L, S = len(ids), be.max_input_length, be.seq_length
    out = lm(inputs_embeds=torch.from_numpy(emb)[None], output_hidden_states=True, use_cache=True)
    hs = [h[0].numpy() for h in out.hidden_states]
    keys = [layer.keys[0].transpose(0, 1).numpy().copy() for layer in out.past_key_values.layers]  # [n, kvh, hd]
    values = [layer.values[0].transpose(0, 1).numpy().copy() for layer in out.past_key_values.layers]
    mask = np.full((1, 1, L, L), -10000.0, np.float32)
    mask[0, 0, :n, :n] = np.where(np.tri(n, dtype=bool), 0.0, -10000.0)
    pos = np.zeros((1, L), np.int32)
    pos[0, :n] = np.arange(n)
    for i in range(be.layers):
        x = np.zeros((1, L, be.hidden), np.float32)
        x[0, :n] = hs[i]
        h, k, v = be.run_net(f"block_{i}", x, pos, mask)
        errors[f"block_{i}"] = rel(h[0, :n], hs[i + 1])
        errors[f"block_{i}.k"] = rel(k[0, :n], keys[i])
        errors[f"block_{i}.v"] = rel(v[0, :n], values[i])

    # lm_head and greedy_head on the last prompt row
    logits = ref.lm_head(torch.from_numpy(hs[-1][n - 1 : n])).numpy()
    ours = be.run_net("lm_head", hs[-1][n - 1 : n])[0]
    errors["lm_head"] = rel(ours, logits)
    token = int(logits.argmax())
    errors["greedy_head_wrong"] = float(int(be.greedy(logits)[0]) != token)

    # block_cache: the next token after the prompt, on the reference's K/V history
    step = lm(
        inputs_embeds=lm.embed_tokens(torch.tensor([[token]])),
        past_key_values=out.past_key_values,
        output_hidden_states=True,
        use_cache=True,
    )
    hs2 = [h[0].numpy() for h in step.hidden_states]
    mask1 = np.full((1, 1, 1, S + 1), -10000.0, np.float32)
    mask1[..., :n] = 0.0
    mask1[..., S] = 0.0
    for i in range(be.layers):
        hist_k = np.zeros((1, S, be.kv_heads, be.head_dim), np.float32)
        hist_v = np.zeros_like(hist_k)
        hist_k[0, :n], hist_v[0, :n] = keys[i], values[i]
        h, k, v = be.run_net(f"block_cache_{i}", hs2[i][None], np.array([[n]], np.int32), mask1, hist_k, hist_v)
        errors[f"block_cache_{i}"] = rel(h[0], hs2[i + 1])
        errors[f"block_cache_{i}.k"] = rel(k[0, 0], step.past_key_values.layers[i].keys[0, :, n].numpy())
        errors[f"block_cache_{i}.v"] = rel(v[0, 0], step.past_key_values.layers[i].values[0, :, n].numpy())

    # the decoder as the runtime drives it: prefill, then teacher-forced steps on the reference's tokens
    tokens, ref_logits = greedy(ref, ids, None, STEPS + 1)
    for name, backend in (("decoder", be), ("onnx", cpu.backend)):
        cache = backend.new_cache(1)
        rows = [prefill(backend, cache, backend.embed(np.asarray([ids]))[0]).copy()]
        for t in tokens[:STEPS]:
            rows.append(backend.forward(cache, backend.embed(np.asarray([[t]])), [1])[0].copy())
        if name == "decoder":
            ours = np.array(rows)
        else:
            onnx = np.array(rows)
    errors["decoder"] = rel(ours, ref_logits)
    errors["decoder_vs_onnx"] = rel(ours, onnx)
    errors["onnx_vs_reference"] = rel(onnx, ref_logits)
    errors["decoder_argmax_disagreements"] = float((ours.argmax(-1) != ref_logits.argmax(-1)).sum())
    errors["seconds"] = time.perf_counter() - started
    return errors


@torch.no_grad()
def greedy_tokens(bundle_dir: str, ckpt_dir: str, steps: int, image: str | None = None) -> dict:
    """Our greedy tokens through the public API, the reference's, and the reference's top-1 margins."""
    model = load(bundle_dir)
    size, per_tile = model.manifest.facts.image_size, model.manifest.facts.num_image_token
    pv = reference_pixels(image, size) if image else None
    ids = prompt_ids(ckpt_dir, [len(pv)] if image else [], per_tile)
    ref_tokens, ref_logits = greedy(reference_for(ckpt_dir, model.manifest), ids, pv, steps)
    ours = model.generate(QUESTION, images=[image] if image else [], max_tiles=1, max_new_tokens=steps, ignore_eos=True)
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    return {
        "prompt_ids_equal": ours.prompt_token_ids == ids,
        "ours": ours.token_ids,
        "reference": ref_tokens,
        "margins": (top2[:, 1] - top2[:, 0]).tolist(),
        "logit_std": ref_logits.std(axis=-1).tolist(),
        "backend": model.backend.describe(),
    }


@torch.no_grad()
def reference_greedy(ckpt_dir: str, steps: int) -> dict:
    """transformers' greedy tokens for the text-only question, with its top-1 margins."""
    ids = prompt_ids(ckpt_dir, [], 0)
    tokens, logits = greedy(load_reference(ckpt_dir), ids, None, steps)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return {
        "prompt_ids": ids,
        "tokens": tokens,
        "margins": (top2[:, 1] - top2[:, 0]).tolist(),
        "logit_std": logits.std(axis=-1).tolist(),
    }


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "nets":
        result = net_errors(*args[:4], check_vit=args[4:] != ["0"])
    else:
        result = greedy_tokens(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else None)
    sys.stdout.flush()
    print("RESULT " + json.dumps(result))
