"""Data engineers' flow: curate the images, then precompute both teachers' features.

Run alone with ``samclip precompute --profile smoke``; the sweep and pipeline flows call it first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from prefect import flow

from samclip.config import load_config
from samclip.workflows import steps


@dataclass
class DataOutputs:
    manifest_uri: str
    rejects_uri: str
    summary_uri: str
    features: dict[str, str]
    computed: dict[str, int]
    teachers: Any
    curate_counts: dict[str, Any]
    ray: dict[str, Any] = field(default_factory=dict)  # address, job_id, how Ray was reached
    timings: dict[str, float] = field(default_factory=dict)

    def stage_data(self):
        """Return the training stages' view of these outputs (``samclip.tasks.train.StageData``)."""
        from samclip.tasks.train import StageData

        return StageData(
            manifest_uri=self.manifest_uri,
            clip_features_dir=self.features["clip"],
            sam_features_dir=self.features["sam"],
        )


# Completed runs persist their result, so a retried parent flow reuses this subflow's run.
@flow(name="samclip-precompute", log_prints=False, persist_result=True)
def precompute_flow(profile: str = "smoke", overrides: list[str] | None = None) -> DataOutputs:
    config = load_config(profile, overrides)
    timings: dict[str, float] = {}

    ray_info = steps.connect_ray(config)
    timings["ray_start"] = ray_info["seconds"]

    if config.testbed is not None:
        from samclip.workflows.testbed_flow import testbed_flow

        started = time.monotonic()
        testbed_flow(profile, overrides)
        timings["testbed"] = time.monotonic() - started

    started = time.monotonic()
    teachers = steps.prepare_teachers(config)
    timings["teachers"] = time.monotonic() - started

    started = time.monotonic()
    curated = steps.curate_images(config)
    timings["curate"] = time.monotonic() - started

    started = time.monotonic()
    features = steps.precompute_features(config, curated.manifest_uri, teachers)
    timings["precompute"] = time.monotonic() - started

    return DataOutputs(
        manifest_uri=curated.manifest_uri,
        rejects_uri=curated.rejects_uri,
        summary_uri=curated.summary_uri,
        features=features.features,
        computed=features.computed,
        teachers=teachers,
        curate_counts=curated.counts,
        ray=ray_info,
        timings=timings,
    )
