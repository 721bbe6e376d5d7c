"""The synthetic task: Chinese-captioned scenes drawn with Pillow, and a judge that reads them back.

This module owns ``Scene`` (shape, colour, background, size, position) and its caption grammar
``{背景}色背景{位置}的一个{大小}的{颜色}色{形状}``, e.g. "灰色背景左边的一个大的红色三角形" (at most 16
characters, one text token each: ``caption`` / ``parse_caption``); ``render`` (drawn 8x larger and
averaged down, with a little jitter of position, size and turn); ``sample_scenes``,
``captions_for_eval``, ``hold_out`` and ``write_corpus`` (EasyNLP TSV shards ``idx \\t text \\t
base64 PNG``, no header, byte-identical for a seed); and the judge, ``judge(image) -> Reading``,
which reads the attributes back from pixels alone (what it cannot see is None); accuracies and their
chance levels are ``painter.evaluation.judge``'s. No Ray here; the
``painter make-corpus`` command is ``painter.stages.make_corpus``.
"""
from __future__ import annotations

import base64
import io
import posixpath
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from painter.io.storage import Storage, as_storage

SHAPES = ("圆形", "正方形", "三角形", "星形")
COLOURS = {"红": (220, 40, 40), "绿": (40, 170, 60), "蓝": (40, 80, 225), "黄": (240, 210, 40),
           "紫": (150, 60, 200), "橙": (245, 135, 30), "青": (30, 200, 210), "白": (250, 250, 250),
           "黑": (15, 15, 15)}
BACKGROUNDS = {"白": (255, 255, 255), "黑": (0, 0, 0), "灰": (128, 128, 128)}
SIZES = ("大", "小")
POSITIONS = {"左": "左边", "中": "中间", "右": "右边"}
ATTRIBUTES = ("shape", "colour", "background", "size", "position")
MAX_CAPTION_CHARS = 16
# Geometry in fractions of the image width: a circle's radius per size, the other shapes'
# circumradius relative to it, each position's centre x, and the jitter ranges.
RADIUS = {"大": 0.22, "小": 0.16}
CIRCUMRADIUS = {"圆形": 1.0, "正方形": 1.25, "三角形": 1.3, "星形": 1.3}
STAR_INNER = 0.5  # inner over outer radius of the five-pointed star
CENTRE_X = {"左": 0.34, "中": 0.5, "右": 0.66}
JITTER_XY, JITTER_SCALE, JITTER_DEGREES = (0.02, 0.04), 0.06, 12.0


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str = "大"
    position: str = "中"

    def __post_init__(self):
        for name, allowed in zip(ATTRIBUTES, (SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour}色 shape on a {self.background}色 background is invisible")


@dataclass(frozen=True)
class Reading:
    """What the judge sees: each attribute of `Scene`, or None where the pixels do not show one."""
    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    size: str | None = None
    position: str | None = None


def all_scenes() -> list[Scene]:
    """Every valid scene (the shape's colour is never the background's), in a fixed order."""
    return [Scene(s, c, b, z, p) for s in SHAPES for c in COLOURS for b in BACKGROUNDS
            for z in SIZES for p in POSITIONS if c != b]


def caption(scene: Scene) -> str:
    return f"{scene.background}色背景{POSITIONS[scene.position]}的一个{scene.size}的{scene.colour}色{scene.shape}"


_CAPTION = re.compile(f"({'|'.join(BACKGROUNDS)})色背景({'|'.join(POSITIONS.values())})的一个"
                      f"({'|'.join(SIZES)})的({'|'.join(COLOURS)})色({'|'.join(SHAPES)})")
_POSITION_OF = {word: key for key, word in POSITIONS.items()}


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (surrounding whitespace ignored); ValueError for other text."""
    m = _CAPTION.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"not a synthetic caption: {text!r}")
    background, position, size, colour, shape = m.groups()
    return Scene(shape, colour, background, size, _POSITION_OF[position])


# --- drawing ---------------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, radius: float, degrees: float) -> list[tuple]:
    """Polygon vertices of a square, triangle or star (outer and inner vertices alternating)
    pointing up, turned by `degrees`."""
    n, first = {"正方形": (4, 45), "三角形": (3, -90), "星形": (10, -90)}[shape]
    radii = [radius * (STAR_INNER if shape == "星形" and k % 2 else 1) for k in range(n)]
    angles = [np.radians(first + degrees + 360 * k / n) for k in range(n)]
    return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]


def render(scene: Scene, size: int, rng: np.random.Generator | int | None = None) -> Image.Image:
    """The scene as an RGB `size` x `size` picture, drawn 8x (4x from 128 px) larger and averaged down.

    `rng` (a Generator or seed) draws the jitter: centre +-2% of the width across and +-4% down,
    radius +-6%, turn +-12 degrees; None draws the scene without jitter.
    """
    jitter = np.zeros(4) if rng is None else np.random.default_rng(rng).uniform(-1, 1, 4)
    ss = 4 if size >= 128 else 8
    big = size * ss
    cx = (CENTRE_X[scene.position] + JITTER_XY[0] * jitter[0]) * big
    cy = (0.5 + JITTER_XY[1] * jitter[1]) * big
    radius = RADIUS[scene.size] * CIRCUMRADIUS[scene.shape] * (1 + JITTER_SCALE * jitter[2]) * big
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw, fill = ImageDraw.Draw(image), COLOURS[scene.colour]
    if scene.shape == "圆形":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, radius, JITTER_DEGREES * jitter[3]), fill=fill)
    return image.reduce(ss)


# --- sampling and the corpus -----------------------------------------------------------------


def _draw_scene(rng: np.random.Generator, excluded: frozenset) -> Scene:
    """Colour, shape, size and position uniform; background uniform among those of another colour."""
    for _ in range(10_000):
        colour = str(rng.choice(list(COLOURS)))
        background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
        scene = Scene(str(rng.choice(SHAPES)), colour, background, str(rng.choice(SIZES)),
                      str(rng.choice(list(POSITIONS))))
        if caption(scene) not in excluded:
            return scene
    raise ValueError("every scene is held out")


def _rows(n: int, seed: int, held_out: Iterable[str] = (), stream: int = 0):
    """(scene, Generator for its jitter) of rows 0..n-1; row i depends only on (seed, stream, i)."""
    excluded = frozenset(held_out)
    for i in range(n):
        rng = np.random.default_rng([int(seed), stream, i])
        yield _draw_scene(rng, excluded), rng


def sample_scenes(n: int, seed: int, held_out: Iterable[str] = ()) -> list[Scene]:
    """The scenes of rows 0..n-1 of `write_corpus(..., seed=seed, held_out=held_out)`."""
    return [scene for scene, _ in _rows(n, seed, held_out)]


def caption_vocab() -> list[str]:
    """A vocab.txt's tokens for a model that only ever reads captions: BERT's specials, then every
    character the captions use (one token each, as the WordPiece tokenizer splits CJK)."""
    chars = sorted({ch for scene in all_scenes() for ch in caption(scene)})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]


def hold_out_captions(count: int, seed: int) -> list[str]:
    """`count` whole captions chosen by `seed`, to leave out of a training corpus so evaluation can
    ask for scenes the model never saw (each attribute value still appears in other scenes)."""
    scenes = all_scenes()
    if not 0 <= count < len(scenes):
        raise ValueError(f"can hold out 0 to {len(scenes) - 1} captions, not {count}")
    order = np.random.default_rng([int(seed), 3]).permutation(len(scenes))[:count]
    return sorted(caption(scenes[i]) for i in order)


def hold_out(pairs: int, seed: int) -> list[str]:
    """Every caption of `pairs` (colour, shape) pairs chosen by `seed`: to leave out of a training
    corpus (`write_corpus(held_out=...)`) and test combinations the model never saw."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    if not 0 <= pairs < len(combos):
        raise ValueError(f"can hold out 0 to {len(combos) - 1} (colour, shape) pairs, not {pairs}")
    chosen = {combos[i] for i in np.random.default_rng([int(seed), 2]).permutation(len(combos))[:pairs]}
    return [caption(s) for s in all_scenes() if (s.colour, s.shape) in chosen]


def captions_for_eval(n: int, seed: int, held_out: Iterable[str] | None = None) -> list[str]:
    """n evaluation captions, drawn from a random stream apart from the training rows' (so no
    (scene, jitter) of a corpus recurs); with `held_out`, drawn from those captions only."""
    if held_out is None:
        return [caption(scene) for scene, _ in _rows(n, seed, stream=1)]
    pool = sorted(set(held_out))
    if not pool:
        raise ValueError("held_out is empty")
    return [pool[i] for i in np.random.default_rng([int(seed), 1]).integers(0, len(pool), n)]


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_corpus(output_dir: str, rows: int, shards: int = 1, size: int = 32, seed: int = 0,
                 held_out: Iterable[str] = (), storage_options: Storage | dict | None = None) -> list[str]:
    """Write `rows` rows as `shards` headerless TSV files `part-NNNNN.tsv` (idx, text, base64 PNG)
    under `output_dir` (local or fsspec URL); returns their paths. Same arguments, same bytes;
    row i shows `sample_scenes(rows, seed, held_out)[i]`."""
    if rows < 1 or shards < 1 or size < 8:
        raise ValueError(f"need rows >= 1, shards >= 1, size >= 8 (got {rows}, {shards}, {size})")
    shards = min(shards, rows)
    bounds = np.linspace(0, rows, shards + 1).round().astype(int)
    fs, root = as_storage(storage_options).fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    prefix = output_dir.split("://", 1)[0] + "://" if "://" in output_dir else ""
    paths, rows_iter = [], _rows(rows, seed, held_out)
    for k in range(shards):
        path = posixpath.join(root, f"part-{k:05d}.tsv")
        with fs.open(path, "wb") as f:
            for i in range(bounds[k], bounds[k + 1]):
                scene, rng = next(rows_iter)
                line = f"{seed}-{i:07d}\t{caption(scene)}\t{png_base64(render(scene, size, rng))}\n"
                f.write(line.encode("utf-8"))
        paths.append(prefix + path if prefix and not path.startswith(prefix) else path)
    return paths


# --- the judge -------------------------------------------------------------------------------

# Colour distances (0..255 RGB): a border pixel that matches the background; the furthest the
# measured background may be from the palette background it is named after; the least foreground
# contrast; the largest median distance of foreground pixels from their colour's blend line.
BORDER_MATCH, NAME_DISTANCE, MIN_CONTRAST, MAX_RESIDUAL = 48.0, 80.0, 60.0, 60.0
RAY_ANGLES, RAY_STEP = 120, 0.25
MIN_HARMONIC, MAX_ASYMMETRY = 0.055, 0.1
_FOLDS = {3: "三角形", 4: "正方形", 5: "星形"}


def as_pixels(image) -> np.ndarray:
    """PIL image, uint8 (H, W, 3), or float in [-1, 1] as (3, H, W) or (H, W, 3) -> float (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    x = np.asarray(image)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"expected an RGB image, got an array of shape {x.shape}")
    if x.shape[-1] != 3:
        x = np.moveaxis(x, 0, -1)
    if np.issubdtype(x.dtype, np.floating):
        return (np.clip(x.astype(np.float64), -1, 1) + 1) * 127.5
    return x.astype(np.float64)


def _spread(a: np.ndarray) -> np.ndarray:
    """Each cell's maximum over its 3x3 neighbourhood (8-connectivity)."""
    p, (h, w) = np.pad(a, 1), a.shape
    out = a.copy()
    for dy in range(3):
        for dx in range(3):
            np.maximum(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, largest first (label propagation in its bounding box)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    inside = mask[box]
    labels = np.where(inside, np.arange(1, inside.size + 1).reshape(inside.shape), 0)
    while not np.array_equal(grown := _spread(labels) * inside, labels):
        labels = grown
    ids, counts = np.unique(labels[inside], return_counts=True)
    parts = []
    for i in ids[np.argsort(-counts, kind="stable")]:
        parts.append(np.zeros_like(mask))
        parts[-1][box] = labels == i
    return parts


def _colour(pixels: np.ndarray, bg: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(palette name, measured colour) of foreground pixels: the colour whose blend line from the
    background passes closest to them (edge pixels are mixtures of the two)."""
    best, best_residual, best_t = None, np.inf, None
    for name, value in COLOURS.items():
        direction = np.array(value) - bg
        if np.linalg.norm(direction) < MIN_CONTRAST:
            continue
        t = np.clip((pixels - bg) @ direction / (direction @ direction), 0, 1.15)
        residual = np.median(np.linalg.norm(pixels - bg - t[:, None] * direction, axis=1))
        if residual < best_residual:
            best, best_residual, best_t = name, residual, t
    if best is None or best_residual > MAX_RESIDUAL:
        return None, np.median(pixels, axis=0)
    solid = pixels[best_t >= 0.8]
    return best, np.median(solid if len(solid) else pixels, axis=0)


def _look(pixels: np.ndarray) -> tuple[str | None, str | None, np.ndarray | None, int]:
    """(background, colour, foreground alpha, number of sizeable foreground regions)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - bg, axis=1) < BORDER_MATCH) < 0.6:
        return None, None, None, 0  # no uniform background: nothing to read
    background = min(BACKGROUNDS, key=lambda k: np.linalg.norm(bg - BACKGROUNDS[k]))
    background = background if np.linalg.norm(bg - BACKGROUNDS[background]) <= NAME_DISTANCE else None
    distance = np.linalg.norm(pixels - bg, axis=2)
    top = np.percentile(distance, 99)
    if top < MIN_CONTRAST:
        return background, None, None, 0
    parts = _components(distance > max(0.5 * top, BORDER_MATCH))
    main = parts[0]
    objects = 1 + sum(int(p.sum() > 0.25 * main.sum()) for p in parts[1:])
    colour, fg = _colour(pixels[main & (distance >= 0.75 * distance[main].max())], bg)
    direction = fg - bg
    alpha = np.clip((pixels - bg) @ direction / max(direction @ direction, 1.0), 0, 1)
    return background, colour, alpha * _spread(_spread(main)), objects


def _radii(alpha: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """Distance from (cy, cx) to the outline along RAY_ANGLES rays: the integral of alpha along each."""
    ys, xs = np.nonzero(alpha)
    theta = np.linspace(0, 2 * np.pi, RAY_ANGLES, endpoint=False)[:, None]
    t = np.arange(0, np.hypot(ys - cy, xs - cx).max() + 2, RAY_STEP)[None, :]
    padded = np.pad(alpha, 1)
    y = np.clip(cy + 1 + t * np.sin(theta), 0, padded.shape[0] - 1.001)
    x = np.clip(cx + 1 + t * np.cos(theta), 0, padded.shape[1] - 1.001)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0
    values = (padded[y0, x0] * (1 - fy) * (1 - fx) + padded[y0 + 1, x0] * fy * (1 - fx)
              + padded[y0, x0 + 1] * (1 - fy) * fx + padded[y0 + 1, x0 + 1] * fy * fx)
    return values.sum(axis=1) * RAY_STEP


def harmonics(radii: np.ndarray) -> np.ndarray:
    """Amplitude of harmonics 0..8 of a radius profile over its mean (entry 0 is 2)."""
    spectrum = np.abs(np.fft.rfft(radii)) / len(radii)
    return 2 * spectrum[:9] / max(spectrum[0], 1e-9)


def _shape(h: np.ndarray) -> str | None:
    """Circle (no 3-, 4- or 5-fold harmonic), else the one fold that stands out; None if lopsided."""
    if max(h[1], h[2]) > MAX_ASYMMETRY:
        return None
    folds = sorted(_FOLDS, key=lambda k: -h[k])
    if h[folds[0]] < MIN_HARMONIC:
        return "圆形"
    return _FOLDS[folds[0]] if h[folds[1]] < 0.5 * h[folds[0]] else None


def _area_factor(shape: str) -> float:
    """The shape's area over RADIUS squared, as `render` draws it without jitter."""
    c = CIRCUMRADIUS[shape]
    return {"圆形": np.pi, "正方形": 2 * c * c, "三角形": 3 * np.sqrt(3) / 4 * c * c,
            "星形": 5 * np.sin(np.radians(36)) * STAR_INNER * c * c}[shape]


def judge(image) -> Reading:
    """Read a picture's attributes from its pixels alone (see `as_pixels` for what it takes).

    Background: median of the outermost pixels (nothing is read unless 60% of them match it).
    Foreground: the largest 8-connected region far from it (a second sizeable region: no shape,
    size or position). Colour: the palette colour whose blend line from the background fits its
    pixels. Shape: harmonics of its radius around the centroid. Size: its area against the judged
    shape's area midway (geometrically) between the two sizes. Position: nearest to the centroid's x.
    """
    background, colour, alpha, objects = _look(as_pixels(image))
    if alpha is None or objects != 1 or alpha.sum() == 0:
        return Reading(background=background, colour=colour)
    ys, xs = np.indices(alpha.shape)
    total = alpha.sum()
    cy, cx = (alpha * ys).sum() / total, (alpha * xs).sum() / total
    shape = _shape(harmonics(_radii(alpha, cy, cx)))
    factor = _area_factor(shape) if shape else np.mean([_area_factor(s) for s in SHAPES])
    size = "大" if total / alpha.size > factor * RADIUS["大"] * RADIUS["小"] else "小"
    position = min(CENTRE_X, key=lambda p: abs(CENTRE_X[p] - (cx + 0.5) / alpha.shape[1]))
    return Reading(shape, colour, background, size, position)
