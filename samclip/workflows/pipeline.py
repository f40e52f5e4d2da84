"""The whole pipeline: curate → precompute → stage 1 → stage 2 sweep → stage 3 → evaluate → register.

The evaluate step always scores agreement with the teachers on the manifest's held-out images;
when ``evaluate`` names ground-truth datasets (the ``shapes`` profile does), it also scores the
final model on them, and both sets of metrics are registered with the model.

Run with ``samclip run --profile smoke`` (``make run``), or as the ``samclip-pipeline``
deployment of ``prefect.yaml``. Every step reuses what storage already contains, so a rerun
after a failure continues where the first run stopped. A retry of the same flow run also
reuses the persisted results of the steps that completed (see ``caching``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from samclip.config import dump_config, load_config
from samclip.tasks import storage
from samclip.tasks.naming import stage_run_name
from samclip.workflows import steps
from samclip.workflows.sweep_flow import SweepOutputs, sweep_flow


@dataclass
class PipelineOutputs:
    profile: str
    config_uri: str
    sweep: SweepOutputs
    stage3: Any
    evaluation: Any
    registered: Any
    final_checkpoint: str
    datasets: Any = None  # the ground-truth evaluation, when ``evaluate`` names datasets
    random_teachers: bool = False  # the profile's teachers have random weights (smoke)
    timings: dict[str, float] = field(default_factory=dict)
    flow_started: float = 0.0


@flow(name="samclip-pipeline", retries=1, retry_delay_seconds=60, persist_result=True)
def pipeline_flow(profile: str = "smoke", overrides: list[str] | None = None) -> PipelineOutputs:
    flow_started = time.time()
    config = load_config(profile, overrides)
    config_uri = config.uri("config.yaml")
    storage.write_text(config_uri, dump_config(config))

    swept = sweep_flow(profile, overrides)
    timings = dict(swept.timings)
    data = swept.data
    stage_data = data.stage_data()
    best_checkpoint = swept.sweep.best["checkpoint_uri"]

    stage3 = None
    final_checkpoint = best_checkpoint
    if config.train.run_stage3:
        started = time.monotonic()
        stage3 = steps.train_stage(config, 3, stage_data, best_checkpoint, stage_run_name(config, 3))
        timings["stage3"] = time.monotonic() - started
        final_checkpoint = stage3.checkpoint_uri

    started = time.monotonic()
    evaluation = steps.evaluate_model(config, final_checkpoint, data.manifest_uri, data.features, "final")
    timings["evaluate"] = time.monotonic() - started
    datasets = None
    if config.evaluate.has_datasets:
        started = time.monotonic()
        datasets = steps.evaluate_on_datasets(config, final_checkpoint, "final-datasets")
        timings["evaluate_datasets"] = time.monotonic() - started

    lineage = {
        "profile": config.profile,
        "manifest_uri": data.manifest_uri,
        "teacher_fingerprints": {
            "sam": data.teachers.sam_fingerprint,
            "clip": data.teachers.clip_fingerprint,
        },
        "features": data.features,
        "stage1_checkpoint": swept.stage1.checkpoint_uri,
        "stage2_checkpoint": best_checkpoint,
        "stage3_checkpoint": stage3.checkpoint_uri if stage3 else None,
        "sweep_table": swept.sweep.table_uri,
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
        "ray_job_ids": [job for job in [data.ray.get("job_id")] if job],
        "ray_address": data.ray.get("address"),
    }
    started = time.monotonic()
    registered = steps.register_model(config, final_checkpoint, evaluation, lineage, datasets)
    timings["register"] = time.monotonic() - started

    steps.publish_artifacts(evaluation, swept.sweep, registered, datasets)

    return PipelineOutputs(
        profile=config.profile,
        config_uri=config_uri,
        sweep=swept,
        stage3=stage3,
        evaluation=evaluation,
        registered=registered,
        final_checkpoint=final_checkpoint,
        datasets=datasets,
        random_teachers=config.teachers.random,
        timings=timings,
        flow_started=flow_started,
    )
