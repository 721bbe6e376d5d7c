"""Benchmark: images/s of our generation against the reference algorithm, same weights and batch.

Ours is `painter.generator.Generator` with the micro-batch set to the batch size: KV-cache sampling
(prefill the text once, one token per step), bf16 autocast on CUDA, ONE VQGAN decode per batch, PNG
encoding on a thread pool. The reference is the pai-painter algorithm: recompute the whole sequence
at every step (`painter.sampling.reference_generate`), fp32, and decode the whole batch once per row
as its postprocess does. Both encode PNGs. Weights are random (`new_model`), so it runs anywhere,
including a lent GPU machine:

    python benchmarks/generate.py --preset tiny                      # CPU, well under a minute
    python benchmarks/generate.py --preset base --device cuda --batch-size 64

Prints one JSON object. On CUDA it adds the model FLOPs per image (GPT from `gpt.flops_per_token()`
over the text and image positions, VQGAN decode counted by torch's FlopCounterMode) and the fraction
of the GPU's dense bf16 peak reached (`--peak-tflops`, else looked up from the device name).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # off sys.path: benchmarks/tokenize.py would shadow the stdlib's tokenize
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # run from a checkout without installing

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from painter.checkpoint import PRESETS, load_model, new_model  # noqa: E402
from painter.generator import GenerationConfig, Generator  # noqa: E402
from painter.io.images import encode_image, uint8_from_tensor  # noqa: E402
from painter.runtime import pick_device  # noqa: E402
from painter.sampling import reference_generate, row_keys  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
PROMPTS = ["宽松T恤", "红色连衣裙", "远处的雪山，表面覆盖着厚厚的积雪", "蓝色牛仔裤"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(n: int) -> list[tuple[str, str, int]]:
    return [(f"bench-{i}", PROMPTS[i % len(PROMPTS)], 0) for i in range(n)]


def run_ours(generator: Generator, rows, batch_size: int) -> list[bytes]:
    images = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = generator({"idx": [r[0] for r in chunk], "text": [r[1] for r in chunk], "sample": [r[2] for r in chunk]})
        images.extend(out["png"])
    return images


@torch.inference_mode()
def run_reference(generator: Generator, rows, batch_size: int) -> list[bytes]:
    """No cache, fp32, and the whole batch decoded once per row (the reference's postprocess)."""
    model, config, images = generator.model, generator.config, []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, _ = model.tokenizer.encode_batch([r[1] for r in chunk])
        keys = row_keys(config.seed, [r[0] for r in chunk], [r[2] for r in chunk], device=generator.device)
        codes = reference_generate(model.gpt, torch.from_numpy(ids).to(generator.device), keys, config.sampling)
        for row in range(len(chunk)):
            pixels = uint8_from_tensor(model.vqgan.decode(codes))[row]
            images.append(encode_image(pixels, "png"))
    return images


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best of `repeats` wall times (the least disturbed by other load on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def flops_per_image(generator: Generator) -> float:
    """GPT forward FLOPs over text + image positions, plus one VQGAN decode (counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    gpt = generator.model.gpt
    counter = FlopCounterMode(display=False)
    codes = torch.zeros(1, gpt.config.img_len, dtype=torch.int64, device=generator.device)
    with counter, torch.inference_mode():
        generator.model.vqgan.decode(codes)
    return gpt.flops_per_token() * (gpt.config.text_len + gpt.config.img_len) + counter.get_total_flops()


def gpu_utilisation(generator: Generator, images_per_second: float, peak_tflops: float | None) -> dict:
    name = torch.cuda.get_device_name(generator.device)
    if peak_tflops is None:
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = flops_per_image(generator)
    achieved = images_per_second * flops / 1e12
    return {"device_name": name, "flops_per_image": flops, "achieved_tflops": round(achieved, 3),
            "peak_bf16_tflops": peak_tflops,
            "fraction_of_peak": round(achieved / peak_tflops, 5) if peak_tflops else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=None, help="rows per measurement (default: one batch)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: what the job's CPU actors run with)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--skip-reference", action="store_true", help="time only our generation")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    rows = _rows(args.rows or args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(new_model(args.preset, str(Path(tmp) / args.preset)), device=device)
    generator = Generator(loaded, GenerationConfig(seed=0), device, micro_batch=args.batch_size)
    warm = rows[:min(2, len(rows))]
    run_ours(generator, warm, args.batch_size)  # warm-up: CUDA context, kernels, allocator
    ours_s = timed(lambda: run_ours(generator, rows, args.batch_size), device, args.repeats)
    result = {"preset": args.preset, "device": str(device), "batch_size": args.batch_size, "rows": len(rows),
              "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "gpt_params": loaded.gpt.num_params(),
              "ours": {"seconds": round(ours_s, 4), "images_per_second": round(len(rows) / ours_s, 3)}}
    if not args.skip_reference:
        run_reference(generator, warm, args.batch_size)
        ref_s = timed(lambda: run_reference(generator, rows, args.batch_size), device, args.repeats)
        result["reference"] = {"seconds": round(ref_s, 4), "images_per_second": round(len(rows) / ref_s, 3)}
        result["speedup"] = round(ref_s / ours_s, 2)
    if device.type == "cuda":
        result["gpu"] = gpu_utilisation(generator, len(rows) / ours_s, args.peak_tflops)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
