"""Tests of painter.checkpoint: the model directory round trip and clear errors for broken directories."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from painter.checkpoint.config import PRESETS, ModelConfig, preset_config
from painter.checkpoint.model_dir import ZOO_NAMES, load_model, new_model, read_manifest, resolve_model_dir, save_model
from painter.errors import CheckpointError
from painter.models.gpt import GPT
from painter.models.vqgan import VQGAN
from painter.checkpoint.tokenizer import TextTokenizer


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the session's tiny model directory, free to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_presets():
    for name in ("base", "large", "tiny", "small"):
        config = preset_config(name)
        assert config.name == name
        assert config.gpt.img_len == config.vqgan.image_token_count
        assert config.gpt.img_vocab_size == config.vqgan.n_embed
    base = PRESETS["base"]()
    assert (base.gpt.n_layer, base.gpt.n_head, base.gpt.n_embd) == (12, 12, 768)
    large = PRESETS["large"]()
    assert (large.gpt.n_layer, large.gpt.n_head, large.gpt.n_embd) == (24, 16, 1024)
    for c in (base, large):
        assert (c.gpt.text_len, c.gpt.img_len, c.gpt.img_vocab_size, c.gpt.text_vocab_size) == (32, 256, 16384, 21128)
        assert c.gpt.vocab_size == 37512 and c.image_size == 256
    with pytest.raises(CheckpointError, match="unknown preset"):
        preset_config("huge")


def test_model_config_dict_roundtrip_and_validation():
    config = preset_config("small")
    d = json.loads(json.dumps(config.to_dict()))
    assert d["image_size"] == 64 and d["text_len"] == 16 and d["img_len"] == 64
    assert ModelConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="img_len"):
        ModelConfig(dataclasses.replace(config.gpt, img_len=32), config.vqgan)
    with pytest.raises(ValueError, match="img_vocab_size"):
        ModelConfig(dataclasses.replace(config.gpt, img_vocab_size=100), config.vqgan)


def test_new_model_load_roundtrip(tmp_path):
    path = new_model("tiny", str(tmp_path / "m"), seed=3)
    assert path == str(tmp_path / "m")
    assert sorted(os.listdir(path)) == ["config.json", "gpt.safetensors", "vocab.txt", "vqgan.safetensors"]
    loaded = load_model(path)
    expected = preset_config("tiny")
    expected.gpt.text_vocab_size = max(expected.gpt.text_vocab_size, TextTokenizer.default().vocab_size)
    assert loaded.config == expected
    assert loaded.tokenizer.text_len == expected.gpt.text_len
    assert isinstance(loaded.gpt, GPT) and isinstance(loaded.vqgan, VQGAN)
    assert not loaded.gpt.training and not loaded.vqgan.training
    config, fingerprints = read_manifest(path)
    assert config == expected
    assert fingerprints == {"gpt": loaded.gpt_fingerprint, "vqgan": loaded.vqgan_fingerprint}
    assert len(loaded.fingerprint) == 16 and loaded.gpt_fingerprint != loaded.vqgan_fingerprint

    # the same seed makes the same weights; another seed other weights
    again = load_model(new_model("tiny", str(tmp_path / "again"), seed=3))
    assert (again.gpt_fingerprint, again.vqgan_fingerprint) == (loaded.gpt_fingerprint, loaded.vqgan_fingerprint)
    assert _states_equal(again.gpt, loaded.gpt) and _states_equal(again.vqgan, loaded.vqgan)
    other = load_model(new_model("tiny", str(tmp_path / "other"), seed=4))
    assert other.gpt_fingerprint != loaded.gpt_fingerprint and other.fingerprint != loaded.fingerprint
    assert not _states_equal(other.gpt, loaded.gpt)

    # saving loaded weights again reproduces the files and fingerprints exactly
    resaved = save_model(str(tmp_path / "resaved"), loaded.config, loaded.tokenizer, gpt=loaded.gpt, vqgan=loaded.vqgan)
    reloaded = load_model(resaved)
    assert reloaded.fingerprint == loaded.fingerprint
    assert (Path(resaved) / "gpt.safetensors").read_bytes() == (Path(path) / "gpt.safetensors").read_bytes()
    assert _states_equal(reloaded.gpt, loaded.gpt) and _states_equal(reloaded.vqgan, loaded.vqgan)


def test_save_model_roundtrip_of_given_weights(tmp_path):
    config = preset_config("tiny")
    tokenizer = TextTokenizer.default(text_len=config.gpt.text_len)
    torch.manual_seed(11)
    gpt, vqgan = GPT(config.gpt), VQGAN(config.vqgan)
    with torch.no_grad():
        gpt.pos_emb.normal_()  # not the zeros of a fresh model
    save_model(str(tmp_path / "m"), config, tokenizer, gpt=gpt, vqgan=vqgan.state_dict())
    loaded = load_model(str(tmp_path / "m"))
    assert _states_equal(loaded.gpt, gpt) and _states_equal(loaded.vqgan, vqgan)
    assert loaded.tokenizer.vocab_hash == tokenizer.vocab_hash
    # a save without GPT weights keeps the GPT file and its fingerprint
    before = loaded.gpt_fingerprint
    with torch.no_grad():
        vqgan.quantize.embedding.weight.add_(1.0)
    save_model(str(tmp_path / "m"), config, tokenizer, vqgan=vqgan)
    updated = load_model(str(tmp_path / "m"))
    assert updated.gpt_fingerprint == before and updated.vqgan_fingerprint != loaded.vqgan_fingerprint
    assert _states_equal(updated.vqgan, vqgan)


def test_load_gpt_only_loads_no_vqgan(model_dir):
    (model_dir / "vqgan.safetensors").unlink()  # not even read
    loaded = load_model(str(model_dir), parts=("gpt",))
    assert loaded.gpt is not None and loaded.vqgan is None
    assert loaded.vqgan_fingerprint  # still named, from config.json
    with pytest.raises(CheckpointError, match="vqgan.safetensors"):
        load_model(str(model_dir))
    nothing = load_model(str(model_dir), parts=())  # config and vocab only
    assert nothing.gpt is None and nothing.vqgan is None


# ---------------------------------------------------------------------------------------------
# broken directories

def _assert_names(err: pytest.ExceptionInfo, *parts: str):
    message = str(err.value)
    assert "\n" not in message.strip()
    for part in parts:
        assert part in message, (part, message)


def test_truncated_weights(model_dir):
    path = model_dir / "gpt.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(path), "fingerprint")


def test_garbled_weights(model_dir):
    path = model_dir / "vqgan.safetensors"
    data = bytearray(path.read_bytes())
    data[100:140] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(path))


def _drop_fingerprints(model_dir: Path):
    manifest = json.loads((model_dir / "config.json").read_text())
    del manifest["fingerprints"]
    (model_dir / "config.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "empty"])
def test_unreadable_weights_without_fingerprint(model_dir, damage):
    _drop_fingerprints(model_dir)  # so the safetensors reader itself meets the damage
    path = model_dir / "gpt.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "garble_header":
        data = data[:8] + b"{not json" + data[17:]
    else:
        data = b""
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(path))


def test_replaced_weights_file_fails_the_fingerprint(model_dir):
    loaded = load_model(str(model_dir), parts=("gpt",))
    state = dict(loaded.gpt.state_dict())
    state["ln_f.weight"] = state["ln_f.weight"] + 1.0
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(model_dir / "gpt.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "gpt.safetensors"), "fingerprint")


def test_tensor_of_wrong_shape_is_named(model_dir):
    loaded = load_model(str(model_dir))
    state = dict(loaded.gpt.state_dict())
    state["blocks.1.attn.query.weight"] = torch.zeros(3, 5)
    save_model(str(model_dir), loaded.config, loaded.tokenizer, gpt=state)  # consistent fingerprint
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "gpt.safetensors"), "blocks.1.attn.query.weight", "[3, 5]")


def test_missing_tensor_is_named(model_dir):
    loaded = load_model(str(model_dir))
    state = dict(loaded.vqgan.state_dict())
    del state["decoder.conv_out.bias"]
    save_model(str(model_dir), loaded.config, loaded.tokenizer, vqgan=state)
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "vqgan.safetensors"), "decoder.conv_out.bias", "missing")


def test_unexpected_tensor_is_named(model_dir):
    loaded = load_model(str(model_dir))
    state = dict(loaded.gpt.state_dict()) | {"blocks.0.attn.mask": torch.ones(1, 1, 80, 80)}
    save_model(str(model_dir), loaded.config, loaded.tokenizer, gpt=state)
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "gpt.safetensors"), "blocks.0.attn.mask", "unexpected")


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text("{\"format\": \"painter-model\", ")
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "config.json"), "JSON")


def test_config_of_another_format(model_dir):
    (model_dir / "config.json").write_text(json.dumps({"n_layer": 12, "vocab_size": 37512}))
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "config.json"), "painter import-easynlp")


def test_config_with_inconsistent_shapes(model_dir):
    manifest = json.loads((model_dir / "config.json").read_text())
    manifest["gpt"]["img_len"] = 10
    (model_dir / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "config.json"), "img_len")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path / "nowhere"))
    _assert_names(err, str(tmp_path / "nowhere" / "config.json"), "not found")


def test_zoo_name_not_imported_says_how(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PAINTER_HOME", str(home))
    assert "pai-painter-base-zh" in ZOO_NAMES
    with pytest.raises(CheckpointError) as err:
        load_model("pai-painter-base-zh")
    _assert_names(err, "pai-painter-base-zh", str(home), "painter import-easynlp", "PAINTER_HOME")
    assert os.listdir(home) == []  # nothing downloaded or created


def test_zoo_name_resolves_under_painter_home(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("PAINTER_HOME", str(tmp_path))
    shutil.copytree(tiny_model_dir, tmp_path / "pai-painter-scenery-base-zh")
    assert resolve_model_dir("pai-painter-scenery-base-zh") == str(tmp_path / "pai-painter-scenery-base-zh")
    assert load_model("pai-painter-scenery-base-zh", parts=()).config.name == "tiny"
    assert resolve_model_dir(str(tmp_path / "x")) == str(tmp_path / "x")  # paths pass through
    assert resolve_model_dir("s3://bucket/model") == "s3://bucket/model"
    assert resolve_model_dir("file:///models/m") == "file:///models/m"  # a URL, file:// too, as it is
    monkeypatch.chdir(tmp_path)  # a relative path becomes absolute: Ray Train workers start in another folder
    assert resolve_model_dir("x") == str(tmp_path / "x")
    assert load_model("x/../pai-painter-scenery-base-zh", parts=()).path == str(tmp_path / "pai-painter-scenery-base-zh")


def test_missing_vocab(model_dir):
    (model_dir / "vocab.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "vocab.txt"))


def test_vocab_larger_than_the_text_embedding(model_dir):
    with open(model_dir / "vocab.txt", "a", encoding="utf-8") as f:
        f.write("".join(f"[extra{i}]\n" for i in range(10)))
    with pytest.raises(CheckpointError) as err:
        load_model(str(model_dir))
    _assert_names(err, str(model_dir / "vocab.txt"), "21138")


def test_new_model_with_a_missing_vocab_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere-vocab.txt"):
        new_model("tiny", str(tmp_path / "m"), vocab=str(tmp_path / "nowhere-vocab.txt"))
