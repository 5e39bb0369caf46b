"""What `--vision-bits 8` costs in accuracy: the image embeddings of an int8-vision bundle against the
float-vision bundle of the same checkpoint, on random pictures (relative RMS error, and the lowest
cosine similarity of one embedding with its float counterpart). Not part of CI.

    python benchmarks/vision_int8_error.py FLOAT_BUNDLE INT8_BUNDLE [--pictures 2]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

import internvl_edge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("float_bundle")
    ap.add_argument("int8_bundle")
    ap.add_argument("--pictures", type=int, default=2)
    args = ap.parse_args()
    exact, fast = internvl_edge.load(args.float_bundle), internvl_edge.load(args.int8_bundle)
    rng = np.random.default_rng(3)
    for _ in range(args.pictures):
        picture = Image.fromarray((rng.random((448, 448, 3)) * 255).astype(np.uint8))
        px = exact.images_to_media([picture]).pixel_values
        a, b = exact.backend.encode_images(px), fast.backend.encode_images(px)
        rel = np.sqrt(((a - b) ** 2).mean() / (a**2).mean())
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        print(f"{px.shape[0]} tile(s): relative RMS error {rel:.4f}, lowest cosine {cos.min():.5f}", flush=True)


if __name__ == "__main__":
    main()
