"""Prefect tasks that wrap one pipeline step each; the flows only sequence these.

Steps that only read or write storage retry with backoff, because a retry of an idempotent
write is safe. Compute steps do not retry blindly: Ray Train and Ray Data already retry failed
workers, and every compute step resumes from what storage already holds when it is rerun.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from samclip.config import PipelineConfig

STORAGE_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}


@task(name="connect-ray")
def connect_ray(config: PipelineConfig) -> dict[str, Any]:
    from samclip.tasks.ray_cluster import init_ray

    started = time.monotonic()
    info = init_ray(config.ray)
    info["seconds"] = round(time.monotonic() - started, 2)
    get_run_logger().info("Ray %s at %s in %.1f s", info["started"], info["address"], info["seconds"])
    return info


@task(name="prepare-teachers", **STORAGE_RETRIES)
def prepare_teachers(config: PipelineConfig):
    from samclip.tasks.teachers import ensure_teachers

    files = ensure_teachers(config)
    get_run_logger().info(
        "teachers ready: sam %s, clip %s", files.sam_fingerprint, files.clip_fingerprint
    )
    return files


@task(name="curate")
def curate_images(config: PipelineConfig):
    from samclip.tasks.curate import curate

    result = curate(config)
    get_run_logger().info("curated: %s", result.counts)
    return result


@task(name="precompute")
def precompute_features(config: PipelineConfig, manifest_uri: str, teachers):
    from samclip.tasks.precompute import precompute

    result = precompute(config, manifest_uri, teachers)
    get_run_logger().info("precompute computed %s, reused %s", result.computed, result.reused)
    return result


@task(name="train-stage")
def train_stage(config: PipelineConfig, stage: int, data, init_checkpoint: str | None, run_name: str):
    from samclip.tasks.train import run_stage

    result = run_stage(config, stage, data, init_checkpoint=init_checkpoint, run_name=run_name)
    get_run_logger().info("stage %d done: %s", stage, result.checkpoint_uri)
    return result


@task(name="sweep")
def sweep_stage2(config: PipelineConfig, data, stage1_checkpoint: str, name: str):
    from samclip.tasks.sweep import run_sweep

    result = run_sweep(config, data, stage1_checkpoint, name=name)
    get_run_logger().info("sweep best: %s", result.best)
    return result


@task(name="evaluate")
def evaluate_model(config: PipelineConfig, checkpoint_uri: str, manifest_uri: str, features: dict, name: str):
    from samclip.tasks.evaluate import evaluate

    result = evaluate(config, checkpoint_uri, manifest_uri, features, name=name)
    get_run_logger().info("evaluation: %s", result.metrics)
    return result


@task(name="register", **STORAGE_RETRIES)
def register_model(config: PipelineConfig, checkpoint_uri: str, evaluation, lineage: dict):
    from samclip.tasks.register import register

    result = register(config, checkpoint_uri, evaluation, lineage)
    get_run_logger().info("registered %s version %s (@%s)", result.name, result.version, result.alias)
    return result
