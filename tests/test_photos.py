"""Real photographs through `painter tokenize`: every case built here from scikit-image's bundled photos
(`skimage.data`, shipped in its wheel: nothing is downloaded), as an image folder on a real local Ray.

Good cases end as tokens equal to encoding their pixels directly, each pixel array checked against an
independent Pillow reading of what the photo should look like; bad cases end as rejected rows with their
reason; the counts add up.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from painter.checkpoint.model_dir import load_model  # noqa: E402
from painter.cli import main as cli  # noqa: E402
from painter.inference.vq_encode import default_max_batch, encode_codes  # noqa: E402
from painter.io.images import fit_square, prepare_pixels  # noqa: E402

SIZE = 32  # the tiny model's images
MAX_PIXELS = 20_000_000  # above the 4000 x 3000 photo, below the bomb


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def photo_cases() -> tuple[dict[str, tuple[bytes, callable]], dict[str, tuple[bytes, str]]]:
    """({file name: (bytes, independent reference: bytes -> RGB image)}, {file name: (bytes, reason)})."""
    astronaut = Image.fromarray(skimage_data.astronaut())
    coffee, chelsea = Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.chelsea())
    camera = Image.fromarray(skimage_data.camera())
    rocket = Image.fromarray(skimage_data.rocket())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer turns it 90 degrees clockwise
    rgba = astronaut.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))))
    palette = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    big = astronaut.resize((4000, 3000), Image.Resampling.BICUBIC)
    good = {
        "exif_rotated.jpg": (save(coffee, "JPEG", exif=exif), lambda d: decoded(d).transpose(Image.Transpose.ROTATE_270)),
        "progressive.jpg": (save(chelsea, "JPEG", progressive=True, quality=90), lambda d: decoded(d).convert("RGB")),
        "cmyk.jpg": (save(rocket.convert("CMYK"), "JPEG"), lambda d: decoded(d).convert("RGB")),
        "greyscale.png": (save(camera, "PNG"), lambda d: decoded(d).convert("RGB")),
        "sixteen_bit.png": (save(Image.fromarray(skimage_data.camera().astype(np.uint16) * 257), "PNG"),
                            lambda d: camera.convert("RGB")),  # 16 bits scaled back to 8: the camera photo
        "palette_transparent.png": (save(palette, "PNG", transparency=0), lambda d: on_white(decoded(d))),
        "rgba.webp": (save(rgba, "WEBP", lossless=True), lambda d: on_white(decoded(d))),
        "animated.gif": (save(coffee, "GIF", save_all=True, append_images=[chelsea.resize(coffee.size)], duration=100),
                         lambda d: Image.open(io.BytesIO(d)).convert("RGB")),  # the first frame
        "large_4000x3000.jpg": (save(big, "JPEG", quality=90), lambda d: decoded(d).convert("RGB")),
    }
    bomb = save(Image.new("L", (6000, 6000)), "PNG")  # ~36 KB on disk, 36 M pixels
    assert len(bomb) < 100_000
    whole = save(astronaut, "JPEG")
    bad = {
        "bomb.png": (bomb, f"image too large: 6000 x 6000 pixels > {MAX_PIXELS}"),
        "truncated.jpg": (whole[: len(whole) // 2], "truncated image"),
    }
    return good, bad


def test_the_photo_cases_decode_as_an_independent_reading_says(tmp_path):
    good, bad = photo_cases()
    for name, (data, reference) in good.items():
        pixels, reason = prepare_pixels(data, SIZE, is_base64=False, max_pixels=MAX_PIXELS)
        assert reason is None, (name, reason)
        expected = fit_square(reference(data), SIZE).astype(int)
        diff = np.abs(pixels.astype(int) - expected)
        # a JPEG 4x the model's size or more decodes at a reduced DCT scale (images.DRAFT_GAP): within a level
        # or two of the full decode on average; a wrong orientation or frame would be tens of levels off
        assert diff.mean() < 2 if name.endswith(".jpg") else diff.max() == 0, (name, diff.mean())
    for name, (data, reason) in bad.items():
        assert prepare_pixels(data, SIZE, is_base64=False, max_pixels=MAX_PIXELS) == (None, reason), name


@pytest.mark.slow
def test_real_photos_through_the_job(ray_session, tiny_model_dir, tmp_path):
    good, bad = photo_cases()
    folder = tmp_path / "photos"
    folder.mkdir()
    lines = []
    for name, (data, _) in {**good, **bad}.items():
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "caption": f"照片 {name}"}, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["tokenize", "--input", str(folder), "--model", tiny_model_dir, "--output",
                         str(tmp_path / "out"), "--columns", "text=caption", "--max-pixels", str(MAX_PIXELS),
                         "--max-error-rate", "0.5"])
    summary = json.loads(out.getvalue().strip().splitlines()[-1])
    assert code == 0, summary
    assert (summary["rows_in"], summary["rows_out"], summary["rows_rejected"]) == (len(good) + len(bad), len(good), len(bad))
    rejected = {r["idx"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "_rejected").to_pylist()}
    assert rejected == {name: reason for name, (_, reason) in bad.items()}
    shards = [p for p in (tmp_path / "out").glob("*.parquet")]
    rows = {r["idx"]: r for f in shards for r in pq.read_table(f).to_pylist()}
    names = sorted(good)
    pixels = [prepare_pixels(good[n][0], SIZE, is_base64=False, max_pixels=MAX_PIXELS)[0] for n in names]
    vqgan = load_model(tiny_model_dir, parts=("vqgan",)).vqgan
    expected = encode_codes(vqgan, np.stack(pixels), "cpu", default_max_batch("cpu"))
    assert [rows[n]["image_tokens"] for n in names] == expected.tolist()
