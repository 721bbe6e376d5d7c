"""`painter demo`: the whole system end to end on the synthetic task, through the real Ray jobs.

corpus (Pillow scenes with Chinese captions, some captions held out) -> [train-vq] -> tokenize ->
train (a fresh GPT) -> generate (a contact sheet of held-out captions) -> evaluate (caption accuracy
by the pixel judge, with chance levels). Every step is the same job a user runs by hand, called
in-process on one Ray session; the summary names each step's output and the scores.

Without `--train-vq-steps` the demo reuses a VQGAN (the bundled model's by default) so it fits in a
few minutes on 2 cores; `make bundled-model` runs it with VQ training and more steps to make the
model that ships in the package.
"""
from __future__ import annotations

import os
import posixpath
import time

from painter.io.retries import fsspec_module

from painter import logs
from painter.evaluation import synthetic
from painter.checkpoint.model_dir import bundled_model_dir, new_model
from painter.errors import ErrorRateExceeded, InputError
from painter.io.storage import absolute
from painter.options.demo import Options
from painter.checkpoint.tokenizer import TextTokenizer

fsspec = fsspec_module()  # with painter's storage retries (painter.io.retries)

log = logs.get("demo")
SCORES = ("colour_shape", "colour", "shape", "background", "size", "position")


def _step(name: str, job, options, steps: dict) -> dict:
    """Run one job module's `run` in-process (as `painter <name>` would, in the Ray the CLI started) and keep
    its summary."""
    start = time.time()
    try:
        summary = job.run(options)
    except ErrorRateExceeded as e:
        steps[name] = {"seconds": round(time.time() - start, 1), **e.summary}
        raise InputError(f"demo step {name} failed: {e}") from None
    steps[name] = {"seconds": round(time.time() - start, 1), **summary}
    log.info(f"{name} done in {steps[name]['seconds']} s")
    return summary


def _threads(o: Options) -> int:
    """Torch threads per worker: this machine's cores shared evenly (the demo runs on a local Ray)."""
    return max(1, (os.cpu_count() or 1) // max(1, o.workers))


def _write_prompts(path: str, captions: list[str]) -> str:
    with fsspec.open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(captions):
            f.write(f"p{i:04d}\t{text}\n")
    return path


def _corpus(o: Options, out: str) -> tuple[str, str]:
    """The training corpus (held-out captions excluded) and the held-out caption file."""
    held_out = synthetic.hold_out_captions(o.hold_out, o.seed)
    corpus = posixpath.join(out, "corpus")
    synthetic.write_corpus(corpus, o.rows, shards=4, size=o.size, seed=o.seed, held_out=held_out)
    held_out_path = posixpath.join(corpus, "_held_out.txt")
    with fsspec.open(held_out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(held_out) + "\n")
    return corpus, held_out_path


def _vqgan_model(o: Options, out: str, corpus: str, steps: dict) -> str:
    """The model directory whose VQGAN tokenizes the corpus: trained now, given, or bundled."""
    if o.train_vq_steps <= 0:  # an absolute path: the Ray workers run in other folders
        return absolute(o.base_model) if o.base_model else bundled_model_dir()
    from painter.stages import train_vq

    vocab = posixpath.join(out, "caption_vocab.txt")
    TextTokenizer(synthetic.caption_vocab()).save(vocab)
    start = new_model(o.preset, posixpath.join(out, "vq-start"), seed=o.seed, vocab=vocab)
    vq_out = posixpath.join(out, "vq-model")
    _step("train-vq", train_vq, train_vq.Options(
        input=[corpus], model=start, output=vq_out, from_scratch=True, max_steps=o.train_vq_steps,
        workers=o.workers, micro_batch=max(8, 64 // o.workers), seed=o.seed, log_every=100,
        checkpoint_every=o.train_vq_steps, run_dir=posixpath.join(out, "runs"), name=f"vq-{int(time.time())}",
        threads_per_worker=_threads(o)), steps)
    return vq_out


def run(o: Options) -> dict:
    from painter.stages import evaluate, generate, tokenize, train

    if o.fine_tune and o.dropout:
        raise InputError("--dropout goes with a fresh GPT; --fine-tune keeps the base model's dropout")
    out = absolute(o.output)
    steps: dict = {}
    start = time.time()
    corpus, held_out = _corpus(o, out)
    log.info(f"corpus: {o.rows} images in {corpus}, {o.hold_out} captions held out")
    base = _vqgan_model(o, out, corpus, steps)
    tokens, model = posixpath.join(out, "tokens"), posixpath.join(out, "model")
    _step("tokenize", tokenize, tokenize.Options(input=[corpus], model=base, output=tokens, overwrite=True), steps)
    init = {"init": base} if o.fine_tune else {"preset": o.preset, "vqgan": base, "dropout": o.dropout}
    _step("train", train, train.Options(
        data=[tokens], **init, output=model, run_dir=posixpath.join(out, "runs"),
        name=f"demo-{int(time.time())}", workers=o.workers, max_steps=o.steps, micro_batch=o.micro_batch,
        lr=o.lr, warmup_steps=min(100, o.steps // 10), checkpoint_every=max(o.steps, 1),
        null_caption_prob=o.null_caption_prob, log_every=100, seed=o.seed, threads_per_worker=_threads(o)), steps)
    prompts = _write_prompts(posixpath.join(out, "prompts.tsv"), synthetic.captions_for_eval(16, o.seed + 1, held_out=_lines(held_out)))
    _step("generate", generate, generate.Options(input=[prompts], model=model, output=posixpath.join(out, "generated"),
                                       samples=1 if o.top_k == 1 else 2, top_k=o.top_k, seed=o.seed,
                                       guidance=o.guidance, candidates=o.candidates, gallery=True), steps)
    evaluation = _step("evaluate", evaluate, evaluate.Options(model=model, captions=o.captions, held_out=held_out,
                                                top_k=o.top_k, seed=o.seed, guidance=o.guidance,
                                                candidates=o.candidates, output=posixpath.join(out, "eval")), steps)
    scores = evaluation.get("caption_accuracy", {})
    summary = {
        "model": model, "contact_sheet": steps["generate"].get("contact_sheet"), "gallery": steps["generate"].get("gallery"),
        "evaluation_sheet": evaluation.get("contact_sheet"), "loss_curve": steps["train"].get("loss_curve"),
        "caption_accuracy": {k: scores.get(k) for k in ("n", "colour_shape", "all", "shape", "colour",
                                                         "background", "size", "position")},
        "chance": scores.get("chance"), "final_loss": steps["train"].get("final_loss"),
        "seconds_by_step": {name: step["seconds"] for name, step in steps.items()},
        "demo_seconds": round(time.time() - start, 1),
    }
    report(summary)
    return summary


def report(summary: dict) -> None:
    """The human-readable result before the JSON line: scores against chance, where the pictures are."""
    scores, chance = summary["caption_accuracy"], summary.get("chance") or {}
    log.info(f"caption accuracy on {scores.get('n')} held-out captions (chance in brackets):")
    for name in SCORES:
        if scores.get(name) is not None:
            log.info(f"  {name:<13} {scores[name]:.3f}  ({chance.get(name, float('nan')):.3f})")
    for name in ("contact_sheet", "gallery", "evaluation_sheet", "loss_curve"):
        if summary.get(name):
            log.info(f"{name.replace('_', ' ')}: {summary[name]}")
    log.info(f"done in {summary['demo_seconds']} s ({', '.join(f'{k} {v} s' for k, v in summary['seconds_by_step'].items())})")


def _lines(path: str) -> list[str]:
    with fsspec.open(path, "r", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
