"""What `benchmarks/gpu.sh` needs on a bare GPU box: the model, inference and training-maths modules
(and the benchmarks' own imports) load with torch, numpy, pillow, safetensors and tokenizers alone.
Checked in a subprocess whose import system refuses fsspec, pyarrow and ray; storage still sets its
retries wherever it is used."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("fsspec", "pyarrow", "ray")  # what a bare GPU box lacks that a painter install has
BLOCKER = f"""
import importlib.abc, sys
class Bare(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is not on a bare GPU box", name=name)
sys.meta_path.insert(0, Bare())
"""
BARE_MODULES = sorted(
    {"painter", "painter.pipeline", "painter.checkpoint.model_dir", "painter.checkpoint.config"} |
    {".".join(p.relative_to(ROOT).with_suffix("").parts) for folder in ("models", "inference", "training")
     for p in (ROOT / "painter" / folder).glob("*.py") if p.name != "__init__.py"})


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_inference_training_and_model_modules_import_without_fsspec_pyarrow_or_ray():
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in BARE_MODULES)
    done = run(code + "print('ok')")
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]


def test_the_blocker_blocks():
    done = run("import painter.io.tables")
    assert done.returncode != 0 and "not on a bare GPU box" in done.stderr


def test_importing_painter_leaves_fsspec_alone_and_the_first_filesystem_sets_the_retries():
    code = ("import sys, painter, painter.inference.generator; before = 'fsspec' in sys.modules\n"
            "from painter.io.storage import filesystem; filesystem('memory://x')\n"
            "import fsspec.config; print(before, fsspec.config.conf['s3']['config_kwargs']['retries']['mode'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["False", "standard"], done.stderr[-3000:]


def test_the_in_memory_random_model_is_the_one_new_model_writes(tmp_path):
    """Benchmarks and GPU tests build `random_model` (no files, no storage): the same weights and
    tokenizer as the directory `new_model` writes for the same preset and seed."""
    import torch
    from painter.checkpoint.model_dir import load_model, new_model, random_model

    on_disk, in_memory = load_model(new_model("tiny", str(tmp_path / "m"), seed=3)), random_model("tiny", seed=3)
    for part in ("gpt", "vqgan"):
        a, b = getattr(on_disk, part).state_dict(), getattr(in_memory, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert on_disk.config == in_memory.config and on_disk.tokenizer.vocab_size == in_memory.tokenizer.vocab_size


def test_generate_benchmark_runs_without_fsspec_pyarrow_or_ray(tmp_path):
    script = ROOT / "benchmarks" / "generate.py"
    code = (f"import sys; sys.argv = [{str(script)!r}, '--preset', 'tiny', '--device', 'cpu', '--micro-batch', '1',"
            f" '--rows', '1', '--repeats', '1', '--skip-old', '--json', {str(tmp_path / 'g.json')!r}]\n"
            f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')")
    done = run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"complete": true' in (tmp_path / "g.json").read_text()
