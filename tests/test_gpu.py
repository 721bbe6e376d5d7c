"""GPU tests (marker `gpu`, skipped without CUDA): CUDA-graph decoding equals eager decoding token for token,
the step is one replay with no host synchronisation, images do not depend on how rows are batched, and
bf16 stays within a stated tolerance of fp32.

`benchmarks/gpu.sh` runs them with `pytest -m gpu tests/test_gpu.py`; on a machine without pytest it
runs this file as a script (`python tests/test_gpu.py`), which calls every test and prints a summary.
The tolerance for bf16 (same codes decoded by the bf16 channels_last VQGAN and the fp32 one): mean
absolute pixel difference <= 3 and 99th percentile <= 16 (of 255); next-code logits of the bf16 GPT
correlate >= 0.99 with fp32's. Measured on CPU bf16 for `tiny`/`small` random weights: mean 1.2-1.5,
99th percentile 5-8.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_sampling's helpers, when run as a script
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # painter from the checkout

from painter.checkpoint.model_dir import random_model  # noqa: E402
from painter.inference.engine import DecodeEngine  # noqa: E402
from painter.inference.generator import GenerationConfig, Generator  # noqa: E402
from painter.inference.sampling import SamplingConfig, reference_generate, row_keys  # noqa: E402
from sampling_helpers import keys_for, sharp_model, text_batch  # noqa: E402

try:
    import pytest
except ImportError:  # the GPU machine may lack pytest; see the module docstring
    pytest = None

HAS_CUDA = torch.cuda.is_available()
if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

SAMPLINGS = {"greedy": SamplingConfig(top_k=1), "top_k": SamplingConfig(temperature=1.0, top_k=50),
             "top_k+top_p": SamplingConfig(temperature=1.0, top_k=50, top_p=0.9),
             "top_p": SamplingConfig(temperature=0.8, top_k=None, top_p=0.95)}
ROWS = [(f"p{i}", f"宽松T恤 第{i}款", s) for i in range(6) for s in range(2)]


@functools.lru_cache(maxsize=None)
def tiny_model():
    return random_model("tiny", device="cuda")


def _images(generator: Generator, rows, batch_size: int) -> dict:
    images = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        encoded, _, _ = generator.images([r[1] for r in chunk], [r[0] for r in chunk], [r[2] for r in chunk])
        images.update({(r[0], r[2]): png for r, png in zip(chunk, encoded)})
    return images


def test_graph_replay_equals_eager_token_for_token():
    for dtype in (torch.float32, torch.bfloat16):
        model = sharp_model(seed=1).cuda().to(dtype)
        text_ids, keys = text_batch(model, 6, seed=2).cuda(), keys_for(6, seed=3).cuda()
        for name, sampling in SAMPLINGS.items():
            graphed = DecodeEngine(model, sampling, 6, cuda_graph=True)
            eager = DecodeEngine(model, sampling, 6, cuda_graph=False)
            codes = graphed(text_ids, keys)
            assert torch.equal(codes, eager(text_ids, keys)), (dtype, name)
            assert torch.equal(graphed(text_ids, keys), codes), (dtype, name)  # replayed again: the same
            if dtype == torch.float32:
                assert torch.equal(codes, reference_generate(model, text_ids, keys, sampling)), name


def test_one_step_graph_per_kv_bucket_all_in_one_pool_with_the_eager_tokens():
    """8 + 128 positions: steps attend over 64, 128 or 136 cache positions, one captured graph each, and
    every graph, the prefill's included, allocates from one memory pool. Graphed = eager in fp32 and bf16;
    in fp32 also = the whole cache every step = the reference."""
    sampling = SAMPLINGS["top_k+top_p"]
    for dtype in (torch.float32, torch.bfloat16):
        model = sharp_model(seed=7, img_len=128).cuda().to(dtype)
        text_ids, keys = text_batch(model, 4, seed=4).cuda(), keys_for(4, seed=5).cuda()
        graphed = DecodeEngine(model, sampling, 4)
        codes = graphed(text_ids, keys)
        prefill, steps = graphed._graphs
        assert sorted(steps) == [64, 128, 136] and len({g.pool() for g in (prefill, *steps.values())}) == 1
        assert torch.equal(codes, DecodeEngine(model, sampling, 4, cuda_graph=False)(text_ids, keys)), dtype
        if dtype == torch.float32:
            full = DecodeEngine(model, sampling, 4, kv_granule=model.config.block_size)
            assert torch.equal(codes, full(text_ids, keys))
            assert torch.equal(codes, reference_generate(model, text_ids, keys, sampling))


def test_compiled_sampler_gives_the_same_tokens_inside_the_graph():
    model = sharp_model(seed=4).cuda().to(torch.bfloat16)
    text_ids, keys = text_batch(model, 6, seed=5).cuda(), keys_for(6, seed=6).cuda()
    sampling = SAMPLINGS["top_k+top_p"]
    compiled = DecodeEngine(model, sampling, 6, compile_sampler=True)
    assert torch.equal(compiled(text_ids, keys), DecodeEngine(model, sampling, 6)(text_ids, keys))


def test_each_step_is_one_replay_without_host_synchronisation():
    model = sharp_model(seed=2).cuda()
    engine = DecodeEngine(model, SAMPLINGS["top_k+top_p"], 4)
    text_ids, keys = text_batch(model, 4).cuda(), keys_for(4).cuda()
    first = engine(text_ids, keys)  # captures
    replays = engine.replays
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
    try:
        codes = engine(text_ids, keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.replays - replays == model.config.img_len  # the prefill and img_len - 1 steps
    assert torch.equal(codes, first)


def test_generator_queues_a_micro_batch_without_waiting_for_the_gpu():
    """Host inputs go up from pinned memory and the codes stay on the device: the host can queue the
    next micro-batch while the GPU works (the overlap the Generator's loop relies on)."""
    generator = Generator(tiny_model(), GenerationConfig(seed=1), "cuda", micro_batch=4)
    texts, idxs, samples = [r[1] for r in ROWS[:4]], [r[0] for r in ROWS[:4]], [r[2] for r in ROWS[:4]]
    first, _, _ = generator.codes(texts, idxs, samples)  # builds and captures the engine
    torch.cuda.set_sync_debug_mode("error")
    try:
        codes, _, _ = generator.codes(texts, idxs, samples)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(codes, first)


def test_images_are_the_same_across_micro_batch_counts():
    loaded = tiny_model()
    generator = Generator(loaded, GenerationConfig(seed=7), "cuda", micro_batch=4)
    assert generator.dtype == torch.bfloat16 and generator.engine.cuda_graph
    by_one = _images(generator, ROWS, 1)  # 12 micro-batches of 1 row + 3 padding
    assert _images(generator, ROWS, 12) == by_one  # 3 full micro-batches in one call
    assert _images(generator, ROWS[::-1], 5) == by_one  # another order and composition
    fresh = Generator(loaded, GenerationConfig(seed=7), "cuda", micro_batch=4, encode_threads=0)
    assert _images(fresh, ROWS, 12) == by_one  # another generator (another capture)
    assert len(set(by_one.values())) == len(ROWS)


def test_fp32_generator_on_cuda_gives_the_reference_tokens():
    loaded = tiny_model()
    generator = Generator(loaded, GenerationConfig(seed=3, precision="fp32", top_k=1), "cuda", micro_batch=4)
    rows = ROWS[:4]
    codes, _, _ = generator.codes([r[1] for r in rows], [r[0] for r in rows], [r[2] for r in rows])
    ids, _ = loaded.tokenizer.encode_batch([r[1] for r in rows])
    keys = row_keys(3, [r[0] for r in rows], [r[2] for r in rows], device="cuda")
    expected = reference_generate(loaded.gpt, torch.from_numpy(ids).cuda(), keys, generator.config.sampling)
    assert torch.equal(codes, expected)


def test_bf16_stays_within_tolerance_of_fp32():
    loaded = tiny_model()
    fp32 = Generator(loaded, GenerationConfig(precision="fp32"), "cuda", micro_batch=16)
    bf16 = Generator(loaded, GenerationConfig(precision="bf16"), "cuda", micro_batch=16)
    assert bf16.vqgan.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, loaded.config.gpt.img_vocab_size, (16, loaded.config.gpt.img_len), generator=g).cuda()
    diff = np.abs(fp32.pixels(codes).astype(np.int16) - bf16.pixels(codes).astype(np.int16))
    assert diff.mean() <= 3.0 and np.percentile(diff, 99) <= 16, (diff.mean(), np.percentile(diff, 99))
    ids = torch.from_numpy(loaded.tokenizer.encode_batch([r[1] for r in ROWS])[0]).cuda()
    positions = torch.arange(ids.size(1), device="cuda")
    with torch.inference_mode():
        logits = [gen.gpt.forward_static(gen.gpt.sequence(ids), positions, gen.gpt.new_static_cache(len(ROWS))).float()
                  for gen in (fp32, bf16)]
    corr = torch.corrcoef(torch.stack([logits[0].flatten(), logits[1].flatten()]))[0, 1]
    assert corr >= 0.99, float(corr)


if __name__ == "__main__":
    if not HAS_CUDA:
        print("tests/test_gpu.py: no CUDA GPU, every test skipped")
        sys.exit(0)
    failed = 0
    for name, test in [(k, v) for k, v in dict(globals()).items() if k.startswith("test_") and callable(v)]:
        try:
            test()
            print(f"PASSED {name}")
        except Exception as e:  # noqa: BLE001 - report every test, then fail at the end
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}")
    print(f"{failed} failed" if failed else "all passed")
    sys.exit(1 if failed else 0)
