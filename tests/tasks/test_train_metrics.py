"""Metrics of a training run in MLflow: a resumed run logs each step once."""

from __future__ import annotations

import pytest

from samclip.tasks.train_metrics import MlflowMetrics


@pytest.fixture()
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((metric.step, metric.value) for metric in history)


def _metrics(tracking_uri: str, resumed: bool = True) -> MlflowMetrics:
    return MlflowMetrics(tracking_uri, "train-metrics-test", None, "stage2-run", resumed=resumed)


def test_resumed_run_skips_logged_steps(tracking_uri):
    first = _metrics(tracking_uri)
    for step in (1, 2, 3):
        first.add({"train/loss": float(step)}, step)
    first.add({"val/loss": 30.0}, 3)
    first.flush()
    # the attempt dies after step 4, before its next flush
    first.add({"train/loss": 4.0}, 4)

    # the next attempt resumes from a checkpoint at step 2, so it repeats steps 3 and 4
    resumed = _metrics(tracking_uri)
    assert resumed.run_id == first.run_id
    assert resumed.logged_step == 3
    for step in (3, 4, 5):
        resumed.add({"train/loss": 10.0 + step}, step)
    resumed.add({"val/loss": 33.0}, 3)
    resumed.add({"val/loss": 50.0}, 5)
    resumed.finish()

    losses = _history(tracking_uri, first.run_id, "train/loss")
    assert losses == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert _history(tracking_uri, first.run_id, "val/loss") == [(3, 30.0), (5, 50.0)]
    assert _metrics(tracking_uri).logged_step == 5


def test_fresh_start_logs_every_step(tracking_uri):
    first = _metrics(tracking_uri, resumed=False)
    first.add({"train/loss": 1.0}, 1)
    first.flush()
    assert first.logged_step == 1

    # the run's checkpoints were deleted, so training starts again from step 0
    again = _metrics(tracking_uri, resumed=False)
    assert again.run_id == first.run_id
    assert again.logged_step == 0
    again.add({"train/loss": 5.0}, 1)
    again.flush()
    assert _history(tracking_uri, first.run_id, "train/loss") == [(1, 1.0), (1, 5.0)]


def test_failed_flush_keeps_logged_step(tracking_uri, monkeypatch):
    metrics = _metrics(tracking_uri)
    metrics.add({"train/loss": 1.0}, 1)
    metrics.flush()

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(metrics.client, "log_batch", unreachable)
    metrics.add({"train/loss": 2.0}, 2)
    metrics.flush()  # logs a warning and keeps training
    assert metrics.failures == 1
    assert metrics.logged_step == 1
    assert _metrics(tracking_uri).logged_step == 1
