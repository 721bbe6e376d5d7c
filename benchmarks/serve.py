"""Benchmark: `painter serve` under a bounded load on loopback against in-process `pipeline()`, same run.

Starts `pipeline("text2image_generation", model)` in this process and the Serve app on a local Ray (no
token, 127.0.0.1) and warms both; then times in-process `pipeline()` on the first half of the prompts
(one call, the engine's own batching), sends all `--requests` prompts as POST /v1/images (one prompt
each) from `--concurrency` client threads, and times in-process on the second half. It reports p50/p99
latency, images/s and failed requests for served, images/s in-process (both halves together, and each),
and the ratio served / in-process. Every served image is checked against the in-process one for the same
(seed, idx): serving must not change pixels. On CPU, in-process computes on the engine's torch threads
(`painter.stages.serve_app.CPU_THREADS`, those of `painter generate`), since pixels depend on them.

Why in-process before and after: on a shared 2-core machine a neighbour's work comes and goes within
minutes, and one in-process phase followed by one served phase measured the same code at 0.67x and 2.4x
within ten minutes; halves on both sides of the served load see what it saw, on average, and the two
halves' figures and the 1-minute load average recorded around each phase show how steady the run was.

    python benchmarks/serve.py                      # a fresh `small` preset model, 300 requests at 16
    python benchmarks/serve.py --model DIR --requests 600

Prints one JSON object and writes it under benchmarks/results/ (or to `--json`).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # off sys.path: the scripts here are not modules to import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # run from a checkout without installing

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "token")


def _texts(n: int) -> list[str]:
    colours, shapes = ("红色", "蓝色", "绿色", "黄色"), ("圆形", "方形", "三角形")
    return [f"白色背景中间的一个{colours[i % 4]}{shapes[i % 3]} 第{i}号" for i in range(n)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served(url: str, texts: list[str], seed: int, concurrency: int) -> dict:
    """POST one prompt per request from `concurrency` threads; seconds, latencies, successes, the images."""
    import requests

    local = threading.local()

    def one(n: int):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        start = time.perf_counter()
        try:
            answer = session.post(url + "/v1/images", timeout=300,
                                  json={"prompts": [{"idx": texts[n], "text": texts[n]}], "seed": seed})
            ok = answer.status_code == 200
            image = base64.b64decode(answer.json()["images"][0]["image"]) if ok else None
        except Exception:  # counted as a failed request
            ok, image = False, None
        return time.perf_counter() - start, ok, image

    load = os.getloadavg()[0]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(texts))))
    return {"seconds": time.perf_counter() - start, "latencies": [r[0] for r in results],
            "ok": [r[1] for r in results], "images": [r[2] for r in results], "load": [load, os.getloadavg()[0]]}


def in_process(pipe, texts: list[str], seed: int) -> dict:
    load = os.getloadavg()[0]
    start = time.perf_counter()
    results = pipe(texts, seed=seed)
    return {"seconds": time.perf_counter() - start, "load": [load, os.getloadavg()[0]],
            "images": [base64.b64decode(r["gen_imgbase64"]) for r in results]}


def summary(load: dict, local_rounds: list[dict]) -> tuple[dict, dict]:
    """The served figures, and the in-process ones over both halves."""
    latencies = sorted(load["latencies"])
    ok = sum(load["ok"])
    served_figures = {"seconds": load["seconds"], "failed": len(latencies) - ok,
                      "p50_ms": 1000 * statistics.median(latencies),
                      "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                      "images_per_second": ok / load["seconds"],
                      "load_average_1min": [round(x, 2) for x in load["load"]]}
    seconds = sum(r["seconds"] for r in local_rounds)
    local_figures = {"seconds": seconds, "images_per_second": sum(len(r["images"]) for r in local_rounds) / seconds,
                     "halves_images_per_second": [len(r["images"]) / r["seconds"] for r in local_rounds],
                     "load_average_1min": [[round(x, 2) for x in r["load"]] for r in local_rounds]}
    return served_figures, local_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a fresh `small` preset model)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="where to write the JSON (default: benchmarks/results/serve-cpu<N>.json)")
    args = parser.parse_args()

    import ray
    import requests
    import torch
    from ray import serve as ray_serve

    from painter.checkpoint.model_dir import new_model
    from painter.inference.generator import default_micro_batch
    from painter.pipeline import pipeline
    from painter.runtime import pick_device
    from painter.stages import serve
    from painter.stages.serve_app import CPU_THREADS

    model = args.model or new_model("small", os.path.join(tempfile.mkdtemp(), "small"), seed=0)
    texts = _texts(args.requests)
    cpus = os.cpu_count() or 1
    threads = CPU_THREADS if pick_device(None).type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    pipe = pipeline("text2image_generation", model)
    pipe(texts[:8], seed=args.seed)  # warm-up, as the served engine is warmed
    half = len(texts) // 2 // default_micro_batch(pick_device(None)) * default_micro_batch(pick_device(None))
    halves = [texts[:half], texts[half:]]  # the first of whole micro-batches: in-process pads only the last
    local_rounds = []
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        options = serve.Options(model=model, port=_free_port(), num_cpus=cpus)
        url = serve.start(options)["url"]
        requests.post(url + "/v1/images", json={"prompts": [{"idx": "w", "text": texts[0]}]}, timeout=300)
        local_rounds.append(in_process(pipe, halves[0], args.seed))
        load = served(url, texts, args.seed, args.concurrency)
        local_rounds.append(in_process(pipe, halves[1], args.seed))
        ray_serve.shutdown()
    finally:
        ray.shutdown()
    served_figures, local = summary(load, local_rounds)
    result = {
        "benchmark": "serve", "cpus": cpus, "requests": args.requests, "concurrency": args.concurrency,
        "in_process_torch_threads": threads,
        "model": "small preset" if not args.model else args.model, "served": served_figures, "in_process": local,
        "served_over_in_process": served_figures["images_per_second"] / local["images_per_second"],
        "same_pixels": load["images"] == [i for r in local_rounds for i in r["images"]],
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    path = args.json or str(_HERE / "results" / f"serve-cpu{cpus}.json")
    Path(path).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
