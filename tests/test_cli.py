"""Tests of the `painter` command line: help for every command and option, JSON last lines, exit codes."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import painter.cli.main as cli
from painter.cli import registry
from painter.checkpoint.model_dir import load_model

ROOT = Path(__file__).resolve().parents[1]


def run_painter(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """`painter ARGS` in a fresh interpreter: `python -m painter.cli`, or as the console script calls it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if script:  # what the `painter` entry point does: no runpy, just import and call main()
        command = [sys.executable, "-c", "import sys; from painter.cli.main import main; sys.exit(main())", *args]
    else:
        command = [sys.executable, "-m", "painter.cli", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_top_level_help_lists_every_command():
    commands = registry.available_commands()
    assert {"new-model", "import-easynlp", "import-vqgan"} <= set(commands)
    assert set(commands) <= set(registry.COMMANDS)
    for script in (False, True):
        result = run_painter("--help", script=script)
        assert result.returncode == 0, result.stderr
        for name in commands:
            assert re.search(rf"^\s+{re.escape(name)}\b", result.stdout, re.M), (name, result.stdout)
            assert squash(registry.COMMANDS[name].help) in squash(result.stdout)


@pytest.mark.parametrize("name", registry.available_commands())
def test_command_help_lists_every_option(name, capsys):
    options_cls, run = registry.load(name)
    assert dataclasses.is_dataclass(options_cls) and callable(run)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    text = squash(capsys.readouterr().out)
    assert squash(registry.COMMANDS[name].help) in text
    for field in dataclasses.fields(options_cls):
        meta = field.metadata
        description = meta.get("help", "")
        assert description.strip(), f"{name}: option {field.name} has no description"
        if meta.get("positional"):
            assert re.search(rf"\b{re.escape(field.name)}\b", text, re.I), (name, field.name)  # as SRC
        else:
            flag = meta.get("flag") or "--" + field.name.replace("_", "-")
            assert re.search(rf"(^|\s|,){re.escape(flag)}(\s|,|$)", text), (name, flag)
        assert squash(description) in text, (name, field.name, description)


def test_new_model_prints_a_json_summary(tmp_path):
    out = tmp_path / "model"
    result = run_painter("new-model", "--preset", "tiny", "--output", str(out), "--seed", "2")
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["status"] == "succeeded"
    assert summary["job"] == "new-model" and summary["preset"] == "tiny"
    assert summary["model"] == str(out)
    assert isinstance(summary["seconds"], (int, float))
    loaded = load_model(str(out))
    assert loaded.config.name == "tiny" and loaded.gpt is not None and loaded.vqgan is not None


def test_failing_command_exits_nonzero_with_the_reason(tmp_path):
    missing = tmp_path / "no-such-easynlp-dir"
    result = run_painter("import-easynlp", str(missing), str(tmp_path / "dst"), script=True)
    assert result.returncode != 0
    summary = last_json(result.stdout)
    assert summary["status"] == "failed" and summary["job"] == "import-easynlp"
    assert str(missing) in summary["error"]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dst").exists()


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["new-model", "--preset", "no-such-preset", "--output", "x"])
    assert exit_info.value.code == 2
    assert "no-such-preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["new-model"])  # --output is required
    assert exit_info.value.code == 2
    said = capsys.readouterr()
    assert "--output" in said.err
    line = last_json(said.out)  # the failure line, as every job's
    assert line == {"job": "new-model", "status": "failed", "failure": "usage", "error": line["error"]}
    assert "--output" in line["error"]


def test_main_in_process_returns_the_exit_code(tmp_path, capsys):
    assert cli.main(["new-model", "--preset", "tiny", "--output", str(tmp_path / "m")]) == 0
    assert last_json(capsys.readouterr().out)["status"] == "succeeded"
    assert cli.main(["import-vqgan", str(tmp_path / "missing.ckpt"), str(tmp_path / "d")]) == 2
    summary = last_json(capsys.readouterr().out)
    assert summary["status"] == "failed" and "missing.ckpt" in summary["error"] and summary["failure"] == "usage"


def test_python_s_ignored_exception_reports_stay_off_the_terminal():
    """A `__del__` that raises at exit (Ray's actor handles after a stopped job) must not print a traceback
    under the job's last line: the `painter` script sends such reports to the log."""
    code = ("import sys\nfrom painter.cli import main as cli\nsys.unraisablehook = cli._unraisable_to_log\n"
            "class Bad:\n    def __del__(self):\n        raise RuntimeError('raised in __del__')\n"
            "kept = Bad()\nprint('done')\n")
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert ours.stdout.strip() == "done" and "raised in __del__" not in ours.stderr, ours.stderr
    plain = subprocess.run([sys.executable, "-c", code.replace("sys.unraisablehook = cli._unraisable_to_log\n", "")],
                           capture_output=True, text=True, check=True, timeout=120)
    assert "raised in __del__" in plain.stderr  # what Python prints without the hook


def test_each_failure_class_has_its_exit_code(tiny_model_dir, tmp_path, capsys):
    """Real faults found before Ray starts, through `main`: a missing input is usage (2), a storage endpoint
    that refuses connections is storage (4, after the retries); each last line names its class. (The
    fault matrix, tests/test_faults.py, asserts the code of every job x fault cell: data 3 from too many
    rejected rows, stopped 143 from SIGTERM, internal 1 from a NaN loss.)"""
    import socket

    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("a\t红色连衣裙\n", encoding="utf-8")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        refused = f'{{"endpoint_url": "http://127.0.0.1:{probe.getsockname()[1]}", "anon": true}}'
    cases = [(["--input", str(tmp_path / "missing.tsv"), "--output", str(tmp_path / "out")], 2, "usage"),
             (["--input", str(prompts), "--output", "s3://painter-refused/out", "--storage-options", refused],
              4, "storage")]
    for args, code, failure in cases:
        assert cli.main(["generate", "--model", tiny_model_dir, *args]) == code
        line = last_json(capsys.readouterr().out)
        assert (line["status"], line["failure"]) == ("failed", failure), line
