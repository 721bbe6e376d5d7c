"""Tests of painter.io.images: base64 decoding, decoding of every image mode, resize/crop, rejection reasons."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from painter.io import images
from painter.io.images import decode_base64, fit_square, load_image, prepare_pixels, preprocess, to_model_input


def file_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming width x height with almost no pixel data (what a decompression bomb looks like)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


# --- base64 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"abc", bytes(range(256)), b"\xfb\xff\xfe" * 7])
def test_base64_standard_urlsafe_padding_and_whitespace(data):
    standard = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    for text in (standard, urlsafe, standard.rstrip("="), urlsafe.rstrip("="),
                 " " + "\n".join(standard[i:i + 4] for i in range(0, len(standard), 4)) + "\r\n",
                 standard.encode()):
        assert decode_base64(text) == data


@pytest.mark.parametrize("text, reason", [
    ("abc!def", "invalid character '!' at position 3"),
    ("ab=cd", "padding '=' before the end, at position 2"),
    ("a\tb c!", "invalid character '!' at position 5"),
    ("abcde", "5 base64 digits cannot encode whole bytes"),
    (b"ab\xffc", "non-ASCII byte at position 2"),
    ("数据", "invalid character '数' at position 0"),
])
def test_base64_errors_say_what_is_wrong(text, reason):
    with pytest.raises(ValueError, match="^" + reason):
        decode_base64(text)


# --- modes --------------------------------------------------------------------------------------

def test_rgb_png_jpeg_webp_decode_to_rgb():
    rgb = noise(40, 30)
    for fmt in ("PNG", "JPEG", "WEBP"):
        image = load_image(file_bytes(rgb, fmt))
        assert image.mode == "RGB" and image.size == (40, 30)
    assert np.array_equal(np.asarray(load_image(file_bytes(rgb))), np.asarray(rgb))  # PNG is lossless


def test_greyscale_palette_and_cmyk_become_rgb():
    grey = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    out = np.asarray(load_image(file_bytes(grey)))
    assert out.shape == (16, 16, 3) and np.array_equal(out[..., 0], np.asarray(grey)) and (out[..., 0] == out[..., 2]).all()
    palette = noise(20, 20).convert("P")
    assert np.array_equal(np.asarray(load_image(file_bytes(palette))), np.asarray(palette.convert("RGB")))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    red = np.asarray(load_image(file_bytes(cmyk, "JPEG", quality=100))).astype(int)
    assert (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    out = np.asarray(load_image(file_bytes(rgba)))
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (127, 127, 127)
    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(load_image(file_bytes(la))) == 255).all()
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 1
    assert (np.asarray(load_image(file_bytes(palette, transparency=1))) == 255).all()


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    out = np.asarray(load_image(file_bytes(image)))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied():
    wide = noise(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = load_image(file_bytes(wide, "JPEG", exif=exif.tobytes()))
    assert image.size == (20, 40)


# --- geometry -----------------------------------------------------------------------------------

def test_fit_square_resizes_shorter_side_and_crops_the_center():
    # a wide image: red | green | blue thirds; the crop keeps the middle (green) square
    stripes = np.zeros((60, 180, 3), np.uint8)
    stripes[:, :60, 0] = stripes[:, 60:120, 1] = stripes[:, 120:, 2] = 255
    out = fit_square(Image.fromarray(stripes), 30)
    assert out.shape == (30, 30, 3) and out.dtype == np.uint8
    assert (out[:, 3:-3, 1] == 255).all() and (out[:, 3:-3, 0] == 0).all()
    tall = fit_square(noise(17, 50), 32)
    assert tall.shape == (32, 32, 3)
    same = noise(32, 32)
    assert np.array_equal(fit_square(same, 32), np.asarray(same))


def test_fit_square_uses_bicubic_like_pillow():
    image = noise(64, 48)
    expected = np.asarray(image.resize((43, 32), Image.Resampling.BICUBIC))[:, 5:37]
    assert np.array_equal(fit_square(image, 32), expected)


def test_model_input_range_layout_and_dtype():
    pixels = np.array([[[0, 127, 255]]], np.uint8)
    x = to_model_input(pixels)
    assert x.dtype == np.float32 and x.shape == (3, 1, 1)
    assert x.ravel().tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])
    arr, reason = preprocess(b64(file_bytes(noise(50, 40))), 32)
    assert reason is None and arr.shape == (3, 32, 32) and arr.dtype == np.float32
    assert -1.0 <= arr.min() and arr.max() <= 1.0
    raw, _ = prepare_pixels(file_bytes(noise(50, 40)), 32, is_base64=False)
    assert np.array_equal(to_model_input(raw), arr)


# --- rejection reasons --------------------------------------------------------------------------

def reason_of(cell, **kwargs) -> str:
    arr, reason = preprocess(cell, 32, **kwargs)
    assert arr is None and reason
    return reason


def test_reasons_for_bad_cells():
    good = file_bytes(noise(64, 64), "JPEG")
    assert reason_of("not base64!") == "bad base64 (invalid character '!' at position 10)"
    assert reason_of(None) == "missing image"
    assert reason_of("") == "empty image"
    assert reason_of(b64(b"hello, I am text")).startswith("not an image (unrecognised format, 16 bytes starting b'hello, ")
    assert reason_of(b64(good[: len(good) // 2])) == "truncated image"
    assert reason_of(b64(file_bytes(noise(64, 64))[:3000])) == "truncated image"
    assert reason_of(good[:100], is_base64=False) == "truncated image"  # cut inside the header
    webp = file_bytes(noise(64, 64), "WEBP")
    assert reason_of(webp[: len(webp) // 2], is_base64=False).startswith("corrupt image (OSError: ")


def test_too_large_is_checked_before_decoding():
    big = file_bytes(Image.new("RGB", (3000, 2000), (1, 2, 3)))
    assert reason_of(b64(big), max_pixels=5_000_000) == "image too large: 3000 x 2000 pixels > 5000000"
    assert preprocess(b64(big), 32, max_pixels=6_000_000)[1] is None
    header = png_header_only(40000, 40000)  # Pillow's own bomb limit fires in Image.open
    assert reason_of(header, is_base64=False).startswith("image too large")
    assert reason_of(header, is_base64=False, max_pixels=10 ** 12).startswith("image too large: Image size (1600000000 pixels)")


def test_reasons_never_raise_for_random_bytes():
    rng = np.random.default_rng(1)
    valid = file_bytes(noise(20, 20))
    for i in range(50):
        data = bytearray(valid)
        for pos in rng.integers(8, len(data), size=8):  # keep the signature so the PNG decoder runs
            data[pos] = rng.integers(0, 256)
        arr, reason = preprocess(bytes(data), 16, is_base64=False)
        assert (arr is None) != (reason is None)


def test_default_pixel_limit():
    assert images.DEFAULT_MAX_PIXELS == 40_000_000
