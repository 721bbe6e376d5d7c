"""Tests of painter.checkpoint.importers: EasyNLP pai-painter directories and taming VQGAN checkpoints."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from painter.checkpoint.config import ModelConfig
from painter.checkpoint.model_dir import check_state_dict, load_model
from painter.errors import CheckpointError
from painter.inference.generator import GenerationConfig, Generator
from painter.checkpoint.importers import gpt_config_from_state, import_easynlp, import_vqgan, read_torch_checkpoint, split_prefixed, vqgan_config_from_state
from painter.io.images import open_image
from painter.models.gpt import GPT, GPTConfig, attention_mask_keys
from painter.models.vqgan import VQGAN, VQGANConfig
from painter.checkpoint.tokenizer import TextTokenizer, default_vocab

FORMATS = Path(__file__).resolve().parents[2] / "shared" / "formats"

# Scaled-down shapes whose key NAMES are exactly those of the reference layouts: the VQGAN keeps
# ch_mult's length (5 levels, f16), 2 res blocks and attention at the lowest level; the GPT keeps 12 layers.
SMALL_VQGAN = VQGANConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(4,),
                          z_channels=32, embed_dim=16, n_embed=64)
SMALL_VOCAB = default_vocab()[:300]  # [PAD], [unused*], [UNK], ..., ASCII and some punctuation
TEXT_LEN = 8
SMALL_GPT = GPTConfig(img_vocab_size=64, text_vocab_size=len(SMALL_VOCAB), text_len=TEXT_LEN, img_len=16,
                      n_layer=12, n_head=2, n_embd=32)


def reference_keys(name: str) -> dict:
    path = FORMATS / name
    if not path.is_file():
        pytest.skip(f"shared format file not found: {path} (the /work/shared folder beside the repo)")
    return {k: list(v) for k, v in json.loads(path.read_text())["tensors"].items()}


def random_state(module: torch.nn.Module, seed: int) -> dict:
    """The module's initial tensors plus noise, so that imported weights are recognisably these."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


def easynlp_state(seed: int = 0) -> dict:
    """`pytorch_model.bin` of a scaled-down pai-painter: transformer.* (with attn.mask) + first_stage_model.*."""
    torch.manual_seed(seed)
    state = {f"transformer.{k}": v for k, v in random_state(GPT(SMALL_GPT), seed).items()}
    block = SMALL_GPT.block_size
    for key in attention_mask_keys(SMALL_GPT):
        state[f"transformer.{key}"] = torch.tril(torch.ones(block, block)).view(1, 1, block, block)
    state.update({f"first_stage_model.{k}": v for k, v in random_state(VQGAN(SMALL_VQGAN), seed + 1).items()})
    return state


def write_easynlp_dir(path: Path, state: dict, config: dict | None = None) -> Path:
    path.mkdir(parents=True)
    torch.save(state, path / "pytorch_model.bin")
    (path / "vocab.txt").write_text("".join(t + "\n" for t in SMALL_VOCAB), encoding="utf-8")
    cfg = {"n_head": SMALL_GPT.n_head, "n_layer": SMALL_GPT.n_layer, "n_embd": SMALL_GPT.n_embd,
           "block_size": SMALL_GPT.block_size, "vocab_size": SMALL_GPT.vocab_size} if config is None else config
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def easynlp_dir(tmp_path_factory):
    state = easynlp_state()
    return write_easynlp_dir(tmp_path_factory.mktemp("easynlp") / "pai-painter-mini-zh", state), state


class NotATensor:
    """An arbitrary object: pickles of it must not be loaded."""

    def __init__(self):
        self.payload = "anything"


# ---------------------------------------------------------------------------------------------
# key layouts

def test_scaled_down_layouts_have_the_reference_key_names():
    gpt_ref = reference_keys("pai_painter_base_zh.gpt.keys.json")
    vqgan_ref = reference_keys("vqgan_f16_16384.keys.json")
    state = easynlp_state()
    assert {k for k in state if k.startswith("transformer.")} == set(gpt_ref)
    assert {k[len("first_stage_model."):] for k in state if k.startswith("first_stage_model.")} == set(vqgan_ref)
    # and at full size the same names carry the reference shapes
    with torch.device("meta"):
        full_vqgan = VQGAN(VQGANConfig())
    assert {k: list(v.shape) for k, v in full_vqgan.state_dict().items()} == vqgan_ref


@pytest.mark.parametrize("gpt_file,shape", [("pai_painter_base_zh.gpt.keys.json", (12, 12, 768)),
                                            ("pai_painter_large_zh.gpt.keys.json", (24, 16, 1024))])
def test_full_size_reference_layout_infers_the_preset(gpt_file, shape):
    gpt_ref = reference_keys(gpt_file)
    vqgan_ref = reference_keys("vqgan_f16_16384.keys.json")
    state = {k: torch.empty(v, device="meta") for k, v in gpt_ref.items()}
    state.update({f"first_stage_model.{k}": torch.empty(v, device="meta") for k, v in vqgan_ref.items()})

    gpt_state = split_prefixed(state, "transformer.")
    gpt_config = gpt_config_from_state(gpt_state)
    assert (gpt_config.n_layer, gpt_config.n_head, gpt_config.n_embd) == shape
    assert (gpt_config.text_vocab_size, gpt_config.img_vocab_size) == (21128, 16384)
    assert (gpt_config.text_len, gpt_config.img_len) == (32, 256)

    vqgan_state = split_prefixed(state, "first_stage_model.")
    vqgan_config = vqgan_config_from_state(vqgan_state)
    assert vqgan_config == VQGANConfig()
    assert vqgan_config.ch_mult == (1, 1, 2, 2, 4) and vqgan_config.attn_resolutions == (16,)
    assert (vqgan_config.n_embed, vqgan_config.embed_dim, vqgan_config.z_channels) == (16384, 256, 256)

    ModelConfig(gpt_config, vqgan_config)  # consistent
    for key in attention_mask_keys(gpt_config):
        gpt_state.pop(key)
    with torch.device("meta"):  # every tensor fits: no missing, unexpected or misshapen names
        check_state_dict(GPT(gpt_config), gpt_state, "base")
        check_state_dict(VQGAN(vqgan_config), vqgan_state, "vqgan")


# ---------------------------------------------------------------------------------------------
# EasyNLP directories

def test_import_easynlp_roundtrip(easynlp_dir, tmp_path):
    src, state = easynlp_dir
    dst = import_easynlp(str(src), str(tmp_path / "imported"), text_len=TEXT_LEN, resolution=64)
    assert dst == str(tmp_path / "imported")
    loaded = load_model(dst)
    assert loaded.config.gpt == SMALL_GPT
    assert loaded.config.vqgan == SMALL_VQGAN
    assert loaded.config.name == "pai-painter-mini-zh"
    assert loaded.tokenizer.vocab == SMALL_VOCAB
    gpt_state, vqgan_state = loaded.gpt.state_dict(), loaded.vqgan.state_dict()
    expected_gpt = {k: v for k, v in split_prefixed(state, "transformer.").items() if not k.endswith("attn.mask")}
    assert gpt_state.keys() == expected_gpt.keys()
    assert all(torch.equal(gpt_state[k], v) for k, v in expected_gpt.items())
    expected_vqgan = split_prefixed(state, "first_stage_model.")
    assert vqgan_state.keys() == expected_vqgan.keys()
    assert all(torch.equal(vqgan_state[k], v) for k, v in expected_vqgan.items())

    # generation from the imported model works end to end
    generator = Generator(loaded, GenerationConfig(seed=1, top_k=10), device="cpu")
    out = generator({"idx": np.array(["a", "b"], dtype=object), "text": np.array(["红色 t 恤", "blue"], dtype=object)})
    images = [open_image(p) for p in out["png"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert list(out["model"]) == [loaded.fingerprint] * 2


def test_import_easynlp_ignores_loss_keys_and_reads_heads_from_config(tmp_path):
    state = easynlp_state(seed=3)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    src = write_easynlp_dir(tmp_path / "src", state, config={"num_attention_heads": 4})
    loaded = load_model(import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64))
    assert loaded.config.gpt.n_head == 4
    assert not any(k.startswith("loss.") for k in loaded.vqgan.state_dict())


def test_import_easynlp_without_head_count_says_so(tmp_path):
    src = write_easynlp_dir(tmp_path / "src", easynlp_state(), config={})
    with pytest.raises(CheckpointError, match="heads"):
        import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64)
    # an explicit n_head does it
    loaded = load_model(import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64, n_head=2),
                        parts=())
    assert loaded.config.gpt.n_head == 2


@pytest.mark.parametrize("extra", ["transformer.blocks.3.attn.rotary", "first_stage_model.encoder.extra_conv.weight",
                                   "cond_stage_model.embedding.weight"])
def test_unexpected_tensor_is_named(tmp_path, extra):
    state = easynlp_state() | {extra: torch.zeros(4)}
    src = write_easynlp_dir(tmp_path / "src", state)
    with pytest.raises(CheckpointError) as err:
        import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64)
    message = str(err.value)
    assert str(src / "pytorch_model.bin") in message
    assert extra.split(".", 1)[1] in message, message  # named (with or without its prefix)
    assert not (tmp_path / "dst").exists()  # nothing half-written


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    state = easynlp_state()
    del state["transformer.blocks.5.mlp.2.bias"]
    src = write_easynlp_dir(tmp_path / "a", state)
    with pytest.raises(CheckpointError, match=r"blocks\.5\.mlp\.2\.bias"):
        import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64)
    state = easynlp_state()
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    src = write_easynlp_dir(tmp_path / "b", state)
    with pytest.raises(CheckpointError, match=r"decoder\.conv_in\.weight"):
        import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64)


def test_non_tensor_pickle_is_refused(tmp_path):
    src = write_easynlp_dir(tmp_path / "src", {"state_dict": {"x": torch.zeros(1)}, "obj": NotATensor()})
    with pytest.raises(CheckpointError) as err:
        import_easynlp(str(src), str(tmp_path / "dst"))
    assert str(src / "pytorch_model.bin") in str(err.value)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_torch_checkpoint(str(src / "pytorch_model.bin"))
    # a bare object (not even a dict) too
    torch.save(NotATensor(), tmp_path / "obj.ckpt")
    with pytest.raises(CheckpointError, match="obj.ckpt"):
        read_torch_checkpoint(str(tmp_path / "obj.ckpt"))


def test_unreadable_checkpoints_are_refused(tmp_path):
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        read_torch_checkpoint(str(tmp_path / "garbage.bin"))
    torch.save({"w": torch.zeros(100)}, tmp_path / "cut.bin")
    data = (tmp_path / "cut.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.bin"):
        read_torch_checkpoint(str(tmp_path / "cut.bin"))
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        read_torch_checkpoint(str(tmp_path / "list.bin"))


def test_missing_source_is_named(tmp_path):
    with pytest.raises(CheckpointError) as err:
        import_easynlp(str(tmp_path / "nowhere"), str(tmp_path / "dst"))
    assert str(tmp_path / "nowhere" / "pytorch_model.bin") in str(err.value)
    src = write_easynlp_dir(tmp_path / "novocab", easynlp_state())
    (src / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.txt"):
        import_easynlp(str(src), str(tmp_path / "dst"), text_len=TEXT_LEN, resolution=64)


# ---------------------------------------------------------------------------------------------
# taming VQGAN checkpoints

def taming_state(seed: int = 5) -> dict:
    torch.manual_seed(seed)
    state = random_state(VQGAN(SMALL_VQGAN), seed)
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    state["loss.logvar"] = torch.zeros(())
    return state


def _check_vqgan_import(ckpt: Path, dst: Path, state: dict):
    out = import_vqgan(str(ckpt), str(dst), resolution=64, text_len=TEXT_LEN, gpt_preset="tiny")
    loaded = load_model(out, parts=("vqgan",))
    assert loaded.config.vqgan == SMALL_VQGAN
    assert loaded.config.gpt.img_vocab_size == 64 and loaded.config.gpt.img_len == 16
    assert loaded.config.gpt.text_len == TEXT_LEN and loaded.config.gpt.n_layer == 2  # the tiny shape
    weights = loaded.vqgan.state_dict()
    assert weights.keys() == {k for k in state if not k.startswith("loss.")}
    assert all(torch.equal(v, state[k]) for k, v in weights.items())
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = loaded.vqgan.encode(images)
    assert codes.shape == (2, 16) and int(codes.max()) < 64
    decoded = loaded.vqgan.decode(codes)
    assert decoded.shape == (2, 3, 64, 64) and torch.isfinite(decoded).all()
    # no GPT weights: the directory is a starting point for training, and says so when asked for a GPT
    assert not (Path(out) / "gpt.safetensors").exists()
    with pytest.raises(CheckpointError, match="GPT"):
        load_model(out)


def test_import_vqgan_from_taming_checkpoint(tmp_path):
    state = taming_state()
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "optimizer_states": [],
                "lr_schedulers": []}, tmp_path / "last.ckpt")
    _check_vqgan_import(tmp_path / "last.ckpt", tmp_path / "model", state)


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` to pickle by reference."""
    cls = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = cls
    return cls


def test_import_vqgan_from_old_lightning_checkpoint(tmp_path, fake_lightning, monkeypatch):
    # Lightning 1.0 (taming-transformers' pin) keys `callbacks` by the callback's class
    state = taming_state(seed=6)
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8",
                "callbacks": {fake_lightning: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.1),
                                               "best_model_path": "logs/last.ckpt"}},
                "optimizer_states": [], "lr_schedulers": []}, tmp_path / "last.ckpt")
    for name in ("pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.callbacks", "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, name)  # loading must not need (or import) Lightning
    _check_vqgan_import(tmp_path / "last.ckpt", tmp_path / "model", state)
    assert "pytorch_lightning.callbacks.model_checkpoint" not in sys.modules


def test_import_vqgan_refuses_other_objects(tmp_path):
    torch.save({"state_dict": taming_state(), "hparams": NotATensor()}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        import_vqgan(str(tmp_path / "last.ckpt"), str(tmp_path / "model"), resolution=64, text_len=TEXT_LEN,
                     gpt_preset="tiny")
    assert not (tmp_path / "model").exists()


def test_import_vqgan_with_a_vocab(tmp_path):
    state = taming_state()
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in SMALL_VOCAB), encoding="utf-8")
    out = import_vqgan(str(tmp_path / "last.ckpt"), str(tmp_path / "model"), resolution=64, text_len=TEXT_LEN,
                       gpt_preset="tiny", vocab=str(tmp_path / "vocab.txt"))
    loaded = load_model(out, parts=())
    assert loaded.tokenizer.vocab == SMALL_VOCAB
    assert loaded.config.gpt.text_vocab_size >= len(SMALL_VOCAB)
    assert TextTokenizer.from_file(str(Path(out) / "vocab.txt")).vocab_hash == loaded.tokenizer.vocab_hash


@pytest.mark.parametrize("kwargs,reason", [(dict(text_len=10, resolution=64), "img_len"),
                                           (dict(text_len=TEXT_LEN, resolution=128), "img_len"),
                                           (dict(text_len=TEXT_LEN, resolution=64, n_head=3), "divisible")])
def test_options_contradicting_the_weights_are_clear_errors(easynlp_dir, tmp_path, kwargs, reason):
    src, _ = easynlp_dir
    with pytest.raises(CheckpointError) as err:
        import_easynlp(str(src), str(tmp_path / "dst"), **kwargs)
    assert str(src / "pytorch_model.bin") in str(err.value) and reason in str(err.value)


def test_missing_vocab_option_is_named(tmp_path):
    torch.save({"state_dict": taming_state()}, tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="no-vocab.txt"):
        import_vqgan(str(tmp_path / "last.ckpt"), str(tmp_path / "model"), resolution=64, text_len=TEXT_LEN,
                     gpt_preset="tiny", vocab=str(tmp_path / "no-vocab.txt"))
