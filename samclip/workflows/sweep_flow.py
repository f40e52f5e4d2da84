"""Researchers' flow: data (reused when present), stage 1 head probing, then the stage 2 sweep.

Run alone with ``samclip sweep --profile smoke``; the pipeline flow calls it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow

from samclip.config import load_config
from samclip.tasks.naming import stage_run_name, sweep_name
from samclip.workflows import steps
from samclip.workflows.precompute_flow import DataOutputs, precompute_flow


@dataclass
class SweepOutputs:
    data: DataOutputs
    stage1: Any
    sweep: Any
    timings: dict[str, float] = field(default_factory=dict)


# Completed runs persist their result, so a retried parent flow reuses this subflow's run.
@flow(name="samclip-sweep", persist_result=True)
def sweep_flow(profile: str = "smoke", overrides: list[str] | None = None) -> SweepOutputs:
    config = load_config(profile, overrides)
    data = precompute_flow(profile, overrides)
    timings = dict(data.timings)
    stage_data = data.stage_data()

    started = time.monotonic()
    stage1 = steps.train_stage(config, 1, stage_data, None, stage_run_name(config, 1))
    timings["stage1"] = time.monotonic() - started

    started = time.monotonic()
    sweep = steps.sweep_stage2(config, stage_data, stage1.checkpoint_uri, sweep_name(config))
    timings["sweep"] = time.monotonic() - started

    return SweepOutputs(data=data, stage1=stage1, sweep=sweep, timings=timings)
