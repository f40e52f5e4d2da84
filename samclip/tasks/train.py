"""Training stages 1-3 as Ray Train jobs: the driver side.

``run_stage`` indexes the manifest and the teacher feature shards, starts a ``TorchTrainer``
whose workers run ``train_loop.train_loop_per_worker``, and returns the final checkpoint with
the stage's metrics. Runs live under ``{train root}/{run_name}/``: Ray Train's checkpoints,
``metrics.jsonl``, ``loss_curve.png`` and ``result.json``. A run name that already has a
``result.json`` returns that result without training again. A run name without one resumes
from its last checkpoint, because Ray Train restores a run by name: this is how a rerun after
a killed driver continues. Worker failures restart the worker group from the last checkpoint
up to ``train.max_failures`` times.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from samclip.config import PipelineConfig, StageConfig, dump_config
from samclip.tasks import storage
from samclip.tasks.train_data import StageData, StageTables, build_stage_tables
from samclip.tasks.train_loop import train_loop_per_worker
from samclip.tasks.train_metrics import LOSS_CURVE_FILE, METRICS_FILE, plot_loss_curve
from samclip.tasks.train_settings import LoopSettings
from samclip.tasks.train_state import TEST_ENV_VARS
from samclip.tasks.train_steps import check_stage

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
INPUTS_FILE = "inputs.json"  # the data and starting checkpoint of the run's first start

__all__ = ["StageData", "StageResult", "run_stage", "stage_config_for"]


@dataclass(frozen=True)
class StageResult:
    """Outputs of a finished stage."""

    run_name: str
    checkpoint_uri: str  # the final student checkpoint folder
    metrics: dict[str, float]  # the last reported metrics: train/..., val/..., lr/..., step, epoch
    metrics_jsonl_uri: str
    loss_curve_png_uri: str
    seconds: float


def stage_config_for(config: PipelineConfig, stage: int) -> StageConfig:
    check_stage(stage)
    return getattr(config.train, f"stage{stage}")


def run_stage(
    config: PipelineConfig,
    stage: int,
    data: StageData,
    init_checkpoint: str | None,
    run_name: str,
    stage_config: StageConfig | None = None,
    callbacks: list[Any] | None = None,
    storage_uri: str | None = None,
) -> StageResult:
    """Train one stage with Ray Train and return its final checkpoint and metrics.

    Args:
        init_checkpoint: the previous stage's student checkpoint; None builds the student from
            the SAM teacher (the usual start of stage 1).
        run_name: a stable name; the same name resumes or returns the same run.
        stage_config: overrides ``config.train.stage{stage}`` (the sweep passes sampled values).
        callbacks: Ray Train user callbacks, such as Tune's ``TuneReportCallback``.
        storage_uri: the parent folder of run folders, ``config.uri("train")`` by default.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from samclip.tasks.ray_cluster import init_ray, loopback_environment
    from samclip.tasks.teachers import ensure_teachers

    started = time.perf_counter()
    check_stage(stage)
    stage_cfg = stage_config or stage_config_for(config, stage)
    root = storage_uri or config.uri("train")
    run_uri = storage.join(root, run_name)
    storage.configure_endpoint(config.storage.endpoint_url)

    result_uri = storage.join(run_uri, RESULT_FILE)
    _check_same_inputs(run_uri, run_name, data, init_checkpoint)
    if storage.exists(result_uri):
        logger.info("stage %d run %s is complete; reusing %s", stage, run_name, result_uri)
        return StageResult(**storage.read_json(result_uri))

    # data and settings for the workers
    init_ray(config.ray)
    tables = build_stage_tables(data, stage)
    teacher_files = ensure_teachers(config)
    settings = _loop_settings(config, stage, stage_cfg, tables, init_checkpoint, run_uri, teacher_files)
    settings.mlflow = _mlflow_settings(config, run_name)
    logger.info(
        "stage %d run %s: images %s, %d steps",
        stage, run_name, ", ".join(f"{k} {v}" for k, v in tables.counts.items()), settings.total_steps,
    )

    # The trainer. The datasets hold only the index, and the workers read images and features.
    # Every worker gets each dataset whole and keeps its own rows (see train_sharding).
    filesystem, path = _train_storage(root, config.storage.endpoint_url)
    datasets = {"train": ray.data.from_arrow(tables.train), "val": ray.data.from_arrow(tables.val)}
    if tables.train_sam is not None:
        datasets["train_sam"] = ray.data.from_arrow(tables.train_sam)
    # The workers of a running cluster do not see this process's later environment changes:
    # they get the S3 settings, the loopback settings and the test failure hook explicitly.
    worker_env = {**loopback_environment(), **storage.worker_environment()}
    worker_env.update({name: os.environ[name] for name in TEST_ENV_VARS if os.environ.get(name)})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        torch_config=TorchConfig(backend="nccl" if config.train.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.train.workers,
            use_gpu=config.train.use_gpu,
            resources_per_worker={"CPU": config.train.cpus_per_worker},
            placement_strategy=config.train.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": worker_env},
        ),
        datasets=datasets,
        dataset_config=_unsplit_ordered_data_config(),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"stage {stage} run {run_name} finished without a checkpoint: see the worker logs above"
        )

    # outputs beside the checkpoints
    metrics_uri = storage.join(run_uri, METRICS_FILE)
    png_uri = storage.join(run_uri, LOSS_CURVE_FILE)
    plot_loss_curve(metrics_uri, png_uri, title=f"stage {stage}: {run_name}")
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    stage_result = StageResult(
        run_name=run_name,
        checkpoint_uri=uri_from_storage_path(root, result.checkpoint.path),
        metrics=metrics,
        metrics_jsonl_uri=metrics_uri,
        loss_curve_png_uri=png_uri,
        seconds=time.perf_counter() - started,
    )
    storage.write_json(result_uri, asdict(stage_result))
    logger.info(
        "stage %d run %s done in %.0f s: %s", stage, run_name, stage_result.seconds,
        " ".join(f"{k} {v:.4f}" for k, v in stage_result.metrics.items() if k.startswith("val/")),
    )
    return stage_result


def _check_same_inputs(run_uri: str, run_name: str, data: StageData, init_checkpoint: str | None) -> None:
    """Record the run's inputs on its first start; raise if a later start names other inputs.

    Run names digest the settings, not the teacher files: a teacher file replaced at the same
    location changes the feature folders (keyed by the teacher's fingerprint) but not the name.
    Reusing or resuming the old run would then mix two teachers, so it is an error instead.
    """
    inputs = {
        "manifest_uri": data.manifest_uri,
        "clip_features_dir": data.clip_features_dir,
        "sam_features_dir": data.sam_features_dir,
        "init_checkpoint": init_checkpoint,
    }
    inputs_uri = storage.join(run_uri, INPUTS_FILE)
    if not storage.exists(inputs_uri):
        storage.write_json(inputs_uri, inputs)
        return
    recorded = storage.read_json(inputs_uri)
    changed = sorted(key for key in inputs if recorded.get(key) != inputs[key])
    if changed:
        differences = "; ".join(f"{key} was {recorded.get(key)}, now {inputs[key]}" for key in changed)
        raise ValueError(
            f"run {run_name} at {run_uri} was started with other inputs ({differences}), usually "
            "because a teacher file was replaced at the same location; remove that run folder to "
            "train it again, or restore the previous teacher file"
        )


def _train_storage(root: str, endpoint_url: str | None) -> tuple[Any, str]:
    """Return Ray Train's storage filesystem and path for the train root.

    Object stores get pyarrow's own S3 client with the credentials of this process, because Ray
    Train's controller reads and writes checkpoints through it in a process that does not see
    this one's environment.
    """
    if root.startswith("s3://"):
        return storage.pyarrow_s3_filesystem(endpoint_url), root[len("s3://"):].rstrip("/")
    return storage.pyarrow_filesystem(root, endpoint_url)


def _unsplit_ordered_data_config() -> Any:
    """Return a Ray Train DataConfig that gives every worker each whole dataset in index order.

    Ray Data's split hands out blocks as workers request them, so a restarted worker could get
    other rows. Each worker selects its own rows instead (``train_sharding``). Without
    preserve_order, Ray Data may also yield blocks in the order they finish.
    """
    import copy

    import ray.train
    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=[], execution_options=options)


def _mlflow_settings(config: PipelineConfig, run_name: str) -> dict[str, Any] | None:
    """Return where rank 0 logs metrics in MLflow, or None when MLflow logging is off."""
    if not config.train.log_to_mlflow:
        return None
    uri = config.resolve_uri(config.registry.tracking_uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if "://" in path:
            logger.warning(
                "metrics go to metrics.jsonl only: MLflow tracking URI %s puts SQLite on an object "
                "store; set registry.tracking_uri to a server or a local file", uri,
            )
            return None
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        uri = "sqlite:///" + os.path.abspath(path)
    location = config.resolve_uri(config.registry.artifact_root)
    if "://" not in location:
        location = "file://" + os.path.abspath(location)
    _create_experiment(uri, config.registry.experiment, location)
    return {
        "tracking_uri": uri,
        "experiment": config.registry.experiment,
        "artifact_location": location,
        "run_name": run_name,
    }


def prepare_mlflow(config: PipelineConfig) -> None:
    """Create the MLflow store and experiment once, before concurrent runs log to it.

    Sweep trials start at the same time; if each created a new SQLite store itself, they would
    race on creating its tables.
    """
    _mlflow_settings(config, "prepare")


def _create_experiment(tracking_uri: str, experiment: str, artifact_location: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_experiment_by_name(experiment) is None:
        try:
            client.create_experiment(experiment, artifact_location=artifact_location)
        except Exception as error:  # another process may have created it in between
            if client.get_experiment_by_name(experiment) is None:
                raise RuntimeError(f"could not create MLflow experiment {experiment!r} at {tracking_uri}") from error


def _loop_settings(
    config: PipelineConfig,
    stage: int,
    stage_cfg: StageConfig,
    tables: StageTables,
    init_checkpoint: str | None,
    run_uri: str,
    teacher_files: Any,
) -> LoopSettings:
    workers = config.train.workers
    # train_sharding deals each epoch's rows to workers in equal shares, leaving out the remainder.
    train_per_worker = tables.counts["train"] // workers
    if train_per_worker == 0:
        raise ValueError(
            f"{tables.counts['train']} train images cannot feed {workers} workers: lower train.workers"
        )
    sam_per_worker = tables.counts["train_sam"] // workers
    if stage == 2 and sam_per_worker == 0:
        raise ValueError(
            f"{tables.counts['train_sam']} train images with SAM features cannot feed {workers} "
            "workers: lower train.workers or precompute SAM features for more images"
        )
    student = config.student
    # the config written into each checkpoint shows the stage settings this run really used
    resolved = config.model_copy(deep=True)
    if hasattr(resolved.train, f"stage{stage}"):  # naive distillation (stage 4) has no section
        setattr(resolved.train, f"stage{stage}", stage_cfg)
    return LoopSettings(
        stage=stage,
        stage_config=stage_cfg.model_dump(mode="json"),
        seed=config.seed,
        arch=student.arch,
        student_options={
            "clip_head_depth": student.clip_head_depth,
            "pooling": student.pooling,
            "mlp_hidden_layers": student.mlp_hidden_layers,
        },
        embed_dim=tables.clip_spec.shape[0],
        teacher_files=teacher_files,
        init_checkpoint=init_checkpoint,
        run_uri=run_uri,
        steps_per_epoch=math.ceil(train_per_worker / stage_cfg.clip_batch_size),
        sam_batches_per_pass=math.ceil(sam_per_worker / stage_cfg.sam_batch_size) if stage == 2 else 0,
        clip_spec=tables.clip_spec,
        sam_spec=tables.sam_spec,
        val_has_sam=tables.counts["val_sam"] > 0,
        config_yaml=dump_config(resolved),
        max_pixels=config.data.max_pixels,
        endpoint_url=config.storage.endpoint_url,
        score_weights=(config.sweep.clip_weight, config.sweep.sam_weight),
        torch_threads=max(1, int(config.train.cpus_per_worker)),
        index_rows={name: tables.counts[name] for name in ("train", "train_sam", "val")},
        precision=_precision(config),
    )


def _precision(config: PipelineConfig) -> str:
    if config.train.precision == "auto":
        return "bf16" if config.train.use_gpu else "fp32"
    return config.train.precision


def uri_from_storage_path(root_uri: str, storage_path: str) -> str:
    """Turn a path on Ray Train's storage filesystem back into a URI like ``root_uri``."""
    if storage.local_path(root_uri) is not None:
        return storage_path
    protocol = root_uri.split("://", 1)[0]
    return f"{protocol}://{storage_path.lstrip('/')}"
