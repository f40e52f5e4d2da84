"""Ray Tune over stage 2: each trial is a Ray Train job with sampled StageConfig values.

Under Ray Train V2 (Ray 2.60), Tune cannot run a ``TorchTrainer`` as a trainable. Each trial
is therefore a function that calls ``run_stage`` from the stage-1 checkpoint with
``TuneReportCallback``, which forwards every report of the training job to Tune, so ASHA can
stop a trial between its validation reports. Trials are compared on two objectives (see
``sweep_report``): the CLIP objective ``val/clip_similarity`` and the SAM objective
``val/sam_iou``. The winner is chosen by ``sweep.selection``: a weighted score or a constraint.

A sweep lives in ``{root}/sweep/{name}/``: Tune's experiment state, the trials' training runs
under ``runs/``, ``sweep.json`` (the settings digest that owns the folder), the trial table
(Parquet, CSV, Markdown), ``pareto.png`` and ``winner.json``. A rerun with the same name and
settings restores the sweep (finished trials are kept); a different sweep is rejected instead of
overwriting the folder. Restoring reads the folder where it lies now, so it may have been moved.
"""

from __future__ import annotations

import contextlib
import os

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from samclip.config import PipelineConfig, SearchDim, StageConfig, SweepConfig
from samclip.tasks import storage
from samclip.tasks.sweep_report import (
    PLOT_FILE,
    WINNER_FILE,
    annotate,
    pareto_front,
    plot_objectives,
    select_winner,
    write_tables,
)
from samclip.tasks.train_data import StageData

logger = logging.getLogger(__name__)

CLIP_OBJECTIVE = "val/clip_similarity"
SAM_OBJECTIVE = "val/sam_iou"
SCORE_METRIC = "val/score"  # computed by the training loop with the sweep's weights
MANIFEST_FILE = "sweep.json"
RUNS_DIR = "runs"  # trials' Ray Train runs, inside the sweep folder

__all__ = [
    "SweepResult", "apply_params", "build_search_space", "max_concurrent_trials", "pareto_front",
    "run_sweep", "sweep_digest",
]  # fmt: skip


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: the trial table, the trade-off plot and the winner."""

    name: str
    table_uri: str  # Parquet; CSV and Markdown copies sit beside it
    csv_uri: str
    plot_uri: str
    best: dict[str, Any]  # params, checkpoint, checkpoint_uri, score, objectives, rule
    trials: list[dict[str, Any]]
    seconds: float
    markdown_uri: str = ""
    winner_uri: str = ""


def build_search_space(space: dict[str, SearchDim], searcher: str = "random", grid_points: int = 3) -> dict[str, Any]:
    """Turn the configured dimensions into Tune's search space; keys must be StageConfig fields.

    With ``searcher="grid"`` every dimension becomes a grid: ``choice`` and ``grid`` values as
    they are, ``loguniform`` ranges as ``grid_points`` geometrically spaced values and ``uniform``
    ranges as evenly spaced ones.
    """
    from ray import tune

    unknown = sorted(set(space) - set(StageConfig.model_fields))
    if unknown:
        raise ValueError(
            f"sweep.space has keys that are not StageConfig fields: {unknown}; "
            f"use some of {sorted(StageConfig.model_fields)}"
        )
    if searcher == "grid":
        return {name: tune.grid_search(grid_values(dim, grid_points)) for name, dim in space.items()}
    samplers = {
        "loguniform": lambda dim: tune.loguniform(dim.low, dim.high),
        "uniform": lambda dim: tune.uniform(dim.low, dim.high),
        "choice": lambda dim: tune.choice(dim.values),
        "grid": lambda dim: tune.grid_search(dim.values),
    }
    return {name: samplers[dim.kind](dim) for name, dim in space.items()}


def grid_values(dim: SearchDim, points: int) -> list[Any]:
    """Return the values a grid search tries for one dimension."""
    if dim.kind in ("choice", "grid"):
        return list(dim.values or [])
    spaced = np.geomspace if dim.kind == "loguniform" else np.linspace
    return [float(f"{value:.6g}") for value in spaced(dim.low, dim.high, points)]


def expected_trial_count(sweep: SweepConfig) -> int:
    """Return how many trials the sweep runs: num_samples times the size of its grid."""
    count = sweep.num_samples
    for dim in sweep.space.values():
        if sweep.searcher == "grid" or dim.kind == "grid":
            count *= len(grid_values(dim, sweep.grid_points))
    return count


def apply_params(stage_cfg: StageConfig, params: dict[str, Any]) -> StageConfig:
    """Return ``stage_cfg`` with sampled values, validated (so bad ranges fail in the trial)."""
    unknown = sorted(set(params) - set(StageConfig.model_fields))
    if unknown:
        raise ValueError(f"sampled parameters {unknown} are not StageConfig fields")
    return StageConfig.model_validate({**stage_cfg.model_dump(), **params})


def trial_resources(config: PipelineConfig) -> dict[str, float]:
    """Return the resources one trial uses at once: its driver's CPU share plus its Ray Train workers'."""
    train = config.train
    return {
        "CPU": config.sweep.cpus_per_trial_driver + train.workers * train.cpus_per_worker,
        "GPU": float(train.workers) if train.use_gpu else 0.0,
    }


def max_concurrent_trials(config: PipelineConfig, cluster: float | dict[str, float]) -> int:
    """Return the configured limit, or as many trials as fit on the cluster's CPUs and GPUs at once.

    ``sweep.reserved_cpus`` stay free for Ray Data's tasks, which need a whole CPU each.

    ``cluster`` is ``ray.cluster_resources()`` or, for CPUs alone, a number of CPUs.
    """
    if config.sweep.max_concurrent_trials is not None:
        return config.sweep.max_concurrent_trials
    available = {"CPU": float(cluster)} if isinstance(cluster, (int, float)) else dict(cluster)
    available["CPU"] = available.get("CPU", 0.0) - config.sweep.reserved_cpus
    fits = [
        math.floor(available.get(kind, 0.0) / need + 1e-9)
        for kind, need in trial_resources(config).items()
        if need > 0
    ]
    return max(1, min(fits))


def sweep_digest(config: PipelineConfig) -> str:
    """Return the digest of the settings that determine a sweep's trials (not where it is stored)."""
    from samclip.tasks.naming import digest, sweep_inputs

    return digest(sweep_inputs(config))


def claim_folder(config: PipelineConfig, experiment_uri: str, name: str) -> None:
    """Write ``sweep.json`` into a new sweep folder, or check that an existing one is this sweep.

    Raises:
        ValueError: the folder contains a sweep with other settings, which restoring would reuse
            (Tune restores the stored search space, not the new one).
    """
    manifest_uri = storage.join(experiment_uri, MANIFEST_FILE)
    expected = sweep_digest(config)
    if storage.exists(manifest_uri):
        found = storage.read_json(manifest_uri)
        if found.get("digest") != expected:
            raise ValueError(
                f"sweep folder {experiment_uri} contains sweep {found.get('name')!r} with settings "
                f"digest {found.get('digest')}, but this sweep's settings have digest {expected}; "
                "choose another sweep.name (or the default name, which carries the digest), or "
                "delete that folder to start over"
            )
        return
    if storage.list_files(experiment_uri):
        raise ValueError(
            f"sweep folder {experiment_uri} already contains files but no {MANIFEST_FILE}; "
            "choose another sweep.name or delete that folder"
        )
    storage.write_json(
        manifest_uri,
        {"name": name, "digest": expected, "space": config.model_dump(mode="json")["sweep"]},
    )


# Ray Tune 2.60 copies these from the driver's environment into every trial's runtime_env
# (ray/tune/execution/class_cache.py), and Ray's runtime-env agent logs runtime_envs with their
# values. Trials read credentials from their own node's environment instead.
_TUNE_PROPAGATED_CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECURITY_TOKEN",
    "AWS_SESSION_TOKEN",
)


@contextlib.contextmanager
def _credentials_hidden_from_tune():
    """Remove the AWS credentials from this process's environment while Tune starts trials.

    The driver's own S3 clients already hold their credentials (created before the sweep), and
    the variables are restored afterwards, even on errors.
    """
    saved = {name: os.environ.pop(name) for name in _TUNE_PROPAGATED_CREDENTIALS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_sweep(
    config: PipelineConfig,
    data: StageData,
    stage1_checkpoint: str,
    name: str | None = None,
    callbacks: list[Any] | None = None,
) -> SweepResult:
    """Run stage 2 for every sampled configuration, rank the trials and pick the winner.

    ``name`` (by default ``naming.sweep_name(config)``) names the Tune experiment under
    ``config.uri("sweep")``. An interrupted sweep with the same name is restored: finished
    trials are kept, and unfinished or failed ones run again, resuming their training runs.
    ``callbacks`` are Tune callbacks added to a new sweep's run config.
    """
    import ray
    from ray import tune

    from samclip.tasks.naming import sweep_name
    from samclip.tasks.ray_cluster import init_ray
    from samclip.tasks.train import prepare_mlflow

    started = time.perf_counter()
    init_ray(config.ray)
    name = name or sweep_name(config)
    root = config.uri("sweep")
    experiment_uri = storage.join(root, name)
    storage.configure_endpoint(config.storage.endpoint_url)
    claim_folder(config, experiment_uri, name)
    filesystem, path = storage.pyarrow_filesystem(root, config.storage.endpoint_url)
    if config.train.log_to_mlflow:
        prepare_mlflow(config)  # before the trials start logging to it at the same time

    trainable = tune.with_parameters(
        _run_trial,
        config_json=config.model_dump(mode="json"),
        data=asdict(data),
        stage1_checkpoint=stage1_checkpoint,
        runs_uri=storage.join(experiment_uri, RUNS_DIR),
    )
    trainable = tune.with_resources(trainable, {"cpu": config.sweep.cpus_per_trial_driver})
    experiment_path = f"{path.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        logger.info("restoring sweep %s from %s", name, experiment_uri)
        # NOTE: Tune 2.60 restarts every unfinished trial at once on restore, beyond
        # max_concurrent_trials. Their Ray Train worker groups then queue for CPUs and fail after
        # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default), counting against
        # train.max_failures; raise that variable for the cluster when many trials were unfinished.
        tuner = tune.Tuner.restore(
            experiment_path, trainable, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        concurrency = max_concurrent_trials(config, ray.cluster_resources())
        logger.info(
            "sweep %s: %s search, %d samples, %d at a time, %s scheduler on %s",
            name, config.sweep.searcher, config.sweep.num_samples, concurrency,
            config.sweep.scheduler, config.sweep.metric,
        )  # fmt: skip
        tuner = tune.Tuner(
            trainable,
            param_space=build_search_space(
                config.sweep.space, config.sweep.searcher, config.sweep.grid_points
            ),
            tune_config=tune.TuneConfig(
                metric=config.sweep.metric,
                mode=config.sweep.mode,
                num_samples=config.sweep.num_samples,
                max_concurrent_trials=concurrency,
                scheduler=build_scheduler(config),
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=path, storage_filesystem=filesystem, callbacks=callbacks
            ),
        )
    with _credentials_hidden_from_tune():
        grid = tuner.fit()

    trials = []
    rungs = asha_rungs(config)
    for result, (trial_id, tune_status) in zip(grid, _tune_trials(grid, len(grid))):
        row = _trial_row(result, list(config.sweep.space), experiment_uri, trial_id)
        time_value = (result.metrics or {}).get(config.sweep.asha.time_attr)
        if row["status"] == "stopped" and not any(_close(time_value, rung) for rung in rungs):
            # NOTE: Tune marks the trials it ends on an interrupt TERMINATED, like those ASHA
            # stops, so a trial without its final report that stopped off every rung is taken
            # as interrupted. One interrupted exactly at a rung is reported as stopped.
            row["status"] = "pending"
        if tune_status not in (None, "TERMINATED", "ERROR"):
            row["status"] = "pending"
        trials.append(row)
    trials.sort(key=lambda row: str(row["trial_id"]))
    finished = sum(row["status"] != "pending" for row in trials)
    expected = expected_trial_count(config.sweep)
    if finished < expected:
        # Tune ends early on SIGINT or SIGUSR1 and saves its state, without creating the
        # trials it had not started yet. Rerunning restores it.
        raise RuntimeError(
            f"sweep {name} was interrupted: {finished} of {expected} trials finished; "
            f"rerun the same command to resume it from {experiment_uri}"
        )
    annotate(trials, config.sweep)
    best = select_winner(trials, config.sweep)
    for row in trials:
        row["winner"] = row["trial_id"] == best["trial_id"]
    table_uri, csv_uri, md_uri = write_tables(trials, experiment_uri)
    plot_uri = plot_objectives(
        trials, storage.join(experiment_uri, PLOT_FILE), title=f"sweep {name}", winner_id=best["trial_id"]
    )
    winner_uri = storage.join(experiment_uri, WINNER_FILE)
    storage.write_json(winner_uri, best)
    seconds = time.perf_counter() - started
    counts = {status: sum(row["status"] == status for row in trials) for status in ("completed", "stopped", "error")}
    logger.info("sweep %s: %d trials %s in %.0f s; winner %s", name, len(trials), counts, seconds, best)
    return SweepResult(name, table_uri, csv_uri, plot_uri, best, trials, seconds, md_uri, winner_uri)


def build_scheduler(config: PipelineConfig) -> Any:
    """Return Tune's trial scheduler: FIFO, or ASHA on ``sweep.metric`` over ``sweep.asha.time_attr``."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.sweep.scheduler != "asha":
        return FIFOScheduler()
    asha = config.sweep.asha
    # ASHA stops every trial that reaches max_t. The default of one epoch more than the stage
    # has keeps it from cutting a trial at its last epoch, before the trial's final report.
    max_t = asha.max_t if asha.max_t is not None else config.train.stage2.epochs + 1
    return ASHAScheduler(
        time_attr=asha.time_attr,
        max_t=max_t,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
    )


def asha_rungs(config: PipelineConfig) -> list[float]:
    """Return the values of ``asha.time_attr`` at which ASHA may stop a trial ([] without ASHA)."""
    if config.sweep.scheduler != "asha":
        return []
    asha = config.sweep.asha
    max_t = asha.max_t if asha.max_t is not None else config.train.stage2.epochs + 1
    rungs, milestone = [], asha.grace_period
    while milestone < max_t:
        rungs.append(milestone)
        milestone *= asha.reduction_factor
    return rungs + [max_t]


def _close(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and math.isclose(value, target, rel_tol=1e-6, abs_tol=1e-6)


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
    # The last report carries the checkpoint, relative to the sweep folder, for the table.
    tune.report({**result.metrics, "checkpoint": _relative_checkpoint(result.checkpoint_uri)})


def _relative_checkpoint(location: str | None) -> str | None:
    """Return a trial checkpoint's path relative to its sweep folder: ``runs/trial-.../checkpoint_...``."""
    if not location:
        return None
    marker = f"/{RUNS_DIR}/trial-"
    if marker not in location:
        return None
    return f"{RUNS_DIR}/trial-{location.rsplit(marker, 1)[1]}"


def _trial_row(result: Any, param_names: list[str], experiment_uri: str, trial_id: str | None = None) -> dict[str, Any]:
    metrics = result.metrics or {}
    if result.error is not None:
        status = "error"
    elif metrics.get("checkpoint"):
        status = "completed"
    else:
        status = "stopped"  # ended by the scheduler before its final report
    # a stopped trial's last checkpoint is the one Tune saw with its last report
    checkpoint = metrics.get("checkpoint") or _relative_checkpoint(metrics.get("checkpoint_path"))
    config = result.config or {}
    return {
        "trial_id": trial_id or metrics.get("trial_id"),
        **{name: config.get(name) for name in param_names},
        "clip_objective": _float(metrics.get(CLIP_OBJECTIVE)),
        "sam_objective": _float(metrics.get(SAM_OBJECTIVE)),
        "val_loss": _float(metrics.get("val/loss")),
        "epoch": _float(metrics.get("epoch")),
        "step": _float(metrics.get("step")),
        "status": status,
        "error": None if result.error is None else str(result.error).splitlines()[0][:500],
        "checkpoint": checkpoint,
        "checkpoint_uri": storage.join(experiment_uri, checkpoint) if checkpoint else None,
        "params": {name: config.get(name) for name in param_names},
    }


def _tune_trials(grid: Any, count: int) -> list[tuple[str | None, str | None]]:
    """Return (trial id, Tune status) for each result of ``grid``, in the grid's order.

    NOTE: ResultGrid has no public accessor for trial ids and statuses in Ray 2.60. It builds
    its results from ``_experiment_analysis.trials`` in that order, which this reads; without
    that attribute every pair is (None, None).
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    tune_trials = list(getattr(analysis, "trials", None) or [])
    if len(tune_trials) != count:
        return [(None, None)] * count
    return [(trial.trial_id, trial.status) for trial in tune_trials]


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
