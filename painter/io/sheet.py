"""Contact sheets and static HTML galleries of generated images, for people to look at.

A contact sheet is one PNG grid: one row per prompt, one column per sample, a caption (idx, sample,
text) under every image; with one sample per prompt the prompts fill a near-square grid instead of one
tall column (`layout`). Images smaller than the cell are enlarged by a whole factor, nearest-neighbour. Captions are Chinese, so the font matters: `find_caption_font` takes
`--font PATH` when given, else looks for a font that really draws CJK glyphs (fontconfig's
`fc-list :lang=zh`, the usual font folders, the `noto-cjk-sans-otc` Python package) and, when none
is found, falls back to Pillow's built-in font and says so in its `note` (the job puts it in its
summary): CJK characters then show as boxes. Nothing is downloaded. No Ray in this module.
"""
from __future__ import annotations

import base64
import glob
import html
import importlib.util
import io
import math
import os
import shutil
import subprocess
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from painter.errors import InputError
from painter.io.images import open_image

PROBE = "宽松国"  # three distinct ideographs: a font without CJK glyphs draws them as identical boxes
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.fonts", "~/.local/share/fonts",
             "/System/Library/Fonts", "/Library/Fonts", "C:/Windows/Fonts")
FONT_NAME_HINTS = ("cjk", "wqy", "droidsansfallback", "sourcehan", "notosanssc", "notoserifsc", "simhei",
                   "simsun", "msyh", "pingfang", "hiragino", "uming", "ukai")
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class CaptionFont:
    """The font captions are drawn with: a file (and face index) or Pillow's built-in font (path None)."""
    path: str | None
    index: int = 0
    covers_cjk: bool = False
    note: str = ""

    def load(self, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if self.path is None:
            return ImageFont.load_default(size)
        return ImageFont.truetype(self.path, size, index=self.index)


@dataclass(frozen=True)
class SheetItem:
    image: bytes  # encoded image (PNG/JPEG/WebP)
    idx: str
    sample: int
    text: str


def draws_cjk(font) -> bool:
    """True when `font` draws distinct, non-empty glyphs for the probe ideographs."""
    masks = []
    for ch in PROBE:
        mask = font.getmask(ch)
        if mask.getbbox() is None:
            return False
        masks.append((mask.size, bytes(mask)))
    return len(set(masks)) == len(masks)


def _faces(path: str) -> list[tuple[int, str]]:
    """(face index, family name) of a font file; several for .ttc/.otc collections."""
    faces = []
    for index in range(16 if path.lower().endswith((".ttc", ".otc")) else 1):
        try:
            faces.append((index, ImageFont.truetype(path, 16, index=index).getname()[0] or ""))
        except OSError:
            break
    return faces


def _cjk_face(path: str) -> int | None:
    """Index of the best face of `path` for Chinese (a Simplified Chinese face first), or None."""
    faces = [(i, name) for i, name in _faces(path) if draws_cjk(ImageFont.truetype(path, 16, index=i))]
    for index, name in faces:
        if any(tag in name for tag in (" SC", " CN", "GB", "Hei", "Song")):
            return index
    return faces[0][0] if faces else None


def _fontconfig_candidates() -> list[str]:
    if not shutil.which("fc-list"):
        return []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({line.split(":")[0].strip() for line in out.splitlines() if line.strip()})


def _folder_candidates() -> list[str]:
    found = []
    for folder in FONT_DIRS:
        for path in sorted(glob.glob(os.path.join(os.path.expanduser(folder), "**", "*"), recursive=True)):
            name = os.path.basename(path).lower().replace("-", "").replace("_", "")
            if name.endswith((".ttf", ".ttc", ".otf", ".otc")) and any(h in name for h in FONT_NAME_HINTS):
                found.append(path)
    return found


def _package_candidates() -> list[str]:
    if importlib.util.find_spec("noto_cjk_sans_otc") is None:
        return []
    import noto_cjk_sans_otc

    return [str(noto_cjk_sans_otc.FONT_PATH)]


def packaged_font_path() -> str | None:
    """The Noto Sans CJK collection of the noto-cjk-sans-otc package (a dependency), or None."""
    paths = _package_candidates()
    return paths[0] if paths else None


def find_caption_font(explicit: str | None = None) -> CaptionFont:
    """The font for captions: `explicit` if given (InputError if unreadable), else the first CJK font found."""
    if explicit:
        try:
            faces = _faces(explicit)
        except OSError:
            faces = []
        if not faces:
            raise InputError(f"--font {explicit}: not a readable TrueType/OpenType font")
        index = _cjk_face(explicit)
        if index is None:
            return CaptionFont(explicit, 0, False, f"--font {explicit} draws no CJK glyphs: Chinese captions show as boxes")
        return CaptionFont(explicit, index, True, f"{explicit} (given with --font)")
    for source, candidates in (("fontconfig", _fontconfig_candidates()), ("font folders", _folder_candidates()),
                               ("noto-cjk-sans-otc package", _package_candidates())):
        for path in candidates:
            try:
                index = _cjk_face(path)
            except OSError:
                continue
            if index is not None:
                return CaptionFont(path, index, True, f"{path} (found via {source})")
    return CaptionFont(None, 0, False, "no CJK-capable font found (searched fc-list, font folders and the "
                       "noto-cjk-sans-otc package): captions use Pillow's built-in font and Chinese shows as "
                       "boxes; pass --font PATH or install a CJK font (e.g. `pip install noto-cjk-sans-otc`)")


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
    """Lines of `text` no wider than `width` pixels, character by character (CJK has no spaces)."""
    lines, line = [], ""
    for ch in " ".join(text.split()):
        if font.getlength(line + ch) > width and line:
            lines.append(line)
            line = ch
        else:
            line += ch
    lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def layout(rows: list[list[SheetItem]]) -> list[list[SheetItem]]:
    """The grid's rows: prompts as rows and samples as columns, or, when every prompt has one sample,
    the prompts in reading order on a near-square grid (ceil(sqrt(n)) columns)."""
    if len(rows) > 1 and all(len(row) == 1 for row in rows):
        items = [row[0] for row in rows]
        columns = math.ceil(math.sqrt(len(items)))
        return [items[i:i + columns] for i in range(0, len(items), columns)]
    return rows


def contact_sheet(rows: list[list[SheetItem]], font: CaptionFont, *, min_cell: int = 128,
                  font_size: int = 15, text_lines: int = 2) -> bytes:
    """One PNG grid (see `layout`), a caption under each image."""
    if not rows or not any(rows):
        raise ValueError("a contact sheet needs at least one image")
    rows = layout(rows)
    images = [[open_image(item.image).convert("RGB") for item in row] for row in rows]
    width = max(im.width for row in images for im in row)
    scale = max(1, -(-min_cell // width))  # small images are enlarged by a whole factor, never blurred
    cell = width * scale
    face = font.load(font_size)
    line_height = font_size + 4
    caption_height = line_height * (1 + text_lines) + 6
    pad = 8
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (pad + columns * (cell + pad), pad + len(rows) * (cell + caption_height + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (row, row_images) in enumerate(zip(rows, images)):
        top = pad + r * (cell + caption_height + pad)
        for c, (item, image) in enumerate(zip(row, row_images)):
            left = pad + c * (cell + pad)
            sheet.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST), (left, top))
            draw.rectangle([left - 1, top - 1, left + cell, top + cell], outline=(200, 200, 200))  # white scenes' edge
            lines = _wrap(f"{item.idx} · #{item.sample}", face, cell, 1) + _wrap(item.text, face, cell, text_lines)
            for k, line in enumerate(lines):
                draw.text((left, top + cell + 3 + k * line_height), line, fill=(20, 20, 20), font=face)
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def gallery_html(rows: list[list[SheetItem]], title: str, image_format: str = "png") -> str:
    """A self-contained HTML page: images inline (data: URLs), every caption HTML-escaped."""
    mime = MIME[image_format]
    figures = []
    for row in layout(rows):
        cells = []
        for item in row:
            data = base64.b64encode(item.image).decode("ascii")
            cells.append(f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(item.text)}">'
                         f"<figcaption><b>{html.escape(item.idx)}</b> #{item.sample}<br>"
                         f"{html.escape(item.text)}</figcaption></figure>")
        figures.append(f'<div class="row">{"".join(cells)}</div>')
    style = ("body{font-family:sans-serif;margin:16px}.row{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:12px}"
             "figure{margin:0;width:160px}img{width:160px;image-rendering:pixelated}"
             "figcaption{font-size:13px;word-break:break-all}")
    return (f'<!DOCTYPE html>\n<html lang="zh"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(figures)
            + "\n</body></html>\n")
