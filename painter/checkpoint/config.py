"""The model's shape: `ModelConfig` (GPT and VQGAN configs, vocab sizes, lengths), the presets, and the
model directory's format name and version."""
from __future__ import annotations
import dataclasses
from dataclasses import dataclass, field
from painter.errors import CheckpointError
from painter.models.config import GPTConfig, VQGANConfig


FORMAT = "painter-model"


FORMAT_VERSION = 1


@dataclass
class ModelConfig:
    gpt: GPTConfig = field(default_factory=GPTConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    name: str = "custom"
    null_caption_prob: float = 0.0  # share of training rows whose caption was dropped (0: no guidance training)

    def __post_init__(self):
        if not 0.0 <= self.null_caption_prob < 1.0:
            raise ValueError(f"null_caption_prob {self.null_caption_prob} is not in [0, 1)")
        if isinstance(self.gpt, dict):
            self.gpt = GPTConfig(**self.gpt)
        if isinstance(self.vqgan, dict):
            self.vqgan = VQGANConfig(**self.vqgan)
        if self.gpt.img_len != self.vqgan.image_token_count:
            raise ValueError(f"gpt.img_len {self.gpt.img_len} != VQGAN tokens per image {self.vqgan.image_token_count}")
        if self.gpt.img_vocab_size != self.vqgan.n_embed:
            raise ValueError(f"gpt.img_vocab_size {self.gpt.img_vocab_size} != VQGAN codes {self.vqgan.n_embed}")

    @property
    def image_size(self) -> int:
        return self.vqgan.resolution

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "name": self.name, "image_size": self.image_size,
                "text_len": self.gpt.text_len, "img_len": self.gpt.img_len,
                "null_caption_prob": self.null_caption_prob, "gpt": dataclasses.asdict(self.gpt), "vqgan": dataclasses.asdict(self.vqgan)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(gpt=GPTConfig(**d["gpt"]), vqgan=VQGANConfig(**d["vqgan"]), name=d.get("name", "custom"),
                   null_caption_prob=float(d.get("null_caption_prob", 0.0)))


def _reference_vqgan() -> VQGANConfig:
    return VQGANConfig()  # taming f16, 16384 codes, 256x256


PRESETS = {
    "base": lambda: ModelConfig(GPTConfig(n_layer=12, n_head=12, n_embd=768), _reference_vqgan(), "base"),
    "large": lambda: ModelConfig(GPTConfig(n_layer=24, n_head=16, n_embd=1024), _reference_vqgan(), "large"),
    # CPU presets for tests and the demo: 32x32 (tiny) and 64x64 (small) images, 8x8 image tokens.
    "tiny": lambda: ModelConfig(
        GPTConfig(img_vocab_size=256, text_len=16, img_len=64, n_layer=2, n_head=2, n_embd=64),
        VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                    z_channels=32, embed_dim=32, n_embed=256), "tiny"),
    "small": lambda: ModelConfig(
        GPTConfig(img_vocab_size=512, text_len=16, img_len=64, n_layer=4, n_head=4, n_embd=128),
        VQGANConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                    z_channels=64, embed_dim=64, n_embed=512), "small"),
    # The bundled demo model's shape: 32x32 images as 8x8 tokens from 512 codes, a 4-layer GPT over a
    # small vocab holding only the synthetic captions' characters (see painter.evaluation.synthetic).
    "demo": lambda: ModelConfig(
        GPTConfig(img_vocab_size=512, text_vocab_size=64, text_len=16, img_len=64, n_layer=4, n_head=4, n_embd=128),
        VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                    z_channels=32, embed_dim=32, n_embed=512), "demo"),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


