"""Importers of foreign checkpoints into a painter model directory.

- EasyNLP `pai-painter-*-zh`: `config.json` + `pytorch_model.bin` (`transformer.*` = the GPT,
  `first_stage_model.*` = the VQGAN, `*.attn.mask` buffers that are not weights) + `vocab.txt`
  (+ `tokenizer_config.json`, whose `do_lower_case` & co. the tokenizer honours). What painter's GPT
  cannot reproduce is refused, never dropped: a non-zero `n_unmasked` (a bidirectional prefix) and
  attention-mask buffers that are not the plain causal mask;
- taming-transformers VQGAN `last.ckpt` (weights under `state_dict`; `loss.*` ignored).

Pickles load with `weights_only=True`; shapes are inferred from the tensors and every tensor must fit.
"""
from __future__ import annotations

import io
import json
import posixpath
import re

from painter.io.retries import fsspec_module
import torch

from painter.checkpoint.config import ModelConfig, preset_config
from painter.checkpoint.model_dir import check_state_dict, load_tokenizer, read_bytes, save_model
from painter.errors import CheckpointError
from painter.models.gpt import GPT, GPTConfig, attention_mask_keys
from painter.models.vqgan import VQGAN, VQGANConfig
from painter.checkpoint.tokenizer import TextTokenizer

fsspec = fsspec_module()  # with painter's storage retries (painter.io.retries)

_LIGHTNING_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


def _lightning_stand_ins(data: bytes) -> list:
    """Inert stand-ins for the Lightning classes a checkpoint names (Lightning 1.0, which taming pins,
    keys `callbacks` by the callback's class), so weights_only loading accepts it; nothing is imported."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # not a zip checkpoint: let torch.load report it
        return []
    return [(type(n.rsplit(".", 1)[-1], (), {}), n) for n in names if n.startswith(_LIGHTNING_MODULES)]


def read_torch_checkpoint(path: str) -> dict:
    """A pickled state dict, loaded with weights_only=True; Lightning's `state_dict` is unwrapped."""
    data = read_bytes(path)
    try:
        with torch.serialization.safe_globals(_lightning_stand_ins(data)):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a pickle, or a pickle with non-tensor objects
        lines = [line for line in str(e).splitlines() if line.strip()] or [""]
        reason = next((line for line in lines if "Unsupported" in line), lines[0]).split(" Please use")[0].strip()
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{reason[:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return obj


def vqgan_config_from_state(state: dict, resolution: int = 256) -> VQGANConfig:
    """Infer a taming VQGAN's shape from its tensors (resolution is not in the weights)."""
    try:
        ch = state["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
        attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state)
        n_embed, embed_dim = state["quantize.embedding.weight"].shape
        z_channels = state["post_quant_conv.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a taming VQGAN state dict: missing tensor {e.args[0]!r}") from None
    return VQGANConfig(resolution=resolution, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                       attn_resolutions=attn, z_channels=z_channels, embed_dim=embed_dim, n_embed=n_embed)


def gpt_config_from_state(state: dict, text_len: int = 32, n_head: int | None = None) -> GPTConfig:
    """Infer the reference GPT's shape from its tensors; heads come from the known presets if not given."""
    try:
        _, block_size, n_embd = state["pos_emb"].shape
        img_vocab = state["head.weight"].shape[0]
        text_vocab = state["tok_emb.weight"].shape[0] - img_vocab
    except KeyError as e:
        raise CheckpointError(f"not a pai-painter GPT state dict: missing tensor {e.args[0]!r}") from None
    n_layer = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    n_head = n_head or {768: 12, 1024: 16}.get(n_embd)
    if n_head is None:
        raise CheckpointError(f"cannot tell the number of heads of a {n_embd}-wide GPT; pass --n-head")
    return GPTConfig(img_vocab_size=img_vocab, text_vocab_size=text_vocab, text_len=text_len,
                     img_len=block_size - text_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def split_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _checked(module: torch.nn.Module, state: dict, source: str) -> dict:
    check_state_dict(module, state, source)
    return state


def read_easynlp_config(src: str) -> dict:
    """EasyNLP's config.json (ARTISTConfig fields), or {} when the directory has none."""
    path = posixpath.join(src, "config.json")
    fs = fsspec.core.url_to_fs(path)[0]
    if not fs.exists(path):
        return {}
    try:
        d = json.loads(read_bytes(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if d.get("n_unmasked"):
        raise CheckpointError(
            f"{path}: n_unmasked={d['n_unmasked']}: in this model the first {d['n_unmasked']} positions attend "
            "to each other both ways, while painter's GPT is causal everywhere, so its pictures would differ; "
            "such models cannot be imported")
    return d


def _easynlp_n_head(config: dict) -> int | None:
    """The head count config.json names, if any (else it is inferred from the width)."""
    for key in ("n_head", "num_attention_heads", "n_heads"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def causal_mask(block_size: int) -> torch.Tensor:
    """The reference's `attn.mask` buffer: (1, 1, T, T) lower-triangular ones (n_unmasked = 0)."""
    return torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)


def pop_causal_masks(gpt_state: dict, config: GPTConfig, source: str) -> None:
    """Remove the `blocks.*.attn.mask` buffers, refusing any that is not the plain causal mask."""
    expected = causal_mask(config.block_size)
    for key in attention_mask_keys(config):
        mask = gpt_state.pop(key, None)
        if mask is not None and (mask.shape != expected.shape or not torch.equal(mask.float(), expected)):
            raise CheckpointError(f"{source}: tensor 'transformer.{key}' is not the causal attention mask painter's "
                                  "GPT applies (a non-zero n_unmasked, or an edited mask); cannot import it")


def import_easynlp(src: str, dst: str, *, text_len: int = 32, resolution: int = 256,
                   n_head: int | None = None) -> str:
    """EasyNLP pai-painter directory -> painter model directory (GPT, VQGAN and vocab)."""
    easynlp_config = read_easynlp_config(src)
    weights = posixpath.join(src, "pytorch_model.bin")
    state = read_torch_checkpoint(weights)
    gpt_state = split_prefixed(state, "transformer.")
    vqgan_state = {k: v for k, v in split_prefixed(state, "first_stage_model.").items() if not k.startswith("loss.")}
    others = [k for k in state if not k.startswith(("transformer.", "first_stage_model."))]
    if others:
        raise CheckpointError(f"{weights}: unexpected tensor {others[0]!r} ({len(others)} outside "
                              "transformer.* and first_stage_model.*)")
    try:  # shapes that contradict each other or the options (--text-len, --resolution, --n-head)
        gpt_config = gpt_config_from_state(gpt_state, text_len, n_head or _easynlp_n_head(easynlp_config))
        config = ModelConfig(gpt_config, vqgan_config_from_state(vqgan_state, resolution),
                             name=posixpath.basename(src.rstrip("/")))
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    pop_causal_masks(gpt_state, gpt_config, weights)
    tokenizer = load_tokenizer(posixpath.join(src, "vocab.txt"), text_len)
    gpt = _checked(_meta(GPT, config.gpt), gpt_state, weights)
    vqgan = _checked(_meta(VQGAN, config.vqgan), vqgan_state, weights)
    return save_model(dst, config, tokenizer, gpt=gpt, vqgan=vqgan)


def import_vqgan(ckpt: str, dst: str, *, resolution: int = 256, text_len: int = 32, gpt_preset: str = "base",
                 vocab: str | None = None) -> str:
    """taming VQGAN checkpoint -> model directory with that VQGAN, a vocab and a GPT config to train.

    No GPT weights are written: `painter train --init DST` starts the GPT from scratch on this VQGAN.
    """
    state = {k: v for k, v in read_torch_checkpoint(ckpt).items() if not k.startswith("loss.")}
    vqgan_config = vqgan_config_from_state(state, resolution)
    shape = preset_config(gpt_preset).gpt
    tokenizer = load_tokenizer(vocab, text_len) if vocab else TextTokenizer.default(text_len)
    gpt_config = GPTConfig(img_vocab_size=vqgan_config.n_embed, text_vocab_size=max(shape.text_vocab_size, tokenizer.vocab_size),
                           text_len=text_len, img_len=vqgan_config.image_token_count,
                           n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd)
    config = ModelConfig(gpt_config, vqgan_config, name=posixpath.basename(ckpt))
    vqgan = _checked(_meta(VQGAN, vqgan_config), state, ckpt)
    return save_model(dst, config, tokenizer, vqgan=vqgan)


def _meta(cls, config):
    """A module built on the meta device: only its parameter names and shapes are needed."""
    with torch.device("meta"):
        return cls(config)
