"""The train job end to end on a real local Ray: DDP over 2 CPU workers, recovery, resume, refusals."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from painter.checkpoint.config import ModelConfig
from painter.checkpoint.model_dir import load_model, new_model
from painter.errors import InputError, PainterError
from painter.io.shards import ShardInfo, shard_table
from painter.stages.train import Options, list_shards, resolve_start, run
from painter.stages.faults import FAIL_AT_STEP as FAULT_ENV

SHARDS, ROWS = 12, 32  # 384 rows: one epoch on 2 workers x batch 8 is 24 optimizer steps
CLASSES = 16


def write_shards(model_dir: str, out_dir: str, shards: int = SHARDS, rows: int = ROWS, info=None) -> str:
    """Token shards with a learnable pattern: the image tokens are a function of the first text id."""
    loaded = load_model(model_dir, parts=())
    info = info or ShardInfo.for_model(loaded)
    os.makedirs(out_dir, exist_ok=True)
    for s in range(shards):
        idx = [f"s{s}-r{r}" for r in range(rows)]
        classes = (np.arange(rows) + s * rows) % CLASSES  # (N,)
        text_ids = np.full((rows, info.text_len), loaded.tokenizer.pad_id, dtype=np.int32)  # (N, Tt)
        text_ids[:, 0] = 200 + classes
        image = (classes[:, None] * 17 + np.arange(info.img_len)[None, :] * 3) % info.img_vocab_size  # (N, Ti)
        table = shard_table(info, idx, [f"class {c}" for c in classes], text_ids, image)
        pq.write_table(table, os.path.join(out_dir, f"part-{s:03d}.parquet"))
    return out_dir


def options(model_dir: str, data: str, output: str, **overrides) -> Options:
    base = dict(data=[data], init=model_dir, output=output, workers=2, micro_batch=4, grad_accum=2, epochs=1, lr=1e-2,
                warmup_steps=2, checkpoint_every=8, log_every=4, shuffle_buffer=16, max_failures=2)
    return Options(**(base | overrides))


def metrics_lines(summary: dict) -> list[dict]:
    with open(os.path.join(summary["run"], "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shards(tiny_model_dir, tmp_path_factory) -> str:
    return write_shards(tiny_model_dir, str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def ddp_run(ray_session, tiny_model_dir, shards, tmp_path_factory) -> dict:
    """One undisturbed 2-worker run of one epoch (24 optimizer steps of 2 micro-batches of 4 rows per worker)."""
    output = str(tmp_path_factory.mktemp("ddp") / "model")
    return run(options(tiny_model_dir, shards, output, record_rows=True))


@pytest.mark.slow
def test_ddp_on_two_cpu_workers_lowers_the_loss_on_disjoint_rows(ddp_run):
    s = ddp_run
    assert s["workers"] == 2 and s["steps_per_epoch"] == SHARDS * ROWS // 2 // 8 == 24
    assert s["steps"] == 24
    assert s["first_loss"] == pytest.approx(np.log(256), rel=0.1)
    assert s["final_loss"] < 0.5 * s["first_loss"]
    assert s["tokens_per_second"] > 0
    lines = metrics_lines(s)
    assert [m["step"] for m in lines] == [1, 4, 8, 12, 16, 20, 24]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "epoch"} <= set(lines[-1])
    rows = {}
    for rank in (0, 1):
        with open(os.path.join(s["run"], "rows", f"epoch0-rank{rank}.txt")) as f:
            rows[rank] = f.read().split()
    assert len(rows[0]) == len(rows[1]) == SHARDS * ROWS // 2
    assert not set(rows[0]) & set(rows[1])
    assert len(set(rows[0]) | set(rows[1])) == SHARDS * ROWS


@pytest.mark.slow
def test_trained_output_loads_and_generates(ddp_run, tiny_model_dir):
    from painter.pipeline import pipeline

    output = ddp_run["output"]
    trained = load_model(output, parts=("gpt",))
    start = load_model(tiny_model_dir, parts=())
    assert trained.vqgan_fingerprint == start.vqgan_fingerprint
    assert trained.gpt_fingerprint != start.gpt_fingerprint
    with open(os.path.join(output, "train.json")) as f:
        assert json.load(f)["summary"]["steps"] == 24
    result = pipeline("text2image_generation", output)(["宽松T恤"], top_k=1)
    assert result[0]["text"] == "宽松T恤" and len(result[0]["gen_imgbase64"]) > 100


@pytest.mark.slow
def test_resume_continues_a_finished_run_and_recovers_from_a_worker_failure(ddp_run, tiny_model_dir, shards, tmp_path,
                                                                             monkeypatch):
    """A copy of the undisturbed run (Ray's snapshot names checkpoints relative to the run) goes on to epoch 2.
    Its last rank fails once after step 36 (checkpoints at 32, 40, 48): the retry resumes from step 32."""
    runs = str(tmp_path / "runs")
    shutil.copytree(os.path.dirname(ddp_run["run"]), runs)
    again = options(tiny_model_dir, shards, str(tmp_path / "model"), run_dir=runs, epochs=2)
    with pytest.raises(InputError, match="already exists; pass --resume"):
        run(again)
    with pytest.raises(InputError, match="no run 'other' to resume"):
        run(options(tiny_model_dir, shards, str(tmp_path / "model"), run_dir=runs, name="other", resume=True))
    monkeypatch.setenv(FAULT_ENV, "36")
    more = run(dataclasses.replace(again, resume=True))
    assert os.path.exists(os.path.join(more["run"], "_fault_injected_at_step_36"))
    assert more["steps"] == 48 and more["epochs"] == 2
    assert more["first_loss"] == ddp_run["first_loss"]
    assert more["final_loss"] < ddp_run["final_loss"] < 0.5 * more["first_loss"]
    steps = [m["step"] for m in metrics_lines(more)]
    # the second session starts at 25; step 36 is done twice: once before the failure, once after
    assert steps == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 36, 40, 44, 48]
    first, redone = (m for m in metrics_lines(more) if m["step"] == 36)
    assert redone["loss"] == first["loss"]  # the retry redid 33-36 exactly: each rank's rows never change
    state = torch.load(os.path.join(more["checkpoint"], "train_state.pt"), weights_only=True)
    assert state["step"] == 48 and state["first_loss"] == more["first_loss"]


def _easynlp_dir(path: str, tiny_model_dir: str) -> str:
    """An EasyNLP pai-painter layout of the tiny model: pytorch_model.bin + vocab.txt + config.json."""
    tiny = load_model(tiny_model_dir)
    state = {f"transformer.{k}": v for k, v in tiny.gpt.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in tiny.vqgan.state_dict().items()}
    os.makedirs(path)
    torch.save(state, os.path.join(path, "pytorch_model.bin"))
    tiny.tokenizer.save(os.path.join(path, "vocab.txt"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "painter", "n_head": tiny.config.gpt.n_head}, f)
    return path


@pytest.mark.slow
def test_fine_tunes_an_imported_easynlp_model(ray_session, tiny_model_dir, tmp_path):
    from painter.checkpoint.importers import import_easynlp

    src = _easynlp_dir(str(tmp_path / "pai-painter-tiny-zh"), tiny_model_dir)
    imported = import_easynlp(src, str(tmp_path / "imported"), text_len=16, resolution=32)
    data = write_shards(imported, str(tmp_path / "shards"), shards=2, rows=8)
    val = write_shards(imported, str(tmp_path / "val"), shards=1, rows=8)
    s = run(options(imported, data, str(tmp_path / "model"), val_data=[val], workers=1, max_steps=3,
                    checkpoint_every=2, log_every=1, threads_per_worker=2))
    assert s["threads"] == 2 and {m["threads"] for m in metrics_lines(s)} == {2}  # not Ray's one per CPU
    assert s["steps"] == 3 and s["steps_per_epoch"] == 2 and s["epochs"] == 1.5  # --max-steps runs into epoch 2
    val_losses = [(m["step"], m["val_loss"]) for m in metrics_lines(s)]
    assert [step for step, _ in val_losses] == [1, 2, 3] and val_losses[0][1] is None
    assert 0 < val_losses[1][1] < 6 and val_losses[2][1] == s["val_loss"]  # after epoch 1 and at the end
    trained = load_model(s["output"])
    assert trained.config.gpt == load_model(imported, parts=()).config.gpt
    assert trained.vqgan_fingerprint == load_model(imported, parts=()).vqgan_fingerprint


def test_shards_of_another_vqgan_are_refused_naming_the_file(ray_session, tiny_model_dir, shards, tmp_path):
    other = new_model("tiny", str(tmp_path / "other"), seed=1)
    bad = write_shards(other, str(tmp_path / "bad"), shards=1, rows=4)
    bad_file = os.path.join(bad, "part-000.parquet")
    with pytest.raises(InputError, match=rf"{bad_file}: token shards do not fit this model: vqgan_fingerprint"):
        run(Options(data=[shards, bad_file], init=tiny_model_dir, output=str(tmp_path / "out")))
    with pytest.raises(InputError, match=rf"{bad_file}: token shards do not fit"):
        run(Options(data=[shards], val_data=[bad], init=tiny_model_dir, output=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")


def test_listing_skips_underscore_folders_below_a_directory(tiny_model_dir, tmp_path):
    data = write_shards(tiny_model_dir, str(tmp_path / "shards"), shards=2, rows=2)
    os.makedirs(os.path.join(data, "_rejected"))
    pq.write_table(pa.table({"idx": ["x"], "reason": ["bad"]}), os.path.join(data, "_rejected", "part-0.parquet"))
    expected = [os.path.join(data, f"part-00{i}.parquet") for i in range(2)]
    assert list_shards([data]) == expected
    assert list_shards([os.path.join(data, "*.parquet")]) == expected
    assert list_shards([expected[1]]) == expected[1:]


def test_bad_starting_points_and_resources_are_refused(ray_session, tiny_model_dir, shards, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="exactly one of --init"):
        run(Options(data=[shards], output=out))
    with pytest.raises(InputError, match="--preset small needs --vqgan"):
        run(Options(data=[shards], preset="small", output=out))
    with pytest.raises(InputError, match="no such file"):
        run(Options(data=[str(tmp_path / "missing")], init=tiny_model_dir, output=out))
    with pytest.raises(InputError, match="matches no input files"):
        run(Options(data=[str(tmp_path / "*.parquet")], init=tiny_model_dir, output=out))
    with pytest.raises(InputError, match="too few for 2 workers x micro-batch 512"):
        run(Options(data=[shards], init=tiny_model_dir, output=out, workers=2, micro_batch=512))
    with pytest.raises(InputError, match="--threads-per-worker must be >= 1, got 0"):
        run(Options(data=[shards], init=tiny_model_dir, output=out, threads_per_worker=0))
    if not ray_session.cluster_resources().get("GPU"):
        with pytest.raises(PainterError, match="--gpus-per-worker 1, but the Ray cluster has no GPUs"):
            run(Options(data=[shards], init=tiny_model_dir, output=out, gpus_per_worker=1))
    assert not os.path.exists(out)


def test_preset_takes_its_shape_and_the_vqgan_dirs_vocab_and_lengths(tiny_model_dir):
    start = resolve_start(Options(data=["unused"], preset="small", vqgan=tiny_model_dir, output="unused"))
    tiny = load_model(tiny_model_dir, parts=())
    assert (start.config.gpt.n_layer, start.config.gpt.n_head, start.config.gpt.n_embd) == (4, 4, 128)
    assert start.config.gpt.img_vocab_size == 256 and start.config.gpt.text_len == tiny.config.gpt.text_len
    assert start.config.vqgan == tiny.config.vqgan and start.config.name == "small"
    assert start.shard_info == ShardInfo.for_model(tiny) and not start.has_gpt
    assert start.config.gpt.resid_pdrop == 0.0
    assert resolve_start(Options(data=["unused"], init=tiny_model_dir, output="unused")).has_gpt


def test_dropout_shapes_a_fresh_gpt_only(tiny_model_dir):
    start = resolve_start(Options(data=["unused"], preset="tiny", vqgan=tiny_model_dir, output="unused", dropout=0.1))
    gpt = start.config.gpt
    assert (gpt.embd_pdrop, gpt.resid_pdrop, gpt.attn_pdrop) == (0.1, 0.1, 0.0)
    assert ModelConfig.from_dict(start.config.to_dict()).gpt == gpt  # stored in the checkpoint's config
    with pytest.raises(InputError, match="--dropout goes with --preset"):
        resolve_start(Options(data=["unused"], init=tiny_model_dir, output="unused", dropout=0.1))
    with pytest.raises(InputError, match=r"--dropout must be in \[0, 1\), got 1.0"):
        resolve_start(Options(data=["unused"], preset="tiny", vqgan=tiny_model_dir, output="unused", dropout=1.0))


def test_the_cli_builds_these_options():
    from painter.cli.main import build_parser
    from painter.options import from_args

    args = build_parser().parse_args(["train", "--data", "a", "b", "--init", "m", "--output", "o", "--workers", "2",
                                      "--gpus-per-worker", "0", "--resume", "--max-steps", "50", "--pkeep", "0.9"])
    o = from_args(Options, args)
    assert o.data == ["a", "b"] and o.workers == 2 and o.gpus_per_worker == 0 and o.resume and o.max_steps == 50
    assert o.pkeep == 0.9 and o.val_data == [] and o.name == "train"


def test_workers_get_one_frozen_typed_config_built_from_the_options(tiny_model_dir, tmp_path):
    """What every worker reads (`WorkerConfig`, by attribute): the options it needs, the shards only when the
    split stays in memory, and nothing a worker could change for the others."""
    import pickle

    from painter.stages.train import worker_config
    from painter.stages.train_worker import WorkerConfig

    o = options(tiny_model_dir, "shards", str(tmp_path / "out"), micro_batch=3, null_caption_prob=0.1, seed=7)
    start = resolve_start(o)
    config = worker_config(o, start, "run", steps_per_epoch=5, total=10, files=["a.parquet", "b.parquet"])
    assert isinstance(config, WorkerConfig) and config.model == start.config and config.train.total_steps == 10
    assert (config.micro_batch, config.seed, config.null_caption_prob, config.total_steps) == (3, 7, 0.1, 10)
    assert config.in_memory and config.train_files == ("a.parquet", "b.parquet") and config.progress is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.micro_batch = 4
    assert pickle.loads(pickle.dumps(config)) == config  # it travels to every worker
    streamed = worker_config(dataclasses.replace(o, in_memory_mb=0), start, "run", 5, 10, ["a.parquet"])
    assert not streamed.in_memory and streamed.train_files == ()


def test_a_relative_output_gives_an_absolute_run_location(tmp_path, monkeypatch):
    """`painter train --output model` from a shell: Ray Train takes only an absolute local storage path
    (a relative one failed in its controller with 'URI has empty scheme'), and workers may start elsewhere."""
    from painter.stages.train_runner import run_location

    monkeypatch.chdir(tmp_path)
    runs, run_path = run_location(Options(data=["tokens"], output="model", name="night"))
    assert runs == str(tmp_path / "model" / "_runs") and run_path == str(tmp_path / "model" / "_runs" / "night")


def test_checkpoint_folders_an_interrupted_run_left_are_removed(tmp_path):
    """A run stopped or killed while writing a checkpoint leaves a folder that Ray Train's snapshot does not
    list and no later run deletes: each stop of a night cost a checkpoint's worth of disk (CI's 256 MiB
    training tmpfs filled up). Only the folders the snapshot lists stay; no snapshot lists none."""
    from painter.io.storage import Storage
    from painter.stages.train_runner import SNAPSHOT_FILE, drop_stray_checkpoints

    run = tmp_path / "run"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c", "checkpoint_d"):
        (run / name).mkdir(parents=True)
        (run / name / "train_state.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text("{}\n")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_b"}, {"checkpoint_dir_name": "checkpoint_c"}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_c"}, "pending_training_results": []}
    (run / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    assert drop_stray_checkpoints(str(run), Storage(), "train") == ["checkpoint_a", "checkpoint_d"]
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint_b", "checkpoint_c", "metrics.jsonl", SNAPSHOT_FILE])
    (run / SNAPSHOT_FILE).unlink()
    assert drop_stray_checkpoints(str(run), Storage(), "train") == ["checkpoint_b", "checkpoint_c"]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
