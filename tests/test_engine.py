"""Tests of painter.inference.engine and the top-k-only sampler: the static-shape decode loop gives the reference's
tokens, rows do not depend on the micro-batch, each step reads only its bucket of the KV cache, the steering
hooks (combine, forcing) do what they say, and both samplers break ties by one rule."""

import math

import pytest
import torch

from painter.inference.engine import DecodeEngine, Steering, kv_cache_bytes, kv_lengths
from painter.models.gpt import GPT, GPTConfig
from painter.inference.sampling import SamplingConfig, choose_codes, reference_generate, row_keys, sample_codes, uniform_noise, uniform_noise_at
from sampling_helpers import keys_for, sharp_model, text_batch

SAMPLINGS = [SamplingConfig(top_k=1), SamplingConfig(temperature=0.0, top_k=None),
             SamplingConfig(temperature=1.0, top_k=50), SamplingConfig(temperature=1.0, top_k=50, top_p=0.9),
             SamplingConfig(temperature=0.7, top_k=None, top_p=0.9), SamplingConfig(temperature=1.3, top_k=None)]
IDS = ["greedy", "temperature0", "top_k", "top_k+top_p", "top_p", "no_filter"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_engine_codes_equal_the_reference_token_for_token(sampling):
    model = sharp_model(seed=1)
    text_ids, keys = text_batch(model, 4, seed=2), keys_for(4, seed=3)
    engine = DecodeEngine(model, sampling, 4)
    codes = engine(text_ids, keys)
    assert codes.shape == (4, model.config.img_len) and codes.dtype == torch.int64
    assert torch.equal(codes, reference_generate(model, text_ids, keys, sampling))
    assert len(torch.unique(codes)) > 5  # not a degenerate constant sequence
    # the buffers are reused: another batch, then the first again, gives the first's codes again
    other = engine(text_batch(model, 4, seed=9), keys_for(4, seed=8))
    assert not torch.equal(other, codes)
    assert torch.equal(engine(text_ids, keys), codes)


def test_engine_samples_really_depend_on_the_keys():
    model = sharp_model(seed=1)
    text_ids = text_batch(model, 4, seed=2)
    sampling = SamplingConfig(temperature=1.0, top_k=50)
    engine = DecodeEngine(model, sampling, 4)
    codes = engine(text_ids, keys_for(4, seed=3))
    assert not torch.equal(codes, engine(text_ids, keys_for(4, seed=4)))
    assert not torch.equal(codes, DecodeEngine(model, SamplingConfig(top_k=1), 4)(text_ids, keys_for(4, seed=3)))


@pytest.mark.parametrize("micro_batch", [1, 5])
def test_row_codes_depend_only_on_seed_idx_sample(micro_batch):
    model = sharp_model(seed=3)
    sampling = SamplingConfig(temperature=1.0, top_k=50)
    g = torch.Generator().manual_seed(4)
    texts = torch.randint(0, model.config.text_vocab_size, (5, model.config.text_len), generator=g)
    idxs = ["a", "b", "c", "d", "e"]
    expected = reference_generate(model, texts, row_keys(7, idxs, [0] * 5), sampling)
    engine = DecodeEngine(model, sampling, micro_batch)
    order = [3, 0, 4, 1, 2]  # another order of the same rows
    got = torch.cat([engine(texts[order][i:i + micro_batch], row_keys(7, [idxs[j] for j in order[i:i + micro_batch]],
                                                                        [0] * micro_batch))
                     for i in range(0, 5, micro_batch)])
    assert torch.equal(got, expected[order])
    other_sample = torch.cat([engine(texts[i:i + micro_batch], row_keys(7, idxs[i:i + micro_batch], [1] * micro_batch))
                              for i in range(0, 5, micro_batch)])
    assert all(not torch.equal(other_sample[i], expected[i]) for i in range(5))


def test_engine_rejects_other_shapes_and_unasked_forcing():
    model = sharp_model()
    engine = DecodeEngine(model, SamplingConfig(), 2)
    with pytest.raises(ValueError, match="engine built for"):
        engine(text_batch(model, 3), keys_for(3))
    with pytest.raises(ValueError, match="forcing"):
        engine(text_batch(model, 2), keys_for(2), forced_codes=torch.zeros(2, model.config.img_len, dtype=torch.int64))
    with pytest.raises(ValueError, match="cuda_graph"):
        DecodeEngine(model, SamplingConfig(), 2, cuda_graph=True)
    with pytest.raises(ValueError, match="combine"):
        Steering(rows_per_sample=2)


# ---------------------------------------------------------------------------------------------
# KV-length buckets: each step reads the filled part of the cache

def test_kv_lengths_cover_every_step_in_a_few_buckets():
    base = GPTConfig()  # 32 text + 256 image positions
    lengths = kv_lengths(base)
    assert len(lengths) == base.img_len and lengths[0] == base.text_len
    assert all(base.text_len + s <= n <= base.block_size for s, n in enumerate(lengths[1:], 1))  # covers step s
    assert sorted(set(lengths[1:])) == [64, 128, 192, 256, 288] and lengths == sorted(lengths)
    assert kv_cache_bytes(base, lengths, 2) / kv_cache_bytes(base, [base.block_size] * base.img_len, 2) < 0.65
    assert set(kv_lengths(base, base.block_size)[1:]) == {base.block_size}  # one bucket: the whole cache
    assert sorted(set(kv_lengths(base, 32)[1:])) == list(range(64, 289, 32))  # step 1 already needs 33
    with pytest.raises(ValueError, match="granule"):
        kv_lengths(base, 0)


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0, top_k=50),
                                      SamplingConfig(temperature=0.8, top_k=None, top_p=0.9)], ids=["top_k", "top_p"])
def test_bucketed_steps_give_the_full_cache_engines_and_the_references_tokens(sampling):
    model = sharp_model(seed=7, img_len=128)  # 8 + 128 positions: buckets 64, 128, 136
    text_ids, keys = text_batch(model, 3, seed=4), keys_for(3, seed=5)
    buckets = DecodeEngine(model, sampling, 3)
    full = DecodeEngine(model, sampling, 3, kv_granule=model.config.block_size)
    assert len(set(buckets.lengths[1:])) == 3 and set(full.lengths[1:]) == {model.config.block_size}
    codes = buckets(text_ids, keys)
    assert torch.equal(codes, full(text_ids, keys))
    assert torch.equal(codes, reference_generate(model, text_ids, keys, sampling))
    assert len(torch.unique(codes)) > 20


def _attention_inputs(engine: DecodeEngine, text_ids, keys) -> list[tuple]:
    """(key shape, value shape) of every attention call of one micro-batch, in call order, from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        engine(text_ids, keys)
    calls = sorted((e for e in prof.events() if e.name == "aten::scaled_dot_product_attention"),
                   key=lambda e: e.time_range.start)
    return [(tuple(e.input_shapes[1]), tuple(e.input_shapes[2])) for e in calls]


def test_kv_bytes_per_image_shrink_with_buckets_and_the_profiler_sees_the_counted_shapes():
    model = sharp_model(seed=7, img_len=128)
    config, sampling = model.config, SamplingConfig(temperature=1.0, top_k=50)
    text_ids, keys = text_batch(model, 1, seed=4), keys_for(1, seed=5)
    read, codes = {}, {}
    for name, granule in (("buckets", 64), ("full_cache", config.block_size)):
        engine = DecodeEngine(model, sampling, 1, kv_granule=granule)
        inputs = _attention_inputs(engine, text_ids, keys)
        assert [k[2] for k, _ in inputs] == [n for n in engine.lengths for _ in range(config.n_layer)], name
        assert all(k == v for k, v in inputs)
        profiled = sum(2 * math.prod(k[1:]) * 4 for k, _ in inputs)  # keys and values, fp32, one row
        read[name], codes[name] = kv_cache_bytes(config, engine.lengths, 4), engine(text_ids, keys)
        assert profiled == read[name], name
    assert torch.equal(codes["buckets"], codes["full_cache"])
    before = kv_cache_bytes(config, [config.block_size] * config.img_len, 4)  # every call over the whole cache
    full_steps = [config.text_len] + [config.block_size] * (config.img_len - 1)  # the prefill reads its text only
    assert read["full_cache"] == kv_cache_bytes(config, full_steps, 4) < before
    assert read["buckets"] < 0.8 * before


# ---------------------------------------------------------------------------------------------
# steering hooks: what guidance and image prompts build on

def test_combine_mixes_model_rows_into_sampled_rows():
    """Two model rows per sample, the code fed back to both: keeping only the first block of rows
    gives the plain tokens; mixing u + S*(c - u) with S = 1 gives them too; S = 0 gives the second block's."""
    model = sharp_model(seed=5)
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    cond, null = text_batch(model, 3, seed=6), text_batch(model, 3, seed=7)
    keys = keys_for(3, seed=1)
    plain = DecodeEngine(model, sampling, 3)
    both = torch.cat([cond, null])  # (2B, Tt): conditional rows, then null rows in the same order

    def guided(scale: float) -> torch.Tensor:
        def combine(logits):  # (2B, V) -> (B, V)
            c, u = logits.chunk(2)
            return u + scale * (c - u)
        return DecodeEngine(model, sampling, 3, steering=Steering(rows_per_sample=2, combine=combine))(both, keys)

    assert torch.equal(guided(1.0), plain(cond, keys))
    assert torch.equal(guided(0.0), plain(null, keys))
    assert not torch.equal(guided(3.0), plain(cond, keys))


def test_forced_codes_are_kept_and_the_rest_continue_from_them():
    model = sharp_model(seed=6)
    greedy = SamplingConfig(top_k=1)
    text_ids, keys = text_batch(model, 2, seed=3), keys_for(2)
    img_len, kept = model.config.img_len, 6
    forced = torch.randint(0, model.config.img_vocab_size, (2, img_len), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, img_len, dtype=torch.bool)
    mask[:, :kept] = True
    engine = DecodeEngine(model, greedy, 2, steering=Steering(forcing=True))
    codes = engine(text_ids, keys, forced_codes=forced, forced_mask=mask)
    assert torch.equal(codes[:, :kept], forced[:, :kept])
    with torch.no_grad():  # every later code is the argmax given everything before it
        logits = model(model.sequence(text_ids, codes)[:, :-1])[:, model.config.text_len - 1:]
    assert torch.equal(logits.argmax(dim=-1)[:, kept:], codes[:, kept:])
    assert not torch.equal(codes[:, kept:], forced[:, kept:])
    # without a mask the engine samples freely: the plain tokens
    assert torch.equal(engine(text_ids, keys), DecodeEngine(model, greedy, 2)(text_ids, keys))


# ---------------------------------------------------------------------------------------------
# the top-k-only noise

def test_noise_at_codes_is_the_full_noise_at_those_codes():
    keys = keys_for(16)
    codes = torch.randint(0, 4096, (16, 100), generator=torch.Generator().manual_seed(1))
    for step in (0, 5, 255):
        full = uniform_noise(keys, step, 4096)
        assert torch.equal(uniform_noise_at(keys, step, codes), full.gather(1, codes))
        assert torch.equal(uniform_noise_at(keys, torch.tensor([step]), codes), full.gather(1, codes))


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_top_k_only_sampler_picks_the_reference_samplers_codes(sampling):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(512, 300, generator=g) * 3
    keys = keys_for(512, seed=4)
    for step in (0, 1, 77):
        expected = choose_codes(logits, keys, step, sampling)
        assert torch.equal(sample_codes(logits, keys, step, sampling), expected)
        assert torch.equal(sample_codes(logits, keys, torch.tensor([step]), sampling), expected)


@pytest.mark.parametrize("sampling, kept", [(SamplingConfig(temperature=1.0, top_k=5), {3, 17, 0, 2, 5}),
                                             (SamplingConfig(temperature=0.5, top_k=5, top_p=0.8), {3, 17, 0})],
                         ids=["top_k", "top_k+top_p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_tied_at_the_kth_keep_the_lower_codes_in_engine_and_reference(sampling, kept, dtype):
    """Ten equal logits straddle the 5th: both samplers keep the two larger codes and the lowest tied
    codes (stable descending order), never a higher tied one, and pick the same code for every row."""
    n, vocab = 4000, 40
    logits = torch.full((vocab,), -4.0)
    logits[[3, 17]] = torch.tensor([2.0, 1.5])
    logits[[33, 0, 25, 5, 39, 2, 11, 20, 8, 30]] = 1.0
    batch, keys = logits.to(dtype).expand(n, vocab), keys_for(n, seed=2)
    engine = sample_codes(batch, keys, 3, sampling)
    assert torch.equal(engine, choose_codes(batch, keys, 3, sampling))
    assert set(engine.tolist()) == kept  # every kept code is drawn, no other


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_bf16_logits_tie_often_and_both_samplers_break_the_ties_alike(sampling):
    logits = (torch.randn(512, 300, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    ranked = logits.float().sort(dim=-1, descending=True).values
    assert int((ranked[:, 49] == ranked[:, 50]).sum()) > 50  # many rows tie at the 50th logit
    keys = keys_for(512, seed=6)
    for step in (0, 9, 200):
        assert torch.equal(sample_codes(logits, keys, step, sampling), choose_codes(logits, keys, step, sampling))


def test_top_k_only_sampler_matches_softmax_probabilities():
    """The same statistical check as the Gumbel test in test_sampling, on `sample_codes`: noise drawn for
    the k candidates only still samples softmax(logits / T) renormalised over the top k (and top p)."""
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    n = 20000
    logits = probs.log().expand(n, 5)
    keys = row_keys(0, [str(i) for i in range(n)], [0] * n)
    for step, sampling, target in [
        (0, SamplingConfig(temperature=1.0, top_k=None), probs),
        (9, SamplingConfig(temperature=1.0, top_k=3), torch.tensor([0, 0, 0.15, 0.3, 0.4]) / 0.85),
        (3, SamplingConfig(temperature=1.0, top_k=2), torch.tensor([0, 0, 0, 3 / 7, 4 / 7])),
        (4, SamplingConfig(temperature=2.0, top_k=3), probs.sqrt() * torch.tensor([0, 0, 1, 1, 1.0])),
        (5, SamplingConfig(temperature=1.0, top_k=4, top_p=0.6), torch.tensor([0, 0, 0, 0.3, 0.4]) / 0.7),
    ]:
        chosen = sample_codes(logits, keys, step, sampling)
        freq = torch.bincount(chosen, minlength=5).float() / n
        assert torch.allclose(freq, target / target.sum(), atol=0.015), (sampling, freq)
    # one row over many steps follows the same distribution too
    sampling = SamplingConfig(temperature=1.0, top_k=4)
    steps = torch.stack([sample_codes(probs.log()[None], keys[:1], s, sampling)[0] for s in range(4000)])
    freq = torch.bincount(steps, minlength=5).float() / 4000
    assert torch.allclose(freq, torch.tensor([0, 0.1, 0.15, 0.3, 0.4]) / 0.95, atol=0.03), freq


def test_static_forward_matches_the_full_recomputation():
    model = sharp_model(seed=2)
    text_ids, codes = text_batch(model, 3), torch.randint(0, model.config.img_vocab_size, (3, 5))
    seq = model.sequence(text_ids, codes)  # (B, Tt+5)
    cache = model.new_static_cache(3)
    with torch.no_grad():
        full = model(seq)  # (B, T, V)
        Tt = model.config.text_len
        assert torch.allclose(model.forward_static(seq[:, :Tt], torch.arange(Tt), cache), full[:, Tt - 1], atol=1e-5)
        for t in range(Tt, seq.size(1)):
            step = model.forward_static(seq[:, t:t + 1], torch.tensor([t]), cache)
            assert torch.allclose(step, full[:, t], atol=1e-5)
    assert isinstance(model, GPT) and cache.keys.shape[:3] == (model.config.n_layer, 3, model.config.n_head)
