"""The synthetic judge: caption accuracy of images generated for synthetic captions.

Images are read back by `painter.evaluation.synthetic.judge`; the summary (`score`, `summarize`) holds the accuracy of
all attributes, of colour and shape together, of each attribute, `unread`, and the `chance` levels, plus
one `Verdict` per image for contact sheets. `caption_accuracy(model, captions)` generates and judges in
one call, as the demo and the tests use it. No Ray, no I/O.
"""
from __future__ import annotations

import collections
import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Sequence

import numpy as np

from painter.evaluation import synthetic


@dataclass(frozen=True)
class Verdict:
    """How one image fared: what its caption asked for, what the judge saw, which attributes match."""
    text: str
    wanted: synthetic.Scene
    seen: synthetic.Reading
    right: dict  # attribute -> bool

    @property
    def all(self) -> bool:
        return all(self.right.values())

    @property
    def colour_shape(self) -> bool:
        return self.right["colour"] and self.right["shape"]

    def label(self) -> str:
        """'ok' or the attributes missed, e.g. 'miss: shape, colour'."""
        missed = [a for a in synthetic.ATTRIBUTES if not self.right[a]]
        return "ok" if not missed else "miss: " + ", ".join(missed)

    def seen_text(self) -> str:
        """The reading written like a caption, '?' where nothing was seen."""
        s = self.seen
        position = synthetic.POSITIONS.get(s.position, "?") if s.position else "?"
        return (f"{s.background or '?'}色背景{position}的{s.size or '?'}的{s.colour or '?'}色{s.shape or '?'}")


def verdict(text: str, image) -> Verdict:
    """Judge one image (PIL image, uint8 array or encoded bytes) against its synthetic caption;
    ValueError for a text that is not a caption."""
    wanted = synthetic.parse_caption(text)
    if isinstance(image, (bytes, bytearray, memoryview)):
        from PIL import Image
        image = Image.open(io.BytesIO(bytes(image))).convert("RGB")
    seen = synthetic.judge(image)
    return Verdict(text, wanted, seen, {a: getattr(wanted, a) == getattr(seen, a) for a in synthetic.ATTRIBUTES})


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """The keys of `score` for judged images: n, all, colour_shape, each attribute,
    unread (share with no shape read) and chance (the best blind guess's accuracies)."""
    if not verdicts:
        raise ValueError("no judged images")
    summary = {"n": len(verdicts), "all": float(np.mean([v.all for v in verdicts])),
               "colour_shape": float(np.mean([v.colour_shape for v in verdicts]))}
    summary.update({a: float(np.mean([v.right[a] for v in verdicts])) for a in synthetic.ATTRIBUTES})
    summary["unread"] = float(np.mean([v.seen.shape is None for v in verdicts]))
    summary["chance"] = chance_levels()
    return summary


def chance_levels() -> dict[str, float]:
    """Accuracy of the best guess made without looking, under `sample_scenes`' distribution
    (colour, shape, size, position uniform; background uniform among those of another colour)."""
    blind = len(synthetic.COLOURS) * len(synthetic.SHAPES) * len(synthetic.SIZES) * len(synthetic.POSITIONS)
    backgrounds = synthetic.BACKGROUNDS
    prob = {s: Fraction(1, blind * (len(backgrounds) - (s.colour in backgrounds))) for s in synthetic.all_scenes()}
    keys = {a: (lambda s, a=a: getattr(s, a)) for a in synthetic.ATTRIBUTES}
    keys.update({"colour_shape": lambda s: (s.colour, s.shape), "all": lambda s: s})
    marginals = {name: collections.Counter() for name in keys}
    for scene, p in prob.items():
        for name, key in keys.items():
            marginals[name][key(scene)] += p
    return {name: float(max(m.values())) for name, m in marginals.items()}


def judge_images(texts: Sequence[str], images: Iterable) -> tuple[dict, list[Verdict]]:
    """The accuracy summary of `images` against captions `texts` (`summarize`; each image judged once) and
    one `Verdict` per image. Images: PIL images, uint8 arrays or encoded bytes."""
    texts, images = list(texts), list(images)
    if len(texts) != len(images) or not texts:
        raise ValueError(f"need one image per text, at least one (got {len(texts)} texts, {len(images)} images)")
    verdicts = [verdict(t, im) for t, im in zip(texts, images)]
    return summarize(verdicts), verdicts


def score(texts: Sequence[str], images: Iterable) -> dict:
    """The accuracies of `images` against their captions `texts` (`judge_images`' summary): of all
    attributes, of colour and shape together, of each; `unread`; `chance`. ValueError on a text that is
    not a caption or counts that differ."""
    return judge_images(texts, images)[0]


def eval_idx(i: int) -> str:
    """The idx of evaluation row i: with the seed and sample, it fixes the image (`painter.inference.sampling`)."""
    return f"eval-{i:06d}"


def generate_images(generator, captions: Sequence[str], samples: int = 1, batch_size: int = 64,
                    progress: Callable[[int, int], None] | None = None) -> tuple[list[str], list[int], list[bytes]]:
    """(idx, sample, encoded image) of `samples` images per caption, made by a `painter.inference.generator.Generator`;
    caption i is row `eval_idx(i)`, rows in caption-major order."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1 (got {samples}, {batch_size})")
    rows = [(eval_idx(i), s, text) for i, text in enumerate(captions) for s in range(samples)]
    images: list[bytes] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        encoded = generator.images([r[2] for r in chunk], [r[0] for r in chunk], [r[1] for r in chunk])[0]
        images.extend(encoded)
        if progress:
            progress(len(images), len(rows))
    return [r[0] for r in rows], [r[1] for r in rows], images


def make_generator(model_or_generator, seed: int = 0, *, device=None, micro_batch: int | None = None, **generation):
    """A `Generator` with this generation config (`GenerationConfig` fields: temperature, top_k, top_p,
    guidance, candidates, ...): from a model directory (loaded here), a `LoadedModel`, or a `Generator`
    (its loaded model, device and micro-batch are reused; its generation config is not)."""
    from painter.inference.generator import GenerationConfig, Generator

    config = GenerationConfig(seed=seed, **generation)
    if isinstance(model_or_generator, Generator):
        g = model_or_generator
        return Generator(g.model, config, g.device, micro_batch=micro_batch or g.micro_batch)
    return Generator(model_or_generator, config, device, micro_batch=micro_batch)


def caption_accuracy(model_or_generator, captions: Sequence[str], seed: int = 0, samples: int = 1, *,
                     device=None, micro_batch: int | None = None, batch_size: int = 64, **generation) -> dict:
    """Generate `samples` images per synthetic caption and judge them: `judge_images`' summary plus
    `samples`. `model_or_generator` and `generation` (temperature, top_k, guidance, ...) as `make_generator`
    takes them."""
    generator = make_generator(model_or_generator, seed, device=device, micro_batch=micro_batch, **generation)
    _, _, images = generate_images(generator, captions, samples, batch_size)
    summary, _ = judge_images([c for c in captions for _ in range(samples)], images)
    return summary | {"samples": samples}
