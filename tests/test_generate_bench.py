"""benchmarks/generate.py as a subprocess on CPU: the old-engine and reference comparison runs and
reports its ratios, and a run killed midway leaves every finished section in its JSON."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "generate.py"
SMALL = ["--preset", "small", "--device", "cpu", "--micro-batch", "2", "--rows", "2", "--repeats", "1"]


def test_comparison_with_old_engine_and_reference_reports_the_ratios(tmp_path):
    out = tmp_path / "generate.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] is True and "errors" not in result, result.get("errors")
    assert result["same_tokens_as_old_engine"] is True  # fp32 on CPU: the engine's codes are the old path's
    for key in ("speedup", "speedup_vs_old_engine", "speedup_in_cpu_seconds"):
        assert result[key] > 0, key
    assert result["speedup"] == round(result["ours"]["images_per_second"] / result["reference"]["images_per_second"], 2)
    kv = result["kv_cache"]  # bytes of KV cache an image reads: the whole cache every step, then the buckets
    assert kv["kv_bytes_per_image"] == kv["profiled_kv_bytes_per_image"] < kv["kv_bytes_per_image_full_cache"]
    assert kv["profiled_lengths_match"] is True and kv["same_tokens"] is True


def test_a_killed_run_keeps_its_finished_sections(tmp_path):
    out = tmp_path / "generate.json"
    child = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--json", str(out)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stderr:  # the script says when each section is on disk; wait for the first
            if line.startswith("report: section ours written"):
                break
        else:
            raise AssertionError(f"the run ended before its first section (exit {child.wait()})")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    result = json.loads(out.read_text())  # whole: written by rename, never half a file
    assert result["ours"]["images_per_second"] > 0 and result["preset"] == "small"
    assert "complete" not in result  # stopped before its end, and says so


def test_decoder_layouts_are_timed_side_by_side(tmp_path):
    """The GPU default layout of the VQGAN decode is picked by this section (compiled too, on CUDA)."""
    out = tmp_path / "layouts.json"
    run = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--skip-old", "--decoder-layouts", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    layouts = json.loads(out.read_text())["decoder_layouts"]
    assert layouts["nchw_images_per_second"] > 0 and layouts["channels_last_images_per_second"] > 0
    assert "compiled_nchw_images_per_second" not in layouts  # compiled only on CUDA
    assert layouts["fastest"] in ("nchw", "channels_last")
