"""Training runs in MLflow, when `--mlflow-uri` names a tracking server or a local folder (off by default).

`mlflow_run(o, job, storage)` wraps a training job (train, train-vq; `painter easynlp --mode train` through
train): an MLflow run named after `--name` in the experiment `painter-<job>`, the job's options as params;
when the job ends, every step its rank 0 logged (`<run>/metrics.jsonl`) as metrics at that step, the loss
curve PNG and the model directory's `config.json` as artifacts, and the status: FINISHED, FAILED, or KILLED
(stopped by a signal). MLflow is an optional extra (`pip install 'painter-t2i[mlflow]'`: mlflow-skinny);
it is imported only here. A local path or `file://` URI is MLflow's file store, which MLflow 3 keeps
behind MLFLOW_ALLOW_FILE_STORE: a path named on the command line is taken as that opt-in.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
from contextlib import contextmanager

from painter import logs
from painter.errors import InputError
from painter.io.storage import Storage, as_storage
from painter.options import to_dict

SKIPPED = ("step", "time", "epoch")  # not metrics: the step is MLflow's own axis


def _client(uri: str):
    try:
        import mlflow
    except ImportError:
        raise InputError("--mlflow-uri needs MLflow: pip install 'painter-t2i[mlflow]'") from None
    if "://" not in uri or uri.startswith("file://"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = uri if uri.startswith("file://") else "file://" + os.path.abspath(uri)
    return mlflow.MlflowClient(uri)


def _params(o) -> dict[str, str]:
    flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in to_dict(o).items()}
    return {k: v[:6000] for k, v in flat.items()}  # MLflow's limit on a param's value


@contextmanager
def mlflow_run(o, job: str, run_path: str, storage: Storage | None = None):
    """An MLflow run around the job (nothing when `o.mlflow_uri` is unset); see the module docstring."""
    if not getattr(o, "mlflow_uri", None):
        yield
        return
    client = _client(o.mlflow_uri)
    experiment = client.get_experiment_by_name(f"painter-{job}")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(f"painter-{job}")
    run = client.create_run(experiment_id, run_name=o.name, tags={"painter.job": job, "painter.run": run_path})
    run_id, status = run.info.run_id, "FAILED"
    client.log_batch(run_id, params=[_param(k, v) for k, v in _params(o).items()])
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            _log_results(client, run_id, run_path, o.output, as_storage(storage))
            client.set_terminated(run_id, status)
            logs.get(job).info(f"MLflow run {run_id} ({status}) in {o.mlflow_uri}")
        except Exception as e:  # the job's own outcome is what matters; MLflow's trouble is a warning
            logs.get(job).warning(f"MLflow run {run_id}: could not record the results ({type(e).__name__}: {e})")


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _log_results(client, run_id: str, run_path: str, output: str, storage: Storage) -> None:
    """Every logged step's numbers as metrics at that step; the loss curve and config.json as artifacts."""
    from mlflow.entities import Metric

    path = posixpath.join(run_path, "metrics.jsonl")
    lines = storage.read_text(path).splitlines() if storage.exists(path) else []
    metrics = []
    for line in filter(str.strip, lines):
        row = json.loads(line)
        metrics += [Metric(k, float(v), int(row.get("time", 0) * 1000), int(row["step"])) for k, v in row.items()
                    if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v)]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    with tempfile.TemporaryDirectory(prefix="painter-mlflow-") as tmp:
        for source, folder in ((posixpath.join(run_path, "loss_curve.png"), None),
                               (posixpath.join(output, "config.json"), "model")):
            if storage.exists(source):
                local = os.path.join(tmp, posixpath.basename(source))
                with storage.open(source, "rb") as f, open(local, "wb") as out:
                    out.write(f.read())
                client.log_artifact(run_id, local, folder)
