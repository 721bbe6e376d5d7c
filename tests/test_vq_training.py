"""VQGAN optimisation in plain torch: the loss falls, dead-code restarts revive codes (and agree across
DDP ranks), the GAN term is off by default and trains the discriminator when asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from painter.evaluation import synthetic
from painter.checkpoint.config import preset_config
from painter.evaluation.reconstruction import codebook_usage
from painter.io.images import to_model_input
from painter.models.vqgan import VQGAN
from painter.training.gpt import lr_at
from painter.training.vqgan import CodeCounter, PatchDiscriminator, VQTrainConfig, hinge_d_loss, make_optimizers, restart_dead_codes, train_step, usage_from_counts


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, size: int = 32) -> torch.Tensor:
    """n synthetic scenes (B, 3, size, size) in [-1, 1]."""
    scenes = synthetic.sample_scenes(n, 0)
    pixels = np.stack([np.asarray(synthetic.render(s, size, i)) for i, s in enumerate(scenes)])
    return torch.from_numpy(to_model_input(pixels))


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(preset_config("tiny").vqgan).train()


def collapse(vqgan: VQGAN) -> None:
    """A codebook where every latent picks code 0: the others are far away."""
    with torch.no_grad():
        vqgan.quantize.embedding.weight.fill_(1e3)
        vqgan.quantize.embedding.weight[0] = 0.0


def test_loss_falls_on_a_fixed_batch():
    x = images(4)
    vqgan = tiny_vqgan()
    config = VQTrainConfig(lr=3e-3, total_steps=40, restart_every=5)
    optimizer, disc_optimizer = make_optimizers(vqgan, config)
    assert disc_optimizer is None
    counter = CodeCounter(256)
    results = [train_step(vqgan, optimizer, x, config, step, counter) for step in range(40)]
    first, last = results[0], results[-1]
    assert last.loss < 0.75 * first.loss, (first.loss, last.loss)
    assert last.l1 < first.l1 and last.l2 < first.l2
    assert torch.isclose(first.loss, first.l1 + first.l2 + first.codebook)
    assert [r.lr for r in results] == [lr_at(s, config.schedule()) for s in range(40)]
    assert all(r.gan is None and r.disc_loss is None for r in results)
    assert int(counter.window.sum()) == 40 * 4 * 64  # every position of every step counted


def test_dead_code_restart_revives_unused_codes():
    x = images(8)
    vqgan = tiny_vqgan()
    collapse(vqgan)
    with torch.no_grad():
        before = usage_from_counts(torch.bincount(vqgan.encode(x).flatten(), minlength=256))
    assert before["codes_used"] == 1
    config = VQTrainConfig(lr=1e-3, total_steps=10, restart_every=1)
    optimizer, _ = make_optimizers(vqgan, config)
    counter = CodeCounter(256)
    result = train_step(vqgan, optimizer, x, config, 0, counter, seed=3)
    assert result.restarted == 255  # every code but 0 was unused since the (implicit) last restart
    assert int(counter.since_restart.sum()) == 0  # counts start again after a restart
    weight = vqgan.quantize.embedding.weight
    assert weight[1:].abs().max() < 100  # the far-away rows now hold encoder outputs
    state = optimizer.state[weight]
    assert state["exp_avg"][1:].abs().max() == 0 and state["exp_avg_sq"][1:].abs().max() == 0
    with torch.no_grad():
        after = usage_from_counts(torch.bincount(vqgan.encode(x).flatten(), minlength=256))
    assert after["codebook_usage"] > 0.3 and after["perplexity"] > 50, after
    # a second restart with every code used restarts nothing
    assert restart_dead_codes(vqgan, None, torch.ones(256, dtype=torch.long), optimizer) == 0


def test_restart_without_restart_every_keeps_a_collapsed_codebook():
    x = images(8)
    vqgan = tiny_vqgan()
    collapse(vqgan)
    config = VQTrainConfig(lr=1e-3, total_steps=10, restart_every=0)
    optimizer, _ = make_optimizers(vqgan, config)
    counter = CodeCounter(256)
    assert all(train_step(vqgan, optimizer, x, config, s, counter).restarted == 0 for s in range(3))
    assert counter.window_usage()["codes_used"] == 1


def _restart_on_rank(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: different latents and counts per rank, then one restart together."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        vqgan = VQGAN(preset_config("tiny").vqgan)
        counts = torch.zeros(256, dtype=torch.long)
        counts[rank::2] = 1  # rank 0 used the even codes, rank 1 the odd ones, except 10 of them
        counts[100:110] = 0
        latents = torch.full((2, 32, 8, 8), float(rank + 1)) + torch.arange(2 * 8 * 8).float().view(2, 1, 8, 8)
        n = restart_dead_codes(vqgan, latents if rank == 0 else None, counts, seed=7)
        torch.save({"n": n, "weight": vqgan.quantize.embedding.weight.detach().clone()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_restarts_and_use_rank_0s_latents(tmp_path):
    mp.spawn(_restart_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["n"] == r1["n"] == 10  # only codes unused on both ranks
    assert torch.equal(r0["weight"], r1["weight"])
    revived = r0["weight"][100:110]
    assert (revived[:, 0] >= 1).all() and (revived[:, 0] < 1 + 128).all()  # rank 0's latents (1 + position)
    assert len(set(revived[:, 0].tolist())) == 10  # distinct positions
    torch.manual_seed(0)
    untouched = VQGAN(preset_config("tiny").vqgan).quantize.embedding.weight.detach()
    assert torch.equal(r0["weight"][:100], untouched[:100]) and torch.equal(r0["weight"][110:], untouched[110:])


def test_code_counter_measures_like_evaluate():
    counter = CodeCounter(16)
    codes = torch.tensor([[0, 1, 1, 3], [3, 3, 5, 0]])
    counter.update(codes)
    expected = codebook_usage(codes.numpy(), 16)
    assert counter.window_usage() == expected
    assert expected["codes_used"] == 4 and expected["codebook_usage"] == 0.25
    assert int(counter.window.sum()) == 0 and int(counter.since_restart.sum()) == 8  # the window was reset


def test_gan_term_is_off_by_default_and_trains_the_discriminator_when_asked():
    x = images(4)
    assert VQTrainConfig().gan_weight == 0 and not VQTrainConfig().gan_active(10_000)
    vqgan = tiny_vqgan()
    disc = PatchDiscriminator.for_resolution(32)
    assert disc(x).shape == (4, 1, 6, 6)  # 2 stride-2 layers at 32 px, then two 4x4 stride-1 convs
    config = VQTrainConfig(lr=1e-3, total_steps=10, restart_every=0, gan_weight=0.5, gan_start=2)
    optimizer, disc_optimizer = make_optimizers(vqgan, config, disc)
    counter = CodeCounter(256)
    start = [p.detach().clone() for p in disc.parameters()]
    for step in range(2):  # before gan_start: no GAN term, the discriminator untouched
        r = train_step(vqgan, optimizer, x, config, step, counter, discriminator=disc, disc_optimizer=disc_optimizer)
        assert r.gan is None and r.disc_loss is None
    assert all(torch.equal(a, b) for a, b in zip(start, disc.parameters()))
    assert all(p.grad is None for p in disc.parameters())
    r = train_step(vqgan, optimizer, x, config, 2, counter, discriminator=disc, disc_optimizer=disc_optimizer)
    assert r.gan is not None and r.disc_loss is not None and torch.isfinite(r.disc_loss)
    assert torch.isclose(r.loss, r.l1 + r.l2 + r.codebook + 0.5 * r.gan, atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())  # gradients reach it
    assert any(not torch.equal(a, b) for a, b in zip(start, disc.parameters()))
    assert all(p.requires_grad for p in disc.parameters())


def test_hinge_loss():
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])) == 0  # both beyond the margin
    assert hinge_d_loss(torch.tensor([0.0]), torch.tensor([0.0])) == 1
