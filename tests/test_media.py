"""Image preprocessing: InternVL's tiling geometry, equality with transformers' processor, modes, errors."""

import io

import numpy as np
import pytest
from conftest import picture
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_edge.errors import UserError
from internvl_edge.media import load_image, preprocess, tile_boxes, tile_grid


@pytest.mark.parametrize(
    "size, max_tiles, grid",
    [
        ((448, 448), 4, (1, 1)),
        ((800, 400), 4, (2, 1)),
        ((400, 800), 4, (1, 2)),
        ((1000, 1000), 4, (2, 2)),  # aspect tie with (1,1): the larger grid wins for a large image
        ((300, 300), 4, (1, 1)),  # ... but not for a small one
        ((1600, 400), 4, (4, 1)),
        ((1000, 400), 4, (3, 1)),  # 2.5 is as far from 2 as from 3: the larger grid, area permitting
        ((1000, 400), 12, (5, 2)),  # exact aspect match exists with more tiles allowed
        ((2000, 100), 4, (4, 1)),
        ((640, 480), 1, (1, 1)),
    ],
)
def test_tile_grid(size, max_tiles, grid):
    assert tile_grid(*size, max_tiles=max_tiles) == grid


def test_tile_boxes_row_major():
    assert tile_boxes(2, 2, 10) == [(0, 0, 10, 10), (10, 0, 20, 10), (0, 10, 10, 20), (10, 10, 20, 20)]


def test_thumbnail_only_with_several_tiles(tmp_path):
    assert preprocess(picture(448, 448)).num_tiles == 1
    assert preprocess(picture(800, 400)).num_tiles == 3
    assert preprocess(picture(1000, 1000)).num_tiles == 5
    assert preprocess(picture(1000, 1000), max_tiles=1).num_tiles == 1


@pytest.mark.parametrize("size", [(448, 448), (500, 300), (300, 500), (900, 880), (1600, 400), (123, 77), (2000, 90)])
@pytest.mark.parametrize("max_tiles", [4, 6])
def test_matches_transformers_image_processor(size, max_tiles):
    """transformers' InternVL processor (GotOcr2, PIL backend) with InternVL's preprocessor settings."""
    img = picture(*size, seed=size[0])
    proc = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    ref = proc(images=[img], return_tensors="np")
    ours = preprocess(img, max_tiles=max_tiles)
    assert ours.num_tiles == int(ref["num_patches"][0])
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(ours.pixel_values - ref["pixel_values"]).max() < 1e-5


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(_png_bytes(rgba)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(_png_bytes(half)).getpixel((0, 0))[0] in (126, 127, 128)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(_png_bytes(la)).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    out = load_image(_png_bytes(p, transparency=1))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("P", (4, 4), 1)
    opaque.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert load_image(_png_bytes(opaque)).getpixel((0, 0)) == (200, 10, 10)


def test_cmyk_grayscale_and_16_bit():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    r, g, b = load_image(buf.getvalue()).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    gray = Image.new("L", (4, 4), 77)
    assert load_image(_png_bytes(gray)).getpixel((0, 0)) == (77, 77, 77)
    deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # mode I;16, full scale
    assert load_image(_png_bytes(deep)).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((4, 4), 32896, np.uint16))  # 128 * 257
    assert load_image(_png_bytes(mid)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    upright = load_image(buf.getvalue())
    assert upright.size == (20, 60)
    r, g, b = upright.getpixel((10, 3))  # the left strip is now on top
    assert b > 200 and r < 60


def test_bad_images_are_one_line_errors(tmp_path):
    fake = tmp_path / "not_an_image.jpg"
    fake.write_text("hello, I am text")
    with pytest.raises(UserError, match="not an image"):
        load_image(str(fake))
    good = io.BytesIO()
    picture(300, 200).save(good, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(UserError, match="cannot be decoded"):
        load_image(str(truncated))
    with pytest.raises(UserError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(UserError, match="folder"):
        load_image(str(tmp_path))
    for err in (UserError,):
        with pytest.raises(err):
            load_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
