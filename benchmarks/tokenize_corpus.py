"""Benchmark of the tokenize job: images/s of the Ray job against a plain single-process loop.

Both read the same TSV corpus (JPEGs of `--image-size` pixels, base64 in TSV shards) with the same model
and batch size; the plain loop runs read -> `prepare_batch` -> `ImageEncoder` in this process, the job
runs `painter.stages.tokenize.run` on a local Ray (all of its own start-up costs included, Ray's own
start excluded). The plain loop is timed with torch's default thread count and with one thread, and
the faster counts. `--repeats` pairs (plain loops, then the job) run one after another, and the median
pair's ratio is the result: on 2 cores one pair alone moves by ±8%. Prints one JSON object.

The job meets the cluster as `ray job submit` does on one that has run a Ray Data job before: a first
job, from another driver process (so none of its workers are reused), creates Ray Data's per-cluster
actors (stats, autoscaling, actor locations: ~2.5 s on 2 cores, once per cluster). `--cold` skips it.

    python benchmarks/tokenize_corpus.py --rows 512 --preset tiny --image-size 256 --micro-batch 64

`--photos` makes the corpus of real photographs instead: scikit-image's bundled photos (the test extra),
cropped, flipped and resized to about 640 x 480 and saved as JPEGs (`--image-size` is then unused), so
decoding and shrinking cost what a photo corpus costs.

    python benchmarks/tokenize_corpus.py --photos --rows 4000
"""
from __future__ import annotations

import os
import sys

# The repository root goes on the path, and on PYTHONPATH for the Ray workers this process starts, so an
# uninstalled checkout works from anywhere.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_ROOT]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from painter.checkpoint.model_dir import new_model  # noqa: E402
from painter.checkpoint.config import preset_config
from painter.cli.main import init_ray  # noqa: E402
from painter.inference.encoder import ImageEncoder, prepare_batch  # noqa: E402
from painter.io import tables  # noqa: E402
from painter.stages import tokenize  # noqa: E402

DISTINCT_IMAGES = 32  # the corpus cycles through these (decoding costs the same)


def photo_like(size: int, seed: int) -> bytes:
    """A smooth colour field with noise, as a JPEG: compresses and decodes like a photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(2, 9) + c) for c in rng.uniform(0, 6, 3)], axis=-1)
    pixels = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
          "coins", "page", "moon")


def real_photo(seed: int) -> bytes:
    """A photo of `skimage.data`, cropped, maybe flipped, resized to about 640 x 480, as a JPEG."""
    from skimage import data

    rng = np.random.default_rng(seed)
    image = Image.fromarray(getattr(data, PHOTOS[seed % len(PHOTOS)])()).convert("RGB")
    width, height = image.size
    left, top = int(rng.integers(0, width // 8 + 1)), int(rng.integers(0, height // 8 + 1))
    image = image.crop((left, top, width - left // 2, height - top // 2))
    if rng.integers(2):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = (int(rng.integers(600, 681)), int(rng.integers(450, 511)))
    buf = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_corpus(root: Path, rows: int, image_size: int, files: int, photos: bool = False) -> list[str]:
    make = real_photo if photos else (lambda k: photo_like(image_size, k))
    cells = [base64.b64encode(make(k)).decode() for k in range(DISTINCT_IMAGES)]
    paths = []
    for f in range(files):
        path = root / f"part-{f}.tsv"
        with open(path, "w") as out:
            for i in range(f, rows, files):
                out.write(f"row-{i}\t商品标题 {i}\t{cells[i % DISTINCT_IMAGES]}\n")
        paths.append(str(path))
    return paths


def plain_loop(paths: list[str], model_dir: str, batch_size: int, threads: int) -> tuple[int, float]:
    """(rows encoded, seconds): read, prepare and encode in this process, batch by batch."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    encoder = ImageEncoder(model_dir)
    schema = tables.parse_schema(tokenize.DEFAULT_SCHEMA)
    size, done = encoder.info.image_size, 0
    for path in paths:
        for chunk in tables.iter_rows(path, schema, chunk_rows=batch_size):
            out = encoder(prepare_batch(pa.table(chunk), size))
            done += out.num_rows - out["image_tokens"].null_count
    return done, time.perf_counter() - start


FIRST_JOB = """
import ray, ray.data
class Same:
    def __call__(self, batch):
        return batch
ray.init(logging_level="ERROR")
ray.data.range(4).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25).materialize()
"""


def first_job_on_cluster() -> float:
    """Seconds a trivial Ray Data job (an actor pool, like tokenize's) takes from its own driver process."""
    import ray  # after painter.cli, which sets Ray's auth mode before Ray is imported

    start = time.perf_counter()
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    subprocess.run([sys.executable, "-c", FIRST_JOB], check=True, capture_output=True, env=env, timeout=300)
    return time.perf_counter() - start


def ray_job(paths: list[str], model_dir: str, output: str, micro_batch: int, actors: int | None) -> dict:
    options = tokenize.Options(input=paths, model=model_dir, output=output, micro_batch=micro_batch, actors=actors)
    start = time.perf_counter()
    summary = tokenize.run(options)
    return summary | {"wall_seconds": time.perf_counter() - start}


def _pair_result(plain: dict, job: dict) -> dict:
    """One repeat's figures: the job's and the faster plain loop's, and their ratio of images/s."""
    threads, (plain_rows, plain_seconds) = min(plain.items(), key=lambda kv: kv[1][1])
    ray_rate, plain_rate = job["rows_out"] / job["wall_seconds"], plain_rows / plain_seconds
    return {
        "ray": {"images": job["rows_out"], "seconds": round(job["wall_seconds"], 2),
                "images_per_second": round(ray_rate, 1)},
        "plain": {"images": plain_rows, "seconds": round(plain_seconds, 2), "torch_threads": threads,
                  "images_per_second": round(plain_rate, 1),
                  "seconds_by_threads": {t: round(sec, 2) for t, (_, sec) in plain.items()}},
        "ray_over_plain": round(ray_rate / plain_rate, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--preset", default="tiny", choices=("tiny", "small", "base"))
    parser.add_argument("--image-size", type=int, default=256, help="side of the source images")
    parser.add_argument("--micro-batch", type=int, default=64, help="images per VQGAN call")
    parser.add_argument("--files", type=int, default=4, help="TSV shards the corpus is split into")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--cold", action="store_true", help="time the first Ray Data job on the fresh cluster")
    parser.add_argument("--repeats", type=int, default=3, help="(plain loop, job) pairs; the median ratio counts")
    parser.add_argument("--photos", action="store_true", help="real photos of about 640 x 480 (skimage.data)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = new_model(args.preset, str(root / "model"))
        (root / "corpus").mkdir()
        paths = write_corpus(root / "corpus", args.rows, args.image_size, args.files, args.photos)
        init_ray()
        warmup = None if args.cold else first_job_on_cluster()
        # torch's default thread count can lose badly to one thread on a busy machine (the Ray actors get
        # one thread per half core): the baseline is the better of the two. It runs before the job: right
        # after one, Ray's processes are still winding down, which slowed the loop and flattered the job.
        # Each repeat times both, so the ratio is taken from pairs measured side by side.
        pairs = []
        for repeat in range(args.repeats):
            plain = {threads: plain_loop(paths, model_dir, args.micro_batch, threads)
                     for threads in sorted({torch.get_num_threads(), 1})}
            job = ray_job(paths, model_dir, str(root / f"tokens-{repeat}"), args.micro_batch, args.actors)
            pairs.append((plain, job))
            print(json.dumps({"pair": repeat, **_pair_result(plain, job)}), file=sys.stderr, flush=True)  # kept if cut off
    runs = [_pair_result(plain, job) for plain, job in pairs]
    middle = sorted(runs, key=lambda r: r["ray_over_plain"])[len(runs) // 2]
    result = {
        "benchmark": "tokenize", "rows": args.rows, "preset": args.preset,
        "image_size": "photos ~640x480" if args.photos else args.image_size,
        "model_image_size": preset_config(args.preset).image_size,
        "micro_batch": args.micro_batch, "cpus": os.cpu_count(),
        "cluster": "cold" if warmup is None else "has run a Ray Data job",
        "first_job_seconds": None if warmup is None else round(warmup, 2),
        "repeats": args.repeats, "ray": middle["ray"], "plain": middle["plain"],
        "ray_over_plain": middle["ray_over_plain"],  # the median pair's
        "ray_over_plain_by_repeat": [r["ray_over_plain"] for r in runs],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
