"""Corpora as teams have them (#28): WebDataset shards, Hugging Face Parquet and image folders, CSV,
compressed TSV, and `--columns` mapping their names onto painter's.

Readers are tested without Ray; one test runs `painter tokenize` on a real local Ray over the same images
and captions in four layouts and finds the same token shards, apart from each layout's idx.
"""
from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from painter.cli import main as cli
from painter.errors import InputError
from painter.io import checks, columns, tables
from painter.io.rows import REASON, ROW, SOURCE
from painter.io.storage import as_storage

SCHEMA = tables.parse_schema("idx,text,imgbase64")
ALTERNATIVES = {"imgbase64": "image"}
CAPTIONS = ["宽松T恤", "夏季新款连衣裙女装", "男士休闲运动鞋 透气", "复古风格手提包", "儿童卡通书包", "北欧风落地灯"]


def image(k: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(k)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40 + k, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]], cut: int | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data[:cut] if cut else data)


def read_all(path, schema=SCHEMA, **kwargs) -> dict[str, list]:
    out: dict[str, list] = {}
    for chunk in tables.iter_rows(str(path), schema, chunk_rows=2, **kwargs):
        for name, values in chunk.items():
            out.setdefault(name, []).extend(values)
    return out


# --- --columns ----------------------------------------------------------------------------------

def test_columns_parse_and_its_errors():
    assert columns.parse("idx=key, text=caption,image=jpg") == {"idx": "key", "text": "caption", "image": "jpg"}
    assert columns.parse(None) == {} == columns.parse("")
    for spec, message in (("idx", "expected PAINTER_NAME=INPUT_NAME"), ("idx=a,idx=b", "maps 'idx' twice"),
                          ("idx=a,text=a", "one input column onto two names"), ("idx=", "bad entry")):
        with pytest.raises(InputError, match=message):
            columns.parse(spec)
    assert columns.renamed(["key", "caption", "b64"], {"idx": "key", "image": "b64"}) == [
        "idx", "caption", "image", "imgbase64"]


def test_an_image_column_holds_base64_text_bytes_or_a_hugging_face_struct(tmp_path):
    (tmp_path / "beside.png").write_bytes(image(1, "PNG"))
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "caption": ["t"] * 4, "image": [
        {"bytes": image(0), "path": "x.jpg"}, {"bytes": None, "path": "beside.png"},
        {"bytes": None, "path": "gone.png"}, {"bytes": None, "path": None}]}), tmp_path / "hf.parquet")
    rows = read_all(tmp_path / "hf.parquet", alternatives=ALTERNATIVES, columns=columns.parse("idx=id,text=caption"))
    assert rows["idx"] == ["a", "b", "c", "d"] and rows["text"] == ["t"] * 4
    assert rows["image"][:2] == [image(0), image(1, "PNG")] and rows["image"][2:] == [None, None]
    assert rows[REASON] == [None, None, "image file 'gone.png' not found", "image struct has neither bytes nor a path"]
    b64 = base64.b64encode(image(2)).decode()
    (tmp_path / "t.tsv").write_text(f"k1\tcap\t{b64}\n")  # a TSV's image column mapped: base64 text
    rows = read_all(tmp_path / "t.tsv", tables.parse_schema("key,caption,pic"),
                    columns=columns.parse("idx=key,text=caption,image=pic"))
    assert rows["idx"] == ["k1"] and rows["imgbase64"] == [b64] and rows["image"] == [None]


def test_preflight_refuses_a_mapping_naming_a_missing_column_in_one_line(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "caption": ["t"], "image": [b"x"]}), tmp_path / "a.parquet")
    checks.check_inputs("--input", [str(tmp_path)], columns={"idx": "id", "text": "caption"}, schema=SCHEMA)
    with pytest.raises(InputError) as error:
        checks.check_inputs("--input", [str(tmp_path)], columns={"idx": "id", "text": "title"}, schema=SCHEMA)
    assert str(error.value) == (f"{tmp_path}/a.parquet: --columns names 'title', not among the file's columns "
                                "(--input; it has id, caption, image)")
    write_tar(tmp_path / "s.tar", [("k0", {"jpg": b"j", "json": b'{"caption": "c", "key": "K"}'})])
    checks.check_inputs("--input", [str(tmp_path / "s.tar")], columns={"idx": "key", "text": "caption"})
    with pytest.raises(InputError, match="--columns names 'title', not among the file's columns .* __key__, jpg, json"):
        checks.check_inputs("--input", [str(tmp_path / "s.tar")], columns={"text": "title"})
    (tmp_path / "t.tsv").write_text("a\tb\tc\n")
    with pytest.raises(InputError, match="--columns names 'caption', not among the --input-schema names"):
        checks.check_inputs("--input", [str(tmp_path / "t.tsv")], columns={"text": "caption"}, schema=SCHEMA)


# --- WebDataset ---------------------------------------------------------------------------------

def test_webdataset_samples_become_rows_and_bad_samples_name_shard_and_key(tmp_path):
    write_tar(tmp_path / "00000.tar", [
        ("s/000", {"jpg": image(0), "txt": "一\n".encode(), "json": b'{"caption": "c0", "key": "K0"}'}),
        ("s/001", {"txt": b"no image"}),
        ("s/002", {"png": image(2, "PNG")}),
        ("s/003", {"webp": image(3, "WEBP"), "txt": b"\xff\xfe"}),
        ("s/004", {"jpeg": image(4), "txt": b"four", "png": image(5, "PNG")}),
    ])
    path = str(tmp_path / "00000.tar")
    rows = read_all(path)
    assert rows["idx"] == ["s/000", "s/001", "s/002", "s/003", "s/004"] and rows[ROW] == [1, 2, 3, 4, 5]
    assert rows[SOURCE] == [path] * 5 and rows["text"] == ["一", None, None, None, "four"]
    assert rows["image"][0] == image(0) and rows["image"][4] == image(4)  # the first of jpg, jpeg, png, webp
    assert rows[REASON] == [None, "sample s/001: no image member (jpg, jpeg, png, webp)",
                            "sample s/002: no 'txt' member or JSON field",
                            "sample s/003: 'txt' is not UTF-8 text (byte 0)", None]
    mapped = read_all(path, columns=columns.parse("idx=key,text=caption"))
    assert mapped["idx"][0] == "K0" and mapped["text"][0] == "c0" and mapped[REASON][0] is None
    assert mapped[REASON][4] == "sample s/004: no 'key' member or JSON field"
    assert read_all(path, columns={"image": "png"})[REASON][0] == "sample s/000: no 'png' member or JSON field"


def test_a_cut_short_shard_keeps_its_samples_and_adds_one_rejected_row(tmp_path):
    samples = [(f"{k:03d}", {"jpg": image(k), "txt": b"t"}) for k in range(4)]
    write_tar(tmp_path / "whole.tar", samples)
    with tarfile.open(tmp_path / "whole.tar") as tar:
        cut = tar.getmember("002.jpg").offset_data + 100  # inside the third sample's image
    write_tar(tmp_path / "cut.tar", samples, cut=cut)
    rows = read_all(tmp_path / "cut.tar")
    assert rows[ROW] == [1, 2, 3] and rows[REASON][:2] == [None, None]
    assert rows[REASON][2] == "tar shard unreadable after sample 2 (ReadError: unexpected end of data)"


def test_a_folder_of_shards_reads_the_tars_not_img2datasets_statistics(tmp_path):
    for name in ("00000.tar", "00001.tar"):
        write_tar(tmp_path / name, [("k", {"jpg": b"j", "txt": b"t"})])
    pq.write_table(pa.table({"url": ["u"], "status": ["success"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert tables.expand_paths([str(tmp_path)]) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert tables.expand_paths([str(tmp_path / "*.tar")]) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]


def test_webdataset_shards_in_a_bucket_as_folder_glob_and_file(s3_bucket, tmp_path):
    bucket, options = s3_bucket
    storage = as_storage(options)
    for k in range(2):
        write_tar(tmp_path / f"{k:05d}.tar", [(f"{k}-a", {"jpg": image(k), "txt": b"t"}), (f"{k}-b", {"txt": b"t"})])
        storage.write_atomic(f"s3://{bucket}/wds/{k:05d}.tar", (tmp_path / f"{k:05d}.tar").read_bytes())
    storage.write_atomic(f"s3://{bucket}/wds/00000.parquet", b"img2dataset's statistics, not read")
    shards = [f"s3://{bucket}/wds/00000.tar", f"s3://{bucket}/wds/00001.tar"]
    for given in (f"s3://{bucket}/wds/", f"s3://{bucket}/wds/*.tar"):
        assert tables.expand_paths([given], options) == shards
        assert checks.check_inputs("--input", [given], options, columns={"text": "txt"}) == shards
    rows = read_all(shards[1], storage_options=options)
    assert rows["idx"] == ["1-a", "1-b"] and rows["image"][0] == image(1) and rows[SOURCE] == [shards[1]] * 2
    assert rows[REASON] == [None, "sample 1-b: no image member (jpg, jpeg, png, webp)"]


def test_evaluate_reads_the_same_formats_with_the_same_columns(tmp_path):
    from painter.io.storage import Storage
    from painter.stages.evaluate_inputs import Rejected, table_rows

    write_tar(tmp_path / "s.tar", [("k0", {"png": image(0, "PNG"), "json": b'{"title": "t0"}'}), ("k1", {"png": b"x"})])
    rejected = Rejected()
    got = list(table_rows([str(tmp_path / "s.tar")], "idx,text,imgbase64", Storage(), True, 0, rejected, "text=title"))
    assert [(idx, text, data) for idx, text, _, _, data in got] == [("k0", "t0", image(0, "PNG"))]
    assert [reason for *_, reason in rejected.rows] == ["sample k1: no 'title' member or JSON field"]


# --- image folders, CSV, compressed TSV -----------------------------------------------------------

@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_image_folder_reads_each_rows_image_beside_its_metadata(tmp_path, metadata):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.jpg").write_bytes(image(0))
    rows = [{"file_name": "train/a.jpg", "caption": "一"}, {"file_name": "train/gone.jpg", "caption": "二"}]
    if metadata.endswith(".jsonl"):
        (tmp_path / metadata).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        (tmp_path / metadata).write_text("file_name,caption\n" + "".join(f"{r['file_name']},{r['caption']}\n" for r in rows))
    assert tables.expand_paths([str(tmp_path)]) == [str(tmp_path / metadata)]
    got = read_all(tmp_path / metadata, alternatives=ALTERNATIVES, columns=columns.parse("text=caption"))
    assert got["idx"] == ["train/a.jpg", "train/gone.jpg"] and got["text"] == ["一", "二"]
    assert got["image"] == [image(0), None] and got[REASON] == [None, "image file 'train/gone.jpg' not found"]


@pytest.mark.parametrize("suffix", [".tsv.gz", ".tsv.zst"])
def test_compressed_tsv_is_read_like_a_tsv(tmp_path, suffix):
    text = b"1\tone\tAAAA\n2\ttwo\n"
    if suffix == ".tsv.gz":
        data = gzip.compress(text)
    else:
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(text)
        data = sink.getvalue().to_pybytes()
    (tmp_path / f"t{suffix}").write_bytes(data)
    rows = read_all(tmp_path / f"t{suffix}")
    assert rows["idx"] == ["1", None] and rows[REASON] == [None, "expected 3 tab-separated fields (idx,text,imgbase64), got 2"]
    assert tables.expand_paths([str(tmp_path)]) == [str(tmp_path / f"t{suffix}")]
    checks.check_inputs("--input", [str(tmp_path)])
    (tmp_path / f"t{suffix}").write_bytes(b"not compressed at all")
    with pytest.raises(InputError, match=f"t{suffix}: not a readable"):
        checks.check_inputs("--input", [str(tmp_path)])


# --- the job ------------------------------------------------------------------------------------

def run_cli(*args) -> tuple[int, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    return code, json.loads(out.getvalue().strip().splitlines()[-1])


def layouts(root) -> dict[str, tuple[str, list[str], list[str]]]:
    """The same images and captions four ways: {layout: (input path, extra args, idx of each image)}."""
    images = [image(k, "PNG" if k % 2 else "JPEG") for k in range(len(CAPTIONS))]
    n = len(images)
    (root / "wds").mkdir()
    write_tar(root / "wds" / "00000.tar", [(f"{k:05d}", {"jpg": images[k], "txt": CAPTIONS[k].encode(),
                                                         "json": json.dumps({"key": f"{k:05d}"}).encode()})
                                           for k in range(n)] + [("99998", {"txt": b"no image"}), ("99999", {"jpg": images[0]})])
    pq.write_table(pa.table({"url": ["u"]}), root / "wds" / "00000.parquet")  # img2dataset's statistics
    pq.write_table(pa.table({"id": [f"hf-{k}" for k in range(n)], "caption": CAPTIONS,
                             "image": [{"bytes": b, "path": f"{k}.jpg"} for k, b in enumerate(images)]}),
                   root / "hf.parquet")
    (root / "folder").mkdir()
    for k, data in enumerate(images):
        (root / "folder" / f"{k}.img").write_bytes(data)
    (root / "folder" / "metadata.csv").write_text(
        "file_name,caption\n" + "".join(f"{k}.img,{c}\n" for k, c in enumerate(CAPTIONS)), encoding="utf-8")
    (root / "easynlp.tsv").write_text("".join(f"e{k}\t{c}\t{base64.b64encode(images[k]).decode()}\n"
                                              for k, c in enumerate(CAPTIONS)), encoding="utf-8")
    return {
        "wds": (str(root / "wds"), [], [f"{k:05d}" for k in range(n)]),
        "hf": (str(root / "hf.parquet"), ["--columns", "idx=id,text=caption"], [f"hf-{k}" for k in range(n)]),
        "folder": (str(root / "folder"), ["--columns", "text=caption"], [f"{k}.img" for k in range(n)]),
        "easynlp": (str(root / "easynlp.tsv"), [], [f"e{k}" for k in range(n)]),
    }


@pytest.mark.slow
def test_the_same_corpus_in_four_layouts_gives_the_same_token_shards(ray_session, tiny_model_dir, tmp_path):
    shards = {}
    for name, (path, extra, idx) in layouts(tmp_path).items():
        out = tmp_path / f"out-{name}"
        code, summary = run_cli("tokenize", "--input", path, "--model", tiny_model_dir, "--output", str(out),
                                "--max-error-rate", "0.5", *extra)
        assert code == 0, summary
        files = sorted(p for p in out.rglob("*.parquet") if "_" not in p.relative_to(out).parts[0][:1])
        table = pa.concat_tables([pq.read_table(f) for f in files])
        by_idx = {r["idx"]: r for r in table.to_pylist()}
        assert sorted(by_idx) == sorted(idx), name
        shards[name] = [(by_idx[i]["text"], by_idx[i]["text_ids"], by_idx[i]["image_tokens"]) for i in idx]
        rejected = pq.read_table(out / "_rejected").to_pylist() if (out / "_rejected").exists() else []
        assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"] == len(idx) + len(rejected)
        if name == "wds":
            shard = f"{tmp_path}/wds/00000.tar"
            assert sorted((r["idx"], r["source"], r["row"], r["reason"]) for r in rejected) == [
                ("99998", shard, 7, "sample 99998: no image member (jpg, jpeg, png, webp)"),
                ("99999", shard, 8, "sample 99999: no 'txt' member or JSON field")]
    assert shards["wds"] == shards["hf"] == shards["folder"] == shards["easynlp"]


def test_tokenize_help_documents_columns_and_the_formats(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tokenize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for example in ("--columns idx=key,text=caption,image=jpg", "EasyNLP TSV without header (corpus/part-0.tsv",
                    ".tsv.gz", ".tsv.zst", "Parquet (hf/train-00000.parquet", "CSV with a header row (table.csv)",
                    "WebDataset shards (shards/00000.tar", "'shards/*.tar'", "an image folder (photos/",
                    "metadata.jsonl or metadata.csv with file_name", "Hugging Face image struct"):
        assert example in text, example
    for job in ("generate", "evaluate", "train-vq"):
        with pytest.raises(SystemExit):
            cli.main([job, "--help"])
        assert "--columns" in capsys.readouterr().out, job
