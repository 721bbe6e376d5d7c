"""Train step time: token shards kept in worker memory (read by the worker itself) vs streamed through Ray
Data's iterator.

One real Ray Train worker (the train job's `GPTRun`: the demo's GPT, batch, lr, every core as torch
threads) holds both data paths of `painter.stages.train_worker.GPTRun.host_batches` open on the same token shards
and alternates them step by step, so both see the same machine load: each timed step is `next(batches)`
plus `train_step`. The streamed side's prefetch threads keep running while the memory side computes,
so its cost is partly charged to the memory side: the ratio errs on the low side. Prints one JSON
object with the median seconds per step of both sides, their ratio and the data wait of each:

    python benchmarks/train_data.py --rows 6000 --steps 40          # makes and tokenizes a corpus first
    python benchmarks/train_data.py --tokens DIR --steps 40         # or reuses token shards
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/: an uninstalled checkout works

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from painter.checkpoint.model_dir import bundled_model_dir  # noqa: E402
from painter.cli.main import init_ray, run_command  # noqa: E402


def alternate(loop_config: dict) -> None:
    """The worker: both data paths open on one shard, one timed step of each in turn (`total_steps` of each)."""
    import dataclasses

    import ray.train

    from painter.stages.train_worker import GPTRun
    from painter.training.gpt import train_step

    run = GPTRun(loop_config["config"])
    steps = run.cfg.total_steps
    shard = ray.train.get_dataset_shard("train")
    paths, times, waits = {}, {"stream": [], "memory": []}, {"stream": [], "memory": []}
    for side in ("stream", "memory"):  # the first batch of each is untimed (pipeline start, loading the split)
        run.cfg = dataclasses.replace(run.cfg, in_memory=side == "memory")
        paths[side] = run.host_batches(shard, 0, skip=0)
        next(paths[side])
    for step in range(steps):
        for side, batches in paths.items():
            start = time.perf_counter()
            batch = next(batches)
            waited = time.perf_counter()
            train_step(run.model, run.optimizer, [batch], run.tc, step, run.config.gpt.img_vocab_size, run.generator)
            times[side].append(time.perf_counter() - start)
            waits[side].append(waited - start)
    with tempfile.TemporaryDirectory() as tmp:
        open(os.path.join(tmp, "done"), "w").close()
        ray.train.report({"times": times, "waits": waits}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def tokens_for(rows: int, work: str) -> str:
    from painter.stages import make_corpus, tokenize

    corpus, tokens = os.path.join(work, "corpus"), os.path.join(work, "tokens")
    run_command("make-corpus", make_corpus.Options(output=corpus, rows=rows, size=32))
    run_command("tokenize", tokenize.Options(input=[corpus], model=bundled_model_dir(), output=tokens))
    return tokens


def main(argv: list[str] | None = None) -> None:
    from painter.stages import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="token shards to reuse (default: make and tokenize --rows)")
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--steps", type=int, default=40, help="timed steps per side (fewer than an epoch)")
    p.add_argument("--micro-batch", type=int, default=64)
    a = p.parse_args(argv)
    init_ray()
    work = tempfile.mkdtemp(prefix="painter-bench-train-data-")
    tokens = a.tokens or tokens_for(a.rows, work)
    o = train.Options(data=[tokens], preset="demo", vqgan=bundled_model_dir(), output=os.path.join(work, "model"),
                      name="alternate", micro_batch=a.micro_batch, lr=5e-3, warmup_steps=10, max_steps=a.steps,
                      threads_per_worker=os.cpu_count())
    start = train.resolve_start(o)
    files = train.list_shards(o.data)
    rows = train.check_shards(files, start.shard_info)
    datasets = {"train": train.shard_dataset(files)}
    steps_per_epoch, total = train.plan_steps(rows, o)
    if a.steps + 1 > steps_per_epoch:
        raise SystemExit(f"--steps {a.steps} must be under an epoch ({steps_per_epoch} steps of {rows} rows)")
    config = train.worker_config(o, start, os.path.join(work, "runs", o.name), steps_per_epoch, total, files)
    config = dataclasses.replace(config, train_files=tuple(files))  # the memory side reads them itself
    result = train.fit(alternate, config, datasets, train.scaling_config(o), o, os.path.join(work, "runs"),
                       stage="train")
    times, waits = result.metrics["times"], result.metrics["waits"]
    stream, memory = statistics.median(times["stream"]), statistics.median(times["memory"])
    print(json.dumps({"rows": rows, "steps_per_side": a.steps, "micro_batch": a.micro_batch, "cpus": os.cpu_count(),
                      "stream_s_per_step": round(stream, 4), "memory_s_per_step": round(memory, 4),
                      "speedup": round(stream / memory, 3),
                      "stream_wait_s": round(statistics.median(waits["stream"]), 4),
                      "memory_wait_s": round(statistics.median(waits["memory"]), 4),
                      "stream_mean_s": round(statistics.mean(times["stream"]), 4),
                      "memory_mean_s": round(statistics.mean(times["memory"]), 4)}), flush=True)


if __name__ == "__main__":
    main()
