"""Researchers' comparison flow: data (reused), stage 1, then the baselines and SAM-CLIP side by side.

Run alone with ``samclip compare --profile smoke``. The comparison's Prefect task sits here
because no other flow uses it; stage 1 reuses ``steps.train_stage``, so it shares its run (and
its checkpoint) with the pipeline and the sweep flow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task

from samclip.config import PipelineConfig, load_config
from samclip.tasks.naming import stage_run_name
from samclip.workflows import steps
from samclip.workflows.precompute_flow import DataOutputs, precompute_flow


@dataclass
class CompareOutputs:
    data: DataOutputs
    stage1: Any
    comparison: Any
    timings: dict[str, float] = field(default_factory=dict)


@task(name="compare")
def compare_models(config: PipelineConfig, data, stage1_checkpoint: str, features: dict):
    from samclip.tasks.compare import run_comparison

    result = run_comparison(config, data, stage1_checkpoint, features)
    get_run_logger().info("comparison table %s, plot %s", result.table_md_uri, result.plot_uri)
    return result


@flow(name="samclip-compare")
def compare_flow(profile: str = "smoke", overrides: list[str] | None = None) -> CompareOutputs:
    config = load_config(profile, overrides)
    data = precompute_flow(profile, overrides)
    timings = dict(data.timings)
    stage_data = data.stage_data()

    started = time.monotonic()
    stage1 = steps.train_stage(config, 1, stage_data, None, stage_run_name(config, 1))
    timings["stage1"] = time.monotonic() - started

    started = time.monotonic()
    comparison = compare_models(config, stage_data, stage1.checkpoint_uri, data.features)
    timings["compare"] = time.monotonic() - started

    return CompareOutputs(data=data, stage1=stage1, comparison=comparison, timings=timings)
