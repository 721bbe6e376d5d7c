"""The command line keeps its users' habits: `--version`, every default and choice in `--help`, `--config`
with the command line winning, `--print-config`, and a `--help` (top-level or a command's) that loads no job."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from painter import __version__
from painter.cli.registry import COMMANDS, options_of
from painter.options import from_record, to_dict
from painter.options import train as train_options


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


@pytest.mark.parametrize("name", list(COMMANDS))
def test_one_name_means_one_thing_micro_batch_is_the_device_batch_and_batch_size_the_actor_call(name):
    fields = {f.name: f.metadata["help"] for f in dataclasses.fields(options_of(name))}
    if "micro_batch" in fields:
        assert "per model call" in fields["micro_batch"], fields["micro_batch"]
    if "batch_size" in fields:
        assert "per actor call" in fields["batch_size"], fields["batch_size"]


def test_a_config_file_written_before_the_rename_is_read_under_the_new_name(tmp_path):
    """`--print-config` of train wrote `batch_size` before it became `micro_batch`: such a file still runs."""
    old = tmp_path / "old.yaml"
    old.write_text("data: [tokens]\npreset: tiny\nvqgan: m\noutput: out\nbatch_size: 16\n", encoding="utf-8")
    done = painter("train", "--config", str(old), "--print-config")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["micro_batch"] == 16 and "batch_size" not in resolved
    assert painter("train", "--data", "t", "--output", "o", "--batch-size", "4").returncode == 2  # the flag is gone


def test_a_stored_record_with_the_old_name_reads_back():
    """`train.json` keeps the options as `to_dict` wrote them; one written before the rename says `batch_size`."""
    record = to_dict(train_options.Options(data=["shards"], output="out", micro_batch=4))
    record["batch_size"] = record.pop("micro_batch")
    record["no_longer_an_option"] = 1
    options = from_record(train_options.Options, record)
    assert options.micro_batch == 4 and options.data == ["shards"]
    both = record | {"micro_batch": 6}  # a record with both names: the new one is the value
    assert from_record(train_options.Options, both).micro_batch == 6
