"""Coming from EasyNLP, without Ray: the predict TSV format, flags and user_defined_parameters, zoo names,
export-easynlp round trips, and the points where painter reproduces the reference exactly (8-bit
truncation, special tokens, do_lower_case, n_unmasked, OpenCV-bilinear resizing)."""
from __future__ import annotations

import ast
import base64
import io
import json
import shutil

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from painter.cli import main as cli, registry
from painter.checkpoint.model_dir import ZOO_NAMES, load_model, resolve_model_dir
from painter.easynlp.flags import check_flags, painter_schema, parse_user_defined_parameters
from painter.easynlp.modes import easynlp_text
from painter.errors import CheckpointError, InputError
from painter.checkpoint.importers import import_easynlp, read_torch_checkpoint
from painter.io.easynlp_tsv import parse_images_cell, write_easynlp_tsv
from painter.io.images import fit_square_reference, prepare_pixels
from painter.inference.pixels import uint8_from_tensor
from painter.options import from_args
from painter.pipeline import pipeline
from painter.checkpoint.tokenizer import TextTokenizer, default_vocab
from test_importers import SMALL_GPT, SMALL_VOCAB, easynlp_state, reference_keys, write_easynlp_dir


def png(colour, size=(4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def flags(*argv: str):
    args = cli.build_parser().parse_args(["easynlp", *argv])
    options_cls, _ = registry.load("easynlp")
    return from_args(options_cls, args)


# --- the predict TSV -----------------------------------------------------------------------------

def test_predict_tsv_is_easynlps_format(tmp_path):
    table = pa.table({"idx": ["b", "a", "b"], "text": ["蓝\t色", "红色", "蓝\t色"], "sample": [1, 0, 0],
                      "png": [png("blue"), png("red"), png("navy")], "category": ["x", "y", "x"]})
    path = str(tmp_path / "out.tsv")
    lines = write_easynlp_tsv(table, path, "png", output_schema="gen_imgbase64,idx", append_cols="category,text",
                              order=["b", "a"])
    assert lines == 2
    rows = [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines()]
    assert [r[1:] for r in rows] == [["b", "x", "蓝 色"], ["a", "y", "红色"]]  # schema order, then append_cols
    cell = rows[0][0]
    assert cell == str([base64.b64encode(png("navy")).decode(), base64.b64encode(png("blue")).decode()])
    decoded = [Image.open(io.BytesIO(base64.urlsafe_b64decode(b))).getpixel((0, 0)) for b in ast.literal_eval(cell)]
    assert decoded == [(0, 0, 128), (0, 0, 255)]  # samples in order
    assert parse_images_cell(cell) == [png("navy"), png("blue")]
    assert ast.literal_eval(rows[1][0]) == [base64.b64encode(png("red")).decode()]  # a list even for one image
    write_easynlp_tsv(table, path, "png", append_cols="text", output_text={"a": "red"})
    rows = [line.split("\t") for line in open(path, encoding="utf-8").read().splitlines()]
    assert [(r[0], r[1], r[3]) for r in rows] == [("a", "red", "红色"), ("b", "蓝 色", "蓝 色")]  # sorted by idx
    with pytest.raises(InputError, match="--append_cols 'nope'"):
        write_easynlp_tsv(table, path, "png", append_cols="nope")
    with pytest.raises(InputError, match="--output_schema 'score'"):
        write_easynlp_tsv(table, path, "png", output_schema="idx,score")


def test_predict_text_is_read_back_through_the_tokenizer_as_easynlp_writes_it():
    tokenizer = TextTokenizer.default(text_len=8)
    assert easynlp_text(tokenizer, "蓝色[MASK]方块 ABC") == "蓝色方块abc"
    assert easynlp_text(tokenizer, "长" * 20) == "长" * 8  # truncated to text_len


# --- flags and user_defined_parameters ----------------------------------------------------------

def test_user_defined_parameters_parse_and_refuse():
    params = parse_user_defined_parameters("pretrain_model_name_or_path=alibaba-pai/pai-painter-large-zh  size=256 "
                                           "text_len=32 random_crop=False max_generated_num=4")
    assert params == {"pretrain_model_name_or_path": "alibaba-pai/pai-painter-large-zh", "size": 256, "text_len": 32,
                      "random_crop": False, "max_generated_num": 4}
    assert parse_user_defined_parameters("random_crop=false")["random_crop"] is False  # not bool("False")
    with pytest.raises(InputError, match="'foo' is not a text2image key"):
        parse_user_defined_parameters("foo=1")
    with pytest.raises(InputError, match="size='big': expected an integer"):
        parse_user_defined_parameters("size=big")
    with pytest.raises(InputError, match="random_crop=True: .*use random_crop=False"):
        check_flags(flags("--tables=a.tsv", "--user_defined_parameters=random_crop=True"))
    with pytest.raises(InputError, match="vqgan_ckpt_path: .*painter import-vqgan"):
        check_flags(flags("--tables=a.tsv", "--user_defined_parameters=vqgan_ckpt_path=last.ckpt"))


@pytest.mark.parametrize("flag,advice", [("--skip_first_line=1", "remove the header"),
                                         ("--optimizer_type=SGD", "AdamW only"),
                                         ("--app_name=text_classify", "only text2image_generation"),
                                         ("--sequence_length=100", "!= text_len 32 \\+ img_len 256")])
def test_unsupported_flags_are_refused_with_advice(flag, advice):
    o = flags("--tables=a.tsv", flag, "--user_defined_parameters=text_len=32 img_len=256")
    with pytest.raises(InputError, match=advice) as e:
        check_flags(o)
    assert "\n" not in str(e.value)


def test_sequences_are_mapped_onto_painters_columns():
    o = flags("--input_schema=id:str:1,idx:str:1,caption:str:1,pic:str:1", "--first_sequence=caption",
              "--second_sequence=pic")
    assert painter_schema(o, needs_image=True) == "id:str:1,idx:str:1,text:str:1,imgbase64:str:1"
    with pytest.raises(InputError, match="no column 'prompt'"):
        painter_schema(flags("--input_schema=idx:str:1,text:str:1", "--first_sequence=prompt"), needs_image=False)


# --- zoo names ------------------------------------------------------------------------------------

def test_zoo_names_as_easynlp_spells_them(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAINTER_HOME", str(tmp_path))
    for name in ZOO_NAMES:
        shutil.copytree(tiny_model_dir, tmp_path / name)
        assert resolve_model_dir(f"alibaba-pai/{name}") == str(tmp_path / name)
        result = pipeline(name, device="cpu")(["红色"])  # the zoo name alone, as in EasyNLP
        assert Image.open(io.BytesIO(base64.b64decode(result[0]["gen_imgbase64"]))).size == (32, 32)
    assert pipeline("alibaba-pai/pai-painter-large-zh", device="cpu").model.path == str(tmp_path / "pai-painter-large-zh")
    shutil.rmtree(tmp_path / "pai-painter-base-zh")
    with pytest.raises(CheckpointError, match="painter import-easynlp /path/to/pai-painter-base-zh"):
        load_model("alibaba-pai/pai-painter-base-zh")


# --- export-easynlp -------------------------------------------------------------------------------

ARTIST_FIELDS = {"vocab_size", "img_vocab_size", "text_vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                 "embd_pdrop", "resid_pdrop", "attn_pdrop", "n_unmasked"}


def test_export_then_import_gives_identical_tensors_and_fingerprints(tmp_path, capsys):
    state = easynlp_state()
    src = write_easynlp_dir(tmp_path / "pai-painter-mini-zh", state)
    first = import_easynlp(str(src), str(tmp_path / "first"), text_len=SMALL_GPT.text_len, resolution=64)
    assert cli.main(["export-easynlp", first, str(tmp_path / "exported")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "succeeded"
    exported = read_torch_checkpoint(str(tmp_path / "exported" / "pytorch_model.bin"))
    gpt_ref = reference_keys("pai_painter_base_zh.gpt.keys.json")
    vqgan_ref = reference_keys("vqgan_f16_16384.keys.json")
    assert set(exported) == set(gpt_ref) | {f"first_stage_model.{k}" for k in vqgan_ref}
    assert all(torch.equal(exported[k], state[k]) for k in exported)  # masks included
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert ARTIST_FIELDS <= set(config) and config["block_size"] == SMALL_GPT.block_size
    assert (tmp_path / "exported" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == SMALL_VOCAB

    second = import_easynlp(str(tmp_path / "exported"), str(tmp_path / "second"), text_len=SMALL_GPT.text_len,
                            resolution=64)
    a, b = load_model(first), load_model(second)
    assert (a.gpt_fingerprint, a.vqgan_fingerprint) == (b.gpt_fingerprint, b.vqgan_fingerprint)
    for x, y in ((a.gpt, b.gpt), (a.vqgan, b.vqgan)):
        assert all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())


# --- exact reproduction ---------------------------------------------------------------------------

def test_truncating_8bit_conversion_is_easynlps_astype():
    x = torch.rand(2, 3, 16, 16) * 2.2 - 1.1
    easynlp = ((x.numpy().transpose(0, 2, 3, 1) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)  # its save_image
    assert np.array_equal(uint8_from_tensor(x, "truncate"), easynlp)
    rounded = uint8_from_tensor(x)
    assert 0.3 < (rounded != easynlp).mean() < 0.7 and (rounded.astype(int) - easynlp).max() == 1
    with pytest.raises(ValueError, match="pixel rounding"):
        uint8_from_tensor(x, "ceil")


def test_special_tokens_typed_into_a_prompt_stay_whole():
    tokenizer = TextTokenizer.default(text_len=16)
    vocab = tokenizer.vocab
    assert tokenizer.tokenize("红色[MASK]圆 [UNK][CLS]和[PAD] [SEP]") == \
        ["红", "色", "[MASK]", "圆", "[UNK]", "[CLS]", "和", "[PAD]", "[SEP]"]
    assert tokenizer.encode("[MASK]红")[:2] == [vocab.index("[MASK]"), vocab.index("红")]
    assert tokenizer.tokenize("[mask]")[0] == "["  # only the exact spelling is special, as in BertTokenizer


def test_do_lower_case_false_is_honoured_and_kept(tmp_path):
    vocab = default_vocab()[:300] + ["Hello", "hello"]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    lower = TextTokenizer.from_file(str(tmp_path / "vocab.txt"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "model_max_length": 32}))
    cased = TextTokenizer.from_file(str(tmp_path / "vocab.txt"))
    assert lower.tokenize("Hello") == ["hello"] and cased.tokenize("Hello") == ["Hello"]
    assert cased.vocab_hash != lower.vocab_hash  # shards made with one are refused by the other
    cased.save(str(tmp_path / "copy" / "vocab.txt"))
    assert TextTokenizer.from_file(str(tmp_path / "copy" / "vocab.txt")).tokenize("Hello") == ["Hello"]


def test_import_honours_tokenizer_config(tmp_path):
    src = write_easynlp_dir(tmp_path / "pai-painter-mini-zh", easynlp_state())
    (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    model = load_model(import_easynlp(str(src), str(tmp_path / "dst"), text_len=SMALL_GPT.text_len, resolution=64),
                       parts=())
    assert model.tokenizer.settings.do_lower_case is False
    assert model.tokenizer.tokenize("A") == ["[UNK]"]  # uppercase kept, so not in the lowercase vocab


def test_n_unmasked_is_refused(tmp_path):
    state = easynlp_state()
    config = {"n_head": SMALL_GPT.n_head, "n_unmasked": 8}
    src = write_easynlp_dir(tmp_path / "a", state, config)
    with pytest.raises(CheckpointError, match="n_unmasked=8"):
        import_easynlp(str(src), str(tmp_path / "out"), text_len=SMALL_GPT.text_len, resolution=64)
    key = "transformer.blocks.3.attn.mask"
    state[key] = state[key].clone()
    state[key][..., :8, :8] = 1  # what n_unmasked=8 saves, with a config that says nothing of it
    src = write_easynlp_dir(tmp_path / "b", state, {"n_head": SMALL_GPT.n_head})
    with pytest.raises(CheckpointError, match="blocks.3.attn.mask' is not the causal attention mask"):
        import_easynlp(str(src), str(tmp_path / "out"), text_len=SMALL_GPT.text_len, resolution=64)


def _smallest_max_size_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """albumentations SmallestMaxSize(size) + CenterCrop(size, size), spelled with OpenCV itself."""
    h, w = pixels.shape[:2]
    scale = size / min(h, w)
    if scale != 1.0:
        pixels = cv2.resize(pixels, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    h, w = pixels.shape[:2]
    return pixels[(h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]


@pytest.mark.parametrize("shape", [(300, 200), (517, 389), (100, 150), (256, 512), (64, 64), (33, 47)])
def test_reference_resize_is_opencv_bilinear_smallest_max_size(shape):
    rng = np.random.default_rng(shape[0])
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    ours, reference = fit_square_reference(pixels, 32), _smallest_max_size_center_crop(pixels, 32)
    assert ours.shape == reference.shape == (32, 32, 3)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1


def test_tokenize_preprocessing_with_the_reference_resize():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (75, 120, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    cell = base64.b64encode(buffer.getvalue()).decode()
    ours, reason = prepare_pixels(cell, 64, resize="easynlp")
    assert reason is None
    assert np.abs(ours.astype(int) - _smallest_max_size_center_crop(pixels, 64).astype(int)).max() <= 1
    default, _ = prepare_pixels(cell, 64)
    assert not np.array_equal(default, ours)  # the default stays painter's antialiased bicubic


def test_evaluate_reads_every_image_of_a_predict_tsv(tmp_path):
    from painter.stages.evaluate_inputs import Rejected, table_rows

    table = pa.table({"idx": ["a", "a", "b"], "text": ["红", "红", "蓝"], "sample": [0, 1, 0],
                      "png": [png("red"), png("maroon"), png("blue")]})
    path = str(tmp_path / "gen.tsv")
    write_easynlp_tsv(table, path, "png")
    with open(path, "a", encoding="utf-8") as f:
        f.write("c\t绿\t['not base64!']\n")
    rejected = Rejected()
    rows = list(table_rows([path], "idx:str:1,text:str:1,gen_imgbase64:str:1", {}, True, 0, rejected))
    assert [(r[0], r[4]) for r in rows] == [("a", png("red")), ("a", png("maroon")), ("b", png("blue"))]
    assert [(r[0], r[3].split(" (")[0]) for r in rejected.rows] == [("c", "not an EasyNLP gen_imgbase64 cell")]
