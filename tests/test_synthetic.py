"""Tests for painter.evaluation.synthetic: captions, drawing, the corpus files, and the judge that reads pictures back.

The judge is measured on 500 rendered scenes at 32x32 and at 64x64, clean (>= 99% on every
attribute) and degraded (>= 95%): Gaussian blur of radius 0.7, then additive Gaussian noise of
sigma 8 per channel and a colour shift of up to +-12 per channel (one per image), rounded and
clipped to uint8 -- roughly what a VQGAN reconstruction or a generated picture does to a scene.
"""

import json

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageFilter

from painter.cli import main as cli, registry
from painter.evaluation import synthetic
from painter.io.images import decode_base64, load_image, preprocess
from painter.io.rows import REASON
from painter.io.tables import iter_rows, parse_schema
from painter.evaluation.synthetic import ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Reading, Scene, all_scenes, caption, captions_for_eval, hold_out, judge, parse_caption, render, sample_scenes, write_corpus
from painter.evaluation.judge import score

SCHEMA = parse_schema("idx:str:1,text:str:1,imgbase64:str:1")
N_JUDGED = 500


def degrade(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Blur (radius 0.7), noise (sigma 8) and a colour shift (+-12 per channel), as uint8 (H, W, 3)."""
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float64)
    x = x + rng.normal(0, 8, x.shape) + rng.uniform(-12, 12, 3)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def judged_set():
    """500 scenes (seed 7) with captions, and their pictures per size (jitter from another seed)."""
    scenes = sample_scenes(N_JUDGED, seed=7)
    images = {size: [render(s, size, np.random.default_rng([99, i])) for i, s in enumerate(scenes)]
              for size in (32, 64)}
    return scenes, [caption(s) for s in scenes], images


# --- captions --------------------------------------------------------------------------------


def test_caption_round_trip_for_every_scene():
    from painter.checkpoint.tokenizer import TextTokenizer

    scenes = all_scenes()
    assert len(scenes) == len(SHAPES) * len(SIZES) * len(POSITIONS) * sum(
        c != b for c in COLOURS for b in BACKGROUNDS) == 600
    texts = [caption(s) for s in scenes]
    assert len(set(texts)) == len(texts)
    tokenizer = TextTokenizer.default(text_len=16)
    for scene, text in zip(scenes, texts):
        assert parse_caption(text) == scene
        assert parse_caption(f" {text}\n") == scene
        assert len(text) <= synthetic.MAX_CAPTION_CHARS == 16, text
        assert tokenizer.tokenize(text) == list(text)  # one known token per character
    assert caption(Scene("圆形", "红", "灰", "大", "左")) == "灰色背景左边的一个大的红色圆形"
    assert max(map(len, texts)) == 16


@pytest.mark.parametrize("text", [
    "", "红色圆形", "灰色背景左边的一个大的红色圆形。", "灰色背景左边的一个大的粉色圆形", "灰色背景上的一个大的红色圆形",
    "白色背景中间的一个小的白色星形",  # shape as white as its background: not a scene
    "a big red circle", None, 3,
])
def test_parse_caption_rejects_other_text(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_scene_rejects_unknown_values():
    with pytest.raises(ValueError, match="shape"):
        Scene("心形", "红", "白")
    with pytest.raises(ValueError, match="invisible"):
        Scene("圆形", "黑", "黑")


# --- drawing and sampling --------------------------------------------------------------------


def test_render_is_deterministic_rgb_and_keeps_shapes_inside(judged_set):
    scenes, _, images = judged_set
    for size in (32, 64):
        for scene, image in zip(scenes, images[size]):
            assert image.mode == "RGB" and image.size == (size, size)
            x = np.asarray(image)
            border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
            assert (border == BACKGROUNDS[scene.background]).all(), scene  # clearly inside the frame
    scene = scenes[0]
    assert np.array_equal(np.asarray(render(scene, 32, 5)), np.asarray(render(scene, 32, 5)))
    assert not np.array_equal(np.asarray(render(scene, 64, 5)), np.asarray(render(scene, 64, 6)))
    assert render(scene, 256, None).size == (256, 256)


def test_sample_scenes_is_deterministic_and_covers_every_value():
    a = sample_scenes(300, seed=1)
    assert a == sample_scenes(300, seed=1) and a != sample_scenes(300, seed=2)
    assert sample_scenes(100, seed=1) == a[:100]  # row i depends only on (seed, i)
    for name, values in zip(ATTRIBUTES, (SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS)):
        assert {getattr(s, name) for s in a} == set(values)


def test_held_out_captions_never_reach_the_corpus(tmp_path):
    held = hold_out(3, seed=0)
    pairs = {(parse_caption(t).colour, parse_caption(t).shape) for t in held}
    assert len(pairs) == 3 and hold_out(3, seed=0) == held and hold_out(0, 0) == []
    scenes = sample_scenes(400, seed=0, held_out=held)
    assert not {(s.colour, s.shape) for s in scenes} & pairs
    evaluation = captions_for_eval(50, seed=0, held_out=held)
    assert set(evaluation) <= set(held) and evaluation == captions_for_eval(50, seed=0, held_out=held)
    # without held_out: a random stream apart from the corpus rows of the same seed
    plain = captions_for_eval(200, seed=0)
    assert plain == captions_for_eval(200, seed=0)
    assert plain != [caption(s) for s in sample_scenes(200, seed=0)]
    assert all(parse_caption(t) for t in plain)
    with pytest.raises(ValueError):
        hold_out(36, 0)


# --- the corpus ------------------------------------------------------------------------------


def test_write_corpus_is_readable_as_easynlp_tsv(tmp_path):
    paths = write_corpus(str(tmp_path / "c"), rows=37, shards=3, size=32, seed=4)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-00000.tsv", "part-00001.tsv", "part-00002.tsv"]
    rows = []
    for path in paths:
        for chunk in iter_rows(path, SCHEMA):
            assert chunk[REASON] == [None] * len(chunk["idx"])
            rows += list(zip(chunk["idx"], chunk["text"], chunk["imgbase64"]))
    assert len(rows) == 37 and len({idx for idx, _, _ in rows}) == 37
    assert [parse_caption(text) for _, text, _ in rows] == sample_scenes(37, seed=4)
    for _, text, cell in rows:
        x, reason = preprocess(cell, 32)
        assert reason is None and x.shape == (3, 32, 32) and x.dtype == np.float32
        assert -1 <= x.min() and x.max() <= 1
        assert judge(load_image(decode_base64(cell))) == Reading(**vars(parse_caption(text)))
    assert preprocess(rows[0][2], 16)[0].shape == (3, 16, 16)  # resizes like any other image


def test_write_corpus_is_byte_identical_for_a_seed(tmp_path):
    first = write_corpus(str(tmp_path / "a"), rows=20, shards=2, size=32, seed=3)
    again = write_corpus(str(tmp_path / "b"), rows=20, shards=2, size=32, seed=3)
    other = write_corpus(str(tmp_path / "c"), rows=20, shards=2, size=32, seed=4)
    read = lambda paths: [open(p, "rb").read() for p in paths]  # noqa: E731
    assert read(first) == read(again)
    assert read(first) != read(other)
    one = write_corpus(str(tmp_path / "d"), rows=20, shards=1, size=32, seed=3)
    assert read(one)[0] == b"".join(read(first))  # sharding does not change the rows
    with pytest.raises(ValueError):
        write_corpus(str(tmp_path / "e"), rows=0)


def test_write_corpus_to_s3(s3_bucket, tmp_path):
    bucket, storage_options = s3_bucket
    paths = write_corpus(f"s3://{bucket}/synthetic", rows=6, shards=2, size=32, seed=1,
                         storage_options=storage_options)
    assert paths == [f"s3://{bucket}/synthetic/part-00000.tsv", f"s3://{bucket}/synthetic/part-00001.tsv"]
    local = write_corpus(str(tmp_path), rows=6, shards=2, size=32, seed=1)
    for path, twin in zip(paths, local):
        chunks = list(iter_rows(path, SCHEMA, storage_options))
        assert sum(len(c["idx"]) for c in chunks) == 3
        with fsspec.open(path, "rb", **storage_options) as f:
            assert f.read() == open(twin, "rb").read()


def test_make_corpus_command(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert "make-corpus" in registry.available_commands()
    code = cli.main(["make-corpus", "--output", str(out), "--rows", "12", "--shards", "2", "--size", "32",
                     "--seed", "5", "--hold-out-pairs", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["status"] == "succeeded" and summary["rows"] == 12
    assert sorted(p.name for p in out.iterdir()) == ["_held_out.txt", "part-00000.tsv", "part-00001.tsv"]
    held = (out / "_held_out.txt").read_text(encoding="utf-8").split()
    assert held == hold_out(2, seed=5) and len(summary["held_out_pairs"]) == 2
    texts = [line.split("\t")[1] for p in summary["files"] for line in open(p, encoding="utf-8")]
    assert len(texts) == 12 and not set(texts) & set(held)
    assert cli.main(["make-corpus", "--output", str(tmp_path / "bad"), "--rows", "0"]) == 2  # usage
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "failed"


# --- the judge -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_judge_reads_clean_pictures(judged_set, size):
    _, texts, images = judged_set
    result = score(texts, images[size])
    assert result["n"] == N_JUDGED
    for key in ("all", "colour_shape") + ATTRIBUTES:
        assert result[key] >= 0.99, (size, key, result)


@pytest.mark.parametrize("size", [32, 64])
def test_judge_reads_blurred_noisy_shifted_pictures(judged_set, size):
    _, texts, images = judged_set
    rng = np.random.default_rng(size)
    result = score(texts, [degrade(image, rng) for image in images[size]])
    for key in ("all", "colour_shape") + ATTRIBUTES:
        assert result[key] >= 0.95, (size, key, result)


def test_judge_takes_model_tensors_and_arrays(judged_set):
    scenes, _, images = judged_set
    for scene, image in list(zip(scenes, images[32]))[:20]:
        expected = Reading(**vars(scene))
        pixels = np.asarray(image)
        model_input = pixels.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1  # (3, H, W) in [-1, 1]
        assert judge(image) == judge(pixels) == judge(model_input) == expected
    with pytest.raises(ValueError):
        judge(np.zeros((4, 4)))


def test_judge_does_not_claim_what_it_cannot_see():
    rng = np.random.default_rng(0)
    texts = captions_for_eval(300, seed=0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in texts]
    result = score(texts, noise)
    chance = result["chance"]
    assert chance["shape"] == 0.25 and chance["colour"] == pytest.approx(1 / 9)
    assert chance["colour_shape"] == pytest.approx(1 / 36)
    assert result["colour_shape"] <= chance["colour_shape"] + 0.03 and result["unread"] >= 0.95
    # a plain background: the background, and nothing else
    assert judge(Image.new("RGB", (32, 32), (128, 128, 128))) == Reading(background="灰")
    # two shapes: no single shape, size or position to report
    two = np.asarray(render(Scene("圆形", "红", "白", "小", "左"), 64)).copy()
    two[:, 32:] = np.asarray(render(Scene("正方形", "蓝", "白", "小", "右"), 64))[:, 32:]
    reading = judge(two)
    assert reading.shape is None and reading.size is None and reading.position is None


def test_score_is_about_the_captions_given(judged_set):
    """Real pictures scored against other captions: near chance, not near 100%."""
    _, texts, images = judged_set
    texts, images = texts[:300], images[32][:300]
    result = score(texts[1:] + texts[:1], images)
    chance = result["chance"]
    bound = lambda p: p + 3 * np.sqrt(p * (1 - p) / len(texts)) + 0.01  # noqa: E731
    for key in ("colour_shape", "shape", "colour", "size", "position"):
        assert result[key] <= bound(chance[key]), (key, result)
    with pytest.raises(ValueError):
        score(texts[:3], images[:2])
    with pytest.raises(ValueError):
        score(["not a caption"], images[:1])
