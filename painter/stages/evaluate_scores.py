"""What `painter evaluate` computes from the images it has: the synthetic judge's verdicts, the samples'
diversity, FID/IS features of both sides, VQGAN reconstruction of `--corpus`, and the contact sheet of
verdicts. The metrics themselves are `painter.evaluation.metrics`, `painter.evaluation.judge` and `painter.evaluation.reconstruction` (no
I/O); this wires them to the rows read.
"""
from __future__ import annotations

import numpy as np

from painter.evaluation import judge, metrics
from painter import logs
from painter.evaluation import synthetic
from painter.errors import InputError
from painter.io import sheet
from painter.io.images import ImageRejected, fit_square, load_image, to_model_input
from painter.io.storage import Storage
from painter.evaluation.reconstruction import ReconstructionMeter
from painter.stages.evaluate_inputs import Candidate, Rejected, table_rows

log = logs.get("evaluate")

SHEET_COLUMNS = 8


class FeaturePass:
    """Features and logits of images given one by one (decoded PIL images), computed a batch at a time."""

    def __init__(self, extractor: metrics.FeatureExtractor, batch_size: int):
        self.extractor, self.batch_size = extractor, batch_size
        self.pending: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.logits: list[np.ndarray] = []

    def add(self, image) -> None:
        self.pending.append(to_model_input(fit_square(image, self.extractor.size)))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        features, logits = self.extractor(np.stack(self.pending))
        self.pending = []
        if features is not None:
            self.features.append(features)
        if logits is not None:
            self.logits.append(logits)

    def result(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        self.flush()
        return (np.concatenate(self.features) if self.features else None,
                np.concatenate(self.logits) if self.logits else None)


def judge_candidates(candidates: list[Candidate], features: FeaturePass | None, rejected: Rejected,
                     source: str) -> tuple[list[tuple[Candidate, judge.Verdict]], int]:
    """Decode each image once: judge it against its caption (when the text is one) and feed the
    feature pass. Returns the judged (candidate, verdict) pairs and how many texts were not captions."""
    judged, not_captions = [], 0
    for number, c in enumerate(candidates, start=1):
        try:
            image = load_image(c.image)
        except ImageRejected as e:
            rejected.add(c.idx, source, number, str(e))
            continue
        if features is not None:
            features.add(image)
        try:
            judged.append((c, judge.verdict(c.text, image)))
        except ValueError:
            not_captions += 1
        if number % 100 == 0:
            log.info(f"judged {number}/{len(candidates)} images")
    return judged, not_captions


def sample_diversity(candidates: list[Candidate]) -> dict:
    """`painter.evaluation.metrics.diversity` of the samples of each caption (generated here: every image decodes)."""
    groups: dict[str, list] = {}
    for c in candidates:
        groups.setdefault(c.idx, []).append(load_image(c.image))
    return metrics.diversity(groups.values()) | {"samples": max(len(g) for g in groups.values())}


def reference_features(options, storage: Storage, extractor: metrics.FeatureExtractor, rejected: Rejected):
    fp = FeaturePass(extractor, options.micro_batch)
    for idx, _, source, row, data in table_rows(options.reference, options.input_schema, storage, False,
                                                 options.limit, rejected, options.columns):
        try:
            fp.add(load_image(data))
        except ImageRejected as e:
            rejected.add(idx, source, row, str(e))
    return fp.result()


def reconstruction(options, storage: Storage, vqgan, rejected: Rejected) -> dict:
    size = vqgan.config.resolution
    meter = ReconstructionMeter(vqgan.config.n_embed)
    batch: list[np.ndarray] = []
    for idx, _, source, row, data in table_rows(options.corpus, options.input_schema, storage, False,
                                                 options.limit, rejected, options.columns):
        try:
            batch.append(to_model_input(fit_square(load_image(data), size)))
        except ImageRejected as e:
            rejected.add(idx, source, row, str(e))
            continue
        if len(batch) >= options.micro_batch:
            meter.update(vqgan, np.stack(batch))
            batch = []
    if batch:
        meter.update(vqgan, np.stack(batch))
    if not meter.values:
        raise InputError(f"--corpus {' '.join(options.corpus)}: no usable images")
    return meter.result() | {"image_size": size}


def fid_summary(cand: tuple, ref: tuple, extractor: metrics.FeatureExtractor, options) -> dict:
    (cand_features, cand_logits), (ref_features, ref_logits) = cand, ref
    result = {"extractor": options.feature_extractor, "feature_size": extractor.size}
    if cand_features is None and cand_logits is None:
        raise InputError("FID/IS: none of the images to compare could be used")
    if (ref_features is None) != (cand_features is None):
        raise InputError(f"FID: no usable images in --reference {' '.join(options.reference)}")
    if cand_features is not None:
        n1, n2, dim = len(cand_features), len(ref_features), cand_features.shape[1]
        if min(n1, n2) < 2:
            raise InputError(f"FID needs at least 2 usable images on each side (images {n1}, reference {n2})")
        if ref_features.shape[1] != dim:
            raise InputError("the extractor gave features of different sizes for the two sets")
        result |= {"fid": metrics.fid_from_features(cand_features, ref_features), "images": n1, "reference_images": n2,
                   "feature_dim": dim}
        if min(n1, n2) <= dim:
            result["note"] = (f"fewer images than feature dimensions ({min(n1, n2)} <= {dim}): the covariances are "
                              "singular and FID is biased upward; compare only runs with the same image counts")
    if cand_logits is not None and len(cand_logits) < options.is_splits:
        result["inception_score_note"] = f"fewer images ({len(cand_logits)}) than --is-splits {options.is_splits}"
    if cand_logits is not None and len(cand_logits) >= options.is_splits:
        mean, std = metrics.inception_score(metrics.softmax(cand_logits), options.is_splits)
        result["inception_score"] = {"mean": mean, "std": std, "splits": options.is_splits}
        if ref_logits is not None and len(ref_logits) >= options.is_splits:
            mean, std = metrics.inception_score(metrics.softmax(ref_logits), options.is_splits)
            result["reference_inception_score"] = {"mean": mean, "std": std, "splits": options.is_splits}
    return result


SHEET_MARKS = {"shape": "形", "colour": "色", "background": "背", "size": "大", "position": "位"}


def sheet_label(v: judge.Verdict) -> str:
    """'对' when every attribute is right, else '错' and one character per attribute missed
    (形 shape, 色 colour, 背 background, 大 size, 位 position)."""
    missed = "".join(SHEET_MARKS[a] for a in synthetic.ATTRIBUTES if not v.right[a])
    return "对" if not missed else f"错:{missed}"


def verdict_sheet(judged: list[tuple[Candidate, judge.Verdict]], options) -> tuple[bytes, dict]:
    """The first --sheet-images judged images: verdict and idx, the caption, then what the judge saw."""
    items = [sheet.SheetItem(c.image, f"{sheet_label(v)} {c.idx}", c.sample, f"{c.text} | 见: {v.seen_text()}")
             for c, v in judged[:options.sheet_images]]
    rows = [items[i:i + SHEET_COLUMNS] for i in range(0, len(items), SHEET_COLUMNS)]
    font = sheet.find_caption_font(options.font)
    return sheet.contact_sheet(rows, font, text_lines=4), {"caption_font": font.path, "caption_font_note": font.note}
