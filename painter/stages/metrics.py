"""Prometheus metrics of the jobs, through Ray (`ray.util.metrics`): every Ray node exports what its
processes (driver, actors, tasks, Train workers) record on its metrics port, beside Ray's own metrics.

Every metric is declared once in `METRICS` (its kind, help, and tags beyond the base ones); every name
starts `painter_` (Ray's exporter prefixes `ray_`, and counters gain `_total`). The base tags are `job`,
`run_date` and `model` (a fingerprint): a night's figures, never a row's. `Recorder(job, run_date, model)`
records them in any process; the metric objects are made once per process.

Ray sends a process's metrics to its node's agent every `RAY_metrics_report_interval_ms` (10 s) and when
a driver disconnects (seen with Ray 2.60: a driver's counter recorded just before it exits is exported);
each process's series carries its WorkerId, so a dashboard sums over them.
"""
from __future__ import annotations

import pyarrow.compute as pc

BASE_TAGS = ("job", "run_date", "model")
SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
METRICS = {  # name: (kind, help, extra tags)
    "painter_images_written": ("counter", "images committed to the output table", ()),
    "painter_rows_in": ("counter", "input rows read", ()),
    "painter_rows_out": ("counter", "rows written (tokenize: token rows)", ()),
    "painter_rows_rejected": ("counter", "input rows rejected, by reason", ("reason",)),
    "painter_image_seconds": ("histogram", "seconds per image, averaged over each generated batch", ()),
    "painter_commits": ("counter", "Delta commits made", ()),
    "painter_commit_seconds": ("histogram", "seconds per Delta commit", ()),
    "painter_table_version": ("gauge", "the output table's version after the run's last commit", ()),
    "painter_images_per_second": ("gauge", "images per second over the run (tokenize: images encoded)", ()),
    "painter_train_step": ("gauge", "the last training step logged", ()),
    "painter_train_loss": ("gauge", "training loss at the last logged step", ()),
    "painter_train_tokens_per_second": ("gauge", "tokens (train-vq: images) per second at the last logged step", ()),
    "painter_train_step_seconds": ("histogram", "seconds per training step, averaged over each logging window", ()),
    "painter_train_mfu": ("gauge", "model FLOPs utilisation at the last logged step, where the GPU is known", ()),
}
_made: dict = {}  # this process's metric objects


def _metric(name: str):
    if name not in _made:
        from ray.util import metrics

        kind, help_text, extra = METRICS[name]
        keys = (*BASE_TAGS, *extra)
        if kind == "counter":
            _made[name] = metrics.Counter(name, help_text, tag_keys=keys)
        elif kind == "gauge":
            _made[name] = metrics.Gauge(name, help_text, tag_keys=keys)
        else:
            _made[name] = metrics.Histogram(name, help_text, boundaries=SECONDS, tag_keys=keys)
    return _made[name]


class Recorder:
    """Records the metrics of one job run (its base tags) in this process."""

    def __init__(self, job: str, run_date: str = "", model: str = ""):
        self.tags = {"job": job, "run_date": run_date or "", "model": model or ""}

    def add(self, name: str, value: float, **tags: str) -> None:
        if value:
            _metric(name).inc(float(value), tags=self.tags | tags)

    def set(self, name: str, value: float | None) -> None:
        if value is not None:
            _metric(name).set(float(value), tags=self.tags)

    def observe(self, name: str, value: float) -> None:
        _metric(name).observe(float(value), tags=self.tags)

    def train_step(self, metrics: dict, step_seconds: float) -> None:
        """A logged training step (train: tokens/s; train-vq: images/s; MFU where the GPU is known)."""
        self.set("painter_train_step", metrics["step"])
        self.set("painter_train_loss", metrics["loss"])
        self.set("painter_train_tokens_per_second", metrics.get("tokens_per_second", metrics.get("images_per_second")))
        self.set("painter_train_mfu", metrics.get("mfu"))
        self.observe("painter_train_step_seconds", step_seconds)

    def rejected(self, counts: dict[str, int]) -> None:
        """Rejected rows by reason, each reason without its per-row detail (`short_reason`)."""
        short: dict[str, int] = {}
        for reason, n in counts.items():
            short[short_reason(reason)] = short.get(short_reason(reason), 0) + n
        for reason, n in short.items():
            self.add("painter_rows_rejected", n, reason=reason)


def short_reason(reason: str) -> str:
    """A reason without what names the row ("expected 3 tab-separated fields (got 1)" -> its start)."""
    return reason.split(" (")[0].split(": ")[0].strip() or "unknown"


def rejected_reasons(folder: str, storage) -> dict[str, int]:
    """How many rejected rows written under `folder` (Parquet) have each `reason`."""
    import pyarrow.parquet as pq

    fs, path = storage.fs(folder, fresh=True)
    reasons: list[str] = []
    for name in sorted(fs.find(path)) if fs.exists(path) else []:
        if name.endswith(".parquet"):
            with fs.open(name, "rb") as f:
                reasons += pc.drop_null(pq.read_table(f, columns=["reason"]).column("reason")).to_pylist()
    return {reason: reasons.count(reason) for reason in set(reasons)}
