"""Unit tests of painter.training: optimizer groups, lr schedule, pkeep corruption, train_step, and the GPU
path's per-device choices (fused AdamW, torch.compile), the device prefetcher and the MFU arithmetic."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from painter.checkpoint.config import preset_config
from painter.models.gpt import GPT
from painter.training.gpt import PEAK_BF16_TFLOPS, GPTLoss, known_peak_tflops, TrainConfig, compile_model, corrupt_tokens, lr_at, make_optimizer, mfu, param_groups, peak_bf16_tflops, prefetch_to_device, train_flops_per_token, train_step, use_compile, use_fused_adamw


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread, and steadiest on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(preset_config("tiny").gpt)


def _batch(gpt: GPT, rows: int, seed: int = 0):
    """A learnable batch: every image token is a function of the row's first text id."""
    g = torch.Generator().manual_seed(seed)
    c = gpt.config
    text = torch.randint(0, 500, (rows, c.text_len), generator=g)  # (B, Tt)
    positions = torch.arange(c.img_len)  # (Ti,)
    image = (text[:, :1] * 7 + positions) % c.img_vocab_size  # (B, Ti)
    return text, image


def test_weight_decay_groups_cover_every_parameter_once(gpt):
    decay, no_decay = param_groups(gpt, 0.1)
    names = {id(p): n for n, p in gpt.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert decay_names | no_decay_names == set(names.values())
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "head.weight" in decay_names and "blocks.0.attn.key.weight" in decay_names
    assert "blocks.0.mlp.0.weight" in decay_names
    for name in ("pos_emb", "tok_emb.weight", "ln_f.weight", "ln_f.bias", "blocks.0.ln1.weight",
                 "blocks.0.attn.key.bias", "blocks.1.mlp.2.bias"):
        assert name in no_decay_names


def test_lr_schedule_warmup_and_cosine_endpoints():
    config = TrainConfig(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(4, config) == pytest.approx(5e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lr_at(10, config) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half-way
    assert lr_at(110, config) == pytest.approx(1e-4)  # ends at min_lr_ratio * lr
    assert lr_at(500, config) == pytest.approx(1e-4)  # and stays there
    lrs = [lr_at(s, config) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, TrainConfig(lr=2e-4, warmup_steps=0, total_steps=5)) == pytest.approx(2e-4)


def test_pkeep_one_keeps_tokens_and_zero_replaces_all():
    codes = torch.arange(64).repeat(8, 1) % 256 + 1000  # (8, 64), all outside the vocab on purpose
    assert torch.equal(corrupt_tokens(codes, 1.0, 256), codes)
    g = torch.Generator().manual_seed(0)
    replaced = corrupt_tokens(codes, 0.0, 256, g)
    assert replaced.shape == codes.shape and replaced.dtype == codes.dtype
    assert (replaced < 256).all() and (replaced >= 0).all()
    half = corrupt_tokens(codes, 0.5, 256, torch.Generator().manual_seed(1))
    kept = (half == codes).float().mean().item()
    assert 0.35 < kept < 0.65


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(gpt):
    config = TrainConfig(lr=3e-3, warmup_steps=2, total_steps=30, weight_decay=0.0)
    model = GPTLoss(gpt)
    optimizer = make_optimizer(model, config)
    batch = _batch(gpt, 8)
    losses = [train_step(model, optimizer, [batch], config, s, gpt.config.img_vocab_size).loss.item()
              for s in range(30)]
    assert losses[0] == pytest.approx(math.log(gpt.config.img_vocab_size), rel=0.05)
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_accumulation_equals_one_full_batch(gpt):
    config_full = TrainConfig(lr=1e-3, grad_clip=1.0, total_steps=10)
    config_accum = TrainConfig(lr=1e-3, grad_clip=1.0, total_steps=10, grad_accum=2)
    full, accum = GPTLoss(gpt), GPTLoss(copy.deepcopy(gpt))
    text, image = _batch(gpt, 8)
    r_full = train_step(full, make_optimizer(full, config_full), [(text, image)], config_full, 0, 256)
    halves = [(text[:4], image[:4]), (text[4:], image[4:])]
    r_accum = train_step(accum, make_optimizer(accum, config_accum), halves, config_accum, 0, 256)
    assert r_accum.loss.item() == pytest.approx(r_full.loss.item(), rel=1e-5)
    assert r_accum.grad_norm.item() == pytest.approx(r_full.grad_norm.item(), rel=1e-4)
    assert r_accum.rows == r_full.rows == 8
    compared = total = 0
    for (name, a), b in zip(full.named_parameters(), accum.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)
        # Adam's first step moves a weight by lr * g / (|g| + 1e-8): a gradient of rounding-noise size
        # (~1e-9, summed in another order) moves it by a noisy fraction of lr, so compare the weights
        # whose gradients are well above that (or exactly 0: embedding rows of unused ids stay put).
        well_defined = (a.grad.abs() > 1e-6) | (a.grad == 0)
        torch.testing.assert_close(a[well_defined], b[well_defined], rtol=1e-4, atol=1e-6, msg=name)
        compared, total = compared + int(well_defined.sum()), total + a.numel()
    assert compared > 0.99 * total


def test_grad_clip_bounds_the_update_and_reports_the_unclipped_norm(gpt):
    config = TrainConfig(lr=1e-3, grad_clip=1e-3, total_steps=10)
    model = GPTLoss(gpt)
    result = train_step(model, make_optimizer(model, config), [_batch(gpt, 4)], config, 0, 256)
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert result.grad_norm.item() > 1e-3
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_pkeep_corrupts_inputs_but_scores_clean_targets(gpt):
    """With pkeep=0 the inputs are noise, yet the loss is measured against the clean codes."""
    model = GPTLoss(gpt)
    text, image = _batch(gpt, 4)
    noisy = corrupt_tokens(image, 0.0, 256, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, clean = gpt.loss(text, noisy, image), gpt.loss(text, image)
    config = TrainConfig(pkeep=0.0, total_steps=10)
    result = train_step(model, make_optimizer(model, config), [(text, image)], config, 0, 256,
                        generator=torch.Generator().manual_seed(0))
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.loss.item() != pytest.approx(clean.item(), rel=1e-6)


def test_fused_adamw_and_compile_are_chosen_per_device(gpt):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fused_adamw(cuda) and not use_fused_adamw(cpu)
    assert use_compile(cuda) and not use_compile(cpu)  # the defaults: a GPU compiles, a CPU does not
    assert use_compile(cpu, True) and not use_compile(cuda, False)  # an explicit choice wins
    optimizer = make_optimizer(gpt, TrainConfig())  # parameters on the CPU: the for-each AdamW
    assert not optimizer.defaults["fused"]
    model = GPTLoss(gpt)
    assert compile_model(model, False) is model
    assert TrainConfig().compile is None


def test_prefetcher_yields_the_same_batches_in_order(gpt):
    batches = [(*_batch(gpt, 3, seed), [f"row-{seed}"]) for seed in range(5)]  # row ids pass through as they are
    taken = []

    def source():
        for batch in batches:
            taken.append(batch)
            yield batch

    prefetched = prefetch_to_device(source(), torch.device("cpu"))
    first = next(prefetched)
    assert len(taken) == 1  # lazy: nothing is read far ahead of the step on a CPU
    out = [first, *prefetched]
    assert len(out) == len(batches)
    for got, want in zip(out, batches):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert list(prefetch_to_device(iter([]), "cpu")) == []


def test_mfu_is_training_flops_over_the_devices_peak(gpt):
    flops = train_flops_per_token(gpt)
    assert flops == 3 * gpt.flops_per_token() > 0
    assert mfu(flops, 1000.0, None) is None  # no known peak: no figure
    assert mfu(6e9, 50_000.0, 1000.0) == pytest.approx(0.3)  # 3e14 FLOP/s of 1e15
    assert mfu(6e9, 50_000.0, 1000.0, devices=2) == pytest.approx(0.15)
    assert peak_bf16_tflops(torch.device("cpu")) is None
    assert PEAK_BF16_TFLOPS["H100", None] == PEAK_BF16_TFLOPS["H200", None] == 989.0


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40", 181.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA A40", None), ("NVIDIA GeForce RTX 4090", None), ("Tesla T4", None),
])
def test_peaks_match_whole_model_names_and_unknown_gpus_have_none(name, peak):
    assert known_peak_tflops(name) == peak
