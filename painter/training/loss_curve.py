"""Loss curves as PNG, drawn with Pillow (no plotting library): what `painter train` and `train-vq` leave
in their run directory for people to look at.

`loss_curve(series)` draws lines of (step, value) on shared axes with ticks and a legend;
`write_loss_curve(run_path, ...)` reads the run's `metrics.jsonl` (one JSON object per logged step;
a step logged twice, as after a restart, keeps its last value; a value repeated unchanged from the line
before, as the validation loss between epochs, is drawn once) and writes `<run_path>/loss_curve.png`,
both through the job's `Storage`.
"""
from __future__ import annotations

import io
import json
import math
import posixpath

from PIL import Image, ImageDraw, ImageFont

from painter.io.storage import Storage, as_storage

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
Series = dict[str, list[tuple[float, float]]]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def loss_curve(series: Series, title: str, *, size: tuple[int, int] = (720, 420), y_label: str = "loss") -> bytes:
    """A PNG of each named series of (step, value) as a line (a single point as a dot), with axes and legend."""
    points = [(x, y) for values in series.values() for x, y in values if math.isfinite(y)]
    if not points:
        raise ValueError("a loss curve needs at least one finite point")
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    x_lo, x_hi = min(x for x, _ in points), max(x for x, _ in points)
    y_lo, y_hi = min(y for _, y in points), max(y for _, y in points)
    x_hi, y_pad = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi - y_lo) * 0.05 or 0.5
    y_lo, y_hi = max(0.0, y_lo - y_pad) if y_lo >= 0 else y_lo - y_pad, y_hi + y_pad
    px = lambda x: left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)  # noqa: E731
    py = lambda y: height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom)  # noqa: E731
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(15), ImageFont.load_default(12)
    draw.text((left, 10), title, fill=(0, 0, 0), font=font)
    for x in _ticks(x_lo, x_hi):
        draw.line([(px(x), top), (px(x), height - bottom)], fill=(232, 232, 232))
        draw.text((px(x), height - bottom + 6), _label(x), fill=(60, 60, 60), font=small, anchor="mt")
    for y in _ticks(y_lo, y_hi):
        draw.line([(left, py(y)), (width - right, py(y))], fill=(232, 232, 232))
        draw.text((left - 6, py(y)), _label(y), fill=(60, 60, 60), font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline=(120, 120, 120))
    draw.text(((left + width - right) / 2, height - 18), "step", fill=(0, 0, 0), font=small, anchor="mm")
    draw.text((8, top - 16), y_label, fill=(0, 0, 0), font=small)
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in sorted(values) if math.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if len(xy) <= 20 else xy[-1:]:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = top + 8 + 18 * i
        draw.line([(width - right - 150, legend_y), (width - right - 126, legend_y)], fill=colour, width=3)
        draw.text((width - right - 120, legend_y), name, fill=(0, 0, 0), font=small, anchor="lm")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def read_metrics(run_path: str, storage: Storage | None = None) -> list[dict]:
    """The run's logged metrics, one dict per step (the last one where a step was logged twice), by step."""
    with as_storage(storage).open(posixpath.join(run_path, "metrics.jsonl"), "r", encoding="utf-8") as f:
        by_step = {m["step"]: m for m in (json.loads(line) for line in f if line.strip())}
    return [by_step[step] for step in sorted(by_step)]


def write_loss_curve(run_path: str, title: str, series: dict[str, str], storage: Storage | None = None) -> str | None:
    """Draw `series` ({legend name: metrics key, dotted for nested keys}) from the run's metrics.jsonl into
    `<run_path>/loss_curve.png`; its path, or None when the run logged nothing to draw."""
    lines: Series = {}
    for name, key in series.items():
        values = []
        for m in read_metrics(run_path, storage):
            value = m
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            # a value carried along unchanged (validation loss between epochs) is drawn once, where measured
            if isinstance(value, (int, float)) and math.isfinite(value) and not (values and values[-1][1] == value):
                values.append((m["step"], float(value)))
        if values:
            lines[name] = values
    if not lines:
        return None
    path = posixpath.join(run_path, "loss_curve.png")
    return as_storage(storage).write_atomic(path, loss_curve(lines, title))
