"""Shared fixtures: random-weight checkpoints in the real formats, their bundles and test images.

Everything is generated (no downloads) into one session-wide temporary folder. Model shapes, so that
nothing depends on one fixture's sizes and each decoder's distinctive features are covered:
- InternVL3 (Qwen2.5: q/k/v biases, head size hidden/heads): `tiny` (the factory's: untied lm_head,
  heads of 32) and `odd` (other head counts, dimensions that are not multiples of the quantisation
  block, three layers, tied embeddings as InternVL3-1B);
- InternVL3.5 (Qwen3: no biases, per-head query/key RMS norms, heads wider than the hidden size):
  `3.5-tiny` (the factory's: tied embeddings, heads of 64) and `odd35` (heads of 128, three query heads
  per KV head, three layers, an untied lm_head as InternVL3.5-8B).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from internvl_edge.checkpoint.factory import make_checkpoint, shapes_with  # noqa: E402
from internvl_edge.convert import ConvertOptions, convert  # noqa: E402
from internvl_edge.progress import Progress  # noqa: E402

ODD = shapes_with(
    "tiny",
    vision_hidden=96,
    vision_layers=3,
    vision_heads=6,
    vision_intermediate=200,
    text_hidden=192,
    text_layers=3,
    text_heads=6,
    text_kv_heads=2,
    text_intermediate=352,
    tie_word_embeddings=True,
)

# hidden 1024 and 3 layers: large enough that a batched reduction order would change the logits
# (tests/test_batch_invariance.py); head_dim 128 as in InternVL3-1B/2B
MID = shapes_with("tiny", text_hidden=1024, text_layers=3, text_heads=8, text_kv_heads=2, text_intermediate=2816)

ODD35 = shapes_with(
    "3.5-tiny",
    vision_hidden=96,
    vision_layers=3,
    vision_heads=6,
    vision_intermediate=200,
    text_hidden=160,
    text_layers=3,
    text_heads=3,
    text_kv_heads=1,
    text_intermediate=288,
    text_head_dim=128,
    tie_word_embeddings=False,
)

CHECKPOINTS = {
    # name: (size, format, weights, seed)
    "tiny_bf16": ("tiny", "original", "bf16", 0),
    "tiny_awq": ("tiny", "original", "awq", 1),
    "tiny_hf": ("tiny", "hf", "bf16", 2),
    "odd_bf16": (ODD, "original", "bf16", 3),
    "mid_bf16": (MID, "original", "bf16", 4),
    "tiny35_bf16": ("3.5-tiny", "original", "bf16", 4),
    "tiny35_hf": ("3.5-tiny", "hf", "bf16", 5),
    "odd35_bf16": (ODD35, "original", "bf16", 6),
    # seed 8: peaked enough logits that the int8-activation check has decisive positions to test (seed 7: 34%)
    "tiny35_awq": ("3.5-tiny", "original", "awq", 8),
}


@pytest.fixture(autouse=True)
def _kernel_settings_follow_the_environment():
    """Our kernels' settings are read from the environment once per process (kernels.settings): read
    them again after every test, so that one that changes the environment leaves nothing behind."""
    yield
    from internvl_edge import kernels

    kernels.settings.cache_clear()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("internvl_edge")


@pytest.fixture(scope="session")
def checkpoint(workdir):
    made = {}

    def get(name: str) -> str:
        if name not in made:
            size, fmt, weights, seed = CHECKPOINTS[name]
            made[name] = make_checkpoint(str(workdir / f"ckpt_{name}"), size=size, fmt=fmt, weights=weights, seed=seed)
        return made[name]

    return get


@pytest.fixture(scope="session")
def bundle(workdir, checkpoint):
    made = {}

    def get(ckpt: str, quantize: str, **options) -> str:
        key = (ckpt, quantize, tuple(sorted(options.items())))
        if key not in made:
            tag = "_".join([ckpt, quantize] + [f"{k}{v}" for k, v in sorted(options.items())])
            opts = ConvertOptions(
                model_path=checkpoint(ckpt),
                out_dir=str(workdir / f"bundle_{tag}"),
                seq_length=options.pop("seq_length", 2048),
                quantize=quantize,
                **options,
            )
            made[key] = convert(opts, progress=Progress(enabled=False)).path
        return made[key]

    return get


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A structured test image: smooth gradients plus blocks, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack(
        [(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 127 // max(width + height, 1))],
        axis=-1,
    ).astype(np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        img[y0 : y0 + height // 5, x0 : x0 + width // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(img, "RGB")


def child_prints(code: str, env: dict) -> str:
    """What Python `code` prints in a child process with `env` (the kernel library reads its flags
    once per process, so a flag's effect is seen in a child)."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout.strip()


def run_tests_in_child(tests: list[str], env: dict) -> str:
    """Run these test ids in a child pytest with `env`; its output, once it has passed."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout
    return proc.stdout


@pytest.fixture(scope="session")
def images(workdir):
    """Files: one tile (square), 2x1 + thumbnail (wide), 2x2 + thumbnail (large square), tall."""
    out = {}
    for name, (w, h, seed) in {
        "square": (320, 320, 1),
        "wide": (500, 300, 2),
        "large": (900, 880, 3),
        "tall": (240, 700, 4),
    }.items():
        path = workdir / f"{name}.png"
        picture(w, h, seed).save(path)
        out[name] = str(path)
    return out
