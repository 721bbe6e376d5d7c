"""Benchmark: `painter serve` under a bounded load on loopback against in-process `pipeline()`, same run.

Times `pipeline(...)` first, then starts a local Ray and the Serve app (no token, 127.0.0.1), sends `--requests` POST /v1/images (one prompt
each) from `--concurrency` client threads, and reports p50/p99 latency, images/s and failed requests; the
in-process figure is `pipeline("text2image_generation", model)` on the same prompts (one call, the
engine's own batching, after a warm-up), and the ratio served / in-process. Every served image is checked against the
in-process one for the same (seed, idx): serving must not change pixels.

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
    """POST one prompt per request from `concurrency` threads; latencies, images/s, failures, the images."""
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

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(texts))))
    seconds = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"seconds": seconds, "failed": sum(not r[1] for r in results),
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "images_per_second": sum(r[1] for r in results) / seconds, "images": [r[2] for r in results]}


def in_process(model: str, texts: list[str], seed: int) -> dict:
    from painter.pipeline import pipeline

    pipe = pipeline("text2image_generation", model)
    pipe(texts[:8], seed=seed)  # warm-up, as the served engine was warmed
    start = time.perf_counter()
    results = pipe(texts, seed=seed)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_second": len(texts) / seconds,
            "images": [base64.b64decode(r["gen_imgbase64"]) for r in results]}


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
    from ray import serve as ray_serve

    from painter.checkpoint.model_dir import new_model
    from painter.stages import serve

    model = args.model or new_model("small", os.path.join(tempfile.mkdtemp(), "small"), seed=0)
    texts = _texts(args.requests)
    cpus = os.cpu_count() or 1
    local = in_process(model, texts, args.seed)  # first: this process before Ray starts in it
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        options = serve.Options(model=model, port=_free_port(), num_cpus=cpus)
        url = serve.start(options)["url"]
        requests.post(url + "/v1/images", json={"prompts": [{"idx": "w", "text": texts[0]}]}, timeout=300)
        load = served(url, texts, args.seed, args.concurrency)
        ray_serve.shutdown()
    finally:
        ray.shutdown()
    result = {
        "benchmark": "serve", "cpus": cpus, "requests": args.requests, "concurrency": args.concurrency,
        "model": "small preset" if not args.model else args.model, "served": {k: v for k, v in load.items() if k != "images"},
        "in_process": {k: v for k, v in local.items() if k != "images"},
        "served_over_in_process": load["images_per_second"] / local["images_per_second"],
        "same_pixels": load["images"] == local["images"], "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(result, indent=2)
    print(text)
    path = args.json or str(_HERE / "results" / f"serve-cpu{cpus}.json")
    Path(path).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
