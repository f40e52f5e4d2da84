"""Ray Tune over stage 2: each trial is a Ray Train job with sampled StageConfig values.

Under Ray Train V2 (Ray 2.60), Tune cannot run a ``TorchTrainer`` as a trainable. Each trial
is therefore a function that calls ``run_stage`` with ``TuneReportCallback``, which forwards
every report of the training job to Tune. Trials are compared on two objectives:

- CLIP objective: ``val/clip_similarity``, the mean cosine similarity of the student's CLIP
  embedding with the CLIP teacher's (1 - L_CLIP) on the val split;
- SAM objective: ``val/sam_iou``, the mean IoU of the student's masks with the SAM teacher's for
  the same prompts on the val split.

The winner maximises ``clip_weight * clip + sam_weight * sam``. The table lists every trial and
the plot marks the Pareto front of the two objectives.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from samclip.config import PipelineConfig, SearchDim, StageConfig
from samclip.tasks import storage
from samclip.tasks.train import uri_from_storage_path
from samclip.tasks.train_data import StageData

logger = logging.getLogger(__name__)

CLIP_OBJECTIVE = "val/clip_similarity"
SAM_OBJECTIVE = "val/sam_iou"
SCORE_METRIC = "val/score"  # computed by the training loop with the sweep's weights
TABLE_FILE = "trials.parquet"
CSV_FILE = "trials.csv"
PLOT_FILE = "pareto.png"


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: the trial table, the trade-off plot and the winner."""

    name: str
    table_uri: str  # Parquet; a CSV copy sits beside it
    csv_uri: str
    plot_uri: str
    best: dict[str, Any]  # params, checkpoint_uri, score, clip_objective, sam_objective
    trials: list[dict[str, Any]]
    seconds: float


def build_search_space(space: dict[str, SearchDim]) -> dict[str, Any]:
    """Turn the configured dimensions into Tune's search space; keys must be StageConfig fields."""
    from ray import tune

    unknown = sorted(set(space) - set(StageConfig.model_fields))
    if unknown:
        raise ValueError(
            f"sweep.space has keys that are not StageConfig fields: {unknown}; "
            f"use some of {sorted(StageConfig.model_fields)}"
        )
    samplers = {
        "loguniform": lambda dim: tune.loguniform(dim.low, dim.high),
        "uniform": lambda dim: tune.uniform(dim.low, dim.high),
        "choice": lambda dim: tune.choice(dim.values),
        "grid": lambda dim: tune.grid_search(dim.values),
    }
    return {name: samplers[dim.kind](dim) for name, dim in space.items()}


def apply_params(stage_cfg: StageConfig, params: dict[str, Any]) -> StageConfig:
    """Return ``stage_cfg`` with sampled values, validated (so bad ranges fail in the trial)."""
    unknown = sorted(set(params) - set(StageConfig.model_fields))
    if unknown:
        raise ValueError(f"sampled parameters {unknown} are not StageConfig fields")
    return StageConfig.model_validate({**stage_cfg.model_dump(), **params})


def max_concurrent_trials(config: PipelineConfig, cluster_cpus: float) -> int:
    """Return the configured limit, or as many trials as fit on the cluster's CPUs at once."""
    if config.sweep.max_concurrent_trials is not None:
        return config.sweep.max_concurrent_trials
    per_trial = config.sweep.cpus_per_trial_driver + config.train.workers * config.train.cpus_per_worker
    return max(1, math.floor(cluster_cpus / per_trial + 1e-9))


def run_sweep(
    config: PipelineConfig, data: StageData, stage1_checkpoint: str, name: str | None = None
) -> SweepResult:
    """Run stage 2 for every sampled configuration and rank the trials.

    ``name`` (by default ``naming.sweep_name(config)``) names the Tune experiment under
    ``config.uri("sweep")``. An interrupted sweep with the same name is restored: finished
    trials are kept and unfinished or failed ones run again, resuming their training runs.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from samclip.tasks.naming import sweep_name
    from samclip.tasks.ray_cluster import init_ray

    started = time.perf_counter()
    init_ray(config.ray)
    name = name or sweep_name(config)
    space = build_search_space(config.sweep.space)
    root = config.uri("sweep")
    experiment_uri = storage.join(root, name)
    filesystem, path = storage.pyarrow_filesystem(root, config.storage.endpoint_url)

    trainable = tune.with_parameters(
        _run_trial,
        config_json=config.model_dump(mode="json"),
        data=asdict(data),
        stage1_checkpoint=stage1_checkpoint,
        runs_uri=storage.join(experiment_uri, "runs"),
    )
    trainable = tune.with_resources(trainable, {"cpu": config.sweep.cpus_per_trial_driver})
    if config.sweep.scheduler == "asha":
        # The training loop reports "epoch". A max_t of one more than the stage's epochs keeps
        # ASHA from stopping a trial at its last epoch, before the trial's final report.
        scheduler = ASHAScheduler(
            time_attr="epoch", max_t=config.train.stage2.epochs + 1, grace_period=1, reduction_factor=2
        )
    else:
        scheduler = FIFOScheduler()
    concurrency = max_concurrent_trials(config, ray.cluster_resources().get("CPU", 1.0))
    tune_config = tune.TuneConfig(
        metric=SCORE_METRIC,
        mode="max",
        num_samples=config.sweep.num_samples,
        max_concurrent_trials=concurrency,
        scheduler=scheduler,
    )
    experiment_path = storage.join(path, name) if storage.local_path(root) is not None else f"{path}/{name}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        logger.info("restoring sweep %s from %s", name, experiment_uri)
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        logger.info(
            "sweep %s: %d samples, %d at a time, %s scheduler",
            name, config.sweep.num_samples, concurrency, config.sweep.scheduler,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune_config,
            run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=filesystem),
        )
    grid = tuner.fit()

    trials = [_trial_row(result, list(config.sweep.space), root) for result in grid]
    for row in trials:
        row["score"] = _score(config, row)
    table_uri, csv_uri = _write_table(trials, experiment_uri)
    plot_uri = plot_objectives(trials, storage.join(experiment_uri, PLOT_FILE), title=f"sweep {name}")
    best = _best(trials)
    seconds = time.perf_counter() - started
    logger.info("sweep %s: %d trials in %.0f s; best %s", name, len(trials), seconds, best)
    return SweepResult(name, table_uri, csv_uri, plot_uri, best, trials, seconds)


def _run_trial(
    params: dict[str, Any], config_json: dict, data: dict, stage1_checkpoint: str, runs_uri: str
) -> None:
    """Train stage 2 with the sampled values, reporting to Tune as it trains."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from samclip.tasks.train import run_stage

    config = PipelineConfig.model_validate(config_json)
    stage_cfg = apply_params(config.train.stage2, params)
    trial_id = tune.get_context().get_trial_id()
    result = run_stage(
        config,
        2,
        StageData(**data),
        stage1_checkpoint,
        run_name=f"trial-{trial_id}",
        stage_config=stage_cfg,
        callbacks=[TuneReportCallback()],
        storage_uri=runs_uri,
    )
    # The last report carries the checkpoint URI, which the sweep's table lists.
    tune.report({**result.metrics, "checkpoint_uri": result.checkpoint_uri})


def _trial_row(result: Any, param_names: list[str], root: str) -> dict[str, Any]:
    metrics = result.metrics or {}
    checkpoint_uri = metrics.get("checkpoint_uri")
    if checkpoint_uri is None and metrics.get("checkpoint_path"):
        # stopped by the scheduler before its final report: the last checkpoint Tune saw
        checkpoint_uri = uri_from_storage_path(root, metrics["checkpoint_path"])
    if result.error is not None:
        status = "error"
    elif metrics.get("checkpoint_uri"):
        status = "completed"
    else:
        status = "stopped"
    config = result.config or {}
    return {
        "trial_id": metrics.get("trial_id"),
        **{name: config.get(name) for name in param_names},
        "clip_objective": _float(metrics.get(CLIP_OBJECTIVE)),
        "sam_objective": _float(metrics.get(SAM_OBJECTIVE)),
        "val_loss": _float(metrics.get("val/loss")),
        "step": _float(metrics.get("step")),
        "status": status,
        "error": None if result.error is None else str(result.error).splitlines()[0][:500],
        "checkpoint_uri": checkpoint_uri,
        "params": {name: config.get(name) for name in param_names},
    }


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _score(config: PipelineConfig, row: dict[str, Any]) -> float | None:
    if row["clip_objective"] is None or row["sam_objective"] is None:
        return None
    return config.sweep.clip_weight * row["clip_objective"] + config.sweep.sam_weight * row["sam_objective"]


def _best(trials: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [
        row
        for row in trials
        if row["score"] is not None and row["checkpoint_uri"] and row["status"] != "error"
    ]
    if not scored:
        raise RuntimeError(
            f"no sweep trial finished with both objectives ({len(trials)} trials, statuses "
            f"{sorted({row['status'] for row in trials})}); see the trial errors in the table"
        )
    winner = max(scored, key=lambda row: row["score"])
    return {
        "params": winner["params"],
        "checkpoint_uri": winner["checkpoint_uri"],
        "score": winner["score"],
        "clip_objective": winner["clip_objective"],
        "sam_objective": winner["sam_objective"],
        "trial_id": winner["trial_id"],
    }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Mark the points that no other point beats on both objectives (both maximised)."""
    marks = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox >= x and oy >= y) and (ox > x or oy > y) for j, (ox, oy) in enumerate(points) if j != i
        )
        marks.append(not dominated)
    return marks


def _write_table(trials: list[dict[str, Any]], experiment_uri: str) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rows = [{k: v for k, v in row.items() if k != "params"} for row in trials]
    table = pa.Table.from_pylist(rows)
    table_uri = storage.join(experiment_uri, TABLE_FILE)
    csv_uri = storage.join(experiment_uri, CSV_FILE)
    storage.write_parquet(table, table_uri)
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    storage.write_bytes(csv_uri, buffer.getvalue())
    return table_uri, csv_uri


def plot_objectives(trials: list[dict[str, Any]], png_uri: str, title: str) -> str:
    """Scatter the CLIP objective against the SAM objective; the Pareto front is joined and ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in trials if row["clip_objective"] is not None and row["sam_objective"] is not None]
    points = [(row["clip_objective"], row["sam_objective"]) for row in done]
    front = pareto_front(points)
    figure, axis = plt.subplots(figsize=(6, 5))
    if points:
        xs, ys = zip(*points)
        axis.scatter(xs, ys, color="tab:blue", label="trial")
        front_points = sorted(p for p, on_front in zip(points, front) if on_front)
        fx, fy = zip(*front_points)
        axis.plot(fx, fy, "o--", color="tab:red", mfc="none", markersize=12, label="Pareto front")
        for row, (x, y) in zip(done, points):
            label = ", ".join(f"{k}={_short(v)}" for k, v in row["params"].items())
            axis.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))
        axis.legend()
    else:
        axis.text(0.5, 0.5, "no trial finished", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("CLIP objective: val cosine similarity to the CLIP teacher")
    axis.set_ylabel("SAM objective: val mask IoU with the SAM teacher")
    axis.set_title(title)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    storage.write_bytes(png_uri, buffer.getvalue())
    return png_uri


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
