"""`painter evaluate`: score a model on the synthetic task, FID/IS against real images, VQGAN reconstruction.

What it measures (any combination, in one run):
1. **Caption accuracy.** `--captions N` held-out captions (`painter.evaluation.synthetic.captions_for_eval`, a random
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

This module owns the options and the run; what is read is `painter.stages.evaluate_inputs`, what is
computed from it `painter.stages.evaluate_scores`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import posixpath
import time

import pyarrow.parquet as pq
import torch

from painter import logs
from painter.evaluation import judge, metrics
from painter.checkpoint.model_dir import check_model_files, load_model, read_bytes
from painter.errors import InputError, check_error_rate
from painter.inference.generator import GenerationConfig, Generator, default_micro_batch
from painter.io import output as out
from painter.io import tables
from painter.io import columns as column_map
from painter.io.checks import check_inputs, check_output
from painter.io.storage import Storage
from painter.options.evaluate import Options
from painter.runtime import pick_device
from painter.stages.evaluate_inputs import Candidate, Rejected, read_captions, read_generated
from painter.stages.evaluate_scores import (FeaturePass, fid_summary, judge_candidates, reconstruction,
                                            reference_features, sample_diversity, sheet_label, verdict_sheet)

log = logs.get("evaluate")

__all__ = ["Options", "check", "evaluate", "preflight", "read_captions", "run", "run_as_task", "sheet_label"]


def check(options: Options) -> None:
    """InputError for options that cannot make a run, before anything is loaded."""
    o = options
    for name in ("captions", "limit", "sheet_images"):
        if getattr(o, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(o, name)}")
    for name in ("samples", "is_splits"):
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
    idxs, samples, images = judge.generate_images(  # 4 micro-batches a generator call, as generate's default batch
        generator, captions, options.samples, 4 * generator.micro_batch,
        progress=lambda done, total: log.info(f"generated {done}/{total} images"))
    seconds = time.time() - start
    texts = [c for c in captions for _ in range(options.samples)]
    candidates = [Candidate(i, s, t, im) for i, s, t, im in zip(idxs, samples, texts, images)]
    return candidates, {"source": "model", "captions": len(captions), "caption_seed": options.caption_seed,
                        "held_out": options.held_out, "samples": options.samples, "seed": options.seed,
                        "temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                        "guidance": generator.guidance, "candidates": options.candidates,
                        "scorer": options.scorer, "micro_batch": generator.micro_batch, "generation_seconds": round(seconds, 3)}


def evaluate(options: Options) -> dict:
    """The whole evaluation in this process (see the module docstring); the run's summary."""
    check(options)
    storage = Storage.from_option(options.storage_options)
    device = pick_device(options.device)
    # the size of every model call (the GPT's, the VQGAN's, the feature network's): the generator's default
    options = dataclasses.replace(options, micro_batch=options.micro_batch or default_micro_batch(device))
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
    if options.generated:
        candidates, where = read_generated(options, storage, rejected)
        log.info(f"read {len(candidates)} images from {' '.join(options.generated)}")
        summary |= _judge(options, storage, device, candidates, where, rejected)
    elif generating:
        summary |= _judge(options, storage, device, *_generate(options, model, device, storage), rejected)
    if options.corpus:
        log.info("reconstructing --corpus with the VQGAN")
        summary["reconstruction"] = reconstruction(options, storage, model.vqgan, rejected)
    summary |= {"rows_read": rejected.read, "rows_rejected": len(rejected.rows), "rejected_examples": rejected.examples(),
                "evaluation_seconds": round(time.time() - started, 3)}
    if options.output:
        summary |= _write(options, storage, summary, rejected)
    check_error_rate(len(rejected.rows), rejected.read, options.max_error_rate, "; ".join(rejected.examples()),
                     summary)
    return summary


def _judge(options: Options, storage: Storage, device, candidates: list[Candidate], where: dict,
           rejected: Rejected) -> dict:
    """Caption accuracy (and diversity, FID/IS and the contact sheet where asked) of `candidates`."""
    extractor = None
    if options.feature_extractor:
        extractor = metrics.load_feature_extractor(read_bytes(options.feature_extractor, storage), options.feature_size, device,
                                              options.micro_batch, source=options.feature_extractor)
    features = FeaturePass(extractor, options.micro_batch) if extractor else None
    source = "generated here" if where["source"] == "model" else " ".join(options.generated)
    judged, not_captions = judge_candidates(candidates, features, rejected, source)
    accuracy = {"texts_not_captions": not_captions} | where
    if judged:
        accuracy = judge.summarize([v for _, v in judged]) | accuracy
    else:
        accuracy["note"] = "no image has a synthetic caption as its text: nothing to judge"
    result: dict = {"caption_accuracy": accuracy}
    if options.samples > 1 and where["source"] == "model":
        result["diversity"] = sample_diversity(candidates)
    if extractor:
        log.info("computing reference features")
        ref = reference_features(options, storage, extractor, rejected)
        result["fid"] = fid_summary(features.result(), ref, extractor, options)
    if options.output and judged and options.sheet_images:
        data, font = verdict_sheet(judged, options)
        result["contact_sheet"] = out.write_bytes(posixpath.join(options.output, "contact_sheet.png"), data, storage)
        result |= font
    return result


def _write(options: Options, storage: Storage, summary: dict, rejected: Rejected) -> dict:
    """rejected.parquet (when rows were) and summary.json under --output; where they went."""
    written = {}
    if rejected.rows:
        buffer = io.BytesIO()
        pq.write_table(rejected.table(), buffer)
        written["errors"] = out.write_bytes(posixpath.join(options.output, "rejected.parquet"), buffer.getvalue(), storage)
    written["summary_file"] = posixpath.join(options.output, "summary.json")
    everything = summary | written
    out.write_bytes(written["summary_file"], json.dumps(everything, ensure_ascii=False, indent=2, default=str).encode(),
                    storage)
    return written


def _runs_on_gpu_worker(options: Options) -> bool:
    """True inside a Ray cluster whose workers have GPUs when this process has none (a job driver on a
    CPU head node) and no --device was forced."""
    if options.device is not None or torch.cuda.is_available():
        return False
    import ray

    from painter.stages.resources import cluster_has_gpus
    return ray.is_initialized() and cluster_has_gpus()


def run_as_task(options: Options, resources: dict) -> dict:
    """`evaluate(options)` as one Ray task with `resources`; a PainterError raised there comes back as itself."""
    import ray

    from painter.stages.ray_errors import painter_errors

    with painter_errors():
        return ray.get(ray.remote(**resources)(evaluate).remote(options))


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
            check_inputs(option_name, paths, storage, columns=column_map.parse(options.columns))
    check_output("--output", options.output, storage)


def run(options: Options) -> dict:
    check(options)
    if _runs_on_gpu_worker(options):
        log.info("this process has no GPU but the cluster has: evaluating in a Ray task with one GPU")
        return run_as_task(options, {"num_gpus": 1}) | {"ran_on": "ray task (1 GPU)"}
    return evaluate(options) | {"ran_on": "this process"}
