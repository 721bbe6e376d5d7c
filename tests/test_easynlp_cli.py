"""`painter easynlp` end to end: EasyNLP's two documented text2image commands, only the program name
changed (and the sizes made tiny through --user_defined_parameters), on a tiny EasyNLP-layout model
imported under the zoo name alibaba-pai/pai-painter-large-zh in a temporary PAINTER_HOME."""
from __future__ import annotations

import ast
import base64
import io
import json
import os
import shlex

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from painter.cli import main as cli
from painter.checkpoint.model_dir import load_model
from painter.inference.generator import GenerationConfig, Generator
from painter.checkpoint.importers import causal_mask, import_easynlp
from painter.models.gpt import GPT, GPTConfig, attention_mask_keys
from painter.models.vqgan import VQGAN, VQGANConfig
from painter.pipeline import pipeline
from painter.checkpoint.tokenizer import default_vocab

CAPTIONS = ["红色的圆", "蓝色方块", "绿色三角形", "黄色背景"]
VOCAB = default_vocab()[:300]
VOCAB += [c for c in sorted(set("".join(CAPTIONS))) if c not in VOCAB]  # every caption character: none is [UNK]
GPT_SHAPE = GPTConfig(img_vocab_size=256, text_vocab_size=len(VOCAB), text_len=16, img_len=64, n_layer=2, n_head=2,
                      n_embd=64)
VQGAN_SHAPE = VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                          z_channels=32, embed_dim=32, n_embed=256)
UDP = "size=32 text_len=16 img_len=64 img_vocab_size=256"

TRAIN = ("--mode=train --worker_gpu=1 --tables=train.tsv,valid.tsv --input_schema=idx:str:1,text:str:1,imgbase64:str:1 "
         "--first_sequence=text --second_sequence=imgbase64 --checkpoint_dir=./finetuned_model/ --learning_rate=4e-5 "
         "--epoch_num=1 --random_seed=42 --logging_steps=100 --save_checkpoint_steps=1000 --sequence_length=80 "
         "--micro_batch_size=16 --app_name=text2image_generation "
         f"--user_defined_parameters='pretrain_model_name_or_path=alibaba-pai/pai-painter-large-zh {UDP}'")
PREDICT = ("--mode=predict --worker_gpu=1 --tables=test.tsv --input_schema=idx:str:1,text:str:1 --first_sequence=text "
           "--outputs=./T2I_outputs.tsv --output_schema=idx,text,gen_imgbase64 --checkpoint_dir=./finetuned_model/ "
           "--sequence_length=80 --micro_batch_size=8 --app_name=text2image_generation "
           f"--user_defined_parameters='{UDP}'")


def easynlp_model_dir(path) -> str:
    """A tiny pai-painter directory in EasyNLP's layout (prefixes, mask buffers, ARTIST config)."""
    torch.manual_seed(0)
    state = {f"transformer.{k}": v for k, v in GPT(GPT_SHAPE).state_dict().items()}
    for key in attention_mask_keys(GPT_SHAPE):
        state[f"transformer.{key}"] = causal_mask(GPT_SHAPE.block_size)
    state.update({f"first_stage_model.{k}": v for k, v in VQGAN(VQGAN_SHAPE).state_dict().items()})
    os.makedirs(path)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "artist", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_unmasked": 0,
                   "block_size": GPT_SHAPE.block_size, "img_vocab_size": 256, "text_vocab_size": len(VOCAB)}, f)
    return str(path)


def image_b64(seed: int, size: tuple[int, int]) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join("\t".join(r) + "\n" for r in rows))


def painter_easynlp(command: str, capsys) -> tuple[int, dict]:
    code = cli.main(["easynlp", *shlex.split(command)])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def read_like_easynlp_users(path) -> dict[str, list[Image.Image]]:
    """What EasyNLP users' scripts do with the predict TSV: a Python list per cell, urlsafe_b64decode, Pillow."""
    images = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            idx, text, cell = line.rstrip("\n").split("\t")
            images[idx] = [Image.open(io.BytesIO(base64.urlsafe_b64decode(b))) for b in ast.literal_eval(cell)]
    return images


@pytest.mark.slow
def test_easynlp_documented_commands_train_then_predict(ray_session, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("PAINTER_HOME", str(home))
    import_easynlp(easynlp_model_dir(tmp_path / "download" / "pai-painter-large-zh"),
                   str(home / "pai-painter-large-zh"), text_len=16, resolution=32)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    captions = CAPTIONS
    write_tsv("train.tsv", [(f"t{i}", captions[i % 4], image_b64(i, (40 + i, 32 + 2 * i))) for i in range(20)])
    write_tsv("valid.tsv", [(f"v{i}", captions[i], image_b64(100 + i, (48, 36))) for i in range(4)])
    more = [(f"q{i}", captions[i % 4]) for i in range(17)]  # 1 bad row in 21: under the 5% error-rate limit
    write_tsv("test.tsv", [("p1", "红色的圆"), ("p2", "蓝色[MASK]方块"), ("bad", "   "), ("p3", "绿色三角形"), *more])

    code, train = painter_easynlp(TRAIN, capsys)
    assert code == 0, train
    assert train["tokenize"]["rows_out"] == 20 and train["tokenize_valid"]["rows_out"] == 4
    assert train["train"]["steps"] == 1 and np.isfinite(train["train"]["val_loss"])
    model = load_model("./finetuned_model/")  # a painter model directory
    assert model.config.gpt == GPT_SHAPE

    code, evaluated = painter_easynlp(TRAIN.replace("--mode=train", "--mode=evaluate")
                                      .replace("--tables=train.tsv,valid.tsv", "--tables=valid.tsv"), capsys)
    assert code == 0 and evaluated["rows"] == 4
    assert evaluated["val_loss"] == pytest.approx(train["train"]["val_loss"], rel=1e-4)

    code, predicted = painter_easynlp(PREDICT, capsys)
    assert code == 0, predicted
    assert (predicted["lines"], predicted["rows_in"], predicted["rows_rejected"]) == (20, 21, 1)
    rejected = pq.read_table(predicted["errors"]).to_pylist()
    assert [(r["idx"], r["reason"]) for r in rejected] == [("bad", "empty text")]
    lines = open("T2I_outputs.tsv", encoding="utf-8").read().splitlines()
    assert [line.split("\t")[:2] for line in lines[:4]] == [["p1", "红色的圆"], ["p2", "蓝色方块"], ["p3", "绿色三角形"],
                                                        ["q0", "红色的圆"]]  # input order, text as EasyNLP writes it
    assert all(line.split("\t")[2].startswith("['iVBOR") for line in lines)
    images = read_like_easynlp_users("T2I_outputs.tsv")
    assert len(images) == 20 and all([im.size for im in ims] == [(32, 32)] for ims in images.values())

    # pixels were truncated to 8 bits as EasyNLP does: the same codes decoded and rounded differ
    generator = Generator(model, GenerationConfig(seed=1234), "cpu", micro_batch=8)  # --random_seed's default
    codes, _, _ = generator.codes(["红色的圆"] * 8, ["p1"] * 8, [0] * 8)
    with torch.inference_mode():
        decoded = model.vqgan.decode(codes)  # the generate job's shape: a micro-batch of 8
    scaled = ((decoded.clamp(-1, 1) + 1) * 127.5).numpy().transpose(0, 2, 3, 1)[0]
    written = np.asarray(images["p1"][0].convert("RGB"))
    assert np.array_equal(written, scaled.clip(0, 255).astype(np.uint8))  # EasyNLP's save_image
    assert not np.array_equal(written, np.rint(scaled).astype(np.uint8))  # not painter's default rounding

    # the fine-tuned checkpoint_dir is what pipeline() and --model read
    out = pipeline("text2image_generation", "./finetuned_model/", device="cpu")(["红色的圆"])
    assert Image.open(io.BytesIO(base64.b64decode(out[0]["gen_imgbase64"]))).size == (32, 32)
