"""Benchmark of memory against corpus size: the driver's peak RSS and the object store's peak, per job.

For each job and row count a fresh driver process runs the job on a local Ray (started in that process)
over a corpus made beforehand in another process: tokenize over `rows` tiny images (TSV, base64 PNG of
the tiny preset's 32x32), generate over `rows` prompts (one sample each, greedy). While the job runs a
thread samples the object store's bytes in use (the raylet's own store statistics) every 0.2 s; the
driver's peak is its `ru_maxrss`. The figure that matters is the growth between the row counts: a job
that holds its corpus grows with it, a streaming one stays flat. Prints one JSON object.

    python benchmarks/scale.py --rows 20000 200000 --jobs tokenize generate
"""
from __future__ import annotations

import os
import sys

# the repository root on the import path (and on the workers' path), so an uninstalled checkout works
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_ROOT]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

DISTINCT_IMAGES = 64


def _png(k: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(k)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_corpus(job: str, rows: int, folder: str, files: int = 8) -> list[str]:
    """`files` TSV shards of `rows` rows, streamed to disk (images for tokenize, texts for generate)."""
    cells = [_png(k) for k in range(DISTINCT_IMAGES)] if job == "tokenize" else None
    paths = []
    for f in range(files):
        path = os.path.join(folder, f"part-{f}.tsv")
        with open(path, "w") as out:
            for i in range(f, rows, files):
                line = f"row-{i}\t商品 {i % 997} 号" + (f"\t{cells[i % DISTINCT_IMAGES]}" if cells else "")
                out.write(line + "\n")
        paths.append(path)
    return paths


class StorePeak:
    """Samples the local object store's bytes in use on a thread until stopped; keeps the peak."""

    def __init__(self, every: float = 0.2):
        import ray
        from ray._private import internal_api

        # this driver's own Ray (other local Rays may be running)
        self.state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        self.every, self.peak, self.samples = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from ray._private import internal_api

        while not self._stop.is_set():
            reply = internal_api.get_memory_info_reply(self.state)
            self.peak = max(self.peak, reply.store_stats.object_store_bytes_used)
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self) -> "StorePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(job: str, corpus: list[str], model: str, output: str, micro_batch: int,
            rows_per_file: int | None = None) -> dict:
    """Run one job in this process (the driver) and return its memory figures."""
    from painter.cli.main import init_ray
    from painter.stages import generate, tokenize

    init_ray()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with StorePeak() as store:
        if job == "tokenize":
            shard_rows = {"rows_per_file": rows_per_file} if rows_per_file else {}
            summary = tokenize.run(tokenize.Options(input=corpus, model=model, output=output, **shard_rows))
        else:
            summary = generate.run(generate.Options(input=corpus, model=model, output=output, top_k=1,
                                                    contact_sheet=False, batch_size=256, micro_batch=micro_batch))
    rows = summary["rows_out"] if job == "tokenize" else summary["images_out"]
    return {"job": job, "rows_out": rows, "seconds": round(time.perf_counter() - start, 1),
            "driver_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "driver_before_job_mb": round(rss_before / 1024, 1),
            "object_store_peak_mb": round(store.peak / 2 ** 20, 1), "store_samples": store.samples}


def run_case(job: str, rows: int, model: str, root: str, micro_batch: int, rows_per_file: int | None) -> dict:
    """Make the corpus in a child process, then measure the job in another (a clean driver)."""
    folder = tempfile.mkdtemp(dir=root, prefix=f"{job}-{rows}-")
    corpus_dir = os.path.join(folder, "corpus")
    os.makedirs(corpus_dir)
    script = os.path.abspath(__file__)
    subprocess.run([sys.executable, script, "--make-corpus", job, str(rows), corpus_dir], check=True)
    corpus = sorted(os.path.join(corpus_dir, f) for f in os.listdir(corpus_dir))
    sized = ["--rows-per-file", str(rows_per_file)] if rows_per_file else []
    done = subprocess.run([sys.executable, script, "--micro-batch", str(micro_batch), *sized, "--measure", job, model,
                           os.path.join(folder, "out"), *corpus],
                          check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--jobs", nargs="+", default=["tokenize", "generate"], choices=("tokenize", "generate"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--micro-batch", type=int, default=256,
                        help="generate's rows per model call (the figures are memory; this only sets the pace)")
    parser.add_argument("--rows-per-file", type=int, help="tokenize's rows per shard file (default: the job's)")
    parser.add_argument("--make-corpus", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_corpus:
        job, rows, folder = args.make_corpus
        return {"files": make_corpus(job, int(rows), folder)}
    if args.measure:
        job, model, output, *corpus = args.measure
        result = measure(job, corpus, model, output, args.micro_batch, args.rows_per_file)
        print(json.dumps(result))
        return result
    from painter.checkpoint.model_dir import new_model

    with tempfile.TemporaryDirectory(prefix="painter-scale-") as root:
        model = new_model(args.preset, os.path.join(root, "model"))
        cases = [run_case(job, rows, model, root, args.micro_batch, args.rows_per_file)
                 for job in args.jobs for rows in sorted(args.rows)]
    growth = {}
    for job in args.jobs:
        small, large = [c for c in cases if c["job"] == job][0], [c for c in cases if c["job"] == job][-1]
        growth[job] = {key: round(large[key] / max(small[key], 1e-9), 3)
                       for key in ("driver_peak_mb", "object_store_peak_mb")}
    result = {"benchmark": "scale", "preset": args.preset, "micro_batch": args.micro_batch, "cpus": os.cpu_count(),
              "rows_per_file": args.rows_per_file,
              "cases": cases,
              "growth_largest_over_smallest": growth}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
