"""Loss curves drawn with Pillow: lines where the data is, a legend per series, read from metrics.jsonl."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from painter.training import loss_curve as plots


def _colour_pixels(png: bytes, colour) -> list[tuple[int, int]]:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return [(x, y) for x in range(image.width) for y in range(image.height) if image.getpixel((x, y)) == colour]


def test_a_falling_loss_is_drawn_from_top_left_to_bottom_right():
    png = plots.loss_curve({"train loss": [(s, 6.0 / (1 + s / 10)) for s in range(0, 101, 10)]}, "t")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (720, 420)
    blue = [p for p in _colour_pixels(png, plots.COLOURS[0]) if p[0] < 720 - 160]  # the line, not the legend
    first, last = min(blue), max(blue)
    assert first[1] < last[1] - 200  # starts high on the left, ends low on the right


def test_two_series_get_two_colours():
    png = plots.loss_curve({"train": [(1, 3.0), (2, 2.0)], "validation": [(2, 2.5)]}, "t")
    assert _colour_pixels(png, plots.COLOURS[0]) and _colour_pixels(png, plots.COLOURS[1])


def test_nothing_to_draw_is_refused():
    with pytest.raises(ValueError):
        plots.loss_curve({"train": [(1, float("nan"))]}, "t")


def test_write_loss_curve_reads_metrics_keeps_the_last_of_a_repeated_step(tmp_path):
    lines = [{"step": 1, "loss": 6.0, "val_loss": None}, {"step": 12, "loss": 3.0, "val_loss": None},
             {"step": 12, "loss": 2.9, "val_loss": None}, {"step": 24, "loss": 2.0, "val_loss": 2.4},
             {"step": 30, "loss": 1.8, "val_loss": 2.4}, {"step": 36, "loss": 1.7, "eval": {"l1": 0.1}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    assert [m["loss"] for m in plots.read_metrics(str(tmp_path))] == [6.0, 2.9, 2.0, 1.8, 1.7]
    path = plots.write_loss_curve(str(tmp_path), "run", {"train loss": "loss", "validation loss": "val_loss",
                                                          "held-out L1": "eval.l1"})
    assert path == str(tmp_path / "loss_curve.png") and Image.open(path).format == "PNG"
    assert plots.write_loss_curve(str(tmp_path), "run", {"nothing": "absent"}) is None
