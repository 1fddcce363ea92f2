"""load_image: every mode to upright RGB, clear errors; image_to_tensor: resize, normalise, pad."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minivlm.data.images import IMAGENET_MEAN, IMAGENET_STD, image_to_array, image_to_tensor, load_image
from minivlm.errors import ImageError


def _rgb(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


# (mode, how to build it, file format, expected RGB of pixel (0, 0))
def _palette() -> Image.Image:
    im = Image.new("P", (8, 6), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return im


MODES = [
    ("1", lambda: Image.new("1", (8, 6), 1), "PNG", (255, 255, 255)),
    ("L", lambda: Image.new("L", (8, 6), 100), "PNG", (100, 100, 100)),
    ("LA", lambda: Image.new("LA", (8, 6), (100, 255)), "PNG", (100, 100, 100)),
    ("P", _palette, "PNG", (10, 200, 30)),
    ("RGB", lambda: Image.new("RGB", (8, 6), (1, 2, 3)), "PNG", (1, 2, 3)),
    ("RGBA", lambda: Image.new("RGBA", (8, 6), (200, 10, 20, 255)), "PNG", (200, 10, 20)),
    ("CMYK", lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
    ("I;16", lambda: Image.new("I;16", (8, 6), 65535), "PNG", (255, 255, 255)),
]


@pytest.mark.parametrize("mode,make,fmt,expected", MODES, ids=[m[0] for m in MODES])
def test_every_mode_becomes_rgb(tmp_path, mode, make, fmt, expected):
    src = make()
    assert src.mode == mode
    path = tmp_path / f"img.{fmt.lower()}"
    src.save(path, format=fmt)
    for img in (load_image(path), load_image(src)):  # from a file and from a PIL image
        assert img.mode == "RGB" and img.size == (8, 6)
        assert _rgb(img) == expected


def test_alpha_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # transparent black: white after compositing
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (0, 0, 255, 128))
    out = load_image(im)
    assert _rgb(out, (0, 0)) == (255, 255, 255) and _rgb(out, (1, 0)) == (255, 0, 0)
    r, g, b = _rgb(out, (2, 0))
    assert b == 255 and 120 <= r <= 135 and r == g  # half-transparent blue over white
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([0, 0, 0, 9, 9, 9] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert _rgb(out, (0, 0)) == (255, 255, 255) and _rgb(out, (1, 0)) == (9, 9, 9)


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 50  # the left (red) side is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    assert Image.open(path).size == (40, 20)  # the file itself is stored sideways


def test_sixteen_bit_keeps_contrast(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "ramp16.png"))[0, :, 0].astype(int)
    assert out[0] <= 1 and out[-1] >= 254
    assert np.all(np.diff(out) >= 0) and len(np.unique(out)) == 64  # a ramp, not clipped to white
    dim = np.tile(np.arange(0, 4096, 64, dtype=np.int32), (4, 1))  # 32-bit ints above 255
    out = np.asarray(load_image(Image.fromarray(dim, mode="I")))[0, :, 0].astype(int)
    assert np.all(np.diff(out) >= 0) and out[-1] > out[0]


def test_float_image_scaled():
    im = Image.fromarray(np.tile(np.linspace(0, 1, 16, dtype=np.float32), (2, 1)), mode="F")
    out = np.asarray(load_image(im))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nothere.jpg: image file not found"):
        load_image(tmp_path / "nothere.jpg")


def test_corrupt_truncated_and_non_image(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name in ("junk.jpg", "text.png", "cut.jpg"):
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h, with one empty data chunk: decoding would need w*h pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(12000, 9000), (50000, 50000)])  # above our limit, and above PIL's own
def test_absurd_size_rejected_from_header(tmp_path, w, h):
    _png_header_only(tmp_path / "bomb.png", w, h)
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_zero_size_rejected(tmp_path):
    with pytest.raises(ImageError, match="empty image"):
        load_image(Image.new("RGB", (0, 5)))
    _png_header_only(tmp_path / "zero.png", 0, 5)
    with pytest.raises(ImageError):
        load_image(tmp_path / "zero.png")


def test_image_to_tensor_resizes_normalises_and_pads():
    x, scale = image_to_tensor(Image.new("RGB", (300, 200), (255, 255, 255)), size=100)
    assert scale == pytest.approx(1 / 3)
    assert x.shape == (3, 128, 128) and x.dtype == torch.float32  # 100x67 padded to multiples of 64
    white = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[:, :67, :100], white.view(3, 1, 1).expand(3, 67, 100), atol=1e-5)
    assert torch.all(x[:, 67:, :] == 0) and torch.all(x[:, :, 100:] == 0)  # padding = mean colour
    # A point on the resized image maps back by orig = resized / scale.
    assert 100 / scale == pytest.approx(300)


def test_normalising_by_table_lookup_gives_the_formulas_floats_bit_for_bit():
    """image_to_array looks every byte up in a table; the floats are those of (v / 255 - mean) / std in float32."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 150, 3), dtype=np.uint8)
    pixels[0, :256 // 3 + 1] = np.arange(256 // 3 * 3 + 3).reshape(-1, 3) % 256  # every byte value occurs
    x, scale = image_to_array(Image.fromarray(pixels), 150)  # no resize: the pixels themselves
    want = ((pixels.astype(np.float32) / 255.0).transpose(2, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
    assert scale == 1.0 and x.dtype == np.float32 and x.shape == (3, 37, 150)
    assert np.array_equal(x, want)


def test_image_to_tensor_tall_exact_and_stride(tmp_path):
    x, scale = image_to_tensor(Image.new("RGB", (64, 256)), size=128)
    assert x.shape == (3, 128, 64) and scale == 0.5  # already multiples of 64: no padding
    x, _ = image_to_tensor(Image.new("L", (50, 30), 7), size=50, stride=32)
    assert x.shape == (3, 32, 64)
    Image.new("RGB", (10, 10)).save(tmp_path / "a.png")
    x, scale = image_to_tensor(tmp_path / "a.png", size=20, stride=8)  # paths accepted; upscaling too
    assert x.shape == (3, 24, 24) and scale == 2.0
