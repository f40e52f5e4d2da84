"""Stable run names: derived from the settings that determine a result, never from timestamps.

A rerun with the same settings gets the same name, so Ray Train and Ray Tune resume the run
(or find it finished) instead of starting over.
"""

from __future__ import annotations

import hashlib
import json

from samclip.config import PipelineConfig

# The config sections that determine each stage's result.
# "testbed" is there because its settings decide the testbed teachers' weights, which the
# teachers section only locates.
_STAGE_INPUTS = {
    1: ("seed", "data", "teachers", "testbed", "student", "train.workers", "train.stage1"),
    2: ("seed", "data", "teachers", "testbed", "student", "train.workers", "train.stage1", "train.stage2", "sweep"),
    3: ("seed", "data", "teachers", "testbed", "student", "train", "sweep"),
}


# Sweep settings that do not change any trial's result.
_SWEEP_NON_INPUTS = ("selection", "max_concurrent_trials", "cpus_per_trial_driver", "reserved_cpus")


def digest(payload: object, length: int = 10) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _select(config: PipelineConfig, paths: tuple[str, ...]) -> dict[str, object]:
    dumped = config.model_dump(mode="json")
    selected: dict[str, object] = {}
    for path in paths:
        node: object = dumped
        for part in path.split("."):
            node = node[part]  # type: ignore[index]
        selected[path] = node
    return selected


def stage_run_name(config: PipelineConfig, stage: int) -> str:
    """Return the Ray Train run name of a stage, e.g. ``stage1-3f9a0c1b2d``."""
    return f"stage{stage}-{digest(_select(config, _STAGE_INPUTS[stage]))}"


def stage_inputs(config: PipelineConfig, stage: int) -> dict[str, object]:
    """Return the config sections that determine a stage's result."""
    return _select(config, _STAGE_INPUTS[stage])


def sweep_inputs(config: PipelineConfig) -> dict[str, object]:
    """Return the settings that determine a sweep's trials.

    The winner selection and the resource settings are left out: they do not change what a
    trial computes, so changing them reuses the same sweep folder instead of training again.
    """
    selected = _select(config, _STAGE_INPUTS[2])
    selected["sweep"] = {k: v for k, v in selected["sweep"].items() if k not in _SWEEP_NON_INPUTS}  # type: ignore[union-attr]
    return selected


def sweep_name(config: PipelineConfig) -> str:
    """Return the Ray Tune experiment name: the configured name plus a digest of its inputs."""
    return f"{config.sweep.name}-{digest(sweep_inputs(config))}"
