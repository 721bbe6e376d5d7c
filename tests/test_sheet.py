"""Contact sheets and galleries: CJK captions when a font exists, a stated fallback when none does."""
from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from painter.errors import InputError
from painter.io import sheet

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def _png(color, size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(prompts=3, samples=2, text="宽松T恤") -> list[list[sheet.SheetItem]]:
    return [[sheet.SheetItem(_png((40 * p, 80, 40 * s)), f"p{p}", s, f"{text}{p}") for s in range(samples)]
            for p in range(prompts)]


@pytest.fixture()
def no_system_fonts(monkeypatch):
    for name in ("_fontconfig_candidates", "_folder_candidates", "_package_candidates"):
        monkeypatch.setattr(sheet, name, lambda: [])


def test_found_font_draws_cjk_or_says_it_cannot():
    font = sheet.find_caption_font()
    if font.covers_cjk:
        assert sheet.draws_cjk(font.load(16)) and font.path
    else:
        assert font.path is None and "no CJK-capable font" in font.note


def test_without_any_cjk_font_the_fallback_is_stated_and_still_renders(no_system_fonts):
    font = sheet.find_caption_font()
    assert font.path is None and not font.covers_cjk
    assert "boxes" in font.note and "--font" in font.note
    assert Image.open(io.BytesIO(sheet.contact_sheet(_rows(), font))).format == "PNG"


def test_explicit_font_must_be_readable(tmp_path):
    not_a_font = tmp_path / "x.ttf"
    not_a_font.write_bytes(b"nope")
    with pytest.raises(InputError, match="--font"):
        sheet.find_caption_font(str(not_a_font))


@pytest.mark.skipif(not __import__("os").path.exists(DEJAVU), reason="DejaVu not installed")
def test_explicit_font_without_cjk_glyphs_is_reported():
    font = sheet.find_caption_font(DEJAVU)
    assert font.path == DEJAVU and not font.covers_cjk and "no CJK glyphs" in font.note


def test_the_builtin_font_draws_boxes_for_cjk(no_system_fonts):
    assert not sheet.draws_cjk(sheet.find_caption_font().load(16))


def test_the_packaged_cjk_font_is_found_and_its_chinese_face_chosen(monkeypatch):
    pytest.importorskip("noto_cjk_sans_otc")  # installed with the test extra
    monkeypatch.setattr(sheet, "_fontconfig_candidates", lambda: [])
    monkeypatch.setattr(sheet, "_folder_candidates", lambda: [])
    font = sheet.find_caption_font()
    assert font.covers_cjk and "noto-cjk-sans-otc" in font.note
    assert "SC" in font.load(16).getname()[0]


def test_contact_sheet_is_a_grid_with_captions_under_the_images():
    font = sheet.find_caption_font()
    image = Image.open(io.BytesIO(sheet.contact_sheet(_rows(3, 2), font, min_cell=128)))
    blank = Image.open(io.BytesIO(sheet.contact_sheet(_rows(3, 2, text=""), font, min_cell=128)))
    assert image.size == blank.size and image.width < image.height  # 2 columns, 3 rows
    assert image.width == 8 + 2 * (128 + 8)
    # the first image is enlarged 4x (32 -> 128) and sits at the top-left corner
    assert image.getpixel((8 + 64, 8 + 64)) == (0, 80, 0)
    # captions differ exactly where the text is: under the images, not on them
    diff = [(x, y) for x in range(0, image.width, 2) for y in range(0, image.height, 2)
            if image.getpixel((x, y)) != blank.getpixel((x, y))]
    assert diff and all((y - 8) % (image.height // 3) >= 128 for _, y in diff)


def test_contact_sheet_needs_images():
    with pytest.raises(ValueError):
        sheet.contact_sheet([], sheet.find_caption_font())


def test_gallery_escapes_captions_and_inlines_images():
    rows = [[sheet.SheetItem(_png("red"), "<b>1</b>", 0, "<script>alert('x')</script> 宽松&T恤")]]
    page = sheet.gallery_html(rows, "night <1>", "png")
    assert "<script>" not in page and "&lt;script&gt;" in page and "宽松&amp;T恤" in page
    assert "&lt;b&gt;1&lt;/b&gt;" in page and "<title>night &lt;1&gt;</title>" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 1 and 'charset="utf-8"' in page


def _size(rows) -> tuple[int, int]:
    return Image.open(io.BytesIO(sheet.contact_sheet(rows, sheet.find_caption_font()))).size


def test_one_sample_per_prompt_fills_a_near_square_grid():
    """16 prompts x 1 sample: a 4x4 grid, no more than twice as tall as wide (not one tall column)."""
    width, height = _size(_rows(16, 1))
    assert height <= 2 * width, (width, height)
    assert width == 8 + 4 * (128 + 8)  # 4 columns of 128 px cells (32 px images enlarged 4x)
    assert [len(row) for row in sheet.layout(_rows(16, 1))] == [4, 4, 4, 4]
    assert [len(row) for row in sheet.layout(_rows(5, 1))] == [3, 2]


def test_prompts_are_rows_and_samples_are_columns():
    """4 prompts x 4 samples: a 4x4 grid whose row r holds prompt r's samples in order."""
    rows = _rows(4, 4)
    assert sheet.layout(rows) is rows
    image = Image.open(io.BytesIO(sheet.contact_sheet(rows, sheet.find_caption_font())))
    one_row = Image.open(io.BytesIO(sheet.contact_sheet(_rows(1, 4), sheet.find_caption_font())))
    assert image.width == one_row.width == 8 + 4 * (128 + 8)
    row_height = one_row.height - 8
    assert image.height == 8 + 4 * row_height
    for p in range(4):
        for s in range(4):  # the centre of cell (p, s) is prompt p's sample s
            centre = (8 + s * (128 + 8) + 64, 8 + p * row_height + 64)
            assert image.getpixel(centre) == (40 * p, 80, 40 * s)
