"""Tests of painter.inference.encoder without Ray: prepare_batch's per-row reasons and ImageEncoder's token rows; the
encode loop's device choices (painter.inference.vq_encode) and the reduced-size decoding of large JPEGs."""
from __future__ import annotations

import base64
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from painter.checkpoint.model_dir import load_model
from painter.inference.encoder import PIXELS, ImageEncoder, prepare_batch, prepared_schema
from painter.io.images import fit_square, load_image, prepare_pixels, preprocess, to_model_input
from painter.io.rows import REASON, ROW, SOURCE
from painter.inference.vq_encode import default_max_batch, model_input, scale_channels_last


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, parts=("vqgan",))


@pytest.fixture(scope="module")
def encoder(loaded):
    return ImageEncoder(loaded)


def png(seed: int, width: int = 48, height: int = 40) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def read_rows(idx, text, cells, reasons=None, column="imgbase64") -> pa.Table:
    """Rows as painter.io.tables reads them."""
    n = len(idx)
    return pa.table({"idx": idx, "text": text, column: cells, SOURCE: ["f.tsv"] * n,
                     ROW: list(range(1, n + 1)), REASON: reasons or [None] * n})


def test_prepare_batch_reasons_per_row():
    good = base64.b64encode(png(0)).decode()
    rows = read_rows(["a", "", None, "d", "e", "f", "g"], ["t", "t", "t", "", "  ", None, "t"],
                     [good, good, good, good, good, good, "@@"],
                     [None, None, None, None, None, "expected 3 tab-separated fields", None])
    out = prepare_batch(rows, 32)
    assert out.schema == prepared_schema()
    assert out[REASON].to_pylist() == [None, "empty idx", "missing idx", "empty text", "empty text",
                                       "expected 3 tab-separated fields",
                                       "bad base64 (invalid character '@' at position 0)"]
    pixels = out[PIXELS].to_pylist()
    assert len(pixels[0]) == 32 * 32 * 3 and pixels[1:] == [None] * 6
    assert out[ROW].to_pylist() == list(range(1, 8))


def test_prepare_batch_reads_parquet_image_bytes_and_any_idx_type():
    rows = read_rows([1, 2], ["t", "u"], [png(1), None], column="image")
    out = prepare_batch(rows, 32)
    assert out["idx"].to_pylist() == ["1", "2"]
    assert out[REASON].to_pylist() == [None, "missing image"]
    with pytest.raises(ValueError, match="neither"):
        prepare_batch(rows.drop_columns(["image"]), 32)


def test_tokens_equal_vqgan_encode_of_the_preprocessed_image(loaded, encoder):
    cells = [base64.b64encode(png(seed, 30 + seed, 50)).decode() for seed in range(6)]
    rows = read_rows([f"i{k}" for k in range(6)], ["宽松T恤", "连衣裙", "a", "b", "c", "d"], cells,
                     [None, None, "bad row", None, None, None])
    out = encoder(prepare_batch(rows, 32))
    assert out.column_names == ["idx", "text", "text_ids", "image_tokens", "is_truncated", SOURCE, ROW, REASON]
    expected = loaded.vqgan.encode(torch.stack([torch.from_numpy(preprocess(c, 32)[0]) for c in cells])).numpy()
    tokens = out["image_tokens"].to_pylist()
    for k in (0, 1, 3, 4, 5):
        assert tokens[k] == expected[k].tolist()
    assert tokens[2] is None and out["text_ids"][2].as_py() is None and out[REASON][2].as_py() == "bad row"
    ids, _ = loaded.tokenizer.encode_batch(["宽松T恤"])
    assert out["text_ids"][0].as_py() == ids[0].tolist()
    assert out.schema.field("image_tokens").type == pa.list_(pa.int16())


def test_token_ids_in_range_and_truncation_flag(loaded, encoder):
    n = 5
    rows = read_rows([str(k) for k in range(n)], ["短"] + ["很长的文字" * 10] * (n - 1),
                     [png(k) for k in range(n)], column="image")
    out = encoder(prepare_batch(rows, 32))
    tokens = np.array(out["image_tokens"].to_pylist())
    assert tokens.shape == (n, 64) and tokens.min() >= 0 and tokens.max() < loaded.config.vqgan.n_embed
    text_ids = np.array(out["text_ids"].to_pylist())
    assert text_ids.shape == (n, 16) and text_ids.min() >= 0 and text_ids.max() < loaded.tokenizer.vocab_size
    assert out["is_truncated"].to_pylist() == [False] + [True] * (n - 1)


def test_max_batch_and_model_dir_give_the_same_tokens(tiny_model_dir, encoder):
    rows = prepare_batch(read_rows([str(k) for k in range(7)], ["t"] * 7, [png(k) for k in range(7)],
                                   column="image"), 32)
    chunked = ImageEncoder(tiny_model_dir, max_batch=3)(rows)
    assert chunked["image_tokens"].to_pylist() == encoder(rows)["image_tokens"].to_pylist()


def test_every_vqgan_call_has_the_same_shape_so_tokens_do_not_depend_on_the_batch(loaded):
    """An image's float sums differ in the last bits between batch sizes (CPU: batch 1 against 2), enough
    to flip a near-tie in the nearest-code search: every call is padded to `max_batch` images."""
    pixels = np.random.default_rng(3).integers(0, 256, (11, 32, 32, 3), dtype=np.uint8)
    encoder = ImageEncoder(loaded, max_batch=4)
    shapes = []
    hook = encoder.model.vqgan.encoder.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape[0]))
    try:
        whole = encoder.encode_pixels(pixels)
        split = [encoder.encode_pixels(pixels[a:b]) for a, b in ((0, 1), (1, 6), (6, 11))]
    finally:
        hook.remove()
    assert set(shapes) == {4}, shapes  # 3 calls for 11 images, then 1 + 2 + 2 calls, all of 4 images
    assert len(shapes) == 3 + 5 and whole.shape == (11, 64)
    assert np.concatenate(split).tolist() == whole.tolist()
    assert encoder.encode_pixels(pixels[:0]).shape == (0, 64)


def test_a_batch_joining_base64_and_binary_image_files_reads_each_row_its_own_way():
    """Ray joins blocks of a TSV (or imgbase64 Parquet) and a binary-`image` Parquet file into one batch,
    each column null where its file had none: every row is read from the column it has."""
    text_rows = read_rows(["a", "b"], ["t", "t"], [base64.b64encode(png(1)).decode(), None])
    binary_rows = read_rows(["c", "d"], ["t", "t"], [png(2), png(3)], column="image")
    mixed = pa.concat_tables([text_rows, binary_rows], promote_options="permissive")
    assert mixed.column_names.count("imgbase64") == mixed.column_names.count("image") == 1
    out = prepare_batch(mixed, 32)
    assert out[REASON].to_pylist() == [None, "missing image", None, None]
    alone = prepare_batch(binary_rows, 32)
    assert out[PIXELS].to_pylist()[2:] == alone[PIXELS].to_pylist()  # the same pixels as read alone


def test_all_rejected_and_empty_batches(encoder):
    rows = prepare_batch(read_rows(["a", "b"], ["t", "t"], ["", None]), 32)
    out = encoder(rows)
    assert out.num_rows == 2 and out["image_tokens"].null_count == 2
    assert out[REASON].to_pylist() == ["empty image", "missing image"]
    empty = encoder(rows.slice(0, 0))
    assert empty.num_rows == 0 and empty.schema == out.schema


def test_wrong_pixel_size_is_a_bug_not_a_row(encoder):
    rows = pa.table({"idx": ["a"], "text": ["t"], PIXELS: [b"\0" * 10], REASON: pa.array([None], pa.string())})
    with pytest.raises(ValueError, match="pixels of 10 bytes"):
        encoder(rows)


def test_loaded_model_without_vqgan_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="VQGAN"):
        ImageEncoder(load_model(tiny_model_dir, parts=()))


def test_default_batch_per_device_and_the_cpu_input_is_the_reference_one(loaded, encoder):
    assert default_max_batch(torch.device("cuda")) == 64 and default_max_batch(torch.device("cpu")) == 8
    assert default_max_batch(torch.device("meta")) is None  # elsewhere: the whole batch at once
    assert encoder.device.type == "cpu" and encoder.max_batch == 8
    assert ImageEncoder(loaded, max_batch=5).max_batch == 5
    pixels = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = model_input(pixels, torch.device("cpu"))
    assert x.is_contiguous() and torch.equal(x, torch.from_numpy(to_model_input(pixels)))


def test_the_gpu_scaling_gives_channels_last_model_input():
    """The CUDA path's arithmetic and layout, run on CPU tensors: uint8 NHWC -> channels_last floats."""
    pixels = np.random.default_rng(1).integers(0, 256, (2, 6, 5, 3), dtype=np.uint8)
    x = scale_channels_last(torch.from_numpy(pixels))
    assert x.shape == (2, 3, 6, 5) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, torch.from_numpy(to_model_input(pixels)), rtol=0, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG (smooth colours plus noise), which is what reduced-scale decoding is for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(x * rng.uniform(2, 9) + y * 3 + c) for c in rng.uniform(0, 6, 3)], axis=-1)
    pixels = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_large_jpeg_decodes_reduced_but_at_least_twice_the_target():
    data = jpeg(1024, 768)
    # shorter side 768 >= 4 x 32: libjpeg's 1/8 scale still leaves 96 >= 2 x 32 rows
    assert load_image(data, size=32).size == (128, 96)
    assert load_image(data, size=96).size == (256, 192)  # 1/4: 192 >= 2 x 96
    assert load_image(data, size=200).size == (1024, 768)  # 768 < 4 x 200: full size
    assert load_image(data).size == (1024, 768)  # no target: full size
    reduced, reason = prepare_pixels(base64.b64encode(data).decode(), 32)
    full = fit_square(load_image(data), 32)
    assert reason is None and reduced.shape == full.shape == (32, 32, 3)
    diff = np.abs(reduced.astype(int) - full)
    assert diff.mean() < 1.0 and diff.max() <= 12  # measured 0.4 and 3 on such images


def test_small_jpegs_and_other_formats_decode_exactly_as_before():
    for data in (jpeg(127, 200, 1), jpeg(100, 100, 2)):  # shorter side below 4 x 32: no reduction
        pixels, _ = prepare_pixels(data, 32, is_base64=False)
        assert np.array_equal(pixels, fit_square(load_image(data), 32))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((400, 300, 3), np.uint8)).save(buf, "PNG")
    assert load_image(buf.getvalue(), size=32).size == (300, 400)  # only JPEG decoders can reduce


def test_a_bf16_encoder_runs_its_network_on_bf16_weights_and_searches_codes_in_fp32():
    """The CUDA path (a bf16 weight copy, no autocast) run on CPU: the network's latents come out in
    bf16, the codes are the fp32 nearest codes of exactly those latents."""
    from painter.inference.vq_encode import encode_codes, network_input, prepare_vqgan
    from painter.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vqgan = prepare_vqgan(VQGAN(VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                            attn_resolutions=(), z_channels=32, embed_dim=32, n_embed=256)),
                          "cpu", dtype=torch.bfloat16)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = network_input(vqgan, pixels, torch.device("cpu"))
    with torch.no_grad():
        latents = vqgan.encode_latents(x)
    assert x.dtype == latents.dtype == torch.bfloat16
    expected = torch.cdist(latents.float().permute(0, 2, 3, 1).reshape(2, -1, 32),
                           vqgan.quantize.embedding.weight.float()[None].expand(2, -1, -1)).argmin(-1)
    assert np.array_equal(encode_codes(vqgan, pixels, torch.device("cpu"), 2), expected.numpy())
