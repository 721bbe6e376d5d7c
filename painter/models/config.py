"""The shapes of the two networks, `GPTConfig` and `VQGANConfig`: plain dataclasses, no torch.

They live apart from the networks (`painter.models.gpt`, `painter.models.vqgan`, which re-export them) so
that what only names a shape (the presets in `painter.checkpoint.config`, the command line's choices)
loads without torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GPTConfig:
    img_vocab_size: int = 16384  # image codes; also the size of the head
    text_vocab_size: int = 21128  # tokenizer ids; enter the embedding at +img_vocab_size
    text_len: int = 32
    img_len: int = 256
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def vocab_size(self) -> int:
        return self.img_vocab_size + self.text_vocab_size

    @property
    def block_size(self) -> int:
        return self.text_len + self.img_len


@dataclass
class VQGANConfig:
    # defaults: the taming ImageNet f16 model with a 16384-entry codebook
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    dropout: float = 0.0

    def __post_init__(self):
        # configs round-trip through JSON, which turns tuples into lists
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def image_token_count(self) -> int:
        return self.grid_size ** 2
