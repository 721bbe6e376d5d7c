"""Benchmark: images/s of generation (new engine, old engine, reference algorithm) and where the time goes.

Three ways to make the same images from the same random weights and batch, timed in one process:
- ours: `painter.inference.generator.Generator`, i.e. the static-shape decode engine (`painter.inference.engine`: one
  CUDA graph replay per step on a GPU, on-device sampling with top-k-only noise), bf16 weights on
  CUDA, one VQGAN decode per micro-batch, PNG encoding on a thread pool overlapping the next chunk;
- old_engine: the same Generator decoding as before the engine: the growing `KVCache`,
  full-vocabulary noise, bf16 autocast on CUDA (`painter.inference.sampling.generate`);
- reference: the pai-painter algorithm: recompute the whole sequence at every step
  (`painter.inference.sampling.reference_generate`), fp32, and the whole batch decoded once per row as its
  postprocess does. All three encode PNGs; their tokens are the same (checked on fp32).

Also reported: host framework calls per decode step (aten ops dispatched for one step, counted with a
TorchDispatchMode; on CUDA the engine's step is one graph replay), the KV cache bytes an image reads
with the whole cache attended every step and with the engine's buckets (counted, checked with
torch.profiler, and the GPT timed both ways), a breakdown of ours into GPT-only,
VQGAN-only and encode-only images/s, on CUDA the fraction of the GPU's dense bf16 peak, and with
`--sweep` the same at several micro-batch sizes (the largest end-to-end rate picks the default).

    python benchmarks/generate.py --preset tiny                                 # CPU, seconds
    python benchmarks/generate.py --preset small --micro-batch 32                # the CPU comparison
    python benchmarks/generate.py --preset base --device cuda --micro-batch 256 --skip-reference --sweep 64,128,256,512

Prints one JSON object (and writes it to `--json` when given).
"""
from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent  # off sys.path: the scripts here are not modules to import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))  # run from a checkout without installing

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from painter.checkpoint.config import PRESETS  # noqa: E402
from benchmarks.report import Report  # noqa: E402
from painter.checkpoint.model_dir import random_model  # noqa: E402
from painter.inference.engine import KV_GRANULE, DecodeEngine, kv_cache_bytes  # noqa: E402
from painter.inference.generator import GenerationConfig, Generator  # noqa: E402
from painter.io.images import encode_image  # noqa: E402
from painter.inference.pixels import uint8_from_tensor  # noqa: E402
from painter.training.gpt import peak_bf16_tflops  # noqa: E402
from painter.runtime import autocast, inference_copy, pick_device  # noqa: E402
from painter.inference.sampling import choose_codes, generate, reference_generate, row_keys  # noqa: E402

PROMPTS = ["宽松T恤", "红色连衣裙", "远处的雪山，表面覆盖着厚厚的积雪", "蓝色牛仔裤"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(n: int) -> list[tuple[str, str, int]]:
    return [(f"bench-{i}", PROMPTS[i % len(PROMPTS)], 0) for i in range(n)]


def _columns(rows) -> tuple[list, list, list]:
    return [r[1] for r in rows], [r[0] for r in rows], [r[2] for r in rows]


class OldEngineGenerator(Generator):
    """The Generator with the decoding it had before the engine (growing KVCache, noise for every code,
    autocast on the fp32 weights on CUDA); VQGAN decode and encoding as ours."""

    def codes(self, texts, idxs, samples, prompts=None):
        """Generator.codes' signature and (codes, is_truncated, scores); no guidance, reranking or prompts."""
        ids, is_truncated = self.model.tokenizer.encode_batch([str(t) for t in texts])
        keys = row_keys(self.config.seed, [str(i) for i in idxs], [int(s) for s in samples], device=self.device)
        with autocast(self.device):
            codes = generate(self.model.gpt, torch.from_numpy(ids).to(self.device), keys, self.config.sampling)
        return codes, is_truncated, None


def run_generator(generator: Generator, rows) -> list[bytes]:
    texts, idxs, samples = _columns(rows)
    return generator.images(texts, idxs, samples)[0]


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
    return timed_both(fn, device, repeats)["seconds"]


def timed_both(fn, device: torch.device, repeats: int) -> dict:
    """Best wall seconds and best process CPU seconds (all threads) of `repeats` runs. On a shared,
    overloaded CPU machine the CPU seconds compare two sides more steadily than the wall times."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return {"seconds": round(wall, 4), "cpu_seconds": round(cpu, 4)}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _count_ops(fn) -> tuple[int, int]:
    """(aten ops reaching the dispatcher's Python mode, every aten call the profiler records, nested included)."""
    with _OpCounter() as counter:
        fn()
    with torch.autograd.profiler.profile() as prof:
        fn()
    return sum(counter.ops.values()), sum(1 for e in prof.function_events if e.name.startswith("aten::"))


@torch.inference_mode()
def host_calls_per_step(generator: Generator) -> dict:
    """aten ops one decode step dispatches from the host: old engine (sample + cached forward) and new
    engine (its step function run eagerly); on CUDA the new engine replays that step as one graph."""
    engine, gpt, device = generator.engine, generator.model.gpt, generator.device
    texts, idxs, samples = _columns(_rows(generator.micro_batch))
    generator.codes(texts, idxs, samples)  # builds (and on CUDA captures) the engine
    ids = torch.from_numpy(generator.model.tokenizer.encode_batch(texts)[0]).to(device)
    keys = row_keys(0, idxs, samples, device=device)
    cache = gpt.new_cache()
    with autocast(device):
        logits = gpt(gpt.sequence(ids), cache)[:, -1]

        def old_step():
            code = choose_codes(logits, keys, 1, generator.config.sampling)
            gpt(code[:, None], cache)

        old = _count_ops(old_step)
    engine.step.fill_(1)
    new = _count_ops(lambda: engine._decode_step(engine.lengths[1]))
    result = {"layers": gpt.config.n_layer, "old_engine_aten_ops": old[0], "new_engine_aten_ops": new[0],
              "old_engine_aten_calls_profiled": old[1], "new_engine_aten_calls_profiled": new[1]}
    if engine.cuda_graph:
        before = engine.replays
        generator.codes(texts, idxs, samples)
        _sync(device)
        result["new_engine_host_calls_per_step"] = (engine.replays - before) / gpt.config.img_len
        result["new_engine_graph_replays_per_step"] = result["new_engine_host_calls_per_step"]
    return result


def _profiled_kv_bytes(engine: DecodeEngine, ids: torch.Tensor, keys: torch.Tensor) -> tuple[int, list[int]]:
    """Run one micro-batch eagerly under torch.profiler: (bytes of the key and value inputs of every
    attention call, per model row; the key lengths those calls saw, in call order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        engine(ids, keys)
    calls = sorted((e for e in prof.events() if e.name == "aten::scaled_dot_product_attention"),
                   key=lambda e: e.time_range.start)
    size = engine.gpt.head.weight.element_size()
    total = sum(math.prod(e.input_shapes[i][1:]) * size for e in calls for i in (1, 2))  # keys, values
    return total // engine.rows, [e.input_shapes[1][2] for e in calls]


def kv_cache_reads(generator: Generator, repeats: int) -> dict:
    """Bytes of the KV cache one image (one model row) reads over a micro-batch, attending over the
    whole cache at every call (before buckets) and over `kv_lengths`' buckets (now): the analytic count
    (`kv_cache_bytes`), checked against the key/value shapes the profiler records for one eager
    micro-batch of one row; and the GPT's seconds per micro-batch both ways (same tokens)."""
    gpt, sampling, device = generator.gpt, generator.config.sampling, generator.device
    config, size = gpt.config, gpt.head.weight.element_size()
    full = [config.block_size] * config.img_len
    one = DecodeEngine(gpt, sampling, 1, cuda_graph=False)
    texts, idxs, samples = _columns(_rows(generator.micro_batch))
    ids = torch.from_numpy(generator.model.tokenizer.encode_batch(texts)[0]).to(device)
    keys = row_keys(0, idxs, samples, device=device)
    profiled, seen = _profiled_kv_bytes(one, ids[:1], keys[:1])
    before, after = kv_cache_bytes(config, full, size), kv_cache_bytes(config, one.lengths, size)
    result = {"dtype": str(gpt.head.weight.dtype).removeprefix("torch."), "granule": KV_GRANULE,
              "bucket_lengths": sorted(set(one.lengths[1:])), "kv_bytes_per_image_full_cache": before,
              "kv_bytes_per_image": after, "read_fraction": round(after / before, 4),
              "profiled_kv_bytes_per_image": profiled,
              "profiled_lengths_match": seen == [n for n in one.lengths for _ in range(config.n_layer)]}
    engines = {"buckets": DecodeEngine(gpt, sampling, generator.micro_batch),
               "full_cache": DecodeEngine(gpt, sampling, generator.micro_batch, kv_granule=config.block_size)}
    codes = {name: engine(ids, keys) for name, engine in engines.items()}  # warm-up (and on CUDA, capture)
    result["same_tokens"] = bool(torch.equal(codes["buckets"], codes["full_cache"]))
    for name, engine in engines.items():
        result[f"{name}_gpt_seconds_per_micro_batch"] = round(timed(lambda: engine(ids, keys), device, repeats), 5)
    return result


def flops_per_image(generator: Generator) -> dict:
    """GPT forward FLOPs over text + image positions, and one VQGAN decode (counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    gpt = generator.model.gpt
    counter = FlopCounterMode(display=False)
    codes = torch.zeros(1, gpt.config.img_len, dtype=torch.int64, device=generator.device)
    with counter, torch.inference_mode():
        generator.model.vqgan.decode(codes)
    return {"gpt": gpt.flops_per_token() * (gpt.config.text_len + gpt.config.img_len),
            "vqgan": counter.get_total_flops()}


def breakdown(generator: Generator, repeats: int) -> dict:
    """Seconds per micro-batch of each part of ours alone, and images/s each would allow."""
    device, n = generator.device, generator.micro_batch
    texts, idxs, samples = _columns(_rows(n))
    codes, _, _ = generator.codes(texts, idxs, samples)
    pixels = generator.pixels(codes)
    pool = generator._pool
    parts = {
        "gpt": lambda: generator.codes(texts, idxs, samples),
        "vqgan": lambda: generator.pixels(codes),  # decode, uint8 and the copy to the host
        "encode": lambda: (list(pool.map(lambda p: encode_image(p, "png"), pixels)) if pool
                           else [encode_image(p, "png") for p in pixels]),
    }
    seconds = {name: timed(fn, device, repeats) for name, fn in parts.items()}
    result = {f"{name}_only_images_per_second": round(n / s, 2) for name, s in seconds.items()}
    result["seconds_per_micro_batch"] = {name: round(s, 5) for name, s in seconds.items()}
    result["gpt_ms_per_decode_step"] = round(1e3 * seconds["gpt"] / generator.model.gpt.config.img_len, 4)
    result["bound_by"] = max(seconds, key=seconds.get)
    return result


def decoder_layouts(generator: Generator, repeats: int, compile_decoder: bool) -> dict:
    """VQGAN decode images/s of one micro-batch of codes in NCHW, in channels_last and (with
    `compile_decoder`) NCHW under torch.compile, on the generator's weight copy: which layout the GPU
    default should be is decided by this measurement (CUDA's GroupNorm works on NCHW only, so a
    channels_last decoder pays a conversion around every norm)."""
    device, n = generator.device, generator.micro_batch
    codes = torch.randint(0, generator.model.vqgan.config.n_embed, (n, generator.model.gpt.config.img_len),
                          device=device)
    vqgan, dtype = generator.model.vqgan, generator.dtype
    variants = {"nchw": lambda: inference_copy(vqgan, dtype).decode,
                "channels_last": lambda: inference_copy(vqgan, dtype, channels_last=True).decode}
    if compile_decoder:
        variants["compiled_nchw"] = lambda: torch.compile(inference_copy(vqgan, dtype).decode)
    result = {}
    for name, make in variants.items():
        decode = make()
        with torch.inference_mode():
            decode(codes)  # warm-up (and compilation)
            result[f"{name}_images_per_second"] = round(n / timed(lambda: decode(codes), device, repeats), 2)
    result["fastest"] = max((k for k in result), key=result.get).removesuffix("_images_per_second")
    return result


def gpu_utilisation(generator: Generator, rates: dict, peak_tflops: float | None) -> dict:
    name = torch.cuda.get_device_name(generator.device)
    source = "--peak-tflops" if peak_tflops else "table"
    if peak_tflops is None:
        peak_tflops = peak_bf16_tflops(generator.device)
        source = "table" if peak_tflops else "unknown device: pass --peak-tflops"
    flops = flops_per_image(generator)
    total = flops["gpt"] + flops["vqgan"]
    out = {"device_name": name, "flops_per_image": flops, "peak_bf16_tflops": peak_tflops, "peak_source": source}
    sides = {"end_to_end": (rates["end_to_end"], total), "gpt_only": (rates["gpt"], flops["gpt"]),
             "vqgan_only": (rates["vqgan"], flops["vqgan"])}
    for label, (rate, per_image) in sides.items():
        achieved = rate * per_image / 1e12
        out[f"{label}_tflops"] = round(achieved, 3)
        out[f"{label}_fraction_of_peak"] = round(achieved / peak_tflops, 5) if peak_tflops else None
    out["roofline_images_per_second"] = round(peak_tflops * 1e12 / total, 1) if peak_tflops else None
    return out


def build(loaded, args, device, micro_batch: int) -> Generator:
    return Generator(loaded, GenerationConfig(seed=0, precision=args.precision), device, micro_batch=micro_batch,
                     encode_threads=args.encode_threads, compile_sampler=args.compile_sampler)


def measure(generator: Generator, args) -> dict:
    """Ours at one micro-batch: end to end over `rows` (default two micro-batches), plus the breakdown."""
    micro_batch, device = generator.micro_batch, generator.device
    rows = _rows(args.rows or 2 * micro_batch)
    run_generator(generator, rows[:micro_batch])  # warm-up: capture, kernels, allocator
    times = timed_both(lambda: run_generator(generator, rows), device, args.repeats)
    result = {"micro_batch": micro_batch, "rows": len(rows), **times,
              "images_per_second": round(len(rows) / times["seconds"], 3)}
    return result | breakdown(generator, args.repeats)


def time_old_engine(old: Generator, args) -> dict:
    """The old engine over the same rows as ours, same weights and micro-batch."""
    rows, n = _rows(args.rows or 2 * old.micro_batch), old.micro_batch
    run_generator(old, rows[:n])
    return _rate(timed_both(lambda: run_generator(old, rows), old.device, args.repeats), len(rows))


def time_reference(generator: Generator, args) -> dict:
    rows, n = _rows(args.rows or 2 * generator.micro_batch), generator.micro_batch
    run_reference(generator, rows[:n], n)
    return _rate(timed_both(lambda: run_reference(generator, rows, n), generator.device, args.repeats), len(rows))


def _rate(times: dict, rows: int) -> dict:
    return times | {"images_per_second": round(rows / times["seconds"], 3)}


def same_tokens(generator: Generator, old: Generator) -> bool:
    """The engine's codes equal the old path's for one micro-batch (meaningful on fp32)."""
    texts, idxs, samples = _columns(_rows(generator.micro_batch))
    return bool(torch.equal(generator.codes(texts, idxs, samples)[0], old.codes(texts, idxs, samples)[0]))


def speedups(result: dict) -> dict:
    """Ours against the old engine and the reference: images/s ratio, and the CPU-seconds ratio."""
    ours, out = result.get("ours"), {}
    for name, key in (("old_engine", "speedup_vs_old_engine"), ("reference", "speedup")):
        if ours and name in result:
            out[key] = round(ours["images_per_second"] / result[name]["images_per_second"], 2)
            out[key + "_in_cpu_seconds"] = round(result[name]["cpu_seconds"] / ours["cpu_seconds"], 2)
    return out


def compare(report: Report, loaded, generator: Generator, args) -> None:
    """Old engine and reference against ours, each its own section; tokens checked equal on fp32."""
    old = OldEngineGenerator(loaded, generator.config, generator.device, micro_batch=generator.micro_batch,
                             encode_threads=args.encode_threads)
    report.section("old_engine", lambda: time_old_engine(old, args))
    if not args.skip_reference:
        report.section("reference", lambda: time_reference(generator, args))
    if generator.dtype == torch.float32:
        report.section("same_tokens_as_old_engine", lambda: same_tokens(generator, old))
    report.data |= speedups(report.data)
    report.write()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per model call")
    parser.add_argument("--rows", type=int, default=None, help="rows per measurement (default: two micro-batches)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: what the job's CPU actors run with)")
    parser.add_argument("--encode-threads", type=int, default=None, help="PNG encoding threads (default: Generator's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is reported")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the reference algorithm")
    parser.add_argument("--skip-old", action="store_true", help="do not time the old engine (nor the reference)")
    parser.add_argument("--compile-sampler", action="store_true", help="torch.compile the engine's sampler")
    parser.add_argument("--sweep", default="", help="micro-batch sizes to measure ours at, comma-separated")
    parser.add_argument("--decoder-layouts", action="store_true",
                        help="time the VQGAN decode in NCHW and channels_last (and compiled on CUDA)")
    parser.add_argument("--json", default=None, help="also write the JSON object to this file")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: a section that would start later is skipped")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    report = Report(args.json, {"preset": args.preset, "device": str(device), "torch": torch.__version__,
                                "compile_sampler": args.compile_sampler, "micro_batch": args.micro_batch,
                                "repeats": args.repeats, "torch_threads": torch.get_num_threads()},
                    deadline=started + args.budget_s if args.budget_s else None)
    loaded = random_model(args.preset, device=device)  # in memory: no storage needed on a bare GPU box
    generator = build(loaded, args, device, args.micro_batch)
    report.data |= {"precision": str(generator.dtype).removeprefix("torch."), "gpt_params": loaded.gpt.num_params(),
                    "encode_threads": generator._pool._max_workers if generator._pool else 0}
    ours = report.section("ours", lambda: measure(generator, args))
    report.section("host_calls_per_step", lambda: host_calls_per_step(generator))
    report.section("kv_cache", lambda: kv_cache_reads(generator, args.repeats))
    if args.decoder_layouts:
        report.section("decoder_layouts", lambda: decoder_layouts(generator, args.repeats, device.type == "cuda"))
    if not args.skip_old:
        compare(report, loaded, generator, args)
    if args.sweep:
        report.section("sweep", lambda: [measure(build(loaded, args, device, int(mb)), args)
                                         for mb in args.sweep.split(",")])
        report.data["best_micro_batch"] = max(report.data.get("sweep", []) + [ours or {}],
                                              key=lambda r: r.get("images_per_second", 0)).get("micro_batch")
    if device.type == "cuda" and ours:
        rates = {"end_to_end": ours["images_per_second"], "gpt": ours["gpt_only_images_per_second"],
                 "vqgan": ours["vqgan_only_images_per_second"]}
        report.section("gpu", lambda: gpu_utilisation(generator, rates, args.peak_tflops)
                       | {"max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)})
    result = report.finish()
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)  # failed sections are in the JSON; the run still fails
