"""`Generator`, the plain callable: decodable images, batch-invariant bytes, truncation, formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from painter.checkpoint.model_dir import load_model
from painter.inference.generator import GenerationConfig, Generator, default_micro_batch
from painter.io.images import open_image

ROWS = [(f"p{i}", f"宽松T恤 第{i}款", s) for i in range(6) for s in range(2)]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine OpenMP's spinning makes
    them many times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def _batch(rows) -> dict:
    return {"idx": [r[0] for r in rows], "text": [r[1] for r in rows], "sample": [r[2] for r in rows]}


def _images(generator: Generator, rows, batch_size: int) -> dict:
    images = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        out = generator(_batch(chunk))
        images.update({(r[0], r[2]): png for r, png in zip(chunk, out["png"])})
    return images


def test_every_row_gets_a_decodable_image_of_the_model_size(loaded):
    out = Generator(loaded, GenerationConfig(seed=1))(_batch(ROWS))
    size = loaded.config.image_size
    assert [open_image(png).size for png in out["png"]] == [(size, size)] * len(ROWS)
    assert list(out["sample"]) == [r[2] for r in ROWS] and set(out["seed"]) == {1}
    assert set(out["model"]) == {loaded.fingerprint}
    assert len({bytes(png) for png in out["png"]}) == len(ROWS)  # (idx, sample) pairs differ


def test_images_are_byte_identical_across_batch_sizes_orders_and_runs(loaded, tiny_model_dir):
    generator = Generator(loaded, GenerationConfig(seed=7))
    by_one = _images(generator, ROWS, 1)
    assert _images(generator, ROWS, 8) == by_one
    assert _images(generator, ROWS[::-1], 5) == by_one  # another order and batch composition
    fresh = Generator(tiny_model_dir, GenerationConfig(seed=7), device="cpu", encode_threads=0)  # another run
    assert _images(fresh, ROWS, 12) == by_one
    other_seed = _images(Generator(loaded, GenerationConfig(seed=8)), ROWS, 12)
    assert all(other_seed[k] != v for k, v in by_one.items())


def test_micro_batch_is_the_shape_images_depend_on(loaded):
    assert default_micro_batch("cpu") == 8 and default_micro_batch("cuda") == 64
    a = Generator(loaded, GenerationConfig(seed=2), micro_batch=3)
    assert _images(a, ROWS, 1) == _images(a, ROWS, 7)
    with pytest.raises(ValueError):
        Generator(loaded, micro_batch=-1)


def test_long_texts_are_truncated_and_flagged(loaded):
    text_len = loaded.config.gpt.text_len
    out = Generator(loaded)(_batch([("a", "短", 0), ("b", "长" * (text_len + 5), 0)]))
    assert out["is_truncated"].tolist() == [False, True]


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_other_formats_are_named_after_the_format(loaded, image_format):
    out = Generator(loaded, GenerationConfig(image_format=image_format))(_batch(ROWS[:2]))
    assert "png" not in out
    assert [open_image(b).format for b in out[image_format]] == [image_format.upper()] * 2


def test_bad_settings_fail_at_construction(loaded):
    with pytest.raises(ValueError):
        GenerationConfig(image_format="gif")
    with pytest.raises(ValueError):
        GenerationConfig(top_k=0)
    with pytest.raises(ValueError):
        GenerationConfig(top_p=1.5)


def test_an_empty_batch_gives_empty_columns(loaded):
    out = Generator(loaded)(_batch([]))
    assert len(out["png"]) == 0 and out["is_truncated"].shape == (0,) and out["seed"].dtype == np.int64


def test_generator_codes_are_the_reference_algorithms(loaded):
    from painter.inference.sampling import reference_generate, row_keys

    generator = Generator(loaded, GenerationConfig(seed=4), micro_batch=3)
    rows = ROWS[:3]
    codes, _, _ = generator.codes([r[1] for r in rows], [r[0] for r in rows], [r[2] for r in rows])
    ids, _ = loaded.tokenizer.encode_batch([r[1] for r in rows])
    keys = row_keys(4, [r[0] for r in rows], [r[2] for r in rows])
    assert torch.equal(codes, reference_generate(loaded.gpt, torch.from_numpy(ids), keys, generator.config.sampling))


def test_device_rounding_is_uint8_from_tensor(loaded):
    from painter.inference.pixels import uint8_from_tensor

    generator = Generator(loaded, micro_batch=2)
    codes = torch.randint(0, loaded.config.gpt.img_vocab_size, (2, loaded.config.gpt.img_len))
    with torch.inference_mode():
        expected = uint8_from_tensor(loaded.vqgan.decode(codes))
    assert np.array_equal(generator.pixels(codes), expected)


def test_precision_fp32_is_the_cpu_path_and_bf16_is_a_converted_copy(loaded):
    default = Generator(loaded, GenerationConfig(seed=5))
    fp32 = Generator(loaded, GenerationConfig(seed=5, precision="fp32"))
    assert default.dtype == fp32.dtype == torch.float32 and fp32.gpt is loaded.gpt  # no copy on CPU
    assert _images(fp32, ROWS[:4], 4) == _images(default, ROWS[:4], 4)
    bf16 = Generator(loaded, GenerationConfig(seed=5, precision="bf16"), micro_batch=4)
    assert bf16.gpt.head.weight.dtype == torch.bfloat16 and bf16.vqgan.decoder.conv_in.weight.dtype == torch.bfloat16
    assert loaded.gpt.head.weight.dtype == torch.float32  # the caller's model is left alone
    size = loaded.config.image_size
    assert [open_image(png).size for png in _images(bf16, ROWS[:4], 4).values()] == [(size, size)] * 4
    with pytest.raises(ValueError, match="precision"):
        GenerationConfig(precision="fp16")
