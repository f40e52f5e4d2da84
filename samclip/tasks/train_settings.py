"""The settings of one stage's worker loop, built by the driver as plain values that Ray ships."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from samclip.config import StageConfig
from samclip.tasks.train_data import FeatureSpec


@dataclass
class LoopSettings:
    """Everything a worker needs, built by the driver as plain values that Ray can ship."""

    stage: int
    stage_config: dict[str, Any]
    seed: int
    arch: str
    student_options: dict[str, Any]  # keyword arguments of build_student besides arch and embed_dim
    embed_dim: int
    teacher_files: Any  # samclip.tasks.teachers.TeacherFiles
    init_checkpoint: str | None
    run_uri: str  # folder of the run, where metrics.jsonl goes
    steps_per_epoch: int
    sam_batches_per_pass: int
    clip_spec: FeatureSpec
    sam_spec: FeatureSpec | None
    val_has_sam: bool
    config_yaml: str
    max_pixels: int
    endpoint_url: str | None
    score_weights: tuple[float, float]  # (clip, sam) weights of val/score
    torch_threads: int
    # rows of each index dataset ("train", "train_sam", "val"), which train_sharding deals to ranks
    index_rows: dict[str, int]
    precision: str = "fp32"  # "bf16" runs the forward passes under bfloat16 autocast
    # MLflow destination of rank 0's metrics: tracking_uri, experiment, artifact_location and
    # run_name; None logs to metrics.jsonl only
    mlflow: dict[str, Any] | None = None

    @property
    def stage_cfg(self) -> StageConfig:
        return StageConfig.model_validate(self.stage_config)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.stage_cfg.epochs
        max_steps = self.stage_cfg.max_steps
        return min(total, max_steps) if max_steps else total
