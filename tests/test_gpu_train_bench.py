"""benchmarks/gpu_train.py at its CPU test sizes, as a subprocess: the JSON it prints and writes carries
the encoder's and the training step's figures (the GPU figures themselves need a GPU)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from painter.checkpoint.config import preset_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_train.py"


def positive(value) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_gpu_train_benchmark_runs_tiny_on_cpu(tmp_path):
    # --peak-tflops gives the CPU a nominal peak, so the MFU and roofline arithmetic run too
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path),
                          "--peak-tflops", "1.0"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout.strip().splitlines()[-1])
    written = json.loads((tmp_path / "gpu_train.json").read_text())
    assert printed == written
    assert written["benchmark"] == "gpu_train" and written["tiny"] and written["device"] == "cpu"
    encoder = written["encoder"]
    for key in ("gflop_per_image", "images_per_second", "batch_size", "roofline_images_per_second",
                "fraction_of_peak"):
        assert positive(encoder[key]), key
    assert all(positive(ms) for ms in encoder["breakdown_ms_per_batch"].values())
    for shape in ("base", "large"):
        train = written["train"][shape]
        for key in ("batch_size", "tokens_per_step", "train_flops_per_token", "tokens_per_second", "mfu"):
            assert positive(train[key]), (shape, key)
        assert train["eager"]["tokens_per_second"] == train["tokens_per_second"] and train["best"] == "eager"
        assert "skipped" in train["compiled"]  # compile is off on a CPU unless forced
        assert train["top_ops_eager"] and all(0 <= op["share"] <= 1 for op in train["top_ops_eager"])
    assert written["train"]["large"]["params"] > written["train"]["base"]["params"]


def test_the_benchmarks_gpt_shapes_are_the_presets():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)  # its path fix-up replaces sys.path[0]; put it back after
    finally:
        sys.path[:] = saved
    for name, shape in module.GPT_SHAPES.items():
        gpt = preset_config(name).gpt
        assert shape == {"n_layer": gpt.n_layer, "n_head": gpt.n_head, "n_embd": gpt.n_embd}, name
        full = module.gpt_config(name, tiny=False)
        assert (full.text_len, full.img_len, full.img_vocab_size, full.text_vocab_size) == (
            gpt.text_len, gpt.img_len, gpt.img_vocab_size, gpt.text_vocab_size)
    assert module.VQGANConfig() == preset_config("base").vqgan  # the full encoder is the presets' VQGAN
