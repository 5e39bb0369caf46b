"""What the vision encoder's bfloat16 path (kernels/bf16gemm.h, the default where the CPU has AVX512-BF16)
costs in accuracy: a bundle's image embeddings on that path, on the float32 path (the same bundle with the
bfloat16 path off) and transformers' model run in bfloat16, each against transformers' model in float32
(the external reference) on the same checkpoint, for random 448x448 pictures (one tile each): relative
RMS error and the lowest cosine similarity of one embedding with the reference's. Not part of CI (it
holds the reference in float32: about 9 GB for InternVL3-2B).

    python benchmarks/vision_bf16_error.py --checkpoint CKPT --bundle B [--pictures 2] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import internvl_edge
from internvl_edge import kernels
from internvl_edge.checkpoint.reader import Checkpoint
from internvl_edge.verify_reference_hf import TransformersReference


def errors(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, lowest cosine over the embeddings) of `ours` against `ref`."""
    a, b = ours.astype(np.float64).reshape(-1, ours.shape[-1]), ref.astype(np.float64).reshape(-1, ref.shape[-1])
    rel = float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return rel, float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--pictures", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = kernels.bf16_path()
    if path is None:
        raise SystemExit("this CPU has no bfloat16 path (AVX512-BF16): nothing to measure")
    rng = np.random.default_rng(3)
    pictures = [Image.fromarray((rng.random((448, 448, 3)) * 255).astype(np.uint8)) for _ in range(args.pictures)]

    model = internvl_edge.load(args.bundle, threads=args.threads)
    print(f"vision kernel: {model.backend.vision_kernel}", flush=True)
    pixels = [model.images_to_media([p]).pixel_values for p in pictures]
    bf16 = [model.backend.encode_images(px) for px in pixels]
    image_token = model.tokens["img_context"]
    del model
    kernels.bf16_path = lambda: None  # the float32 path: ONNX Runtime's MatMul on the widened weights
    model = internvl_edge.load(args.bundle, threads=args.threads)
    f32 = [model.backend.encode_images(px) for px in pixels]
    del model

    import torch

    print("transformers reference (float32, then bfloat16) ...", flush=True)
    ref = TransformersReference(Checkpoint(args.checkpoint), image_token, args.threads).model
    with torch.no_grad():
        want = [ref.model.get_image_features(pixel_values=torch.from_numpy(px)).pooler_output.numpy() for px in pixels]
        ref = ref.to(torch.bfloat16)
        hf_bf16 = [
            ref.model.get_image_features(pixel_values=torch.from_numpy(px).bfloat16()).pooler_output.float().numpy()
            for px in pixels
        ]
    print("| picture | ours, bfloat16 path | ours, float32 path | transformers in bfloat16 |")
    print("|---|---|---|---|")
    for i in range(args.pictures):
        cells = [errors(x[i], want[i]) for x in (bf16, f32, hf_bf16)]
        print(f"| {i + 1} | " + " | ".join(f"{rel:.2e} RMS, cos {cos:.6f}" for rel, cos in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
