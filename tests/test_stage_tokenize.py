"""Tests of the tokenize job (painter.stages.tokenize) on a real local Ray and on moto's S3.

The corpus is made here: real PNG/JPEG/WebP/GIF images of every mode and many sizes, several TSV shards,
Parquet shards (one with a binary `image` column, one missing a column), a cell of a few MB, and one
broken row of every kind, each with the reason the errors table must give it.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from painter.cli import main as cli
from painter.checkpoint.model_dir import load_model
from painter.errors import InputError, PainterError
from painter.io.images import prepare_pixels
from painter.io.shards import ShardInfo, read_shard_info
from painter.io.storage import as_storage
from painter.io.rows import REASON, ROW, SOURCE, find_duplicates
from painter.io.tables import url_to_fs
from painter.stages import tokenize
from painter.stages.datasets import arrow_filesystem
from painter.stages.ray_errors import painter_error_from
from painter.inference.vq_encode import default_max_batch, encode_codes

MAX_PIXELS = 3_000_000
FIELDS = "expected 3 tab-separated fields (idx,text,imgbase64), got"
TITLES = ["宽松T恤", "夏季新款连衣裙女装", "男士休闲运动鞋 透气", "复古风格手提包", "儿童卡通书包",
          "极简北欧风客厅落地灯，暖光，适合卧室和书房，可调节亮度，送灯泡，包邮到家"]
MODES = [("RGB", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
         ("I;16", "PNG"), ("RGB", "WEBP"), ("RGBA", "WEBP"), ("L", "JPEG"), ("P", "GIF"), ("RGB", "PNG")]


def make_image(k: int) -> bytes:
    """Image file number k: cycles through modes, formats and sizes (some smaller than the model's 32)."""
    mode, fmt = MODES[k % len(MODES)]
    rng = np.random.default_rng(k)
    width, height = int(rng.integers(12, 90)), int(rng.integers(12, 90))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
    else:
        image = rgb.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def as_base64(data: bytes, k: int) -> str:
    """Standard, URL-safe without padding, or standard with spaces inside: all must decode."""
    if k % 3 == 1:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")
    text = base64.b64encode(data).decode()
    return text if k % 3 == 0 else " ".join(text[i:i + 76] for i in range(0, len(text), 76))


class Corpus:
    """Builds the input files and remembers each good row's image and each bad row's reason."""

    def __init__(self, root: Path):
        self.root = root
        self.good: dict[str, bytes] = {}      # idx -> image file bytes of the row that must be written
        self.reasons: dict[tuple[str, int], str] = {}  # (file name, row) -> reason (or its start, "...")
        self.counter = 0

    def next_image(self) -> bytes:
        self.counter += 1
        return make_image(self.counter)

    def tsv(self, name: str, lines: list[tuple[bytes, str | None]]) -> None:
        """lines: (raw line, expected reason or None for a good row)."""
        with open(self.root / name, "wb") as f:
            for number, (line, reason) in enumerate(lines, start=1):
                f.write(line + b"\n")
                if reason is not None:
                    self.reasons[(name, number)] = reason

    def good_line(self, idx: str, k: int) -> tuple[bytes, None]:
        data = self.next_image()
        self.good[idx] = data
        return f"{idx}\t{TITLES[k % len(TITLES)]}\t{as_base64(data, k)}".encode(), None


def build_corpus(root: Path) -> Corpus:
    c = Corpus(root)
    image = base64.b64encode(make_image(0)).decode()
    jpeg = make_image(12)  # (RGB, JPEG)
    huge = Image.new("RGB", (2000, 1600), (200, 10, 10))
    buf = io.BytesIO()
    huge.save(buf, "PNG")
    for f in range(3):
        c.tsv(f"part-{f}.tsv", [c.good_line(f"p{f}-{i:03d}", i) for i in range(70)])
    # a cell of a few MB, and broken rows of every kind, in a fourth TSV
    big = np.random.default_rng(7).integers(0, 256, (1100, 1400, 3), dtype=np.uint8)
    big_png = io.BytesIO()
    Image.fromarray(big).save(big_png, "PNG")
    c.good["big"] = big_png.getvalue()
    bad = [
        (b"big\t" + "大图".encode() + b"\t" + base64.b64encode(big_png.getvalue()), None),
        (b"b-1\tonly two fields", f"{FIELDS} 2"),
        (b"b-2\tt\t" + image.encode() + b"\textra", f"{FIELDS} 4"),
        (b"\ttext\t" + image.encode(), "empty idx"),
        (b"b-4\t\t" + image.encode(), "empty text"),
        (b"b-5\tt\t" + image.encode()[:40] + b"!!" + image.encode()[40:], "bad base64 (invalid character '!' at position 40)"),
        (b"b-6\tt\t" + base64.b64encode(b"just some text, no picture"), "not an image (unrecognised format..."),
        (b"b-7\tt\t" + base64.b64encode(jpeg[: len(jpeg) // 2]), "truncated image"),
        (b"b-8\tt\t" + base64.b64encode(buf.getvalue()), f"image too large: 2000 x 1600 pixels > {MAX_PIXELS}"),
        (b"b-9\t\xe5\xae\xbd\xff\t" + image.encode(), "not UTF-8 text (byte 7)"),
        (b"", "empty line"),
        (b"b-11\tt\t", "empty image"),
        (b"p0-005\tdup\t" + image.encode(), f"duplicate idx (first at {root}/part-0.tsv:6)"),
        (b"b-5\tt\t" + image.encode(), None),  # same idx as a rejected row: this one is kept
    ]
    c.good["b-5"] = base64.b64decode(image)
    c.tsv("part-3.tsv", bad + [(b"b-12\tt\t" + image.encode(), None), (b"b-12\tt2\t" + image.encode(),
                                f"duplicate idx (first at {root}/part-3.tsv:15)")])
    c.good["b-12"] = base64.b64decode(image)
    parquet_rows = {"idx": [], "text": [], "image": [], "extra": []}
    for i in range(30):
        data = c.next_image()
        c.good[f"q{i:02d}"] = data
        for key, value in (("idx", f"q{i:02d}"), ("text", TITLES[i % 6]), ("image", data), ("extra", i)):
            parquet_rows[key].append(value)
    for key, value in (("idx", "q-null-text"), ("text", None), ("image", make_image(3)), ("extra", 0)):
        parquet_rows[key].append(value)
    c.reasons[("part-4.parquet", 31)] = "missing text"
    pq.write_table(pa.table(parquet_rows), root / "part-4.parquet")
    pq.write_table(pa.table({"idx": ["m1", "m2"], "imgbase64": [image, image]}), root / "part-5.parquet")
    c.reasons.update({("part-5.parquet", 1): "missing column 'text'", ("part-5.parquet", 2): "missing column 'text'"})
    return c


def run_cli(*args) -> tuple[int, dict]:
    """`painter tokenize ARGS` in this process: (exit code, the summary printed as the last line)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["tokenize", *args])
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def read_parquet_dir(path: str, storage: dict | None = None):
    """(table, files, filesystem) of the Parquet files under `path`, not under its `_` folders. The listing
    is fresh: this process ran the job, whose filesystem instance (fsspec keeps one per options) listed
    the folder before Ray workers had written all of it."""
    filesystem, _ = arrow_filesystem(path, storage)
    files = as_storage(storage).find(path, (".parquet",), skip_hidden=True)
    return pa.concat_tables([pq.read_table(f, filesystem=filesystem) for f in files]), files, filesystem


def job_args(corpus_path: str, model: str, output: str, *extra: str) -> list[str]:
    return ["--input", corpus_path, "--model", model, "--output", output, "--max-pixels", str(MAX_PIXELS),
            "--micro-batch", "16", "--rows-per-file", "100", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_run(ray_session, corpus, tiny_model_dir, tmp_path_factory):
    """The job on the local corpus with the default --max-error-rate: (exit code, summary, output)."""
    output = str(tmp_path_factory.mktemp("run") / "tokens")
    code, summary = run_cli(*job_args(str(corpus.root), tiny_model_dir, output))
    return code, summary, output


@pytest.mark.slow
def test_local_run_counts_reasons_and_tokens(local_run, corpus, tiny_model_dir):
    code, summary, output = local_run
    expected_rejected = len(corpus.reasons)
    assert code == 3 and summary["status"] == "failed"  # the broken rows (6%) exceed --max-error-rate 0.05
    assert summary["failure"] == "data"
    assert "--max-error-rate 0.05" in summary["error"]
    assert summary["rows_out"] == len(corpus.good) and summary["rows_rejected"] == expected_rejected
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"]
    assert summary["errors"] == posixpath.join(output, "_rejected") and summary["truncated_texts"] > 0

    # every broken row is in the errors table, by file and row, with its reason
    errors = pq.read_table(summary["errors"]).to_pylist()
    got = {(Path(r["source"]).name, r["row"]): r["reason"] for r in errors}
    assert got.keys() == corpus.reasons.keys()
    for key, reason in corpus.reasons.items():
        assert got[key].startswith(reason[:-3]) if reason.endswith("...") else got[key] == reason, key
    assert {r["stage"] for r in errors} == {"tokenize"}

    # the shards: metadata, ids in range, and tokens equal to encoding the same image outside Ray
    table, files, filesystem = read_parquet_dir(output)
    loaded = load_model(tiny_model_dir, parts=("vqgan",))
    assert read_shard_info(files, filesystem) == ShardInfo.for_model(loaded) and len(files) == summary["files"]
    rows = {r["idx"]: r for r in table.to_pylist()}
    assert rows.keys() == corpus.good.keys()
    order = sorted(rows)
    pixels = []
    for idx in order:
        array, reason = prepare_pixels(corpus.good[idx], 32, is_base64=False, max_pixels=MAX_PIXELS)
        assert reason is None
        pixels.append(array)
    # every VQGAN call holds default_max_batch images, whichever others share an image's call
    expected = encode_codes(loaded.vqgan, np.stack(pixels), "cpu", default_max_batch("cpu"))
    assert np.array([rows[i]["image_tokens"] for i in order]).tolist() == expected.tolist()
    text_ids = np.array([rows[i]["text_ids"] for i in order])
    assert text_ids.min() >= 0 and text_ids.max() < loaded.tokenizer.vocab_size
    assert rows["p0-001"]["text_ids"] == loaded.tokenizer.encode_batch([TITLES[1]])[0][0].tolist()


@pytest.mark.slow
def test_s3_run_gives_the_same_shards(local_run, corpus, tiny_model_dir, s3_bucket, monkeypatch):
    _, _, output = local_run
    bucket, storage = s3_bucket
    fs, _ = url_to_fs(f"s3://{bucket}", storage)
    fs.put(str(corpus.root) + "/", f"{bucket}/corpus/", recursive=True)
    monkeypatch.setenv("PAINTER_TEST_S3", json.dumps(storage))  # credentials are refused inline
    code, summary = run_cli(*job_args(f"s3://{bucket}/corpus/", tiny_model_dir, f"s3://{bucket}/tokens",
                                      "--max-error-rate", "1", "--storage-options", "env:PAINTER_TEST_S3"))
    assert code == 0 and summary["status"] == "succeeded", summary
    assert "testing" not in json.dumps(summary)  # no credentials in what is printed
    local, _, _ = read_parquet_dir(output)
    remote, _, _ = read_parquet_dir(f"s3://{bucket}/tokens", storage)
    assert remote.schema.metadata == local.schema.metadata and summary["rows_out"] == remote.num_rows
    assert remote.sort_by("idx").to_pylist() == local.sort_by("idx").to_pylist()
    remote_errors = read_parquet_dir(f"s3://{bucket}/tokens/_rejected", storage)[0].to_pylist()
    names = {(Path(r["source"]).name, r["row"]) for r in remote_errors}
    assert names == corpus.reasons.keys()


@pytest.mark.slow
@pytest.mark.parametrize("name, content, message", [
    ("comma.csv", b"1,one,AAAA\n2,two,BBBB\n", "no 'idx' column among 1, one, AAAA (--input; a .csv needs a header row"),
    ("shard.tar", b"not a tar at all" * 64, "not a readable WebDataset tar shard (--input;"),
    ("binary.tsv", bytes(range(256)) * 8, "binary data, not a TSV table (--input; not UTF-8 text and a NUL"),
    ("binary.parquet", b"PAR1" + bytes(range(256)) * 4, "not a readable Parquet file"),
])
def test_unreadable_corpus_fails_with_one_clear_line(ray_session, tiny_model_dir, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, summary = run_cli("--input", str(tmp_path / name), "--model", tiny_model_dir,
                            "--output", str(tmp_path / "out"))
    assert code == 2 and summary["status"] == "failed" and summary["failure"] == "usage"
    assert summary["error"].startswith(str(tmp_path / name)) and message in summary["error"], summary["error"]
    assert "\n" not in summary["error"] and "Traceback" not in summary["error"]


# --- pieces without Ray --------------------------------------------------------------------------

def keys_table(rows) -> pa.Table:
    idx, source, row, reason = zip(*rows)
    return pa.table({"idx": list(idx), SOURCE: list(source), ROW: list(row), REASON: pa.array(reason, pa.string())})


def test_find_duplicates_keeps_the_first_good_row_by_file_and_row():
    keys = keys_table([("a", "f2.tsv", 1, None), ("a", "f1.tsv", 9, None), ("a", "f1.tsv", 3, "bad base64"),
                       ("b", "f1.tsv", 1, None), ("a", "f1.tsv", 10, None), ("c", "f1.tsv", 2, None)])
    assert find_duplicates(keys) == {
        ("f2.tsv", 1): "duplicate idx (first at f1.tsv:9)", ("f1.tsv", 10): "duplicate idx (first at f1.tsv:9)"}
    assert find_duplicates(keys.slice(0, 0)) == {}


def test_options_are_checked_before_any_work(ray_session, tmp_path, tiny_model_dir):
    options = tokenize.Options(input=[str(tmp_path)], model=tiny_model_dir, output=str(tmp_path / "out"),
                               input_schema="idx,text,img")
    with pytest.raises(InputError, match="names no 'imgbase64' column"):
        tokenize.run(options)
    options.input_schema, options.storage_options = tokenize.DEFAULT_SCHEMA, "{not json"
    with pytest.raises(InputError, match="--storage-options is not valid JSON"):
        tokenize.run(options)
    options.storage_options = None
    options.actors = 8  # 8 encoders at half a CPU would leave the 2-CPU test cluster nothing to decode with
    with pytest.raises(InputError, match="--actors 8: the encoders would take 4 of this cluster's 2 CPUs"):
        tokenize.run(options)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.parquet").write_text("x")
    with pytest.raises(PainterError, match="already exists and is not empty; .* --overwrite"):
        tokenize.run(options)
    tokenize.prepare_destinations([options.output, str(tmp_path / "nowhere")], {}, overwrite=True)
    assert not (tmp_path / "out").exists()
    options.input, options.actors = [str(tmp_path / "missing.tsv")], None
    with pytest.raises(InputError, match="missing.tsv: no such file or directory"):
        tokenize.run(options)


def test_painter_error_from_ray_traceback_text():
    class FakeRayError(Exception):
        def __init__(self):
            super().__init__("The actor died")
            self.error_msg = ('Traceback (most recent call last):\n  File "x.py"\n'
                              "painter.errors.CheckpointError: m/vqgan.safetensors: file not found\n")
    found = painter_error_from(FakeRayError())
    assert type(found).__name__ == "CheckpointError" and str(found) == "m/vqgan.safetensors: file not found"
    assert painter_error_from(ValueError("plain")) is None
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = InputError("inner")
    assert str(painter_error_from(wrapped)) == "inner"


def test_read_blocks_are_a_number_of_rows_whatever_the_row_size(ray_session, tmp_path):
    """`read_input(block_rows=...)`: blocks of about that many rows for small and large rows alike,
    within the byte cap; the Dataset's block target is the one taken (the store budget is counted in it)."""
    from painter.stages.datasets import read_input

    def blocks(cell: int, cap: int) -> tuple[int, list[int]]:
        path = tmp_path / f"rows-{cell}.tsv"
        path.write_text("".join(f"{i}\tt\t{'x' * cell}\n" for i in range(1000)))
        ds = read_input([str(path)], tokenize.DEFAULT_SCHEMA, block_bytes=cap, block_rows=200)
        return ds.context.target_max_block_size, [b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]

    for cell in (1_000, 8_000):  # 200 rows: ~0.2 MB and ~1.6 MB
        target, sizes = blocks(cell, cap=8 * 2 ** 20)
        assert 200 * cell < target < 200 * (cell + 256)
        assert sum(sizes) == 1000 and max(sizes) <= 256 and len(sizes) >= 4, sizes
    target, sizes = blocks(8_000, cap=2 ** 20)  # the cap wins: ~128 rows of 8 KB
    assert target == 2 ** 20 and sum(sizes) == 1000 and max(sizes) <= 256 and len(sizes) >= 4, sizes
