"""Small fp32 GPTs with spread-out logits, text batches and row keys, shared by the sampling, engine and
GPU tests (no pytest import: tests/test_gpu.py also runs as a plain script)."""
import torch

from painter.models.gpt import GPT, GPTConfig
from painter.inference.sampling import row_keys


def sharp_model(seed: int = 0, img_vocab: int = 100, img_len: int = 16, std: float = 0.3) -> GPT:
    """A small random fp32 GPT whose logits are spread out (no near-ties), unlike the 0.02 init."""
    torch.manual_seed(seed)
    config = GPTConfig(img_vocab_size=img_vocab, text_vocab_size=40, text_len=8, img_len=img_len,
                       n_layer=2, n_head=2, n_embd=32)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0.0, std)
    return model


def text_batch(model: GPT, batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.text_vocab_size, (batch, model.config.text_len), generator=g)


def keys_for(batch: int, seed: int = 0, sample: int = 0) -> torch.Tensor:
    return row_keys(seed, [f"row{i}" for i in range(batch)], [sample] * batch)
