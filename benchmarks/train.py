"""Training throughput: GPT steps on pre-encoded token shards vs the reference's VQGAN-in-the-loop steps.

The reference (EasyNLP pai-painter, after taming-transformers) encodes the batch's pixels with the
first-stage VQGAN inside every training forward pass; painter tokenizes the corpus once (`painter
tokenize`) and trains on token ids. Both sides here run the same GPT, batch and `train_step` (bf16
autocast on CUDA, fp32 on CPU) in one plain torch process; the reference side first encodes random
images of the model's resolution with the VQGAN (fp32, no grad, as the reference does). Prints
progress, then one JSON object: tokens/s of both, their ratio and, on a GPU, the model FLOPs
utilisation (`painter.training.train_flops_per_token` x tokens/s over the peak: 6 x non-embedding
params + attention; the GPU step's own figures are in benchmarks/gpu_train.py). `python benchmarks/train.py --preset tiny` runs on a CPU in seconds (one torch thread
by default there: on a shared 2-core machine two threads often run many times slower than one).
"""
from __future__ import annotations

import sys
from pathlib import Path

# The repo root replaces this script's folder on the path: painter imports from a checkout, and
# the repository root first, not benchmarks/: an uninstalled checkout works from anywhere
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from painter.checkpoint.config import PRESETS, preset_config  # noqa: E402
from painter.models.gpt import GPT  # noqa: E402
from painter.models.vqgan import VQGAN  # noqa: E402
from painter.runtime import pick_device  # noqa: E402
from painter.training.gpt import GPTLoss, TrainConfig, make_optimizer, mfu, peak_bf16_tflops, train_flops_per_token, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(step_fns: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each step function; the sides alternate so they share the machine's load."""
    times = {name: [] for name in step_fns}
    for i in range(warmup + steps):
        for name, fn in step_fns.items():
            _sync(device)
            start = time.perf_counter()
            fn(i)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
        if i == warmup - 1 or (i >= warmup and (i - warmup + 1) % max(1, steps // 4) == 0):
            print(f"benchmark: step {i + 1}/{warmup + steps}", file=sys.stderr, flush=True)
    return {name: statistics.median(t) for name, t in times.items()}


def run(preset: str, batch_size: int, steps: int, warmup: int, device: torch.device,
        peak_tflops: float | None) -> dict:
    config = preset_config(preset)
    torch.manual_seed(0)
    gpt, vqgan = GPT(config.gpt).to(device).train(), VQGAN(config.vqgan).to(device).eval()
    model = GPTLoss(gpt)
    train = TrainConfig(lr=1e-4, warmup_steps=0, total_steps=steps + warmup)
    optimizer = make_optimizer(gpt, train)
    c, res = config.gpt, config.image_size
    text_ids = torch.randint(0, c.text_vocab_size, (batch_size, c.text_len), device=device)  # (B, Tt)
    codes = torch.randint(0, c.img_vocab_size, (batch_size, c.img_len), device=device)  # (B, Ti): pre-encoded
    images = torch.rand(batch_size, 3, res, res, device=device) * 2 - 1  # (B, 3, H, W) in [-1, 1]

    def tokens_step(i):
        train_step(model, optimizer, [(text_ids, codes)], train, i, c.img_vocab_size)

    def reference_step(i):
        with torch.no_grad():
            encoded = vqgan.encode(images)  # (B, Ti): the reference encodes pixels every step
        train_step(model, optimizer, [(text_ids, encoded)], train, i, c.img_vocab_size)

    def encode_only(i):
        with torch.no_grad():
            vqgan.encode(images)

    tokens = batch_size * c.block_size
    results = time_interleaved({"pretokenized": tokens_step, "reference": reference_step,
                                "vqgan_encode": encode_only}, steps, warmup, device)
    ours, ref = tokens / results["pretokenized"], tokens / results["reference"]
    flops_per_token = train_flops_per_token(gpt)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    out = {"preset": preset, "device": device_name, "micro_batch": batch_size, "steps": steps,
           "cpu_threads": torch.get_num_threads(), "gpt_params": gpt.num_params(), "tokens_per_step": tokens,
           "pretokenized_tokens_per_second": round(ours, 1), "reference_tokens_per_second": round(ref, 1),
           "speedup": round(ours / ref, 3), "vqgan_encode_ms_per_step": round(results["vqgan_encode"] * 1000, 2),
           "pretokenized_ms_per_step": round(results["pretokenized"] * 1000, 2),
           "train_flops_per_token": flops_per_token}
    if peak_tflops:
        out |= {"peak_tflops": peak_tflops, "mfu": round(mfu(flops_per_token, ours, peak_tflops), 4),
                "reference_mfu": round(mfu(flops_per_token, ref, peak_tflops), 4)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS))
    p.add_argument("--micro-batch", type=int, default=8, help="rows per training step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where it is steadiest on shared machines)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, for MFU (default: detected for known GPUs)")
    a = p.parse_args(argv)
    device = pick_device(a.device)
    if a.threads or device.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    peak = a.peak_tflops or peak_bf16_tflops(device)
    print(json.dumps(run(a.preset, a.micro_batch, a.steps, a.warmup, device, peak)), flush=True)


if __name__ == "__main__":
    main()
