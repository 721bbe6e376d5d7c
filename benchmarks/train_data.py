"""Train step time: token shards kept in worker memory vs streamed through Ray Data's iterator.

Both sides are the real `painter train` job (Ray Train, one worker with every core as torch threads,
the demo's GPT and batch) on the same synthetic token shards, in one process on one Ray session, run
alternately (`--repeats` pairs) so they share the machine's load. A step's time is taken from the run's
own metrics.jsonl (wall time between the logged steps after the first `--warmup` steps), so Ray
Train's start-up is left out. Prints one JSON object with both medians and their ratio:

    python benchmarks/train_data.py --rows 6000 --steps 150 --repeats 2
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not benchmarks/ (tokenize.py shadows)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from painter.checkpoint import bundled_model_dir  # noqa: E402
from painter.cli import init_ray, run_command  # noqa: E402


def step_seconds(run_path: str, warmup: int) -> float:
    """Mean wall seconds per step between the first logged step at or after `warmup` and the last one."""
    with open(os.path.join(run_path, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    timed = [m for m in lines if m["step"] >= warmup]
    first, last = timed[0], timed[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def main(argv: list[str] | None = None) -> None:
    from painter.stages import make_corpus, tokenize, train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args(argv)
    init_ray()
    work = tempfile.mkdtemp(prefix="painter-bench-train-data-")
    corpus, tokens = os.path.join(work, "corpus"), os.path.join(work, "tokens")
    run_command("make-corpus", make_corpus.Options(output=corpus, rows=a.rows, size=32))
    run_command("tokenize", tokenize.Options(input=[corpus], model=bundled_model_dir(), output=tokens))
    times: dict[str, list[float]] = {"stream": [], "memory": []}
    for r in range(a.repeats):
        for side, mb in (("stream", 0), ("memory", 1024)):
            s = run_command("train", train.Options(
                data=[tokens], preset="demo", vqgan=bundled_model_dir(), output=os.path.join(work, f"m-{side}-{r}"),
                name=f"{side}-{r}", max_steps=a.steps, batch_size=a.batch_size, lr=5e-3, warmup_steps=10,
                checkpoint_every=a.steps, log_every=10, threads_per_worker=os.cpu_count(), in_memory_mb=mb))
            assert s["data_path"] == side, s
            times[side].append(step_seconds(s["run"], a.warmup))
    stream, memory = statistics.median(times["stream"]), statistics.median(times["memory"])
    print(json.dumps({"rows": a.rows, "steps": a.steps, "batch_size": a.batch_size, "cpus": os.cpu_count(),
                      "stream_s_per_step": round(stream, 4), "memory_s_per_step": round(memory, 4),
                      "speedup": round(stream / memory, 3), "runs": times}), flush=True)


if __name__ == "__main__":
    main()
