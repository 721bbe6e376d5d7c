"""Image conversion, both ways: file bytes -> model input, and model output -> 8-bit pictures and bytes.

Input side (the tokenize job's preprocessing): base64 text (standard or URL-safe alphabet, padding
optional, whitespace ignored) -> Pillow decode of any mode -> RGB -> shorter side resized to `size`
-> center crop `size` x `size` -> float32 (3, size, size) in [-1, 1]. Two resize modes (`RESIZE_MODES`):
  * `pil` (the default): EXIF orientation applied, transparency composited on white, antialiased PIL
    bicubic. It is the better picture when shrinking large photos (OpenCV's bilinear samples only the
    2x2 pixels nearest each output pixel, so downscaling by more than 2x aliases), and it is what
    painter's own models were tokenized with;
  * `easynlp`: exactly what EasyNLP's text2image dataset and taming do, so tokens match the reference's
    encoding: Pillow's plain `convert("RGB")` (no EXIF rotation, alpha dropped), albumentations
    `SmallestMaxSize` (OpenCV `INTER_LINEAR`, reimplemented here in its fixed-point arithmetic) and
    `CenterCrop`. For fine-tuning a reference checkpoint on data it was trained on.
Choices the reference leaves open, in the `pil` mode:
  * transparency (LA, PA, RGBA, P or RGB with a transparent colour) is composited on white;
  * 16-bit greyscale (I;16*, I) is scaled to 8 bits (value / 257), not clipped;
  * the EXIF orientation is applied before resizing;
  * CMYK goes through Pillow's plain conversion (no ICC colour management);
  * a JPEG whose shorter side is at least 4x `size` is decoded at a reduced scale (Pillow's `draft`:
    libjpeg's DCT scaling by 1/2, 1/4 or 1/8), never below 2x `size` (`DRAFT_GAP`, Pillow's own
    `thumbnail` default), before the bicubic resize. Decoding gets several times cheaper and the pixels
    differ from a full-size decode by under one level on average (0.4 on photo-like test images, 3 at
    most); smaller JPEGs and other formats decode exactly as before.
A row's image either converts or gets a one-line reason (`preprocess` returns (array, None) or
(None, reason)) so callers reject the row instead of failing a batch. The pixel limit is checked
on the header (`Image.open` reads no pixel data) before anything is decoded; Pillow's own
decompression-bomb limit (2 x `Image.MAX_IMAGE_PIXELS`) stays in force above it.

Output side: `encode_image` and `open_image` for generated pictures (`painter.inference.pixels` makes
their 8-bit arrays from the model's output, with `PIXEL_ROUNDING`). The model's
[-1, 1] output becomes 8 bits by rounding to the nearest level by default (`round`); EasyNLP's
predictor truncates instead (`astype(np.uint8)`, every pixel half a level darker on average, 46% of
values one level below rounding), which `truncate` reproduces (`painter easynlp` uses it).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# defined where the command line reads them without numpy or Pillow; imported from here too
from painter.io.formats import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, PIXEL_ROUNDING, RESIZE_MODES  # noqa: F401

PROMPT_COLUMN = "prompt_image"  # generate's optional input column: an image (bytes, or base64 text) to continue
DRAFT_GAP = 2  # a reduced JPEG decode keeps its shorter side >= DRAFT_GAP x the target size
_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")
_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/\-_= \t\r\n\v\f]")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)


class ImageRejected(ValueError):
    """An image that cannot be used; the message is the row's reason."""


def decode_base64(text: str | bytes) -> bytes:
    """Base64 in the standard or URL-safe alphabet, padding optional, whitespace ignored.

    Raises ValueError with a short description of the first problem.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError as e:
            raise ValueError(f"non-ASCII byte at position {e.start}") from None
    bad = _NOT_BASE64.search(text)
    if bad:
        raise ValueError(f"invalid character {bad.group()!r} at position {bad.start()}")
    digits = text.translate(_WHITESPACE).rstrip("=")
    if "=" in digits:
        raise ValueError(f"padding '=' before the end, at position {text.index('=')}")
    if len(digits) % 4 == 1:
        raise ValueError(f"{len(digits)} base64 digits cannot encode whole bytes")
    digits = digits.replace("-", "+").replace("_", "/") + "=" * (-len(digits) % 4)
    try:
        return base64.b64decode(digits, validate=True)
    except binascii.Error as e:  # not expected after the checks above; keep the reason anyway
        raise ValueError(str(e)) from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the image and check its size from the header; no pixel data is decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"not an image (unrecognised format, {len(data)} bytes starting "
                            f"{data[:8]!r})") from None
    except Exception as e:  # a recognised format whose header is broken
        raise _broken(e) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(f"image too large: {width} x {height} pixels > {max_pixels}")
    if width == 0 or height == 0:
        raise ImageRejected(f"empty image: {width} x {height} pixels")
    return image


def _broken(error: Exception) -> ImageRejected:
    """The reason for an image Pillow recognised but could not read (decoders raise all kinds of errors)."""
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return ImageRejected("truncated image")
    return ImageRejected(f"corrupt image ({type(error).__name__}: {error})")


def _draft(image: Image.Image, size: int) -> None:
    """Ask a JPEG decoder for its smallest DCT scale whose shorter side is still >= DRAFT_GAP x `size`."""
    width, height = image.size
    scale = DRAFT_GAP * size / min(width, height)
    if image.format == "JPEG" and scale <= 0.5:
        image.draft(None, (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))))


def _decode(image: Image.Image, size: int | None = None) -> None:
    """Decode the pixels (at a reduced JPEG scale when `size` allows, see `_draft`); ImageRejected if broken."""
    try:
        if size is not None:
            _draft(image, size)
        image.load()
    except Exception as e:
        raise _broken(e) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency on white, 16-bit scaled to 8 bits."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ImageRejected(f"unsupported image mode {image.mode} ({e})") from None


def load_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, size: int | None = None) -> Image.Image:
    """Image file bytes -> decoded RGB image with its EXIF orientation applied; ImageRejected if not.

    With `size` (the side it will be fitted to), a large JPEG may decode at a reduced scale (`_draft`).
    """
    image = _open(data, max_pixels)
    _decode(image, size)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as e:  # a malformed EXIF block
        raise ImageRejected(f"corrupt image (bad EXIF: {e})") from None
    return to_rgb(image)


def fit_square(image: Image.Image, size: int) -> np.ndarray:
    """Shorter side resized to `size` (bicubic), center crop -> uint8 (size, size, 3)."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [-1, 1] (x / 127.5 - 1, as the reference)."""
    x = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def image_bytes(cell, is_base64: bool) -> bytes:
    """The file bytes of a table cell: base64 text (str, or bytes where `is_base64`) or raw bytes; ImageRejected
    if unusable."""
    if cell is None:
        raise ImageRejected("missing image")
    if not isinstance(cell, (str, bytes, bytearray, memoryview)):  # image structs are bytes by now (columns)
        raise ImageRejected(f"an image cell of type {type(cell).__name__}, not bytes or base64 text")
    if is_base64 or isinstance(cell, str):  # text in an image column is base64
        try:
            data = decode_base64(cell)
        except ValueError as e:
            raise ImageRejected(f"bad base64 ({e})") from None
    else:
        data = bytes(cell)
    if not data:
        raise ImageRejected("empty image")
    return data


def load_image_as_reference(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes -> uint8 (H, W, 3) as EasyNLP loads them: `Image.open(...).convert("RGB")`, nothing else."""
    image = _open(data, max_pixels)
    _decode(image)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ValueError as e:
        raise ImageRejected(f"unsupported image mode {image.mode} ({e})") from None


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR taps along one axis: (first index, second index, weight of the first in 1/2048)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first).astype(np.float32)
    frac[first < 0] = 0
    first[first < 0] = 0
    frac[first >= src - 1] = 0
    first[first >= src - 1] = src - 1
    weight = np.rint(((1.0 - frac) * 2048).astype(np.float32)).astype(np.int64)  # saturate_cast<short>
    return first, np.minimum(first + 1, src - 1), weight


def resize_bilinear_opencv(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, C) -> (height, width, C) as `cv2.resize(..., INTER_LINEAR)` computes it: half-pixel
    centres, no antialiasing, 11-bit fixed-point weights, the horizontal pass then the vertical one."""
    src_h, src_w = pixels.shape[:2]
    x0, x1, ax = _linear_taps(src_w, width)
    y0, y1, ay = _linear_taps(src_h, height)
    p = pixels.astype(np.int64)
    rows = p[:, x0] * ax[None, :, None] + p[:, x1] * (2048 - ax)[None, :, None]  # (H, width, C), x2048
    top, bottom = rows[y0] >> 4, rows[y1] >> 4
    by0, by1 = ay[:, None, None], (2048 - ay)[:, None, None]
    out = (((by0 * top) >> 16) + ((by1 * bottom) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def fit_square_reference(pixels: np.ndarray, size: int) -> np.ndarray:
    """albumentations SmallestMaxSize(size) (OpenCV bilinear) + CenterCrop(size, size) -> uint8 (size, size, 3)."""
    height, width = pixels.shape[:2]
    scale = size / min(height, width)
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)  # Python's round, as albumentations
        pixels = resize_bilinear_opencv(pixels, new_w, new_h)
    height, width = pixels.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])


def prepare_pixels(cell, size: int, *, is_base64: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                   resize: str = "pil") -> tuple[np.ndarray | None, str | None]:
    """One row's image cell -> (uint8 (size, size, 3), None) or (None, reason). Never raises for bad data.
    `resize` is one of `RESIZE_MODES` (see the module docstring)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r} is not one of {RESIZE_MODES}")
    try:
        data = image_bytes(cell, is_base64)
        if resize == "easynlp":
            return fit_square_reference(load_image_as_reference(data, max_pixels), size), None
        return fit_square(load_image(data, max_pixels, size), size), None
    except ImageRejected as e:
        return None, str(e)


def preprocess(cell, size: int, *, is_base64: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
               resize: str = "pil") -> tuple[np.ndarray | None, str | None]:
    """One row's image cell -> (float32 (3, size, size) in [-1, 1], None) or (None, reason)."""
    pixels, reason = prepare_pixels(cell, size, is_base64=is_base64, max_pixels=max_pixels, resize=resize)
    return (None, reason) if pixels is None else (to_model_input(pixels), None)






def encode_image(pixels: np.ndarray, image_format: str = "png") -> bytes:
    """(H, W, 3) uint8 -> file bytes. PNG is lossless and byte-stable for equal pixels."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format {image_format!r} is not one of {IMAGE_FORMATS}")
    buf = io.BytesIO()
    kwargs = {"png": {"optimize": False}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}[image_format]
    Image.fromarray(pixels, "RGB").save(buf, format=image_format.upper(), **kwargs)
    return buf.getvalue()


def open_image(data: bytes) -> Image.Image:
    """Bytes written by `encode_image` back to a PIL image."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
