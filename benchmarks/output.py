"""Benchmark of the generate job's output: end-to-end images/s with the Delta table against the old
hand-made protocol (staged Parquet files copied into hive folders, then a `_SUCCESS` listing replaced
atomically), measured in one process on one local Ray, same model, prompts and batch sizes.

The old protocol is not kept in the package: its two modules (`painter/io/output.py` and
`painter/stages/generate.py` at `--baseline-ref`, the commit before the table format) are read with
`git show` into a temporary folder at run time and imported from there, the old generate stage wired
to the old output module; Ray pickles both by value so its workers need no copy. The runs alternate
(old, new, old, new, …) into fresh output folders, each timed around the whole `run(options)` call
(prompt reading, actor start-up and model loading, generation, writing, committing, the run record;
no contact sheet), after one small untimed run of each. The best run of each counts. Prints one JSON
object.

    python benchmarks/output.py --prompts 1000 --samples 2          # 2,000 images, tiny model, CPU
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_ROOT]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

BASELINE_REF = "1199925"  # main before generate wrote a Delta table


def load_baseline(ref: str, folder: str):
    """The old generate stage module, importing the old output module, both from `git show ref:…`."""
    import ray.cloudpickle

    modules = {}
    for name, path in (("painter_baseline_output", "painter/io/output.py"),
                       ("painter_baseline_generate", "painter/stages/generate.py")):
        source = subprocess.run(["git", "-C", _ROOT, "show", f"{ref}:{path}"], check=True, capture_output=True,
                                text=True).stdout
        source = source.replace("from painter.io import output as out", "import painter_baseline_output as out")
        file = os.path.join(folder, f"{name}.py")
        with open(file, "w", encoding="utf-8") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        ray.cloudpickle.register_pickle_by_value(module)  # workers get the code with the actor
        modules[name] = module
    return modules["painter_baseline_generate"]


def timed_run(stage, options) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = stage.run(options)
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each protocol, alternating")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    args = parser.parse_args()

    import ray
    from ray.data import DataContext

    from painter.checkpoint.model_dir import new_model
    from painter.stages import generate as new_stage

    work = tempfile.mkdtemp(prefix="painter-bench-output-")
    old_stage = load_baseline(args.baseline_ref, work)
    model = new_model(args.preset, os.path.join(work, "model"), seed=0)
    prompts = os.path.join(work, "prompts.tsv")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(f"p{i}\t宽松T恤 第{i}款\t{'shoes' if i % 2 else 'hats'}\n" for i in range(args.prompts))
    warm = os.path.join(work, "warm.tsv")
    with open(warm, "w", encoding="utf-8") as f:
        f.writelines(f"w{i}\t连衣裙 {i}\tshoes\n" for i in range(8))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    common = dict(input=[prompts], model=model, run_date="2024-05-01", samples=args.samples,
                  input_schema="idx:str:1,text:str:1,category:str:1", partition_by=["category"],
                  batch_size=args.batch_size, contact_sheet=False)
    for name, stage in (("old", old_stage), ("new", new_stage)):  # untimed: Ray workers, imports, caches
        stage.run(stage.Options(output=os.path.join(work, f"warm-{name}"), **(common | {"input": [warm]})))
    runs = {"old": [], "new": []}
    for r in range(args.repeats):
        for name, stage in (("old", old_stage), ("new", new_stage)):
            options = stage.Options(output=os.path.join(work, f"out-{name}-{r}"), **common)
            seconds, summary = timed_run(stage, options)
            assert summary["images_out"] == args.prompts * args.samples, summary
            runs[name].append({"seconds": round(seconds, 3), "images_per_second": round(summary["images_out"] / seconds, 3),
                               "generation_images_per_second": summary["images_per_second"]})
            print(f"[bench] {name} run {r}: {seconds:.1f} s", file=sys.stderr, flush=True)
    best = {name: max(x["images_per_second"] for x in rs) for name, rs in runs.items()}
    print(json.dumps({
        "images": args.prompts * args.samples, "preset": args.preset, "batch_size": args.batch_size,
        "cpus": os.cpu_count(), "baseline": f"git show {args.baseline_ref}:painter/{{io/output,stages/generate}}.py",
        "runs": runs, "old_images_per_second": best["old"], "new_images_per_second": best["new"],
        "new_over_old": round(best["new"] / best["old"], 3),
    }))
    ray.shutdown()


if __name__ == "__main__":
    main()
