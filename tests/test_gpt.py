"""Tests of painter.models.gpt: forward against a plain minGPT, the KV cache, the loss, the key layout."""

import json
import math
from pathlib import Path

import pytest
import torch

from painter.checkpoint.config import PRESETS
from painter.models.gpt import GPT, GPTConfig, KVCache, attention_mask_keys

FORMATS = Path(__file__).resolve().parents[2] / "shared" / "formats"


def small_config(**overrides) -> GPTConfig:
    kw = dict(img_vocab_size=50, text_vocab_size=40, text_len=8, img_len=16, n_layer=2, n_head=2, n_embd=32)
    kw.update(overrides)
    return GPTConfig(**kw)


def small_model(seed: int = 0, std: float = 0.3, **overrides) -> GPT:
    """A random GPT with weights large enough that every layer matters (not the 0.02 init)."""
    torch.manual_seed(seed)
    model = GPT(small_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln" in name:
                p.normal_(0.0, 0.1) if name.endswith(".bias") else p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, std)
    return model


def random_sequence(config: GPTConfig, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Embedding ids: text ids (offset by img_vocab_size) then image codes, as GPT.sequence makes them."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_vocab_size, (batch, config.text_len), generator=g)
    image = torch.randint(0, config.img_vocab_size, (batch, config.img_len), generator=g)
    seq = torch.cat([text + config.img_vocab_size, image], dim=1)
    return seq[:, :length]


# ---------------------------------------------------------------------------------------------
# an independent, straightforward minGPT forward reading the same state dict

def plain_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def plain_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def plain_forward(sd: dict, config: GPTConfig, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    C, nh = config.n_embd, config.n_head
    hs = C // nh
    x = sd["tok_emb.weight"][idx] + sd["pos_emb"][:, :T]  # (B, T, C)
    causal = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        h = plain_layer_norm(x, sd[p + "ln1.weight"], sd[p + "ln1.bias"])

        def lin(name, z):
            return z @ sd[p + name + ".weight"].T + sd[p + name + ".bias"]

        q = lin("attn.query", h).view(B, T, nh, hs).transpose(1, 2)
        k = lin("attn.key", h).view(B, T, nh, hs).transpose(1, 2)
        v = lin("attn.value", h).view(B, T, nh, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * hs ** -0.5  # (B, nh, T, T)
        att = att.masked_fill(causal == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin("attn.proj", y)
        h = plain_layer_norm(x, sd[p + "ln2.weight"], sd[p + "ln2.bias"])
        x = x + lin("mlp.2", plain_gelu(lin("mlp.0", h)))
    x = plain_layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"])
    return x @ sd["head.weight"].T  # (B, T, img_vocab)


# ---------------------------------------------------------------------------------------------

def test_forward_matches_plain_mingpt():
    model = small_model()
    config = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    idx = random_sequence(config, batch=3, length=config.block_size)
    with torch.no_grad():
        logits = model(idx)
    expected = plain_forward(sd, config, idx)
    assert logits.shape == (3, config.block_size, config.img_vocab_size)
    assert logits.dtype == torch.float32
    assert float(expected.std()) > 0.1  # the comparison is not between near-constant tensors
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # a shorter sequence (not the full block) uses the leading positions only
    with torch.no_grad():
        short = model(idx[:, :11])
    torch.testing.assert_close(short, plain_forward(sd, config, idx[:, :11]), atol=1e-5, rtol=1e-5)
    # causality: later tokens do not change earlier logits
    torch.testing.assert_close(short, logits[:, :11], atol=1e-5, rtol=1e-5)


def test_forward_rejects_too_long_sequence():
    model = small_model()
    idx = torch.zeros(1, model.config.block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size"):
        model(idx)


def test_cached_forward_token_by_token_matches_full_forward():
    model = small_model(seed=2)
    config = model.config
    idx = random_sequence(config, batch=2, length=config.block_size, seed=3)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = model.new_cache()
        assert isinstance(cache, KVCache)
        steps = [model(idx[:, :config.text_len], cache)]  # prefill the text
        assert cache.length == config.text_len
        for t in range(config.text_len, config.block_size):
            steps.append(model(idx[:, t:t + 1], cache))
        assert cache.length == config.block_size
    cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # the cache is full: one more token must be refused, not silently wrap
    with pytest.raises(ValueError):
        model(idx[:, :1], cache)


def test_cached_forward_prefix_then_chunks_matches_full_forward():
    model = small_model(seed=4)
    config = model.config
    idx = random_sequence(config, batch=2, length=config.block_size, seed=5)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = []
        bounds = [0, config.text_len + 3, config.text_len + 4, config.text_len + 9, config.block_size]
        for a, b in zip(bounds[:-1], bounds[1:]):  # prefix, 1 token, 5 tokens, the rest
            pieces.append(model(idx[:, a:b], cache))
            assert cache.length == b
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_on_image_positions_only():
    model = small_model(seed=6, std=0.1)
    config = model.config
    g = torch.Generator().manual_seed(7)
    text_ids = torch.randint(0, config.text_vocab_size, (3, config.text_len), generator=g)
    codes = torch.randint(0, config.img_vocab_size, (3, config.img_len), generator=g)
    seq = model.sequence(text_ids, codes)
    assert seq.shape == (3, config.block_size)
    assert torch.equal(seq[:, :config.text_len], text_ids + config.img_vocab_size)
    assert torch.equal(seq[:, config.text_len:], codes)
    assert torch.equal(model.sequence(text_ids), text_ids + config.img_vocab_size)

    with torch.no_grad():
        loss = model.loss(text_ids, codes)
        logits = plain_forward(model.state_dict(), config, seq)  # (B, T, V_img)
    assert logits.shape[-1] == config.img_vocab_size
    # position p predicts token p+1: image token j (at p = text_len + j) is predicted at text_len + j - 1
    log_probs = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for b in range(3):
        for j in range(config.img_len):
            total -= float(log_probs[b, config.text_len + j - 1, codes[b, j]])
            count += 1
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(total / count, rel=1e-5, abs=1e-5)
    # the head runs on the image-predicting positions only: the same logits as the full forward's slice
    with torch.no_grad():
        image_logits = model.image_logits(text_ids, codes)
    assert image_logits.shape == (3, config.img_len, config.img_vocab_size)
    assert torch.allclose(image_logits, logits[:, config.text_len - 1:-1], atol=1e-5)
    # changing text tokens changes the loss (the text conditions the image); the loss is not on text
    with torch.no_grad():
        other = model.loss((text_ids + 1) % config.text_vocab_size, codes)
    assert abs(float(other) - float(loss)) > 1e-4


def test_loss_backpropagates_to_every_parameter():
    model = small_model(seed=8, std=0.1).train()
    config = model.config
    text_ids = torch.randint(0, config.text_vocab_size, (2, config.text_len))
    codes = torch.randint(0, config.img_vocab_size, (2, config.img_len))
    model.loss(text_ids, codes).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_head_scores_image_codes_only():
    config = small_config()
    model = GPT(config)
    assert model.head.weight.shape == (config.img_vocab_size, config.n_embd)
    assert model.head.bias is None
    assert model.tok_emb.weight.shape == (config.img_vocab_size + config.text_vocab_size, config.n_embd)
    assert model.pos_emb.shape == (1, config.text_len + config.img_len, config.n_embd)
    assert config.vocab_size == 90 and config.block_size == 24


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def _expected_gpt_layout(name: str) -> dict:
    path = FORMATS / name
    if not path.is_file():
        pytest.skip(f"shared format file not found: {path} (the /work/shared folder beside the repo)")
    tensors = json.loads(path.read_text())["tensors"]
    assert all(k.startswith("transformer.") for k in tensors)
    return {k[len("transformer."):]: list(v) for k, v in tensors.items()}


@pytest.mark.parametrize("preset,keys_file", [("base", "pai_painter_base_zh.gpt.keys.json"),
                                               ("large", "pai_painter_large_zh.gpt.keys.json")])
def test_preset_matches_pai_painter_layout(preset, keys_file):
    expected = _expected_gpt_layout(keys_file)
    config = PRESETS[preset]().gpt
    with torch.device("meta"):
        model = GPT(config)
    actual = {k: list(v.shape) for k, v in model.state_dict().items()}
    masks = set(attention_mask_keys(config))
    assert masks <= set(expected), "the reference's attn.mask buffers"
    assert len(masks) == config.n_layer
    assert not masks & set(actual), "attn.mask buffers are not weights here"
    expected_weights = {k: v for k, v in expected.items() if k not in masks}
    assert sorted(set(expected_weights) - set(actual)) == [], "missing tensors"
    assert sorted(set(actual) - set(expected_weights)) == [], "unexpected tensors"
    wrong = {k: (actual[k], v) for k, v in expected_weights.items() if actual[k] != v}
    assert wrong == {}
    block = config.block_size
    assert all(expected[k] == [1, 1, block, block] for k in masks)
