"""The one place images are opened and turned into model input.

`load_image` takes any file PIL reads (any size, any mode, EXIF-rotated, 16-bit) and returns an upright
RGB image, or raises `ImageError` naming the file and the reason. `image_to_array` resizes and normalises
it in numpy and `image_to_tensor` pads that for TEE-X. Nothing here imports torch at import time, so the
torch-free ONNX Runtime path (`minivlm.edge`) opens images with this very code.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import PIL
from PIL import Image, ImageOps

from minivlm.errors import ImageError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 100_000_000  # beyond this a "photo" is a decompression bomb or a scan we should not decode
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
# Every normalised value a byte can give, per channel, by the same float32 steps as (v / 255 - mean) / std, so
# a table lookup gives those floats bit for bit in one pass instead of four (600 x 450 px: 7.9 -> 3.8 ms).
_NORMALISED = (np.arange(256, dtype=np.float32)[None, :] / 255.0 - IMAGENET_MEAN[:, :, 0]) / IMAGENET_STD[:, :, 0]

# PIL warns above MAX_IMAGE_PIXELS and refuses above twice that; load_image turns the warning into an
# error, so every image above MAX_PIXELS is refused from its header, before any decoding.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def load_image(src: str | Path | Image.Image) -> Image.Image:
    """An upright RGB image from a path or a PIL image.

    Transparency is composited on white (dropping alpha would turn the transparent background of logos
    and scans, usually black underneath, into black). 16-bit and 32-bit grey images are scaled to 8 bits
    rather than clipped, so they keep their contrast.
    """
    if isinstance(src, Image.Image):
        return _to_rgb(src, "<PIL image>")
    path = Path(src)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im, path)
                im.load()  # decode now, inside the try: truncated files fail here
                return _to_rgb(im, path)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"{path}: image too large ({err})") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file PIL can identify") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:  # PIL's decoders raise all of these
        raise ImageError(f"{path}: cannot decode image ({err})") from None


def _check_size(im: Image.Image, name: str | Path) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: image too large ({w}x{h} > {MAX_PIXELS} pixels)")


def _to_rgb(im: Image.Image, name: str | Path) -> Image.Image:
    _check_size(im, name)
    try:
        im = ImageOps.exif_transpose(im) or im
    except Exception:  # a broken EXIF block should not make a readable image unusable
        pass
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _grey_to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    try:
        if im.mode == "La":  # premultiplied grey+alpha: PIL converts it only to LA
            im = im.convert("LA")
        if im.mode in ("RGBA", "LA", "PA", "RGBa"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except ValueError as err:
        raise ImageError(f"{name}: cannot convert mode {im.mode} to RGB ({err})") from None


def _grey_to_8bit(im: Image.Image) -> Image.Image:
    """Wide grey images to 'L'. PIL's own convert clips everything above 255 to white; instead 16-bit
    data is mapped by its full range (x / 257) and 32-bit int/float data by its min-max range."""
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "I" and a.min() >= 0 and a.max() <= 65535:
        a = a if a.max() <= 255 else a / 257.0  # 16-bit PNGs open as "I" in some PIL versions
    elif im.mode == "F" and a.min() >= 0 and a.max() <= 1:
        a = a * 255.0
    else:
        a = np.nan_to_num(a)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def image_to_tensor(img: Image.Image | str | Path, size: int, stride: int = 64) -> tuple[torch.Tensor, float]:
    """Model input for TEE-X: the longest side resized to `size` (aspect kept), normalised with ImageNet
    mean/std, zero-padded at the bottom/right so H and W are multiples of `stride` (64 = the P6 stride,
    so every BiFPN level lines up). Padding is 0 after normalisation, i.e. the mean colour.

    Returns (tensor [3, H, W] float32, scale). Boxes predicted on the resized image map back to the
    original image by `orig = resized / scale` (the padding is bottom/right, so no offset).
    """
    import torch

    x, scale = image_to_array(load_image(img), size)
    nh, nw = x.shape[1:]
    ph, pw = math.ceil(nh / stride) * stride, math.ceil(nw / stride) * stride
    out = torch.zeros(3, ph, pw, dtype=torch.float32)
    out[:, :nh, :nw] = torch.from_numpy(x)
    return out, scale


def image_to_array(img: Image.Image, size: int) -> tuple[np.ndarray, float]:
    """An RGB image with its longest side resized to `size` (aspect kept, bilinear), ImageNet-normalised:
    ([3, h, w] float32, scale from original to resized pixels). No padding."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    pixels = np.asarray(img)
    x = np.empty((3, nh, nw), dtype=np.float32)
    for c in range(3):
        np.take(_NORMALISED[c], pixels[:, :, c], out=x[c], mode="clip")  # bytes are always in range; "raise" buffers
    return x, scale
