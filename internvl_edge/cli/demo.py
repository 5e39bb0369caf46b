"""`internvl-edge demo`: the whole path on a fresh machine, in one command.

Weights cannot be downloaded here, so the demo makes a tiny random-weight InternVL3 checkpoint in the
original format, converts it to a CPU bundle, draws a test picture and asks about it. The answer is
random-weight text; what the demo shows is that every stage runs (and how fast).
"""

from __future__ import annotations

import os
import sys

from ..convert import QUANTIZE_MODES
from ..errors import UserError
from ..progress import Progress
from .common import int_at_least


def add_arguments(p) -> None:
    p.add_argument("--dir", default="internvl-edge-demo", help="working folder (default ./internvl-edge-demo)")
    p.add_argument("-p", "--prompt", default="Describe the image.", help="the question (default: Describe the image.)")
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int_at_least(1),
        default=48,
        help="length of the answer (default 48)",
    )
    p.add_argument(
        "-q", "--quantize", default="w4bf16", choices=QUANTIZE_MODES, help="conversion precision (default w4bf16)"
    )


def draw_picture(path: str) -> None:
    """A small landscape with distinct shapes and colours, wider than tall (so it tiles 2x1 + thumbnail)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (800, 450), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 300, 800, 450], fill=(70, 150, 60))
    d.ellipse([620, 40, 720, 140], fill=(250, 210, 40))
    d.rectangle([150, 200, 330, 330], fill=(180, 60, 50))
    d.polygon([(130, 200), (240, 120), (350, 200)], fill=(110, 40, 30))
    d.rectangle([220, 260, 260, 330], fill=(90, 60, 30))
    d.ellipse([450, 260, 560, 330], fill=(240, 240, 240))
    img.save(path)


def main(args) -> int:
    from ..api import load
    from ..bundle import load_manifest
    from ..checkpoint.factory import make_checkpoint
    from ..convert import ConvertOptions, convert

    os.makedirs(args.dir, exist_ok=True)
    ckpt = os.path.join(args.dir, "InternVL3-tiny-random")
    bundle_dir = os.path.join(args.dir, f"internvl3-tiny_{args.quantize}")
    image = os.path.join(args.dir, "picture.png")
    progress = Progress("[demo] ")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        progress.step(f"making a tiny random-weight checkpoint in {ckpt}")
        make_checkpoint(ckpt, size="tiny", fmt="original", weights="bf16", overwrite=True)
        progress.done()
    try:
        load_manifest(bundle_dir)
    except UserError:
        convert(ConvertOptions(model_path=ckpt, out_dir=bundle_dir, seq_length=2048, quantize=args.quantize))
    if not os.path.isfile(image):
        draw_picture(image)
    progress.step("loading the bundle")
    model = load(bundle_dir)
    progress.done()
    print(f"\nQuestion: {args.prompt}\nImage: {image}\nAnswer: ", end="", flush=True)
    stats = None
    for chunk in model.stream(args.prompt, images=[image], max_new_tokens=args.max_new_tokens):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats or stats
    print(f"\nFTL: {stats.ftl_s:.3f} s  ({stats.num_tiles} image tiles, vision {stats.vision_s:.3f} s)")
    print(f"TPS: {stats.decode_tps:.3f} token/s")
    print("\n(random weights: the words are noise; every stage ran.) Next, try:")
    print(f"  internvl-edge chat -m {bundle_dir}")
    print(f'  internvl-edge run -m {bundle_dir} -p "What is in the picture?" --image {image} --json')
    return 0
