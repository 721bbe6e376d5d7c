"""Exporters of a painter model directory to foreign layouts: the way back to EasyNLP.

`export_easynlp` writes what EasyNLP's text2image app loads (`TextImageGeneration` reads
`config.json` with `AutoConfig`, `pytorch_model.bin` with `load_state_dict`, and `vocab.txt` with its
BertTokenizer): the GPT under `transformer.` with the `blocks.*.attn.mask` causal-mask buffers EasyNLP
saves, the VQGAN under `first_stage_model.`, and the ARTISTConfig fields. A tokenizer with settings
other than bert-base-chinese's also gets its `tokenizer_config.json`. `import_easynlp` reads the
result back into identical tensors.
"""
from __future__ import annotations

import io
import json
import posixpath

from painter.io.retries import fsspec_module
import torch

from painter.checkpoint.model_dir import load_model
from painter.errors import CheckpointError
from painter.checkpoint.importers import causal_mask
from painter.models.gpt import attention_mask_keys
from painter.models.vqgan import VQGANConfig

fsspec = fsspec_module()  # with painter's storage retries (painter.io.retries)


def easynlp_config(gpt_config) -> dict:
    """EasyNLP's ARTISTConfig fields for a GPTConfig (`n_unmasked` 0: painter's GPT is causal everywhere)."""
    return {
        "model_type": "artist", "vocab_size": gpt_config.vocab_size, "img_vocab_size": gpt_config.img_vocab_size,
        "text_vocab_size": gpt_config.text_vocab_size, "block_size": gpt_config.block_size,
        "n_layer": gpt_config.n_layer, "n_head": gpt_config.n_head, "n_embd": gpt_config.n_embd,
        "embd_pdrop": gpt_config.embd_pdrop, "resid_pdrop": gpt_config.resid_pdrop,
        "attn_pdrop": gpt_config.attn_pdrop, "n_unmasked": 0,
    }


def easynlp_state_dict(model) -> dict:
    """A loaded model's tensors under EasyNLP's names, mask buffers included."""
    gpt_config = model.config.gpt
    state = {f"transformer.{k}": v.detach().cpu().contiguous() for k, v in model.gpt.state_dict().items()}
    mask = causal_mask(gpt_config.block_size)
    for key in attention_mask_keys(gpt_config):
        state[f"transformer.{key}"] = mask.clone()
    state.update({f"first_stage_model.{k}": v.detach().cpu().contiguous() for k, v in model.vqgan.state_dict().items()})
    return state


def shape_note(config) -> str | None:
    """A warning when EasyNLP could not build this model's VQGAN (its `VQModel()` shape is fixed)."""
    if config.vqgan == VQGANConfig():
        return None
    return ("EasyNLP builds its VQGAN with the fixed taming f16 16384-code shape at 256x256; this model's VQGAN "
            f"({config.image_size}px, {config.vqgan.n_embed} codes) loads only where that shape is changed")


def export_easynlp(model_dir: str, dst: str) -> str:
    """painter model directory (or zoo name) -> EasyNLP directory `dst`: config.json, pytorch_model.bin,
    vocab.txt. Returns `dst`."""
    model = load_model(model_dir)
    fs, root = fsspec.core.url_to_fs(dst)
    if fs.exists(posixpath.join(root, "pytorch_model.bin")):
        raise CheckpointError(f"{dst}: already holds a pytorch_model.bin; choose an empty directory")
    fs.makedirs(root, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(easynlp_state_dict(model), buffer)
    with fsspec.open(posixpath.join(dst, "pytorch_model.bin"), "wb") as f:
        f.write(buffer.getvalue())
    with fsspec.open(posixpath.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(easynlp_config(model.config.gpt), f, indent=2)
    model.tokenizer.save(posixpath.join(dst, "vocab.txt"))
    return dst
