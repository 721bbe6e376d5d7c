"""The layers of DESIGN.md, checked on the source with `ast`: imports point downward only.

- `painter/models/` is pure torch: the standard library, torch and its own package, nothing else;
- `painter/io/` (formats) never imports Ray;
- nothing but `painter/cli.py` imports `painter.cli` (commands are found through `painter.registry`);
- the training math (`training.py`, `vq_training.py`) imports neither the evaluate job's module nor a stage;
- the `ray job submit` scripts in `jobs/` shadow no module and edit no `sys.path`;
- the modules Ray's read and write tasks run (`stages/common.py`, `stages/token_sink.py`,
  `stages/generate_prompts.py`) load no torch, checked by importing them (torch costs a fresh worker seconds).
Every import counts, a function's lazy one included.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "painter"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports, anywhere in it; `from a import b` counts as
    both `a` and `a.b`, since b may be a submodule (`from painter import cli`)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..io import y
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_of(path: Path) -> set[str]:
    return imported_names(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _is(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_the_checker_sees_every_kind_of_import():
    source = "import torch.nn\nfrom painter import cli\ndef f():\n    import ray.data\nfrom .gpt import GPT\n"
    names = imported_names(source, "painter.models.x")
    assert {"torch.nn", "painter.cli", "ray.data", "painter.models.gpt"} <= names
    assert "painter.io.tables" in imported_names("from ..io import tables", "painter.stages.common")


@pytest.mark.parametrize("path", files(PACKAGE / "models"), ids=lambda p: p.name)
def test_models_import_only_torch_and_the_standard_library(path):
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    foreign = sorted(n for n in imports_of(path)
                     if n.split(".")[0] not in allowed and not _is(n, "painter.models"))
    assert not foreign, f"{path.relative_to(ROOT)} imports {foreign}: painter/models is pure torch"


@pytest.mark.parametrize("path", files(PACKAGE / "io"), ids=lambda p: p.name)
def test_formats_never_import_ray(path):
    found = sorted(n for n in imports_of(path) if _is(n, "ray"))
    assert not found, f"{path.relative_to(ROOT)} imports {found}: painter/io is below Ray"


def test_only_the_cli_imports_the_cli():
    importers = [str(p.relative_to(ROOT)) for p in files(PACKAGE)
                 if p != PACKAGE / "cli.py" and any(_is(n, "painter.cli") for n in imports_of(p))]
    assert not importers, f"{importers} import painter.cli; commands are in painter.registry"


@pytest.mark.parametrize("name", ["training.py", "vq_training.py"])
def test_training_math_imports_no_evaluation_and_no_stage(name):
    found = sorted(n for n in imports_of(PACKAGE / name) if any(_is(n, f"painter.{m}") for m in ("metrics", "judge", "stages")))
    assert not found, f"painter/{name} imports {found}"


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.py")), ids=lambda p: p.name)
def test_job_scripts_shadow_nothing_and_leave_sys_path_alone(path):
    """Python puts jobs/ first on sys.path when it runs a script there: a script named like a module
    (`tokenize.py`) would replace it for every import, the standard library's own included."""
    assert path.stem not in sys.stdlib_module_names, f"{path.name} shadows the standard library's {path.stem}"
    assert importlib.util.find_spec(path.stem) is None, f"{path.name} shadows the installed module {path.stem}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    touched = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
               and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not touched, f"{path.name} edits sys.path"
    assert "painter.cli" in imports_of(path)


def test_read_and_write_tasks_load_no_torch():
    """Tokenize's read, write and duplicate tasks and generate's prompt passes start in fresh Ray workers:
    importing torch there (~1.5 s a worker on 2 cores) once cost the job a serial two seconds at its end."""
    code = ("import sys, painter.stages.common, painter.stages.token_sink, painter.stages.generate_prompts; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tokenizers')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", f"the task modules load {loaded.stdout.strip()[:200]}"
