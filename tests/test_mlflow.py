"""`--mlflow-uri`: a training run recorded in MLflow, read back with MLflow's own client.

`painter train` runs on the session's local Ray through the CLI, into a file:// tracking folder; then
MlflowClient finds the run by its name: the options as params, the loss at every logged step, the loss
curve and config.json as artifacts, status FINISHED. A run that fails is recorded as FAILED."""
from __future__ import annotations

import json

import pytest

mlflow = pytest.importorskip("mlflow")  # the optional extra: painter-t2i[mlflow]

from painter.cli import main as cli  # noqa: E402

from test_stage_train import write_shards  # noqa: E402


def _run(capsys, *args: str) -> tuple[int, dict]:
    code = cli.main(["train", *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _find(uri: str, name: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("painter-train")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, runs
    return client, runs[0]


@pytest.mark.slow
def test_a_train_run_is_recorded_in_mlflow(ray_session, tiny_model_dir, tmp_path, capsys, monkeypatch):
    shards = write_shards(tiny_model_dir, str(tmp_path / "shards"))
    uri = (tmp_path / "mlruns").as_uri()
    code, s = _run(capsys, "--data", shards, "--init", tiny_model_dir, "--output", str(tmp_path / "model"),
                   "--name", "night-1", "--workers", "1", "--micro-batch", "4", "--max-steps", "6", "--log-every", "2",
                   "--checkpoint-every", "6", "--warmup-steps", "0", "--mlflow-uri", uri)
    assert code == 0 and s["steps"] == 6, s
    client, run = _find(uri, "night-1")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["max_steps"], params["log_every"], params["name"], params["init"]) == (
        "6", "2", "night-1", tiny_model_dir)
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = [json.loads(line) for line in open(f"{s['run']}/metrics.jsonl")]
    assert [m.step for m in history] == [m["step"] for m in logged] == [1, 2, 4, 6]
    assert [m.value for m in history] == pytest.approx([m["loss"] for m in logged])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "loss_curve.png" in artifacts and "model" in artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/config.json"]
    local = client.download_artifacts(run.info.run_id, "loss_curve.png", str(tmp_path / "dl"))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    code, failed = _run(capsys, "--data", shards, "--init", tiny_model_dir, "--output", str(tmp_path / "model2"),
                        "--name", "night-2", "--workers", "1", "--micro-batch", "4", "--max-steps", "3",
                        "--log-every", "1", "--checkpoint-every", "1", "--min-lr-ratio", "1e25", "--lr", "1e-3",
                        "--warmup-steps", "0", "--mlflow-uri", uri)
    assert (code, failed["failure"]) == (1, "internal"), failed  # the loss went NaN
    client, run = _find(uri, "night-2")
    assert run.info.status == "FAILED" and client.get_metric_history(run.info.run_id, "loss")
