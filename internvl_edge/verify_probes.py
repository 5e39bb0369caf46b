"""`verify`'s built-in probes: synthetic images drawn with Pillow and the questions asked about them.

The images cover what users feed a vision-language model and what stresses its encoder differently:
a bar chart (flat colours, thin lines, digits), rendered text (high-frequency strokes), shapes (hard
edges on a plain ground) and photo-like noise (smooth colour fields with grain), at several aspect
ratios so that one, two and more tiles (with the thumbnail) are exercised. They are drawn from fixed
seeds, so a report is comparable between runs and bundles. A text-only probe checks the decoder alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont


@dataclass
class ProbeSpec:
    name: str
    question: str
    images: list  # PIL images or paths
    builtin: bool = True


def _font(size: int):
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font: no system fonts needed


def bar_chart(width: int = 640, height: int = 480) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, bottom, top = 60, height - 50, 40
    d.line([(left, top), (left, bottom), (width - 20, bottom)], fill="black", width=2)
    values = [3, 7, 5, 9, 2, 6]
    colours = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948"]
    step = (width - left - 40) // len(values)
    for i, (v, c) in enumerate(zip(values, colours, strict=True)):
        x0 = left + 15 + i * step
        y0 = bottom - v * (bottom - top) // 10
        d.rectangle([x0, y0, x0 + step - 25, bottom], fill=c, outline="black")
        d.text((x0 + 5, y0 - 22), str(v), fill="black", font=_font(18))
        d.text((x0 + 5, bottom + 8), "ABCDEF"[i], fill="black", font=_font(18))
    d.text((left, 8), "Sales by region", fill="black", font=_font(22))
    return img


def rendered_text(width: int = 896, height: int = 448) -> Image.Image:
    img = Image.new("RGB", (width, height), (250, 248, 240))
    d = ImageDraw.Draw(img)
    lines = [
        "INVOICE 2024-117",
        "Item: 12 x solar panel",
        "Unit price: 149.90 EUR",
        "Total due: 1798.80 EUR",
        "Pay before 30 June",
    ]
    for i, line in enumerate(lines):
        d.text((40, 30 + i * 80), line, fill=(20, 20, 20), font=_font(44 if i == 0 else 36))
    return img


def shapes(size: int = 448) -> Image.Image:
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    d.ellipse([30, 30, 170, 170], fill="red", outline="black", width=3)
    d.rectangle([240, 50, 400, 160], fill="blue")
    d.polygon([(90, 400), (200, 230), (310, 400)], fill="green")
    d.ellipse([330, 280, 420, 420], fill="orange")
    return img


def photo_noise(width: int = 336, height: int = 672, seed: int = 7) -> Image.Image:
    """Smooth random colour fields (a low-resolution field upsampled bicubically) plus fine grain."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 3, 3)) * 255).astype(np.uint8), "RGB")
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0.0, 12.0, field.shape)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8), "RGB")


def builtin_probes() -> list[ProbeSpec]:
    return [
        ProbeSpec("chart", "Which region has the highest sales, and what is its value?", [bar_chart()]),
        ProbeSpec("text", "What is the total due on this invoice?", [rendered_text()]),
        ProbeSpec("shapes", "How many shapes are there, and what colours are they?", [shapes()]),
        ProbeSpec("noise", "Describe the image.", [photo_noise()]),
        ProbeSpec("text-only", "Write two sentences about the sea.", []),
    ]


def user_probes(images: list[str], prompts: list[str]) -> list[ProbeSpec]:
    """Each of the user's images asked the first of their prompts (or "Describe the image."); every
    prompt also asked alone, so the decoder is checked on the user's own wording."""
    question = prompts[0] if prompts else "Describe the image."
    out = [ProbeSpec(f"image {i + 1}", question, [path], builtin=False) for i, path in enumerate(images)]
    out += [ProbeSpec(f"prompt {i + 1}", p, [], builtin=False) for i, p in enumerate(prompts)]
    return out


def read_prompts(path: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    from .errors import UserError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompts {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt (one per line)")
    return prompts
