"""`painter train-vq` on a real local Ray: DDP over 2 CPU workers on a synthetic corpus with bad rows,
a worker failure on the way, the trained VQGAN exported with a new fingerprint; refusals."""
from __future__ import annotations

import base64
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from painter.evaluation import synthetic
from painter.checkpoint.model_dir import load_model
from painter.inference.encoder import PIXELS
from painter.errors import ErrorRateExceeded, InputError
from painter.io.images import prepare_pixels
from painter.io.shards import ShardInfo, shard_table
from painter.io.rows import REASON, ROW, SOURCE
from painter.stages.train_vq import Options, prepare_images, run
from painter.stages.faults import FAIL_AT_STEP as FAULT_ENV

ROWS, BAD = 320, 3
STEPS = 120  # 256 training rows (64 held out) on 2 workers x batch 8: 16 steps an epoch, 7.5 epochs


def write_bad_rows(path: str) -> str:
    """A TSV of rows that cannot be used: bad base64, a truncated PNG, a line with two fields."""
    truncated = base64.b64encode(base64.b64decode(synthetic.png_base64(synthetic.render(
        synthetic.Scene("圆形", "红", "白"), 32)))[:60]).decode()
    with open(path, "w", encoding="utf-8") as f:
        f.write("bad-1\t红色圆形\tnot*base64\n")
        f.write(f"bad-2\t红色圆形\t{truncated}\n")
        f.write("bad-3\tonly two fields\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("vq-corpus")
    synthetic.write_corpus(str(root), ROWS, shards=2, size=32, seed=0)
    write_bad_rows(str(root / "part-bad.tsv"))
    return str(root)


def options(model: str, corpus: str, output: str, **overrides) -> Options:
    base = dict(input=[corpus], model=model, output=output, workers=2, micro_batch=8, max_steps=STEPS, lr=1e-3,
                warmup_steps=10, restart_every=25, eval_images=64, log_every=10, checkpoint_every=40,
                max_error_rate=0.05, max_failures=1)
    return Options(**(base | overrides))


@pytest.fixture(scope="module")
def vq_run(ray_session, tiny_model_dir, corpus, tmp_path_factory) -> dict:
    """One 2-worker run; the last rank fails once after step 60 and the group resumes from step 40."""
    output = str(tmp_path_factory.mktemp("vq") / "model")
    os.environ[FAULT_ENV] = "60"
    try:
        return run(options(tiny_model_dir, corpus, output))
    finally:
        del os.environ[FAULT_ENV]


def metrics_lines(summary: dict) -> list[dict]:
    with open(os.path.join(summary["run"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_ddp_training_lowers_reconstruction_error_and_keeps_codes_in_use(vq_run):
    s = vq_run
    print({k: s[k] for k in ("first_loss", "final_loss", "start_reconstruction_l1", "reconstruction_l1",
                             "start_psnr", "psnr", "codebook_usage", "perplexity", "codes_restarted",
                             "images_per_second")})
    assert s["steps"] == STEPS and s["workers"] == 2 and s["steps_per_epoch"] == 16
    assert s["rows_in"] == ROWS + BAD and s["rows_rejected"] == BAD and s["rows"] == ROWS - 64
    assert s["eval_images"] == 64  # held out, measured before the first step and after the last
    # at lr 1e-3 with 10 warm-up steps, seeds 0-3 end at 0.56-0.66 of the start's L1 and 3.8-5.7 dB up, the
    # same in every run (seed 0: 0.572, 5.37 dB); at lr 2e-3 without warm-up, with Ray Data's timing-dependent
    # split, the same seeds spread over 0.60-0.85 from run to run (one CI run failed at 0.81)
    assert s["reconstruction_l1"] < 0.7 * s["start_reconstruction_l1"]
    assert s["psnr"] > s["start_psnr"] + 3
    assert s["final_loss"] < 0.8 * s["first_loss"]
    assert s["codebook_usage"] > 0.3 and s["perplexity"] > 30
    assert s["codes_restarted"] > 0 and s["images_per_second"] > 0
    lines = metrics_lines(s)
    assert [m["step"] for m in lines] == [1, 10, 20, 30, 40, 50, 60, 50, 60, 70, 80, 90, 100, 110, 120]
    assert {"loss", "l1", "codebook_usage", "perplexity", "lr", "codes_restarted"} <= set(lines[-1])
    assert all(0 < m["codebook_usage"] <= 1 for m in lines)
    assert lines[-1]["eval"]["l1"] == s["reconstruction_l1"]


@pytest.mark.slow
def test_a_worker_failure_resumes_from_the_last_checkpoint(vq_run):
    assert os.path.exists(os.path.join(vq_run["run"], "_fault_injected_at_step_60"))
    lines = metrics_lines(vq_run)
    assert lines[7]["first_loss"] == lines[0]["first_loss"]  # the restored state carries on
    assert [m["step"] for m in lines[5:9]] == [50, 60, 50, 60]
    assert (lines[7]["loss"], lines[8]["loss"]) == (lines[5]["loss"], lines[6]["loss"])  # redone exactly
    assert lines[7]["start_eval"] == lines[0]["start_eval"]  # measured once, before any training


@pytest.mark.slow
def test_rejected_rows_are_written_with_reasons(vq_run):
    errors = pq.read_table(vq_run["errors"]).to_pylist()
    reasons = {r["idx"] or r["row"]: r["reason"] for r in errors}
    assert len(errors) == BAD and {r["stage"] for r in errors} == {"train-vq"}
    assert reasons["bad-1"].startswith("bad base64") and reasons["bad-2"] == "truncated image"
    assert reasons[3].startswith("expected 3 tab-separated fields")


@pytest.mark.slow
def test_output_is_a_model_dir_with_a_new_vqgan_that_old_shards_do_not_fit(vq_run, tiny_model_dir, tmp_path):
    from painter.stages.train import check_shards

    out, start = load_model(vq_run["output"]), load_model(tiny_model_dir)
    assert out.vqgan_fingerprint == vq_run["vqgan"] != start.vqgan_fingerprint == vq_run["previous_vqgan"]
    assert out.gpt_fingerprint == start.gpt_fingerprint and out.config.to_dict() == start.config.to_dict()
    assert out.tokenizer.vocab_hash == start.tokenizer.vocab_hash
    with open(os.path.join(vq_run["output"], "train.json")) as f:
        assert json.load(f)["summary"]["steps"] == STEPS
    info = ShardInfo.for_model(start)  # token shards made with the old VQGAN
    shard = os.path.join(tmp_path, "old.parquet")
    pq.write_table(shard_table(info, ["a"], ["t"], np.zeros((1, info.text_len), np.int32),
                               np.zeros((1, info.img_len), np.int32)), shard)
    with pytest.raises(InputError, match="vqgan_fingerprint"):
        check_shards([shard], ShardInfo.for_model(out))


def test_prepare_images_decodes_checks_and_holds_out(corpus):
    good = synthetic.png_base64(synthetic.render(synthetic.Scene("圆形", "红", "白"), 48))
    batch = pa.table({"idx": ["a", "b", "c", None], "text": ["x", None, "z", None],
                      "imgbase64": [good, good, "@@", None], SOURCE: ["f"] * 4, ROW: [1, 2, 3, 4],
                      REASON: [None, None, None, "expected 3 tab-separated fields (idx,text,imgbase64), got 1"]})
    checked = prepare_images(batch, 32, 10**6, "check").to_pylist()
    assert [r[REASON] is None for r in checked] == [True, True, False, False]  # no text is needed
    assert checked[2][REASON].startswith("bad base64") and PIXELS not in checked[0]
    train = prepare_images(batch, 32, 10**6, "train", frozenset({("f", 2)}))
    held = prepare_images(batch, 32, 10**6, "eval", frozenset({("f", 2)}))
    assert train.num_rows == 1 and held.num_rows == 1
    expected, _ = prepare_pixels(good, 32)
    assert train[PIXELS][0].as_py() == expected.tobytes() == held[PIXELS][0].as_py()
    small = prepare_images(batch.slice(0, 1), 32, 100, "check").to_pylist()
    assert small[0][REASON].startswith("image too large")


def test_too_many_rejected_rows_fail_before_training(ray_session, tiny_model_dir, tmp_path):
    data = tmp_path / "corpus"
    synthetic.write_corpus(str(data), 20, size=32, seed=1)
    write_bad_rows(str(data / "part-bad.tsv"))
    out = str(tmp_path / "out")
    with pytest.raises(ErrorRateExceeded, match=r"3 of 23 rows rejected .*, above --max-error-rate 0.01"):
        run(options(tiny_model_dir, str(data), out, max_error_rate=0.01))
    assert pq.read_table(os.path.join(out, "_rejected")).num_rows == 3
    assert not os.path.exists(os.path.join(out, "_runs"))  # no training started
    only_bad = str(tmp_path / "bad.tsv")
    write_bad_rows(only_bad)
    with pytest.raises(InputError, match=r"no usable images \(all 3 rows rejected; first at .*bad.tsv row 1: bad base64"):
        run(options(tiny_model_dir, only_bad, str(tmp_path / "out2")))


def test_bad_options_are_refused_before_any_work(ray_session, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="names no 'imgbase64' column"):
        run(options(tiny_model_dir, "unused", out, input_schema="idx,text"))
    with pytest.raises(InputError, match="is the --model directory"):
        run(options(tiny_model_dir, "unused", tiny_model_dir + "/"))
    os.makedirs(os.path.join(out, "_runs", "train-vq"))
    with pytest.raises(InputError, match="already exists; pass --resume"):
        run(options(tiny_model_dir, "unused", out, workers=1))
    with pytest.raises(InputError, match="no run 'other' to resume"):
        run(options(tiny_model_dir, "unused", out, workers=1, name="other", resume=True))


def test_lr_defaults_to_fine_tuning_unless_from_scratch():
    o = Options(input=["c"], model="m", output="o")
    assert o.peak_lr == 1e-4 and Options(input=["c"], model="m", output="o", from_scratch=True).peak_lr == 2e-3
    assert Options(input=["c"], model="m", output="o", lr=5e-4, from_scratch=True).peak_lr == 5e-4


def test_the_cli_builds_these_options():
    from painter.cli.main import build_parser
    from painter.options import from_args

    args = build_parser().parse_args(["train-vq", "--input", "a", "b", "--model", "m", "--output", "o",
                                      "--workers", "2", "--from-scratch", "--max-steps", "50", "--gan-weight", "0.1",
                                      "--restart-every", "20"])
    o = from_args(Options, args)
    assert o.input == ["a", "b"] and o.workers == 2 and o.from_scratch and o.max_steps == 50
    assert o.gan_weight == 0.1 and o.restart_every == 20 and o.name == "train-vq" and o.lr is None
