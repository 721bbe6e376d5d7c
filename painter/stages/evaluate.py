"""`painter evaluate`: score a model on the synthetic task, FID/IS against real images, VQGAN reconstruction.

What it measures (any combination, in one run):
1. **Caption accuracy.** `--captions N` held-out captions (`painter.synthetic.captions_for_eval`, a random
   stream apart from any training corpus' rows; with `--held-out FILE`, only the captions of
   (colour, shape) pairs `painter make-corpus --hold-out-pairs` kept out of training) are generated
   with `--model` and read back by the synthetic judge. Or `--generated PATH` scores images that exist
   already: a `painter generate` output table (its Delta table read through `deltalake`: the committed
   rows of `--generated-date`, default the latest date), one `run_date=D` folder of it, or TSV/Parquet
   files with a text and an image column (EasyNLP TSV `idx, text, base64` as `painter make-corpus` writes
   them, or EasyNLP's predict TSV with a list of base64 images per line, as `generate --tsv-output` and
   `painter easynlp` write them).
   The summary holds accuracy of all attributes, of colour and shape together and of each attribute,
   next to the chance levels of a blind guess.
2. **FID / IS.** `--feature-extractor FILE` (a torch.export `.pt2` or TorchScript file; see
   `painter.evaluate` for the contract, and for trust: loading it runs code from it) and `--reference
   PATH` (real images, TSV/Parquet): FID between the images of 1. and the reference; the Inception
   Score of both when the extractor gives logits.
3. **VQGAN reconstruction.** `--corpus PATH` (TSV/Parquet images): the model's VQGAN encodes and
   decodes them: L1, L2, PSNR and codebook usage.

Where it runs: in this process (a plain `Generator`, no actor pool: a few hundred images cost less
than starting and loading a pool of actors, and one generator keeps every image named by (seed, idx,
sample) as the generate job makes it). Inside `ray job submit` on a cluster whose driver has no GPU
but whose workers do, the whole evaluation runs as one Ray task with one GPU instead, so `--model`,
`--corpus`, `--reference`, `--feature-extractor` and `--output` must then be paths that worker can read
(`s3://`). Files are read row by row in this process; rows that cannot be used (bad image, missing
column) are counted, a few shown in the summary, all written to `<output>/rejected.parquet` when
`--output` is given, and `--max-error-rate` fails the run above that share. With `--output`, the
summary is also written there as `summary.json`, with a contact sheet of the judged images and their
verdicts (`contact_sheet.png`).
"""
from __future__ import annotations

import io
import json
import posixpath
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from painter import evaluate as ev
from painter import logs
from painter import synthetic
from painter.checkpoint import check_model_files, load_model, read_bytes
from painter.errors import InputError, check_error_rate
from painter.generator import GenerationConfig, Generator
from painter.io import output as out
from painter.io.output_table import OutputTable
from painter.io import sheet
from painter.io import tables
from painter.io.checks import check_inputs, check_output
from painter.io.easynlp_tsv import parse_images_cell
from painter.io.images import IMAGE_FORMATS, ImageRejected, fit_square, image_bytes, load_image, to_model_input
from painter.io.storage import Storage, as_storage
from painter.options import option
from painter.runtime import pick_device

STAGE = "evaluate"
BASE64_COLUMNS = ("imgbase64", "gen_imgbase64")
BINARY_COLUMNS = (*IMAGE_FORMATS, "image")
SHEET_COLUMNS = 8
EXAMPLES = 5


@dataclass(kw_only=True)
class Options:
    model: str | None = option(None, "model directory (local, s3:// or a zoo name): generates the caption "
                               "images, and its VQGAN reconstructs --corpus")
    captions: int = option(200, "synthetic captions to generate and judge (0: none)")
    caption_seed: int = option(0, "which evaluation captions (painter.synthetic.captions_for_eval)")
    held_out: str | None = option(None, "draw captions only from this file of captions kept out of training "
                                  "(<corpus>/_held_out.txt of a synthetic corpus made with held out pairs)")
    samples: int = option(1, "images per caption")
    seed: int = option(0, "sampling seed: the image of (seed, idx, sample) is always the same")
    temperature: float = option(1.0, "sampling temperature; 0 is greedy")
    top_k: int = option(100, "sample among the k likeliest codes; 0 turns top-k off")
    top_p: float | None = option(None, "nucleus sampling threshold in (0, 1]")
    guidance: float | None = option(None, "classifier-free guidance scale S (1: none; default: painter.generator."
                                          "DEFAULT_GUIDANCE for a model trained with caption dropout, else 1)")
    candidates: int = option(1, "images drawn per caption and sample; the best-scored one is judged")
    scorer: str | None = option(None, "image-text scorer file for --candidates (.pt2 / TorchScript; TRUSTED FILES "
                                      "ONLY) instead of the model's own caption-vs-null likelihood ratio")
    batch_size: int = option(64, "images per generator call, VQGAN pass and feature pass")
    micro_batch: int | None = option(None, "rows per model call, which images depend on (default: 8 on CPU, 64 on GPU)")
    device: str | None = option(None, "cpu or cuda (default: cuda when this process has one)")
    generated: list[str] = option([], "score existing images instead of generating: a generate output root, "
                                  "a run_date=D folder of it, or TSV/Parquet files with text and image columns")
    generated_date: str | None = option(None, "run_date of a generate output root to score (default: the latest committed)")
    generated_schema: str = option("idx:str:1,text:str:1,imgbase64:str:1", "TSV columns of --generated files")
    corpus: list[str] = option([], "TSV/Parquet images for the VQGAN reconstruction error and codebook usage")
    reference: list[str] = option([], "TSV/Parquet real images for FID (needs a feature extractor)")
    input_schema: str = option("idx:str:1,text:str:1,imgbase64:str:1", "TSV columns of --corpus and --reference")
    limit: int = option(10000, "use at most this many images of each of --generated, --corpus and --reference (0: all)")
    feature_extractor: str | None = option(None, "torch.export .pt2 or TorchScript feature network for FID/IS "
                                           "(TRUSTED FILES ONLY: loading it runs code from it)")
    feature_size: int | None = option(None, "image side the extractor takes, when the file does not declare it")
    is_splits: int = option(1, "splits for the Inception Score's standard deviation (10 in the usual protocol)")
    output: str | None = option(None, "folder for summary.json, contact_sheet.png and rejected.parquet")
    sheet_images: int = option(32, "judged images on the contact sheet")
    font: str | None = option(None, "caption font file (default: a CJK font found on the system)")
    max_error_rate: float = option(0.05, "fail the run above this share of unusable rows read from files")
    storage_options: str | None = option(None, "fsspec options as JSON (default: credentials from the environment)")


@dataclass
class Candidate:
    """One image to judge and compare: generated here or read from --generated."""
    idx: str
    sample: int
    text: str
    image: bytes


class Rejected:
    """Rows that could not be used, with where they came from and why."""

    def __init__(self):
        self.rows: list[tuple] = []  # (idx, source, row, reason)
        self.read = 0

    def add(self, idx, source, row, reason) -> None:
        self.rows.append((None if idx is None else str(idx), str(source), int(row or 0), str(reason)))

    def table(self) -> pa.Table:
        columns = list(zip(*self.rows)) if self.rows else [[], [], [], []]
        return tables.rejected_table(*map(list, columns), STAGE)

    def examples(self) -> list[str]:
        return [f"{source} row {row}: {reason}" for _, source, row, reason in self.rows[:EXAMPLES]]


def _say(message: str) -> None:
    logs.get("evaluate").info(message)


def check(options: Options) -> None:
    """InputError for options that cannot make a run, before anything is loaded."""
    o = options
    for name in ("captions", "limit", "sheet_images"):
        if getattr(o, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(o, name)}")
    for name in ("samples", "batch_size", "is_splits"):
        if getattr(o, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}")
    if o.micro_batch is not None and o.micro_batch < 1 or o.feature_size is not None and o.feature_size < 1:
        raise InputError("--micro-batch and --feature-size must be >= 1")
    generating = not o.generated and o.captions > 0
    if generating and not o.model:
        if not (o.corpus or o.reference or o.feature_extractor):
            raise InputError("nothing to evaluate: give --model (to generate and judge --captions images), "
                             "--generated PATH (images to judge), or --corpus with --model")
        if o.feature_extractor or o.reference:
            raise InputError("FID needs images to compare: --model to generate them, or --generated PATH")
    if o.corpus and not o.model:
        raise InputError("--corpus (VQGAN reconstruction) needs --model")
    if bool(o.feature_extractor) != bool(o.reference):
        raise InputError("FID needs both --feature-extractor and --reference")
    if o.feature_extractor and not o.generated and o.captions == 0:
        raise InputError("FID needs images to compare: --captions N with --model, or --generated PATH")
    if not (o.generated or (o.model and o.captions > 0) or o.corpus):
        raise InputError("nothing to evaluate: --captions is 0 and there is no --generated or --corpus")
    if o.top_p is not None and not 0 < o.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {o.top_p}")


# --- reading -------------------------------------------------------------------------------------


def _image_column(chunk: dict, is_text_file: bool) -> tuple[str | None, bool]:
    """(column, is_base64) of the first image column a chunk has; every column of a TSV is text."""
    for name in BASE64_COLUMNS + BINARY_COLUMNS:
        if name in chunk:
            return name, is_text_file or name in BASE64_COLUMNS
    return None, False


def _table_rows(paths: list[str], schema_spec: str, storage: Storage, need_text: bool, limit: int,
                rejected: Rejected) -> Iterator[tuple]:
    """(idx, text, source, row, image file bytes) of usable rows of TSV/Parquet files, at most `limit`
    (0: all); unusable rows go to `rejected`."""
    schema = tables.parse_schema(schema_spec)
    files = tables.expand_paths(paths, storage)
    kept = 0
    for path in files:
        parquet = tables.is_parquet(path)
        wanted = [c for c in schema if c.name == "text" and need_text] if parquet else schema
        for chunk in tables.iter_rows(path, wanted, storage):
            column, is_base64 = _image_column(chunk, not parquet)
            n = len(chunk[tables.ROW])
            idx = chunk.get("idx", [None] * n)
            texts = chunk.get("text", [None] * n)
            for i in range(n):
                if limit and kept >= limit:
                    return
                rejected.read += 1
                reason = chunk[tables.REASON][i]
                if reason is None and column is None:
                    reason = f"no image column (one of {', '.join(BASE64_COLUMNS + BINARY_COLUMNS)})"
                if reason is None and need_text and not str(texts[i] or "").strip():
                    reason = "empty text"
                images = []
                if reason is None:
                    try:
                        images = _cell_images(chunk[column][i], is_base64)
                    except ImageRejected as e:
                        reason = str(e)
                if reason is not None:
                    rejected.add(idx[i], chunk[tables.SOURCE][i], chunk[tables.ROW][i], reason)
                    continue
                for data in images:
                    kept += 1
                    yield idx[i], texts[i], chunk[tables.SOURCE][i], chunk[tables.ROW][i], data


def _cell_images(cell, is_base64: bool) -> list[bytes]:
    """The images of one cell: EasyNLP's predict output holds a list repr of base64 PNGs, others one image."""
    if is_base64 and isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            return parse_images_cell(cell)
        except ValueError as e:
            raise ImageRejected(str(e)) from None
    return [image_bytes(cell, is_base64)]


def _generate_output(paths: list[str], date: str | None, storage: Storage) -> tuple[str, str] | None:
    """(root, run date) when `paths` names a generate output table (its root, or one run_date=D folder of it)."""
    if len(paths) != 1:
        return None
    path = paths[0].rstrip("/")
    name = posixpath.basename(path)
    if name.startswith("run_date=") and OutputTable(posixpath.dirname(path), storage).exists():
        if date and date != name.split("=", 1)[1]:
            raise InputError(f"--generated {paths[0]} is run_date {name.split('=', 1)[1]}, but --generated-date is {date}")
        return posixpath.dirname(path), out.check_run_date(name.split("=", 1)[1])
    table = OutputTable(path, storage)
    if not table.exists():
        return None
    if date:
        return path, out.check_run_date(date)
    dates = table.run_dates()
    if not dates:
        raise InputError(f"--generated {path}: a generate output table with no committed run_date partition")
    return path, dates[-1]


def read_generated(options: Options, storage: Storage, rejected: Rejected) -> tuple[list[Candidate], dict]:
    """The images of --generated, at most --limit, and where they came from."""
    found = _generate_output(options.generated, options.generated_date, storage)
    candidates: list[Candidate] = []
    if found is None:
        for idx, text, _, row, data in _table_rows(options.generated, options.generated_schema, storage, True,
                                                   options.limit, rejected):
            candidates.append(Candidate(str(idx if idx is not None else row), 0, str(text), data))
        return candidates, {"source": "files", "paths": options.generated}
    root, date = found
    rows = OutputTable(root, storage).read(date, ["idx", "text", "sample", "image"]).sort_by(
        [("idx", "ascending"), ("sample", "ascending")])
    for number, r in enumerate(rows.to_pylist(), start=1):  # read through deltalake: committed rows only
        if options.limit and len(candidates) >= options.limit:
            break
        rejected.read += 1
        if not r["image"] or not str(r["text"] or "").strip():
            rejected.add(r["idx"], f"{root} run_date={date}", number, "no image" if not r["image"] else "empty text")
            continue
        candidates.append(Candidate(str(r["idx"]), int(r["sample"] or 0), str(r["text"]), bytes(r["image"])))
    if not candidates and not rejected.rows:
        raise InputError(f"--generated {root}: no committed images for run_date {date}")
    return candidates, {"source": "generate output", "root": root, "run_date": date}


def read_captions(options: Options, storage: Storage | dict) -> list[str]:
    held_out = None
    if options.held_out:
        try:
            with as_storage(storage).open(options.held_out, "r", encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except FileNotFoundError:
            raise InputError(f"--held-out {options.held_out}: no such file") from None
        held_out = [line for line in lines if line]
        for number, line in enumerate(lines, start=1):
            if line:
                try:
                    synthetic.parse_caption(line)
                except ValueError:
                    raise InputError(f"--held-out {options.held_out} line {number}: not a synthetic caption: {line[:40]!r}") from None
        if not held_out:
            raise InputError(f"--held-out {options.held_out}: no captions in the file")
    return synthetic.captions_for_eval(options.captions, options.caption_seed, held_out=held_out)


# --- the run -------------------------------------------------------------------------------------


def _generate(options: Options, model, device, storage: Storage) -> tuple[list[Candidate], dict]:
    captions = read_captions(options, storage)
    try:
        config = GenerationConfig(seed=options.seed, temperature=options.temperature, top_k=options.top_k or None,
                                  top_p=options.top_p, guidance=options.guidance, candidates=options.candidates,
                                  scorer=options.scorer)
        generator = Generator(model, config, device, micro_batch=options.micro_batch, storage=storage)
    except ValueError as e:
        raise InputError(str(e)) from None
    start = time.time()
    idxs, samples, images = ev.generate_images(
        generator, captions, options.samples, options.batch_size,
        progress=lambda done, total: _say(f"generated {done}/{total} images"))
    seconds = time.time() - start
    texts = [c for c in captions for _ in range(options.samples)]
    candidates = [Candidate(i, s, t, im) for i, s, t, im in zip(idxs, samples, texts, images)]
    return candidates, {"source": "model", "captions": len(captions), "caption_seed": options.caption_seed,
                        "held_out": options.held_out, "samples": options.samples, "seed": options.seed,
                        "temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                        "guidance": generator.guidance, "candidates": options.candidates,
                        "scorer": options.scorer, "micro_batch": generator.micro_batch, "generation_seconds": round(seconds, 3)}


class FeaturePass:
    """Features and logits of images given one by one (decoded PIL images), computed a batch at a time."""

    def __init__(self, extractor: ev.FeatureExtractor, batch_size: int):
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
                     source: str) -> tuple[list[tuple[Candidate, ev.Verdict]], int]:
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
            judged.append((c, ev.verdict(c.text, image)))
        except ValueError:
            not_captions += 1
        if number % 100 == 0:
            _say(f"judged {number}/{len(candidates)} images")
    return judged, not_captions


def sample_diversity(candidates: list[Candidate]) -> dict:
    """`painter.evaluate.diversity` of the samples of each caption (generated here: every image decodes)."""
    groups: dict[str, list] = {}
    for c in candidates:
        groups.setdefault(c.idx, []).append(load_image(c.image))
    return ev.diversity(groups.values()) | {"samples": max(len(g) for g in groups.values())}


def reference_features(options: Options, storage: Storage, extractor: ev.FeatureExtractor, rejected: Rejected):
    fp = FeaturePass(extractor, options.batch_size)
    for idx, _, source, row, data in _table_rows(options.reference, options.input_schema, storage, False,
                                                 options.limit, rejected):
        try:
            fp.add(load_image(data))
        except ImageRejected as e:
            rejected.add(idx, source, row, str(e))
    return fp.result()


def reconstruction(options: Options, storage: Storage, vqgan, rejected: Rejected) -> dict:
    size = vqgan.config.resolution
    meter = ev.ReconstructionMeter(vqgan.config.n_embed)
    batch: list[np.ndarray] = []
    for idx, _, source, row, data in _table_rows(options.corpus, options.input_schema, storage, False,
                                                 options.limit, rejected):
        try:
            batch.append(to_model_input(fit_square(load_image(data), size)))
        except ImageRejected as e:
            rejected.add(idx, source, row, str(e))
            continue
        if len(batch) >= options.batch_size:
            meter.update(vqgan, np.stack(batch))
            batch = []
    if batch:
        meter.update(vqgan, np.stack(batch))
    if not meter.values:
        raise InputError(f"--corpus {' '.join(options.corpus)}: no usable images")
    return meter.result() | {"image_size": size}


def _fid(cand: tuple, ref: tuple, extractor: ev.FeatureExtractor, options: Options) -> dict:
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
        result |= {"fid": ev.fid_from_features(cand_features, ref_features), "images": n1, "reference_images": n2,
                   "feature_dim": dim}
        if min(n1, n2) <= dim:
            result["note"] = (f"fewer images than feature dimensions ({min(n1, n2)} <= {dim}): the covariances are "
                              "singular and FID is biased upward; compare only runs with the same image counts")
    if cand_logits is not None and len(cand_logits) < options.is_splits:
        result["inception_score_note"] = f"fewer images ({len(cand_logits)}) than --is-splits {options.is_splits}"
    if cand_logits is not None and len(cand_logits) >= options.is_splits:
        mean, std = ev.inception_score(ev.softmax(cand_logits), options.is_splits)
        result["inception_score"] = {"mean": mean, "std": std, "splits": options.is_splits}
        if ref_logits is not None and len(ref_logits) >= options.is_splits:
            mean, std = ev.inception_score(ev.softmax(ref_logits), options.is_splits)
            result["reference_inception_score"] = {"mean": mean, "std": std, "splits": options.is_splits}
    return result


SHEET_MARKS = {"shape": "形", "colour": "色", "background": "背", "size": "大", "position": "位"}


def sheet_label(v: ev.Verdict) -> str:
    """'对' when every attribute is right, else '错' and one character per attribute missed
    (形 shape, 色 colour, 背 background, 大 size, 位 position)."""
    missed = "".join(SHEET_MARKS[a] for a in synthetic.ATTRIBUTES if not v.right[a])
    return "对" if not missed else f"错:{missed}"


def _sheet(judged: list[tuple[Candidate, ev.Verdict]], options: Options) -> tuple[bytes, dict]:
    """The first --sheet-images judged images: verdict and idx, the caption, then what the judge saw."""
    items = [sheet.SheetItem(c.image, f"{sheet_label(v)} {c.idx}", c.sample, f"{c.text} | 见: {v.seen_text()}")
             for c, v in judged[:options.sheet_images]]
    rows = [items[i:i + SHEET_COLUMNS] for i in range(0, len(items), SHEET_COLUMNS)]
    font = sheet.find_caption_font(options.font)
    return sheet.contact_sheet(rows, font, text_lines=4), {"caption_font": font.path, "caption_font_note": font.note}


def evaluate(options: Options) -> dict:
    """The whole evaluation in this process (see the module docstring); the run's summary."""
    check(options)
    storage = Storage.from_option(options.storage_options)
    device = pick_device(options.device)
    rejected = Rejected()
    started = time.time()
    summary: dict = {"device": str(device)}
    generating = not options.generated and options.captions > 0
    parts = tuple(p for p, needed in (("gpt", generating), ("vqgan", generating or bool(options.corpus))) if needed)
    model = None
    if parts:
        model = load_model(options.model, parts=parts, device=device, storage=storage)
        summary["model"] = model.fingerprint  # GPT and VQGAN, from config.json even when only the VQGAN is loaded
        summary["model_dir"] = options.model

    candidates: list[Candidate] = []
    if options.generated:
        candidates, where = read_generated(options, storage, rejected)
        _say(f"read {len(candidates)} images from {' '.join(options.generated)}")
    elif generating:
        candidates, where = _generate(options, model, device, storage)

    extractor = None
    if options.feature_extractor:
        extractor = ev.load_feature_extractor(read_bytes(options.feature_extractor, storage), options.feature_size, device,
                                              options.batch_size, source=options.feature_extractor)
    if candidates or options.generated:
        features = FeaturePass(extractor, options.batch_size) if extractor else None
        source = "generated here" if where["source"] == "model" else " ".join(options.generated)
        judged, not_captions = judge_candidates(candidates, features, rejected, source)
        accuracy = {"texts_not_captions": not_captions} | where
        if judged:
            accuracy = ev.summarize([v for _, v in judged]) | accuracy
        else:
            accuracy["note"] = "no image has a synthetic caption as its text: nothing to judge"
        summary["caption_accuracy"] = accuracy
        if options.samples > 1 and where["source"] == "model":
            summary["diversity"] = sample_diversity(candidates)
        if extractor:
            _say("computing reference features")
            ref = reference_features(options, storage, extractor, rejected)
            summary["fid"] = _fid(features.result(), ref, extractor, options)
        if options.output and judged and options.sheet_images:
            data, font = _sheet(judged, options)
            summary["contact_sheet"] = out.write_bytes(posixpath.join(options.output, "contact_sheet.png"), data, storage)
            summary |= font
    if options.corpus:
        _say("reconstructing --corpus with the VQGAN")
        summary["reconstruction"] = reconstruction(options, storage, model.vqgan, rejected)

    summary |= {"rows_read": rejected.read, "rows_rejected": len(rejected.rows), "rejected_examples": rejected.examples(),
                "evaluation_seconds": round(time.time() - started, 3)}
    if options.output:
        if rejected.rows:
            buffer = io.BytesIO()
            pq.write_table(rejected.table(), buffer)
            summary["errors"] = out.write_bytes(posixpath.join(options.output, "rejected.parquet"), buffer.getvalue(), storage)
        summary["summary_file"] = posixpath.join(options.output, "summary.json")
        out.write_bytes(summary["summary_file"], json.dumps(summary, ensure_ascii=False, indent=2, default=str).encode(), storage)
    check_error_rate(len(rejected.rows), rejected.read, options.max_error_rate, "; ".join(rejected.examples()),
                     summary)
    return summary


def _runs_on_gpu_worker(options: Options) -> bool:
    """True inside a Ray cluster whose workers have GPUs when this process has none (a job driver on a
    CPU head node) and no --device was forced."""
    if options.device is not None or torch.cuda.is_available():
        return False
    import ray

    from painter.stages.common import cluster_has_gpus
    return ray.is_initialized() and cluster_has_gpus()


def run_as_task(options: Options, resources: dict) -> dict:
    """`evaluate(options)` as one Ray task with `resources`; a PainterError raised there comes back as itself."""
    import ray

    from painter.stages.common import painter_error_from
    try:
        return ray.get(ray.remote(**resources)(evaluate).remote(options))
    except Exception as e:
        cause = painter_error_from(e)
        if cause is None:
            raise
        raise cause from None


def preflight(options: Options) -> None:
    """What can be checked before Ray starts: options, model files, input files, the output folder."""
    check(options)
    storage = Storage.from_option(options.storage_options)
    if options.model:
        generating = not options.generated and options.captions > 0
        check_model_files(options.model, parts=("gpt", "vqgan") if generating else ("vqgan",), storage=storage)
    for path in options.generated:  # a generate output root is a folder of data files and a log: only its presence
        fs, stripped = tables.url_to_fs(path, storage or None)
        if not any(ch in stripped for ch in "*?[") and not fs.exists(stripped):
            raise InputError(f"--generated {path}: no such file or directory")
    for option_name, paths in (("--corpus", options.corpus), ("--reference", options.reference)):
        if paths:
            check_inputs(option_name, paths, storage)
    check_output("--output", options.output, storage)


def run(options: Options) -> dict:
    check(options)
    if _runs_on_gpu_worker(options):
        _say("this process has no GPU but the cluster has: evaluating in a Ray task with one GPU")
        return run_as_task(options, {"num_gpus": 1}) | {"ran_on": "ray task (1 GPU)"}
    return evaluate(options) | {"ran_on": "this process"}
