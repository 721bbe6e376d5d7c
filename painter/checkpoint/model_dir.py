"""The model directory: presets, save/load, fingerprints, model-zoo names and foreign-checkpoint import.

A model directory holds `config.json` (a `ModelConfig`), `vocab.txt`, `gpt.safetensors` and
`vqgan.safetensors`; every path goes through the job's `painter.io.storage.Storage` so `s3://` directories work
like local ones.
A tensor that is missing, unexpected or misshapen raises `CheckpointError` naming the file and the
first tensor that does not fit. Importers of foreign layouts are in `painter.checkpoint.importers`.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from painter.checkpoint.config import FORMAT, ModelConfig, preset_config
from painter.errors import CheckpointError
from painter.io.storage import Storage, absolute, as_storage
from painter.models.gpt import GPT
from painter.models.vqgan import VQGAN
from painter.checkpoint.tokenizer import TextTokenizer

ZOO_NAMES = (
    "pai-painter-base-zh",
    "pai-painter-large-zh",
    "pai-painter-commercial-base-zh",
    "pai-painter-scenery-base-zh",
    "pai-painter-painting-base-zh",
)
ZOO_ORG = "alibaba-pai/"  # EasyNLP and its model hub also spell zoo names with the organisation










@dataclass
class LoadedModel:
    """What a model directory holds, loaded: only the parts asked for are set."""
    path: str
    config: ModelConfig
    tokenizer: TextTokenizer
    gpt: GPT | None = None
    vqgan: VQGAN | None = None
    gpt_fingerprint: str = ""
    vqgan_fingerprint: str = ""

    @property
    def fingerprint(self) -> str:
        """Names the weights that made an image: GPT and VQGAN together."""
        return hashlib.sha256(f"{self.gpt_fingerprint}:{self.vqgan_fingerprint}".encode()).hexdigest()[:16]


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_bytes(path: str, storage: Storage | None = None) -> bytes:
    try:
        return as_storage(storage).read_bytes(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None


def check_state_dict(module: torch.nn.Module, state: dict, source: str) -> None:
    """Raise CheckpointError naming `source` and the first missing, unexpected or misshapen tensor."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{source}: missing tensor {name!r} (expected shape {list(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(state[name].shape)}, "
                                  f"expected {list(tensor.shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")


def _load_weights(module: torch.nn.Module, path: str, fingerprint: str | None, storage: Storage) -> str:
    data = read_bytes(path, storage)
    actual = _fingerprint(data)
    if fingerprint and actual != fingerprint:
        raise CheckpointError(f"{path}: contents do not match the fingerprint in config.json "
                              f"({actual} != {fingerprint}): the file was replaced, truncated or corrupted")
    try:
        state = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    check_state_dict(module, state, path)
    module.load_state_dict(state)
    return actual


def check_weight_file(path: str, storage: Storage | None = None) -> None:
    """CheckpointError naming `path` when it is missing, not safetensors, or shorter than its header says.

    Reads the header only (8 bytes of length, then the JSON index of tensors), so a job can refuse a
    truncated model before any worker loads it; the fingerprint check at load time catches the rest."""
    fs, stripped = as_storage(storage).fs(path)
    try:
        size = fs.size(stripped)
        with fs.open(stripped, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > min(size - 8, 100 << 20):
                raise ValueError("no safetensors header")
            index = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in index.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (the model directory lacks this weight file)") from None
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a readable safetensors file (its header is damaged)") from None
    if size < 8 + length + end:
        raise CheckpointError(f"{path}: truncated: {size} bytes, its header promises {8 + length + end}")


def check_model_files(model_dir: str, parts: tuple[str, ...] = ("gpt", "vqgan"),
                      storage: Storage | None = None) -> LoadedModel:
    """The model directory's config and vocab (no weights), after checking the weight files of `parts`."""
    loaded = load_model(model_dir, parts=(), storage=storage)
    for part in parts:
        check_weight_file(posixpath.join(loaded.path, f"{part}.safetensors"), storage)
    return loaded


def load_tokenizer(path: str, text_len: int, storage: Storage | None = None) -> TextTokenizer:
    """A vocab.txt as a tokenizer; a missing or unusable file is a CheckpointError naming it."""
    try:
        return TextTokenizer.from_file(path, text_len=text_len, storage=storage)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the vocabulary ({type(e).__name__}: {e})") from None


def read_manifest(model_dir: str, storage: Storage | None = None) -> tuple[ModelConfig, dict]:
    """The model directory's config and the fingerprints of its weight files."""
    path = posixpath.join(model_dir, "config.json")
    try:
        d = json.loads(read_bytes(path, storage))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a painter model config (no \"format\": \"{FORMAT}\"); "
                              "import foreign checkpoints with `painter import-easynlp` or `painter import-vqgan`")
    try:
        return ModelConfig.from_dict(d), dict(d.get("fingerprints", {}))
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def load_model(model_dir: str, *, parts: tuple[str, ...] = ("gpt", "vqgan"), device="cpu",
               storage: Storage | None = None) -> LoadedModel:
    """Load a model directory (a path, `s3://` prefix or zoo name) through `storage`; only `parts` get weights."""
    storage = as_storage(storage)
    model_dir = resolve_model_dir(model_dir)
    config, fingerprints = read_manifest(model_dir, storage)
    vocab_path = posixpath.join(model_dir, "vocab.txt")
    tokenizer = load_tokenizer(vocab_path, config.gpt.text_len, storage)
    if tokenizer.vocab_size > config.gpt.text_vocab_size:
        raise CheckpointError(f"{vocab_path}: {tokenizer.vocab_size} tokens but the GPT embeds only "
                              f"{config.gpt.text_vocab_size} text ids")
    loaded = LoadedModel(model_dir, config, tokenizer, gpt_fingerprint=fingerprints.get("gpt", ""),
                         vqgan_fingerprint=fingerprints.get("vqgan", ""))
    for part, cls, part_config in (("gpt", GPT, config.gpt), ("vqgan", VQGAN, config.vqgan)):
        if part not in parts:
            continue
        path = posixpath.join(model_dir, f"{part}.safetensors")
        if part not in fingerprints and not storage.exists(path):
            raise CheckpointError(f"{path}: this model directory has no {part.upper()} weights")
        module = cls(part_config).eval()
        setattr(loaded, f"{part}_fingerprint", _load_weights(module, path, fingerprints.get(part), storage))
        setattr(loaded, part, module.to(device))
    return loaded


def save_model(model_dir: str, config: ModelConfig, tokenizer: TextTokenizer, *,
               gpt: GPT | dict | None = None, vqgan: VQGAN | dict | None = None, storage: Storage | None = None) -> str:
    """Write a model directory through `storage`; weights given as None keep the files (and fingerprints)
    already there. config.json, which names the weights by fingerprint, is replaced last and atomically."""
    storage = as_storage(storage)
    storage.makedirs(model_dir)
    config_path = posixpath.join(model_dir, "config.json")
    fingerprints = {}
    if storage.exists(config_path):
        fingerprints = json.loads(read_bytes(config_path, storage)).get("fingerprints", {})
    for name, part in (("gpt", gpt), ("vqgan", vqgan)):
        if part is None:
            continue
        state = part.state_dict() if isinstance(part, torch.nn.Module) else part
        data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in state.items()})
        with storage.open(posixpath.join(model_dir, f"{name}.safetensors"), "wb") as f:
            f.write(data)
        fingerprints[name] = _fingerprint(data)
    tokenizer.save(posixpath.join(model_dir, "vocab.txt"), storage)
    manifest = config.to_dict() | {"fingerprints": fingerprints}
    storage.write_atomic(config_path, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return model_dir


def _random(preset: str, seed: int, tokenizer: TextTokenizer | None = None) -> tuple[ModelConfig, TextTokenizer, GPT, VQGAN]:
    """A preset's config, tokenizer (default vocab unless given) and randomly initialised GPT and VQGAN."""
    config = preset_config(preset)
    tokenizer = tokenizer or TextTokenizer.default(text_len=config.gpt.text_len)
    config.gpt.text_vocab_size = max(config.gpt.text_vocab_size, tokenizer.vocab_size)
    torch.manual_seed(seed)
    return config, tokenizer, GPT(config.gpt), VQGAN(config.vqgan)


def new_model(preset: str, output: str, *, seed: int = 0, vocab: str | None = None,
              storage: Storage | None = None) -> str:
    """A randomly initialised model directory from a preset (for tests and from-scratch training)."""
    tokenizer = load_tokenizer(vocab, preset_config(preset).gpt.text_len, storage) if vocab else None
    config, tokenizer, gpt, vqgan = _random(preset, seed, tokenizer)
    return save_model(output, config, tokenizer, gpt=gpt, vqgan=vqgan, storage=storage)


def random_model(preset: str, *, seed: int = 0, device="cpu") -> LoadedModel:
    """The model `new_model(preset, ..., seed=seed)` writes, in memory only: no files, so no storage
    (benchmarks and GPU tests on a box without fsspec). Its fingerprint names the preset and seed."""
    config, tokenizer, gpt, vqgan = _random(preset, seed)
    name = f"random-{preset}-{seed}"
    return LoadedModel(name, config, tokenizer, gpt.eval().to(device), vqgan.eval().to(device),
                       gpt_fingerprint=name, vqgan_fingerprint=name)


def models_home() -> str:
    return os.environ.get("PAINTER_HOME", os.path.join(os.path.expanduser("~"), ".cache", "painter", "models"))


BUNDLED = "bundled"  # the small model that ships in the package (painter/assets/demo-model)


def bundled_model_dir() -> str:
    """The model directory shipped in the package: trained on the synthetic task by `make bundled-model`."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo-model")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: the bundled model is missing from this install; `make bundled-model` builds it")
    return path


def zoo_name(name_or_path: str) -> str | None:
    """The zoo name `name_or_path` spells (`pai-painter-large-zh` or `alibaba-pai/pai-painter-large-zh`), else None."""
    name = name_or_path[len(ZOO_ORG):] if name_or_path.startswith(ZOO_ORG) else name_or_path
    return name if name in ZOO_NAMES else None


def resolve_model_dir(name_or_path: str) -> str:
    """`bundled` is the packaged model; a zoo name resolves under the models home (nothing is downloaded); a
    local path becomes absolute; a URL stays as it is."""
    if name_or_path == BUNDLED:
        return bundled_model_dir()
    if zoo_name(name_or_path):
        name_or_path = zoo_name(name_or_path)
        path = os.path.join(models_home(), name_or_path)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise CheckpointError(
                f"model {name_or_path!r} is not in {models_home()} (set PAINTER_HOME to change that). Nothing is "
                f"downloaded: get EasyNLP's {name_or_path} directory, then run "
                f"`painter import-easynlp /path/to/{name_or_path} {path}`")
        return path
    return absolute(name_or_path)
