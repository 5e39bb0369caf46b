"""Images in, normalised 448x448 tiles out: InternVL's `dynamic_preprocess`, as pure functions.

Tiling (https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/train/dataset.py,
dynamic_preprocess / find_closest_aspect_ratio): among grids (cols, rows) with min..max tiles, take
the one whose aspect ratio is closest to the image's (ties go to the larger grid while the image
has more than half the grid's pixel area), resize to the grid with bicubic filtering, crop the
tiles row by row, and append a whole-image thumbnail when there is more than one tile.
Normalisation: ImageNet mean and std (IMAGENET_MEAN / IMAGENET_STD in InternVL's constants.py).

Images are decoded fully here, so a truncated or non-image file fails with a clear message before
any model runs; EXIF orientation is applied and every mode is turned into 8-bit RGB, transparent
pixels composited on white as transformers' `convert_to_rgb` does.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit, made explicit


def tile_grid(width: int, height: int, max_tiles: int, min_tiles: int = 1, tile: int = 448) -> tuple[int, int]:
    """(columns, rows) of the tiling InternVL picks for an image of this size."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_tiles, max_tiles + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_tiles <= i * j <= max_tiles
        },
        key=lambda r: r[0] * r[1],
    )
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_boxes(cols: int, rows: int, tile: int = 448) -> list[tuple[int, int, int, int]]:
    """Crop boxes (left, top, right, bottom), row by row."""
    return [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)]


def dynamic_preprocess(
    image: Image.Image, max_tiles: int = 4, tile: int = 448, use_thumbnail: bool = True
) -> list[Image.Image]:
    cols, rows = tile_grid(image.width, image.height, max_tiles, tile=tile)
    resized = image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC)
    tiles = [resized.crop(box) for box in tile_boxes(cols, rows, tile)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def normalize(tiles: list[Image.Image]) -> np.ndarray:
    """RGB tiles -> float32 [N, 3, H, W], (x / 255 - mean) / std."""
    arr = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) / np.float32(255.0)
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16/32-bit and float greyscale scaled, transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 257.0
        elif image.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if image.mode == "CMYK" or image.mode == "YCbCr" or image.mode == "LAB" or image.mode == "HSV":
        return image.convert("RGB")
    has_alpha = (
        image.mode in ("RGBA", "LA", "RGBa", "La", "PA")
        or (image.mode == "P" and "transparency" in image.info)
        or (image.mode in ("L", "RGB", "1") and "transparency" in image.info)
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """A path, bytes or a PIL image -> decoded, upright, RGB image. Failures are one-line UserErrors."""
    name = "image"
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        else:
            name = os.fspath(source)
            if not os.path.exists(name):
                raise UserError(f"image not found: {name}")
            if os.path.isdir(name):
                raise UserError(f"{name} is a folder, not an image")
            image = Image.open(name)
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
        image.load()
        image = ImageOps.exif_transpose(image) or image
        if image.width < 1 or image.height < 1:
            raise UserError(f"{name} has no pixels")
        return to_rgb(image)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{name} is too large ({e})") from None
    except PermissionError:
        raise UserError(f"cannot read {name}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(
            f"{name} cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


@dataclass
class ImageTiles:
    pixel_values: np.ndarray  # float32 [tiles, 3, 448, 448]
    grid: tuple[int, int]  # (columns, rows) before the thumbnail
    size: tuple[int, int]  # original (width, height)

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]


def preprocess(source, max_tiles: int = 4, tile: int = 448) -> ImageTiles:
    image = load_image(source)
    tiles = dynamic_preprocess(image, max_tiles=max_tiles, tile=tile)
    return ImageTiles(normalize(tiles), tile_grid(image.width, image.height, max_tiles, tile=tile), image.size)
