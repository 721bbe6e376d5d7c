"""The command line keeps its users' habits: `--version`, every default and choice in `--help`, `--config`
with the command line winning, `--print-config`, and a `--help` (top-level or a command's) that loads no job."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from painter import __version__
from painter.cli.registry import COMMANDS


def painter(*args: str, code: str = "from painter.cli.main import entry; entry()") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_version():
    done = painter("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"painter {__version__}"


def test_help_shows_every_default_zero_and_off_included_and_every_choice_list():
    text = " ".join(painter("generate", "--help").stdout.split())
    assert "the image of (seed, idx, sample) is always the same (default: 0)" in text
    assert "keep its first K token rows and generate the rest (default: 0)" in text
    assert "(one of: png, jpeg, webp) (default: png)" in text
    assert "write a static HTML gallery beside the contact sheet (default: off)" in text


def test_the_top_level_help_loads_no_job_and_neither_torch_nor_ray():
    code = ("import sys\nfrom painter.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'deltalake', 'painter.stages.generate') if m in sys.modules))")
    done = painter(code=code)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "generate" in done.stdout and "tokenize" in done.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_help_imports_neither_torch_ray_deltalake_nor_pyarrow(name):
    """`painter COMMAND --help` reads the command's options (`painter.options`) and never its job module: torch
    and Ray alone took `painter tokenize --help` to 3.9 s."""
    code = ("import sys\nfrom painter.cli.main import main\n"
            f"try:\n    main([{name!r}, '--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in ('torch', 'ray', 'deltalake', 'pyarrow') if m in sys.modules))")
    done = painter(code=code)
    *_, exit_line, loaded = done.stdout.strip().splitlines()
    assert exit_line == "exit 0" and f"usage: painter {name} " in done.stdout, done.stderr[-2000:]
    assert loaded == "[]", f"painter {name} --help imports {loaded}"


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "night.yaml"
    path.write_text(yaml.safe_dump({"input": ["titles.tsv"], "model": "bundled", "output": "out/gen",
                                    "seed": 5, "top-k": 7, "partition_by": "category"}), encoding="utf-8")
    return path


def test_config_gives_any_option_and_the_command_line_wins(config_file):
    done = painter("generate", "--config", str(config_file), "--top-k", "3", "--print-config")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["input"] == ["titles.tsv"] and resolved["model"] == "bundled"  # required ones, from the file
    assert resolved["seed"] == 5 and resolved["partition_by"] == ["category"]  # a list option from a scalar
    assert resolved["top_k"] == 3  # the command line over the file
    assert resolved["samples"] == 1  # the default where neither says


def test_printed_config_is_a_config_file_that_gives_the_same_options(config_file, tmp_path):
    first = painter("generate", "--config", str(config_file), "--print-config").stdout
    again = tmp_path / "again.yaml"
    again.write_text(first, encoding="utf-8")
    assert painter("generate", "--config", str(again), "--print-config").stdout == first


def test_a_config_key_that_is_no_option_is_a_usage_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input: [a.tsv]\nmodel: m\noutput: o\ntop_kk: 3\n", encoding="utf-8")
    done = painter("generate", "--config", str(path))
    assert done.returncode == 2
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["failure"] == "usage" and "top_kk is not an option of this command" in line["error"]
