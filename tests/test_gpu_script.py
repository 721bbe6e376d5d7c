"""`benchmarks/gpu.sh` works: its CPU fallback (`--device cpu`: tiny sizes) runs every step of the script
(the GPU tests, generation, the encoder and the training step),
without Ray, and writes the JSON the GPU run would write."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bare_box(tmp_path, *missing: str) -> str:
    """A PYTHONPATH entry whose packages `missing` fail to import, as on a bare GPU box."""
    folder = tmp_path / "bare"
    for name in missing:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError('benchmarks/gpu.sh must not need {name}', name={name!r})\n")
    return str(folder)


def test_gpu_script_cpu_fallback_runs_every_step_on_a_bare_box(tmp_path):
    """torch, numpy, pillow, safetensors and tokenizers only: no Ray, fsspec or pyarrow."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(
        [bare_box(tmp_path, "ray", "fsspec", "pyarrow"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = tmp_path / "out"
    assert {"summary.json", "tests.txt", "generate-tiny.json", "gpu_train.json"} <= {p.name for p in out.iterdir()}
    assert "skipped" in (out / "tests.txt").read_text()  # no CUDA here: the GPU tests skip, they do not fail
    summary = json.loads((out / "summary.json").read_text())
    tiny = summary["runs"]["tiny"]
    assert summary["device"] == "cpu" and summary["gpu_tests"]["exit_code"] == 0 and tiny["exit_code"] == 0
    assert tiny["end_to_end_images_per_second"] > 0 and tiny["bound_by"] in ("gpt", "vqgan", "encode")
    assert tiny["host_calls_per_step"]["new_engine_aten_ops"] > 0
    train = summary["gpu_train"]  # issue 18's encoder and training-step figures, from benchmarks/gpu_train.py
    assert train["exit_code"] == 0 and train == {"exit_code": 0, **json.loads((out / "gpu_train.json").read_text())}
    result = json.loads((out / "generate-tiny.json").read_text())
    assert [s["micro_batch"] for s in result["sweep"]] == [1] and result["best_micro_batch"] in (1, 2)
    assert not (ROOT / "benchmarks" / "results" / "gpu-cpu.json").exists()  # only a GPU run names a device file


def test_gpu_script_names_what_is_missing_in_one_line_before_any_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=os.pathsep.join(
        [bare_box(tmp_path, "tokenizers", "safetensors"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(["bash", "benchmarks/gpu.sh", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "gpu.sh: cannot import: safetensors tokenizers (needs torch, numpy, pillow, safetensors, tokenizers)"]
    assert not (tmp_path / "out" / "tests.txt").exists()  # no step ran
