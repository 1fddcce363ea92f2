"""Request images: data URLs (or bare base64) -> upright RGB PIL images, refused with a 400 that says why.

The server never fetches a URL: an `http(s)://` image would let any client make it connect anywhere
(server-side request forgery), so remote URLs are refused and the client sends the bytes inline.
Size is checked from the image header before any pixel is decoded, so a small file that would expand
to gigabytes (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from minivlm.data.images import load_image
from minivlm.errors import MiniVLMError
from minivlm.serve.errors import ApiError, bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)$", re.S)
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def image_bytes(src: str, param: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL or of bare base64 text."""
    if not isinstance(src, str) or not src.strip():
        raise bad_request("empty image: expected a data URL (data:image/png;base64,...)", "empty_image", param)
    src = src.strip()
    if _REMOTE.match(src):
        scheme = src.split(":", 1)[0].lower()
        raise bad_request(f"remote image URLs ({scheme}://...) are not fetched by this server; send the image "
                          "inline as a data URL (data:image/jpeg;base64,...)", "remote_url_refused", param)
    if src.startswith("data:"):
        m = _DATA_URL.match(src)
        if m is None:
            raise bad_request("malformed data URL: expected data:image/<type>;base64,<data>", "invalid_data_url", param)
        mime = m["mime"].strip().lower()
        if mime and not mime.startswith("image/"):
            raise bad_request(f"wrong content type {mime!r} in the data URL: expected an image (image/png, "
                              "image/jpeg, ...)", "wrong_content_type", param)
        if "base64" not in m["params"].lower().split(";"):
            raise bad_request("the data URL must be base64-encoded (data:image/png;base64,...)", "invalid_data_url",
                              param)
        src = m["data"]
    try:
        data = base64.b64decode(re.sub(r"\s+", "", src), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image is not valid base64", "invalid_base64", param) from None
    if not data:
        raise bad_request("empty image (no bytes after decoding)", "empty_image", param)
    return data


def open_image(data: bytes, max_pixels: int, param: str) -> Image.Image:
    """Decoded, upright RGB; a 400 for anything that is not a whole image within `max_pixels`."""
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
        if w * h > max_pixels:
            raise ApiError(413, f"image too large: {w}x{h} = {w * h} pixels, the limit is {max_pixels}",
                           "image_too_large", param)
        im.load()  # decode here: a truncated file fails now, with its reason
        return load_image(im)  # the library's own conversion: modes, alpha, EXIF rotation
    except ApiError:
        raise
    except Image.UnidentifiedImageError:
        raise bad_request("not an image: the bytes are in no format the server reads (PNG, JPEG, GIF, BMP, "
                          "WebP, TIFF, ...)", "invalid_image", param) from None
    except Image.DecompressionBombError as err:  # PIL's own ceiling, when max_pixels is set above it
        raise ApiError(413, f"image too large ({err})", "image_too_large", param) from None
    except MiniVLMError as err:
        raise bad_request(f"unusable image: {err}", "invalid_image", param) from None
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, struct.error, ...
        # on malformed input; these are the client's bytes, never a server fault.
        reason = "truncated" if "truncated" in str(err).lower() else "cannot be decoded"
        raise bad_request(f"image {reason} ({type(err).__name__}: {err})", "invalid_image", param) from None


def decode_images(sources: list[tuple[str, str]], max_pixels: int) -> list[Image.Image]:
    """[(data URL, param name)] -> images; the first bad one raises."""
    return [open_image(image_bytes(src, param), max_pixels, param) for src, param in sources]
