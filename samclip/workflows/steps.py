"""Prefect tasks that wrap one pipeline step each; the flows only sequence these.

Steps that only read or write storage retry with backoff, because a retry of an idempotent
write is safe. Compute steps do not retry blindly: Ray Train and Ray Data already retry failed
workers, and every compute step resumes from what storage already holds when it is rerun.

Compute steps are cached within one root flow run (``caching.STEP_CACHE``) and persist their
results, so a flow retried after a late failure returns the completed steps' results instead
of running them again. The accelerator-heavy steps carry the ``ACCELERATOR_TAG`` tag: a
platform team bounds how many run at once across all flow runs with a tag concurrency limit,
``prefect concurrency-limit create samclip-accelerator 1``. Without a limit the tag does nothing.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from samclip.config import PipelineConfig
from samclip.workflows.caching import STEP_CACHE

STORAGE_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}
ACCELERATOR_TAG = "samclip-accelerator"
# persisted results are what a retried flow run reads back instead of rerunning a step
CACHED = {"cache_policy": STEP_CACHE, "persist_result": True}


@task(name="connect-ray")
def connect_ray(config: PipelineConfig) -> dict[str, Any]:
    from samclip.tasks.ray_cluster import current_job_id, init_ray

    started = time.monotonic()
    info = init_ray(config.ray)
    info["seconds"] = round(time.monotonic() - started, 2)
    info["job_id"] = current_job_id()
    get_run_logger().info("Ray %s at %s in %.1f s", info["started"], info["address"], info["seconds"])
    return info


@task(name="prepare-teachers", **STORAGE_RETRIES, **CACHED)
def prepare_teachers(config: PipelineConfig):
    from samclip.tasks.teachers import ensure_teachers

    files = ensure_teachers(config)
    get_run_logger().info(
        "teachers ready: sam %s, clip %s", files.sam_fingerprint, files.clip_fingerprint
    )
    return files


@task(name="curate", **CACHED)
def curate_images(config: PipelineConfig):
    from samclip.tasks.curate import curate

    result = curate(config)
    get_run_logger().info("curated: %s", result.counts)
    return result


@task(name="precompute", tags=[ACCELERATOR_TAG], **CACHED)
def precompute_features(config: PipelineConfig, manifest_uri: str, teachers):
    from samclip.tasks.precompute import precompute

    result = precompute(config, manifest_uri, teachers)
    get_run_logger().info("precompute computed %s, reused %s", result.computed, result.reused)
    return result


@task(name="train-stage", tags=[ACCELERATOR_TAG], **CACHED)
def train_stage(config: PipelineConfig, stage: int, data, init_checkpoint: str | None, run_name: str):
    from samclip.tasks.train import run_stage

    result = run_stage(config, stage, data, init_checkpoint=init_checkpoint, run_name=run_name)
    get_run_logger().info("stage %d done: %s", stage, result.checkpoint_uri)
    return result


@task(name="sweep", tags=[ACCELERATOR_TAG], **CACHED)
def sweep_stage2(config: PipelineConfig, data, stage1_checkpoint: str, name: str):
    from samclip.tasks.sweep import run_sweep

    result = run_sweep(config, data, stage1_checkpoint, name=name)
    get_run_logger().info("sweep best: %s", result.best)
    return result


@task(name="evaluate", **CACHED)
def evaluate_model(config: PipelineConfig, checkpoint_uri: str, manifest_uri: str, features: dict, name: str):
    from samclip.tasks.evaluate import evaluate

    result = evaluate(config, checkpoint_uri, manifest_uri, features, name=name)
    get_run_logger().info("evaluation: %s", result.metrics)
    return result


@task(name="evaluate-datasets", **CACHED)
def evaluate_on_datasets(config: PipelineConfig, checkpoint_uri: str, name: str):
    """Score a checkpoint against the ground truth of the datasets in ``evaluate``."""
    from samclip.tasks.eval_suite import evaluate_datasets

    result = evaluate_datasets(config, checkpoint_uri, name=name)
    get_run_logger().info("dataset evaluation: %s", result.metrics)
    return result


# Registering is not idempotent (each call creates a model version), so the task does not retry
# on its own. NOTE: a retry of the whole flow after MLflow created the version, but before the
# task returned, registers one more version with the same files.
@task(name="register")
def register_model(config: PipelineConfig, checkpoint_uri: str, evaluation, lineage: dict, datasets=None):
    from samclip.tasks.register import register

    result = register(config, checkpoint_uri, evaluation, lineage, datasets=datasets)
    get_run_logger().info("registered %s version %s (@%s)", result.name, result.version, result.alias)
    return result


@task(name="publish-artifacts", retries=2, retry_delay_seconds=5)
def publish_artifacts(evaluation, sweep, registered, datasets=None) -> list[str]:
    """Publish the evaluation tables, links to overlays and plots, and the registered version."""
    from samclip.workflows.artifacts import publish_run_artifacts

    ids = publish_run_artifacts(evaluation, sweep, registered, datasets)
    get_run_logger().info("published %d Prefect artifacts", len(ids))
    return ids
