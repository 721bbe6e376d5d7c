"""Tests of painter.inference.sampling: KV-cache generation equals full recomputation, filtering, row-keyed noise."""

import math

import pytest
import torch

from painter.inference.sampling import SamplingConfig, choose_codes, filter_logits, generate, reference_generate, row_key, row_keys, uniform_noise
from sampling_helpers import keys_for, sharp_model, text_batch


# ---------------------------------------------------------------------------------------------
# cache equivalence

def test_greedy_with_cache_equals_reference():
    model = sharp_model()
    text_ids = text_batch(model, 4)
    keys = keys_for(4)
    greedy = SamplingConfig(top_k=1)
    assert greedy.is_greedy
    codes = generate(model, text_ids, keys, greedy)
    expected = reference_generate(model, text_ids, keys, greedy)
    assert codes.shape == (4, model.config.img_len) and codes.dtype == torch.int64
    assert torch.equal(codes, expected)
    assert len(torch.unique(codes)) > 5  # not a degenerate constant sequence
    # greedy is greedy: it ignores the keys and equals argmax of a full recomputation at each step
    assert torch.equal(generate(model, text_ids, keys_for(4, seed=9), greedy), codes)
    assert torch.equal(generate(model, text_ids, keys, SamplingConfig(temperature=0.0, top_k=None)), codes)
    with torch.no_grad():
        logits = model(model.sequence(text_ids, codes)[:, :-1])[:, model.config.text_len - 1:]
    assert torch.equal(logits.argmax(dim=-1), codes)


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, top_k=50),
                                      SamplingConfig(temperature=1.0, top_k=50, top_p=0.9),
                                      SamplingConfig(temperature=0.7, top_k=None, top_p=0.9)],
                         ids=["top_k", "top_k+top_p", "top_p"])
def test_sampling_with_cache_equals_reference(sampling):
    model = sharp_model(seed=1)
    text_ids = text_batch(model, 4, seed=2)
    keys = keys_for(4, seed=3)
    codes = generate(model, text_ids, keys, sampling)
    assert torch.equal(codes, reference_generate(model, text_ids, keys, sampling))
    # it really sampled: not the greedy sequence, and other keys give other tokens
    assert not torch.equal(codes, generate(model, text_ids, keys, SamplingConfig(top_k=1)))
    assert not torch.equal(codes, generate(model, text_ids, keys_for(4, seed=4), sampling))


def test_sampling_never_yields_a_non_image_code():
    model = sharp_model(seed=2, img_vocab=30, img_len=16, std=0.05)
    text_ids = text_batch(model, 64, seed=3)
    codes = generate(model, text_ids, keys_for(64), SamplingConfig(temperature=50.0, top_k=None))
    assert int(codes.min()) >= 0 and int(codes.max()) < model.config.img_vocab_size
    assert len(torch.unique(codes)) == model.config.img_vocab_size  # high temperature reaches every code
    # with logits that strongly prefer nothing, still only image codes come out of choose_codes
    flat = torch.zeros(1000, model.config.img_vocab_size)
    chosen = choose_codes(flat, keys_for(1000), 0, SamplingConfig(temperature=100.0, top_k=None))
    assert int(chosen.min()) >= 0 and int(chosen.max()) < model.config.img_vocab_size


# ---------------------------------------------------------------------------------------------
# reproducibility per (seed, idx, sample)

def test_row_tokens_do_not_depend_on_batch():
    model = sharp_model(seed=3)
    sampling = SamplingConfig(temperature=1.0, top_k=50)
    g = torch.Generator().manual_seed(4)
    texts = torch.randint(0, model.config.text_vocab_size, (5, model.config.text_len), generator=g)
    idxs = ["a", "b", "c", "d", "e"]
    batch = generate(model, texts, row_keys(7, idxs, [0] * 5), sampling)
    for i in (0, 2, 4):  # first, middle and last position of the batch of 5
        alone = generate(model, texts[i:i + 1], row_keys(7, [idxs[i]], [0]), sampling)
        assert torch.equal(alone[0], batch[i])
    # another order of the same rows gives the same rows
    order = [3, 0, 4, 1, 2]
    shuffled = generate(model, texts[order], row_keys(7, [idxs[j] for j in order], [0] * 5), sampling)
    assert torch.equal(shuffled, batch[order])
    # another sample number or another seed gives other tokens for the same text
    other_sample = generate(model, texts, row_keys(7, idxs, [1] * 5), sampling)
    other_seed = generate(model, texts, row_keys(8, idxs, [0] * 5), sampling)
    for other in (other_sample, other_seed):
        assert all(not torch.equal(other[i], batch[i]) for i in range(5))


def test_row_keys_are_stable_and_distinct():
    assert row_key(0, "x", 0) == row_key(0, "x", 0)
    assert len({row_key(s, i, n) for s in range(3) for i in ("x", "y", "宽松T恤") for n in range(3)}) == 27
    keys = row_keys(5, ["x", "y"], [0, 1])
    assert keys.dtype == torch.int64 and keys.shape == (2,)
    assert keys.tolist() == [row_key(5, "x", 0), row_key(5, "y", 1)]
    assert all(0 <= k < 2 ** 62 for k in keys.tolist())  # fits a signed int64 with room to spare


# ---------------------------------------------------------------------------------------------
# filtering and config

def test_top_k_keeps_exactly_k():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=g)
    for k in (1, 5, 50, 99):
        out = filter_logits(logits, k, None)
        assert torch.isfinite(out).sum(dim=-1).tolist() == [k] * 6
        kept = torch.isfinite(out)
        top = torch.topk(logits, k, dim=-1).indices
        assert kept.gather(-1, top).all()  # the k kept are the k largest
        assert torch.equal(out[kept], logits[kept])  # kept values are unchanged
    assert torch.equal(filter_logits(logits, 100, None), logits)
    assert torch.equal(filter_logits(logits, 1000, None), logits)
    assert torch.equal(filter_logits(logits, None, None), logits)


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1],
                          [0.96, 0.01, 0.01, 0.01, 0.01],
                          [0.1, 0.22, 0.18, 0.26, 0.24]])
    logits = probs.log()
    # row 0: 0.4 + 0.3 = 0.7 < 0.75 -> needs 0.15 too; row 1: 0.96 alone; row 2: all but 0.1
    out = filter_logits(logits, None, 0.75)
    assert torch.isfinite(out).tolist() == [[False, True, True, True, False],
                                            [True, False, False, False, False],
                                            [False, True, True, True, True]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    # a tiny top_p still keeps one logit (the largest)
    tiny = filter_logits(logits, None, 1e-6)
    assert torch.isfinite(tiny).sum(dim=-1).tolist() == [1, 1, 1]
    assert torch.isfinite(tiny).float().argmax(dim=-1).tolist() == [1, 0, 3]
    # top_p 1.0 keeps everything; combined with top_k the smaller set wins
    assert torch.equal(filter_logits(logits, None, 1.0), logits)
    assert torch.isfinite(filter_logits(logits, 2, 0.75)).sum(dim=-1).tolist() == [2, 1, 2]


def test_equal_logits_fall_to_the_lower_code_in_top_k_and_top_p():
    """The tie rule (stable descending order): of equal logits straddling the cut, the lower codes stay,
    and top-k keeps exactly k."""
    logits = torch.tensor([[0.2, 0.3, 0.2, 0.1, 0.2]]).log()  # codes 0, 2 and 4 tie
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, 3, None)).tolist() == [[True, True, True, False, False]]
    # sorted: 0.3 (code 1), then 0.2 for codes 0, 2, 4; 0.3 + 0.2 + 0.2 reaches 0.6 at code 2
    assert torch.isfinite(filter_logits(logits, None, 0.6)).tolist() == [[True, True, True, False, False]]


def test_top_p_nucleus_reaching_p_exactly_is_not_extended():
    # probabilities 0.5, 0.25, 0.25: the top token alone already holds p = 0.5
    logits = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert torch.isfinite(filter_logits(logits, None, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.75)).sum().item() == 2


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_k=0), dict(top_k=-3),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2)])
def test_sampling_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_edge_values():
    assert SamplingConfig(temperature=0.0).is_greedy
    assert SamplingConfig(top_k=1).is_greedy
    assert not SamplingConfig(top_k=2, top_p=1.0).is_greedy
    assert not SamplingConfig(top_k=None).is_greedy


# ---------------------------------------------------------------------------------------------
# the noise

def test_uniform_noise_is_uniform_and_keyed():
    keys = keys_for(64)
    u = torch.cat([uniform_noise(keys, step, 4096) for step in range(4)])  # 1M draws
    assert u.shape == (256, 4096) and u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0  # -log(-log(u)) stays finite
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.005)
    # a pure function of (key, step, code); different steps and keys give different noise
    assert torch.equal(uniform_noise(keys, 3, 4096), u[192:])
    assert torch.equal(uniform_noise(keys[5:6], 2, 4096)[0], u[128 + 5])
    assert not torch.equal(uniform_noise(keys, 0, 4096), uniform_noise(keys, 1, 4096))
    assert not torch.equal(u[0], u[1])
    # neighbouring codes and steps are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:64].flatten(), u[64:128].flatten()]))[0, 1])) < 0.01


def test_gumbel_max_sampling_matches_softmax_probabilities():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    logits = probs.log().expand(n, 4)
    keys = row_keys(0, [str(i) for i in range(n)], [0] * n)
    sampling = SamplingConfig(temperature=1.0, top_k=None)
    for step in (0, 17):
        chosen = choose_codes(logits, keys, step, sampling)
        freq = torch.bincount(chosen, minlength=4).float() / n
        assert torch.allclose(freq, probs, atol=0.015), (step, freq)
    # temperature sharpens / flattens the same distribution: p ** (1/T) normalised
    for temperature in (0.5, 2.0):
        chosen = choose_codes(logits, keys, 0, SamplingConfig(temperature=temperature, top_k=None))
        freq = torch.bincount(chosen, minlength=4).float() / n
        target = probs ** (1 / temperature)
        assert torch.allclose(freq, target / target.sum(), atol=0.015), (temperature, freq)
    # top_k 2 samples only the two best, renormalised
    chosen = choose_codes(logits, keys, 0, SamplingConfig(temperature=1.0, top_k=2))
    freq = torch.bincount(chosen, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]), atol=0.015)
    # one row over many steps follows the same distribution too
    one = keys[:1]
    steps = torch.stack([choose_codes(probs.log()[None], one, s, sampling)[0] for s in range(4000)])
    freq = torch.bincount(steps, minlength=4).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq
    assert math.isclose(float(freq.sum()), 1.0)
