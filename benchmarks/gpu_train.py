"""GPU figures of the tokenize and train jobs, without Ray: the VQGAN encoder's images/s and the GPT
training step's tokens/s and model FLOPs utilisation (MFU), each against the device's dense bf16 peak.

(a) encoder: the full f16/16384 VQGAN (random weights) encodes random 256x256 uint8 pictures through
    `painter.inference.vq_encode.encode_codes`, the tokenize job's own loop (pinned uint8 copies, channels_last,
    a bf16 weight copy on CUDA with an fp32 code search; fp32 on CPU), `default_max_batch` images per call. The FLOPs per image are
    counted by torch's FlopCounterMode (convolutions, attention, the nearest-code search), so the
    roofline is peak / FLOPs. The breakdown: input copy, encoder network and code search timed apart;
    on CUDA the same loop in NCHW instead of channels_last (torch's CUDA GroupNorm is NCHW-only), with
    cuDNN's autotuner on, and (last, if the time budget allows) with the encoder network compiled.
(b) train: `painter.training.gpt.train_step` (bf16 autocast, fused AdamW on CUDA, SDPA attention) for the
    `base` and `large` GPT shapes, batches fed from host memory through `prefetch_to_device` as in the
    train job, at the largest batch that fits (halving from --max-batch on CUDA out-of-memory), eager
    and then compiled (`torch.compile`) while the time budget lasts; the faster is the figure. MFU =
    `train_flops_per_token` x tokens/s / peak. The breakdown: the step's top operators by device time.

Only torch, numpy and Pillow are needed (no Ray, no fsspec). Writes gpu_train.json to --out (default
$OUT, else benchmarks/results/) and prints it as the last line.

    python benchmarks/gpu_train.py --device cuda --out DIR   # about 3 minutes on an H100/H200
    python benchmarks/gpu_train.py --device cpu              # tiny sizes, seconds (--full: real ones)
"""
from __future__ import annotations

import sys
from pathlib import Path

# The repo root replaces this script's folder on the path: painter imports from a checkout, and
# the repository root first, not benchmarks/: an uninstalled checkout works from anywhere
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.report import Report  # noqa: E402
from painter.models.gpt import GPT, GPTConfig  # noqa: E402
from painter.models.vqgan import VQGAN, VQGANConfig  # noqa: E402
from painter.training.gpt import GPTLoss, TrainConfig, compile_model, make_optimizer, mfu, peak_bf16_tflops, prefetch_to_device, train_flops_per_token, train_step, use_compile
from painter.inference.vq_encode import default_max_batch, encode_codes, network_input, prepare_vqgan  # noqa: E402

# The GPT presets' shapes (painter.checkpoint.PRESETS; a test holds them equal: that module needs fsspec).
GPT_SHAPES = {"base": {"n_layer": 12, "n_head": 12, "n_embd": 768},
              "large": {"n_layer": 24, "n_head": 16, "n_embd": 1024}}
# --tiny: the same two runs at CPU-test sizes (the tiny preset's VQGAN; small GPTs over short sequences).
TINY_GPT_SHAPES = {"base": {"n_layer": 2, "n_head": 2, "n_embd": 64},
                   "large": {"n_layer": 3, "n_head": 2, "n_embd": 96}}
TINY_SEQUENCE = {"img_vocab_size": 256, "text_vocab_size": 512, "text_len": 16, "img_len": 64}
TINY_VQGAN = {"resolution": 32, "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (),
              "z_channels": 32, "embed_dim": 32, "n_embed": 256}
TARGETS = {"encoder_images_per_second": 3000.0, "train_mfu": 0.45}  # issue 18's goals on an H100/H200
COMPILE_RESERVE_S = {"base": 45.0, "large": 75.0, "encoder": 40.0}  # budget a compiled run needs to start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn) -> int:
    """FLOPs torch counts in `fn()` (matmuls, convolutions, attention); run it on meta tensors to be free."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bench_encoder(device: torch.device, tiny: bool, peak: float | None, repeats: int) -> dict:
    """(a): images/s of the tokenize job's encode loop, its FLOPs and fraction of peak, and a breakdown."""
    config = VQGANConfig(**TINY_VQGAN) if tiny else VQGANConfig()
    res, batch = config.resolution, default_max_batch(device) or 16
    with torch.device("meta"):
        meta = VQGAN(config).eval()
        flops = count_flops(lambda: meta.encode(torch.zeros(1, 3, res, res)))  # per image
    torch.manual_seed(0)
    with torch.device(device):
        vqgan = prepare_vqgan(VQGAN(config), device)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, res, res, 3), dtype=np.uint8)  # (B, H, W, 3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encode_codes(vqgan, pixels, device, batch)  # warm-up: kernels chosen, memory pools grown
    seconds = timed(lambda: encode_codes(vqgan, pixels, device, batch), device, repeats)
    rate = batch / seconds
    out = {"model": "tiny" if tiny else "vqgan-f16-16384", "resolution": res, "batch_size": batch,
           "precision": "bf16" if device.type == "cuda" else "fp32", "channels_last": device.type == "cuda",
           "gflop_per_image": round(flops / 1e9, 3), "images_per_second": round(rate, 1),
           "ms_per_batch": round(seconds * 1000, 2), "max_memory_gib": memory_gib(device),
           "breakdown_ms_per_batch": encoder_breakdown(vqgan, pixels, device, repeats)}
    if peak:
        out |= {"roofline_images_per_second": round(peak * 1e12 / flops, 1),
                "fraction_of_peak": round(rate * flops / (peak * 1e12), 4),
                "target_images_per_second": TARGETS["encoder_images_per_second"]}
    if device.type == "cuda":
        out["variants_images_per_second"] = encoder_variants(vqgan, pixels, device, repeats)
    del vqgan
    release(device)
    return out


def encoder_variants(vqgan: VQGAN, pixels: np.ndarray, device: torch.device, repeats: int) -> dict:
    """Images/s of the same loop with cuDNN's autotuner on (the job leaves torch's global default), and
    in NCHW instead of channels_last, with and without the autotuner."""
    out, batch = {}, len(pixels)
    for layout in ("channels_last", "nchw"):
        channels_last = layout == "channels_last"
        prepare_vqgan(vqgan, device, channels_last)
        for autotune in (False, True):
            if not channels_last or autotune:  # channels_last without the autotuner is the main figure
                torch.backends.cudnn.benchmark = autotune
                encode_codes(vqgan, pixels, device, batch, channels_last)  # warm-up (and autotuning)
                seconds = timed(lambda: encode_codes(vqgan, pixels, device, batch, channels_last), device, repeats)
                out[layout + ("_cudnn_benchmark" if autotune else "")] = round(batch / seconds, 1)
    torch.backends.cudnn.benchmark = False
    return out


@torch.inference_mode()
def encoder_breakdown(vqgan: VQGAN, pixels: np.ndarray, device: torch.device, repeats: int) -> dict:
    """Milliseconds per batch of the encode loop's parts, each timed on its own."""
    x = network_input(vqgan, pixels, device)  # (B, 3, H, W) in the weights' dtype
    latents = vqgan.encode_latents(x)  # (B, D, h, w)
    parts = {"input_copy_and_scale": lambda: network_input(vqgan, pixels, device),
             "encoder_network": lambda: vqgan.encode_latents(x),
             "nearest_code_search": lambda: vqgan.quantize.codes_from_latents(latents)}
    return {name: round(timed(fn, device, repeats) * 1000, 2) for name, fn in parts.items()}


def bench_compiled_encoder(device: torch.device, tiny: bool, repeats: int) -> dict:
    """Images/s of the encode loop with the VQGAN's encoder network under `torch.compile` (not the job's
    path: it tells whether compiling it, fusing GroupNorm and swish, is worth adding)."""
    config = VQGANConfig(**TINY_VQGAN) if tiny else VQGANConfig()
    batch = default_max_batch(device) or 16
    with torch.device(device):
        vqgan = prepare_vqgan(VQGAN(config), device)
    vqgan.encoder = torch.compile(vqgan.encoder, dynamic=False)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, config.resolution, config.resolution, 3),
                                               dtype=np.uint8)
    start = time.perf_counter()
    encode_codes(vqgan, pixels, device, batch)  # compiles
    compile_seconds = time.perf_counter() - start
    seconds = timed(lambda: encode_codes(vqgan, pixels, device, batch), device, repeats)
    del vqgan
    release(device)
    return {"images_per_second": round(batch / seconds, 1), "compile_seconds": round(compile_seconds, 1)}


def gpt_config(shape: str, tiny: bool) -> GPTConfig:
    return GPTConfig(**TINY_SEQUENCE, **TINY_GPT_SHAPES[shape]) if tiny else GPTConfig(**GPT_SHAPES[shape])


def host_batches(config: GPTConfig, batch: int, count: int):
    """`count` distinct random (text_ids (B, Tt), image_tokens (B, Ti)) batches in host memory, cycled forever."""
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randint(0, config.text_vocab_size, (batch, config.text_len), generator=g),
             torch.randint(0, config.img_vocab_size, (batch, config.img_len), generator=g)) for _ in range(count)]
    while True:
        yield from pool


def run_steps(config: GPTConfig, batch: int, device: torch.device, compiled: bool, steps: int, warmup: int
              ) -> dict:
    """Seconds per optimizer step (after `warmup` steps, which include any compilation) and the last loss."""
    torch.manual_seed(0)
    with torch.device(device):
        gpt = GPT(config).train()
    model = compile_model(GPTLoss(gpt), compiled)
    train = TrainConfig(lr=1e-4, total_steps=warmup + steps)
    optimizer = make_optimizer(gpt, train)
    batches = prefetch_to_device(host_batches(config, batch, count=4), device)
    start = time.perf_counter()

    def step(i):
        return train_step(model, optimizer, [next(batches)], train, i, config.img_vocab_size)

    for i in range(warmup):
        step(i)
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        result = step(i)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    out = {"seconds_per_step": seconds, "warmup_seconds": warm, "loss": result.loss.item(),
           "top_ops": top_ops(step, device, warmup + steps) if not compiled else None}
    del model, gpt, optimizer, batches
    return out


def top_ops(step, device: torch.device, i: int, count: int = 8) -> list[dict]:
    """The operators taking most of two steps' device time (CPU time on a CPU), with their shares."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(i)
        step(i + 1)
        sync(device)
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]

    def self_time(e):  # microseconds spent in the operator itself, on the device that matters
        if device.type == "cuda":
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    total = sum(self_time(e) for e in events) or 1
    ranked = sorted(events, key=self_time, reverse=True)[:count]
    return [{"op": e.key, "ms_per_step": round(self_time(e) / 2000, 3), "share": round(self_time(e) / total, 3)}
            for e in ranked]


def largest_batch_run(config: GPTConfig, device: torch.device, max_batch: int, steps: int, warmup: int
                      ) -> tuple[int, dict, list[int]]:
    """(batch, eager run, batch sizes that ran out of memory): halving from `max_batch` on CUDA OOM."""
    too_big, batch = [], max_batch
    while batch >= 1:
        if device.type == "cuda":  # the peak reported is this attempt's, not a failed larger one's
            torch.cuda.reset_peak_memory_stats(device)
        try:
            return batch, run_steps(config, batch, device, False, steps, warmup), too_big
        except torch.OutOfMemoryError:
            too_big.append(batch)
        batch //= 2
        release(device)  # after the except block, which holds the failed run's frames
    raise RuntimeError(f"not even one row of {config} fits on {device}")


def figures(config: GPTConfig, batch: int, run: dict, peak: float | None, flops_per_token: int) -> dict:
    tokens = batch * config.block_size
    rate = tokens / run["seconds_per_step"]
    out = {"tokens_per_second": round(rate, 1), "ms_per_step": round(run["seconds_per_step"] * 1000, 2),
           "warmup_seconds": round(run["warmup_seconds"], 1), "loss": round(run["loss"], 4)}
    utilisation = mfu(flops_per_token, rate, peak)
    return out | ({} if utilisation is None else {"mfu": round(utilisation, 4)})


def bench_train(shape: str, device: torch.device, tiny: bool, peak: float | None, args, deadline: float) -> dict:
    """(b) for one GPT shape: eager at the largest batch that fits, then compiled if the budget allows."""
    config = gpt_config(shape, tiny)
    with torch.device("meta"):
        meta = GPT(config)
        flops_per_token, params = train_flops_per_token(meta), meta.num_params()
    batch, eager, too_big = largest_batch_run(config, device, args.max_batch, args.steps, args.warmup)
    out = {"shape": GPT_SHAPES[shape] if not tiny else TINY_GPT_SHAPES[shape], "params": params,
           "batch_size": batch, "out_of_memory_at": too_big, "tokens_per_step": batch * config.block_size,
           "train_flops_per_token": flops_per_token, "fused_adamw": device.type == "cuda",
           "max_memory_gib": memory_gib(device), "eager": figures(config, batch, eager, peak, flops_per_token),
           "top_ops_eager": eager["top_ops"]}
    release(device)
    wanted = use_compile(device, args.compile)
    if not wanted:
        out["compiled"] = {"skipped": f"compile off on {device.type} (--compile to force)"}
    elif time.perf_counter() + COMPILE_RESERVE_S[shape] * (0.1 if tiny else 1) > deadline:
        out["compiled"] = {"skipped": "time budget"}
    else:
        try:
            out["compiled"] = figures(config, batch, run_steps(config, batch, device, True, args.steps,
                                                               args.warmup), peak, flops_per_token)
        except torch.OutOfMemoryError:
            out["compiled"] = {"skipped": f"out of memory at batch {batch}"}
        release(device)  # after the except block, which holds the failed run's frames
    best = max((out["eager"], out["compiled"]), key=lambda r: r.get("tokens_per_second", 0))
    out |= {"best": "compiled" if best is out["compiled"] else "eager", "tokens_per_second": best["tokens_per_second"]}
    if "mfu" in best:
        out |= {"mfu": best["mfu"], "target_mfu": TARGETS["train_mfu"]}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"),
                   help="folder for gpu_train.json (default: $OUT, else benchmarks/results/)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="CPU-test sizes (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="the real sizes even on a CPU (slow)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds after which compiled runs are skipped (default: 170 on CUDA, 60 on CPU)")
    p.add_argument("--max-batch", type=int, default=None, help="largest GPT batch tried (default: 256; tiny: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 10; tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3; tiny: 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled GPT (default: as the train job decides, on CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: known GPUs by name; none on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads on a CPU (default 1: steadiest)")
    args = p.parse_args(argv)
    args.tiny = args.tiny or (torch.device(args.device).type == "cpu" and not args.full)
    args.max_batch = args.max_batch or (8 if args.tiny else 256)
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    return args


def compiled_encoder(device: torch.device, args, deadline: float) -> dict:
    """The encoder network compiled, when compile is on and the budget leaves room for it."""
    if not use_compile(device, args.compile):
        return {"skipped": f"compile off on {device.type} (--compile to force)"}
    if time.perf_counter() + COMPILE_RESERVE_S["encoder"] * (0.1 if args.tiny else 1) > deadline:
        return {"skipped": "time budget"}
    return bench_compiled_encoder(device, args.tiny, args.steps)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    budget = args.budget_s or (170.0 if device.type == "cuda" else 60.0)
    peak = args.peak_tflops or peak_bf16_tflops(device)
    os.makedirs(args.out, exist_ok=True)
    report = Report(os.path.join(args.out, "gpu_train.json"), {
        "benchmark": "gpu_train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "tiny": args.tiny, "peak_bf16_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else ("table" if peak else
                                                                 "unknown device: pass --peak-tflops" if device.type == "cuda" else None)})
    report.section("encoder", lambda: bench_encoder(device, args.tiny, peak, repeats=args.steps))
    for shape in GPT_SHAPES:
        report.section(f"train/{shape}", lambda: bench_train(shape, device, args.tiny, peak, args, started + budget))
    if "encoder" in report.data:
        report.section("encoder/compiled", lambda: compiled_encoder(device, args, started + budget))
    report.data["seconds"] = round(time.perf_counter() - started, 1)
    result = report.finish()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)  # failed sections are in the JSON; the run still fails
