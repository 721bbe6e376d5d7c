"""The layers of DESIGN.md, checked on the source with `ast`: imports point downward only.

- `painter/models/` is pure torch: the standard library, torch and its own package, nothing else;
- `painter/io/` (formats) never imports Ray;
- nothing but `painter/cli/main.py` imports `painter.cli` (commands are found through `painter.cli.registry`);
- the `ray job submit` scripts in `jobs/` shadow no module and edit no `sys.path`;
- the modules Ray's read and write tasks run (`stages/datasets.py`, `stages/tokenize_sink.py`,
  `stages/generate_prompts.py`) load no torch, checked by importing them (torch costs a fresh worker seconds);
- `painter.options` (every command's options, what `painter COMMAND --help` loads) and every painter module it
  imports import no torch, Ray, deltalake or pyarrow.
Every import counts, a function's lazy one included.
"""
from __future__ import annotations

import ast
import re
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
    assert "painter.io.tables" in imported_names("from ..io import tables", "painter.stages.datasets")


@pytest.mark.parametrize("path", files(PACKAGE / "models"), ids=lambda p: p.name)
def test_models_import_only_torch_and_the_standard_library(path):
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    foreign = sorted(n for n in imports_of(path)
                     if n.split(".")[0] not in allowed and not _is(n, "painter.models"))
    assert not foreign, f"{path.relative_to(ROOT)} imports {foreign}: painter/models is pure torch"


@pytest.mark.parametrize("path", files(PACKAGE / "io"), ids=lambda p: p.name)
def test_storage_and_formats_import_neither_ray_nor_torch(path):
    found = sorted(n for n in imports_of(path) if _is(n, "ray") or _is(n, "torch"))
    assert not found, f"{path.relative_to(ROOT)} imports {found}: painter/io is below Ray and torch"


BELOW_RAY = ("inference", "training", "evaluation", "checkpoint")


@pytest.mark.parametrize("path", [p for pkg in BELOW_RAY for p in files(PACKAGE / pkg)],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_no_ray_no_stage_and_no_cli(path):
    found = sorted(n for n in imports_of(path) if any(_is(n, m) for m in ("ray", "painter.stages", "painter.cli")))
    assert not found, f"{path.relative_to(ROOT)} imports {found}: painter/{path.parent.name} runs without Ray"


@pytest.mark.parametrize("path", files(PACKAGE / "training"), ids=lambda p: p.name)
def test_training_math_imports_no_scoring(path):
    """Training may measure codebook usage (`evaluation.reconstruction`), never the metrics or the judge."""
    found = sorted(n for n in imports_of(path) if _is(n, "painter.evaluation.metrics") or _is(n, "painter.evaluation.judge"))
    assert not found, f"{path.relative_to(ROOT)} imports {found}"


def test_only_the_cli_imports_the_cli():
    importers = [str(p.relative_to(ROOT)) for p in files(PACKAGE)
                 if PACKAGE / "cli" not in p.parents and any(_is(n, "painter.cli") for n in imports_of(p))]
    assert not importers, f"{importers} import painter.cli; the CLI is the top layer"


ROOT_MODULES = {"__init__.py", "errors.py", "logs.py", "runtime.py", "pipeline.py"}
ROOT_PACKAGES = {"options"}  # cross-cutting too: the helpers in its __init__, one module per command's options


def test_the_root_holds_only_the_cross_cutting_modules():
    extra = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ROOT_MODULES)
    assert not extra, f"painter/ holds {extra}: each concern has its package (DESIGN.md's layer table)"
    assert ROOT_PACKAGES <= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def import_graph() -> dict[str, set[str]]:
    """painter module -> the painter modules it imports (a module's own parent packages left out:
    importing `painter.io.rows` runs `painter/__init__.py`, which is not a cycle of ours)."""
    modules = {module_name(p): p for p in files(PACKAGE)}

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = {owner(n) for n in imports_of(path) if _is(n, "painter")} - {name, ""} - parents
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_painter_has_no_import_cycle():
    assert cycles(import_graph()) == []


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
    assert "painter.cli.main" in imports_of(path)


def test_read_and_write_tasks_load_no_torch():
    """Tokenize's read, write and duplicate tasks and generate's prompt passes start in fresh Ray workers:
    importing torch there (~1.5 s a worker on 2 cores) once cost the job a serial two seconds at its end."""
    code = ("import sys, painter.stages.datasets, painter.stages.tokenize_sink, painter.stages.generate_prompts, "
            "painter.stages.resources, painter.stages.progress, painter.stages.ray_errors; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tokenizers')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", f"the task modules load {loaded.stdout.strip()[:200]}"


HEAVY = ("torch", "ray", "deltalake", "pyarrow")


def imported_closure(roots: list[str]) -> dict[str, set[str]]:
    """Every painter module reachable from `roots` through imports (lazy ones included) -> what it imports."""
    modules = {module_name(p): p for p in files(PACKAGE)}
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen[name] = imports_of(modules[name])
        todo += [n for n in seen[name] if _is(n, "painter")]
    return seen


def test_the_closure_follows_imports_to_their_imports():
    reached = imported_closure(["painter.options.train"])
    assert {"painter.options", "painter.options.training", "painter.checkpoint.config", "painter.models.config"} <= set(reached)


def test_the_options_import_no_torch_ray_deltalake_or_pyarrow():
    """`painter COMMAND --help` builds its parser from `painter.options` alone: each of these costs a second or
    more to import (torch and Ray several), which once made a command's --help take 4 s."""
    roots = [module_name(p) for p in files(PACKAGE / "options")]
    found = {name: sorted(n for n in names if any(_is(n, h) for h in HEAVY))
             for name, names in imported_closure(roots).items()}
    assert not {name: heavy for name, heavy in found.items() if heavy}, "painter.options reaches heavy imports"
    code = ("import importlib, sys\n"
            f"for m in {roots!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", f"importing painter.options loads {loaded.stdout.strip()[:200]}"


def test_test_only_switches_live_in_the_faults_module():
    readers = [str(p.relative_to(ROOT)) for p in files(PACKAGE)
               if p != PACKAGE / "stages" / "faults.py" and "PAINTER_TEST_" in p.read_text(encoding="utf-8")]
    assert not readers, f"{readers} name a test-only switch: they live in painter/stages/faults.py"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_scripts_shadow_no_module(path):
    """A script's folder is first on sys.path: a benchmark named like a module (`tokenize.py`) replaced the
    standard library's for every import of the run."""
    assert path.stem not in sys.stdlib_module_names, f"{path.name} shadows the standard library's {path.stem}"


def test_every_module_imports():
    """A name moved between modules is caught here, not by the first job that happens to load the module."""
    code = ("import importlib, pkgutil, painter\n"
            "for m in pkgutil.walk_packages(painter.__path__, 'painter.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


PRIVATE_RAY = re.compile(r"\bray\._private\b|\bfrom\s+ray\s+import\s+[^\n]*\b_private\b")
# Ray APIs that are not public (DeveloperAPI, alpha) or differ across the supported releases: only the adapter
ADAPTED = ("iter_internal_ref_bundles", "TaskPoolStrategy", "RAY_TRAIN_V2_ENABLED")


def test_the_private_ray_pattern_sees_both_spellings():
    assert PRIVATE_RAY.search("import ray._private.worker as w") and PRIVATE_RAY.search("from ray import _private")
    assert not PRIVATE_RAY.search("import ray.data  # ray.private_thing")


@pytest.mark.parametrize("path", files(PACKAGE) + sorted((ROOT / "jobs").glob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_ray_and_non_public_apis_only_through_the_adapter(path):
    """`ray._private` nowhere in painter (not even in a comment: a grep must come back empty), and the
    release-dependent or DeveloperAPI names only in `stages/ray_compat.py`."""
    text = path.read_text(encoding="utf-8")
    assert not PRIVATE_RAY.search(text)
    if path.name != "ray_compat.py":
        assert not [name for name in ADAPTED if name in text], path
