"""Benchmark: what guidance and reranking cost, in images/s against plain sampling, same weights and batch.

Times three `painter.inference.generator.Generator` configurations in one process, alternating, best of
`--repeats`: plain sampling (guidance 1, one candidate), classifier-free guidance (`--guidance S`:
2B rows in one batch and cache) and guidance with reranking (`--candidates N`: N candidates per
image, each scored by one full forward of 2BN rows, the best kept). Each includes VQGAN decode and
PNG encoding, as the generate job runs it. The model is the bundled one by default (it is trained
with caption dropout), or any model directory:

    python benchmarks/guidance.py                         # the bundled model, CPU, about a minute
    python benchmarks/guidance.py --model DIR --device cuda --micro-batch 64

Prints one JSON object: images/s of each and the ratios `guided_over_plain` and
`reranked_over_plain` (below 1: slower than plain sampling).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # off sys.path: the scripts here are not modules to import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # run from a checkout without installing

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from painter.evaluation import synthetic  # noqa: E402
from painter.checkpoint.model_dir import BUNDLED, load_model  # noqa: E402
from painter.inference.generator import GenerationConfig, Generator  # noqa: E402
from painter.runtime import pick_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(generator: Generator, rows: list[tuple[str, str]], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(generator.device)
        start = time.perf_counter()
        generator.images([t for _, t in rows], [i for i, _ in rows], [0] * len(rows))
        _sync(generator.device)
        best = min(best, time.perf_counter() - start)
    return len(rows) / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED, help="model directory (default: the bundled model)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per model call")
    parser.add_argument("--rows", type=int, default=None, help="images per measurement (default: one batch)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a CPU actor's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = load_model(args.model, device=device)
    captions = synthetic.captions_for_eval(args.rows or args.micro_batch, seed=0)
    rows = [(f"bench-{i}", text) for i, text in enumerate(captions)]
    configs = {"plain": GenerationConfig(guidance=1.0),
               "guided": GenerationConfig(guidance=args.guidance),
               "reranked": GenerationConfig(guidance=args.guidance, candidates=args.candidates)}
    generators = {name: Generator(model, config, device, micro_batch=args.micro_batch)
                  for name, config in configs.items()}
    for generator in generators.values():  # warm-up (allocations, kernels)
        generator.images([rows[0][1]], [rows[0][0]], [0])
    speed = {name: 0.0 for name in generators}
    for _ in range(args.repeats):  # alternate, so a burst of load on a shared machine hits all three
        for name, generator in generators.items():
            speed[name] = max(speed[name], images_per_second(generator, rows, 1))
    result = {"benchmark": "guidance", "model": args.model, "device": str(device), "threads": args.threads,
              "micro_batch": args.micro_batch, "images": len(rows), "guidance": args.guidance,
              "candidates": args.candidates,
              **{f"{name}_images_per_second": round(v, 3) for name, v in speed.items()},
              "guided_over_plain": round(speed["guided"] / speed["plain"], 3),
              "reranked_over_plain": round(speed["reranked"] / speed["plain"], 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
