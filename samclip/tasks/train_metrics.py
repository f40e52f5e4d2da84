"""A training run's metrics: ``metrics.jsonl``, the MLflow run, the ETA and the loss-curve plot.

Each line is one JSON object with ``kind`` (``train`` for a logged step, ``eval`` for a
checkpoint report), ``step``, ``epoch`` and namespaced metrics (``train/...``, ``val/...``,
``lr/...``). Rank 0 rewrites the whole file at each checkpoint, because object stores cannot
append. A resumed run drops the lines past its restored step, so each step appears once.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

from samclip.tasks import storage

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def read_metrics_jsonl(uri: str, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """Read the lines of a metrics file, optionally only those at or before ``up_to_step``."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    if up_to_step is None:
        return lines
    return [line for line in lines if line.get("step", 0) <= up_to_step]


def write_metrics_jsonl(uri: str, lines: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
    storage.write_text(uri, text)


def plot_loss_curve(metrics_uri: str, png_uri: str, title: str) -> str:
    """Draw train and val losses against the optimiser step into a PNG; returns ``png_uri``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics_jsonl(metrics_uri)
    figure, axis = plt.subplots(figsize=(7, 4))
    curves = (
        ("train", "train/loss", "-"),
        ("train", "train/clip_cosine", ":"),
        ("eval", "val/loss", "o-"),
        ("eval", "val/clip_cosine", "s--"),
        ("train", "train/sam", "-."),
        ("eval", "val/sam", "^--"),
    )
    for kind, key, style in curves:
        points = [(line["step"], line[key]) for line in lines if line.get("kind") == kind and key in line]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, style, label=key)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    if axis.has_data():
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=axis.transAxes)

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(png_uri, buffer.getvalue())
    return png_uri


def format_eta(seconds: float) -> str:
    """Format a remaining time as ``H:MM:SS``."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MlflowMetrics:
    """Metrics of one training run in MLflow, sent from rank 0 in batches at each checkpoint.

    The MLflow run is found by the tag ``samclip.run_name``, so a resumed training run keeps
    logging into the same MLflow run. Each flush also sets the tag ``samclip.logged_step`` to
    the highest step logged so far. With ``resumed``, metrics at or below the step found there
    are dropped. A run resumed from a checkpoint older than its last flush repeats those steps,
    and MLflow would otherwise keep both values of each. A run that starts from step 0 logs
    every step. A failure to reach the tracking server is logged and never stops training.
    """

    RUN_NAME_TAG = "samclip.run_name"
    LOGGED_STEP_TAG = "samclip.logged_step"

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None,
        run_name: str,
        resumed: bool = False,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # another process created it first
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{self.RUN_NAME_TAG}` = '{run_name}'", max_results=1
        )
        self.logged_step = 0  # metrics at this step or below are in MLflow already
        if runs:
            self.run_id = runs[0].info.run_id
            if resumed:
                self.logged_step = int(runs[0].data.tags.get(self.LOGGED_STEP_TAG, 0))
        else:
            tags = {self.RUN_NAME_TAG: run_name}
            self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        self.pending: list[Any] = []
        self.failures = 0

    def add(self, metrics: dict[str, Any], step: int) -> None:
        """Queue the numeric metrics of ``step`` for the next flush, unless MLflow has that step."""
        from mlflow.entities import Metric

        if step <= self.logged_step:
            return
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.pending.append(Metric(key, float(value), now, int(step)))

    def flush(self) -> None:
        """Send the queued metrics, and record the highest step sent in the run's tags."""
        from mlflow.entities import RunTag

        pending, self.pending = self.pending, []
        if not pending:
            return
        logged_step = max(self.logged_step, *(metric.step for metric in pending))
        try:
            for start in range(0, len(pending), 1000):  # MLflow's limit of metrics per batch
                self.client.log_batch(self.run_id, metrics=pending[start : start + 1000])
            # Set after the metrics, so a failure in between repeats steps rather than losing them.
            self.client.log_batch(self.run_id, tags=[RunTag(self.LOGGED_STEP_TAG, str(logged_step))])
            self.logged_step = logged_step
        except Exception as error:  # noqa: BLE001  (metrics must not stop training)
            self.failures += 1
            if self.failures <= 3:
                logger.warning("logging %d metrics to MLflow run %s failed: %s", len(pending), self.run_id, error)

    def finish(self) -> None:
        self.flush()
        try:
            self.client.set_terminated(self.run_id)
        except Exception as error:  # noqa: BLE001
            logger.warning("ending MLflow run %s failed: %s", self.run_id, error)
