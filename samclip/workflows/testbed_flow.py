"""Researchers' testbed flow: write the shapes scenes, then train the CLIP and SAM teachers on them.

Run alone with ``samclip testbed --profile shapes``; the precompute flow calls it first for any
profile with a ``testbed`` section. The two teachers train at the same time, each in its own
one-worker Ray Train job, and each is reused while its settings stay the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task

from samclip.config import PipelineConfig, load_config
from samclip.workflows import steps


@dataclass
class TestbedOutputs:
    scenes: dict[str, Any]  # testbed.json: settings and counts
    clip: dict[str, Any]  # the teacher record: settings, held-out scores, seconds, files
    sam: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


@task(name="write-scenes", **steps.CACHED)
def write_scenes(config: PipelineConfig) -> dict[str, Any]:
    from samclip.tasks.testbed import scenes_folder, write_scenes as write

    summary = write(config)
    get_run_logger().info("testbed scenes in %s: %s", scenes_folder(config), summary["counts"]["split"])
    return summary


@task(name="train-testbed-teacher", tags=[steps.ACCELERATOR_TAG], **steps.CACHED)
def train_teacher(config: PipelineConfig, kind: str) -> dict[str, Any]:
    from samclip.tasks.testbed import train_teacher as train

    record = train(config, kind)  # type: ignore[arg-type]
    get_run_logger().info("%s teacher: %s", kind, record["result"])
    return record


@flow(name="samclip-testbed", persist_result=True)
def testbed_flow(profile: str = "shapes", overrides: list[str] | None = None) -> TestbedOutputs:
    config = load_config(profile, overrides)
    if config.testbed is None:
        raise ValueError(f"profile {profile!r} has no testbed section; use the shapes profile")
    timings: dict[str, float] = {}
    steps.connect_ray(config)

    started = time.monotonic()
    scenes = write_scenes(config)
    timings["scenes"] = time.monotonic() - started

    # Both tasks run in threads of this process. Two threads importing torchvision at once
    # deadlock on Python's import locks, so the libraries are imported here first.
    import samclip.testbed.train_clip  # noqa: F401
    import samclip.testbed.train_sam  # noqa: F401

    started = time.monotonic()
    clip = train_teacher.submit(config, "clip")
    sam = train_teacher.submit(config, "sam")
    outputs = TestbedOutputs(scenes=scenes, clip=clip.result(), sam=sam.result(), timings=timings)
    timings["teachers"] = time.monotonic() - started
    return outputs
