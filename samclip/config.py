"""Run configuration: validated pydantic models loaded from YAML profiles in layers.

A profile is resolved as: the defaults in these models, then the profile's YAML, then
``key.path=value`` overrides from the command line. The resolved config is written beside
every run's outputs, so a result can always be traced to the settings that produced it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROFILE_PACKAGE = "samclip.configs"


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


class StorageConfig(Section):
    root: str = "runs/smoke"  # every output goes under this URI: a local path, file://, or s3://
    endpoint_url: str | None = None  # S3-compatible endpoint; credentials come from the standard AWS_* variables
    region: str | None = None
    # curate and precompute remove temporary files (.tmp-*) that a killed writer left in the
    # folders they write, once older than this many seconds. None keeps them all.
    stale_temp_age_s: float | None = Field(3600.0, ge=0)

    @field_validator("root")
    @classmethod
    def _absolute_local_root(cls, value: str) -> str:
        # A relative local root is anchored to the working directory once, so every URI
        # recorded in manifests, lineage and the registry stays valid from any other folder.
        if value.startswith("file://"):
            value = value[len("file://"):]
        return value if "://" in value else os.path.abspath(value)


class RayConfig(Section):
    address: str | None = None  # None starts a local Ray; RAY_ADDRESS in the environment wins over this
    num_cpus: int | None = None  # CPUs for a local Ray; None means all of this machine's
    include_dashboard: bool = False
    object_store_memory_mb: int | None = 512


class DataConfig(Section):
    source: str = "builtin:photos"  # "builtin:photos" or a URI of a folder or prefix of images
    # how the source is laid out: image files, WebDataset tar shards (img2dataset), or SA-1B
    # (JPEG + JSON masks); "auto" picks webdataset when .tar files exist, sa1b when every JPEG
    # has a JSON of the same name, and images otherwise
    layout: Literal["auto", "images", "webdataset", "sa1b"] = "auto"
    labels: str | None = None  # optional CSV/Parquet of (uri or file name, label) for evaluation
    augment_crops: int = 0  # extra deterministic crops per image (the originals always stay)
    sample_fraction: float = Field(1.0, gt=0, le=1)  # deterministic by content hash
    val_fraction: float = Field(0.2, ge=0, lt=1)  # deterministic by content hash
    min_side: int = Field(32, ge=1)  # pixels; smaller images are rejected with a reason
    max_aspect: float = Field(8.0, ge=1)  # long side / short side; wider images are rejected
    max_pixels: int = Field(50_000_000, ge=1)  # images with more pixels are rejected (decompression bombs)
    limit: int | None = None  # keep at most this many images after sampling (for quick runs)


class SamTeacherConfig(Section):
    variant: str = "tiny"  # SAM architecture: tiny, vit_b, vit_l, vit_h
    checkpoint: str = "{root}/teachers/sam_tiny.pth"  # official SAM layout; {root} is storage.root
    create_random: bool = True  # write a deterministic random checkpoint if none exists (smoke only)


class ClipTeacherConfig(Section):
    model: str = "samclip-tiny-clip"  # an open_clip model name, or the name in model_config
    model_config_path: str | None = "{root}/teachers/samclip-tiny-clip.json"  # open_clip JSON for custom models
    weights: str = "{root}/teachers/samclip-tiny-clip.bin"  # open_clip state dict (.bin/.pt/.safetensors)
    # open_clip pretrained tag of those weights (e.g. "datacomp_xl_s13b_b90k"): its image
    # normalisation is used and fingerprinted; None keeps the model config's own defaults
    pretrained: str | None = None
    create_random: bool = True


class TeachersConfig(Section):
    sam: SamTeacherConfig = SamTeacherConfig()
    clip: ClipTeacherConfig = ClipTeacherConfig()
    seed: int = 0  # seed of the random smoke teachers
    cache_dir: str | None = None  # local folder for copies of remote teacher files; None: $SAMCLIP_CACHE_DIR or ~/.cache/samclip

    @property
    def random(self) -> bool:
        """True when either teacher may be written with random weights (the smoke profile)."""
        return self.sam.create_random or self.clip.create_random


class StudentConfig(Section):
    arch: str = "tiny"  # student registry name: tiny or vit_b
    clip_head_depth: int = Field(3, ge=1)
    pooling: Literal["max", "mean"] = "max"
    mlp_hidden_layers: int = Field(2, ge=1)


class PrecomputeConfig(Section):
    batch_size: int = Field(8, ge=1)
    actors: int = Field(1, ge=1)  # Ray Data actor pool size per teacher
    cpus_per_actor: float = Field(1.0, gt=0)
    # CPUs per Ray Data task that reads, hash-checks and decodes images ahead of the encoders.
    # Ray Data runs as many such tasks as the CPUs left beside the actor pool allow.
    decode_cpus: float = Field(0.5, gt=0)
    dtype: Literal["float16", "float32"] = "float16"  # storage dtype of the features
    # dtype of the teachers' forward pass (torch.autocast for bfloat16). It is part of the
    # feature folder's name, so features of bfloat16 and float32 never share a folder.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    rows_per_shard: int = Field(256, ge=1)
    features_root: str = "{root}/features"  # feature folders are keyed by teacher fingerprint, so runs can share one root


class StageConfig(Section):
    """One training stage; which parameters train is fixed by the stage's kind."""

    epochs: int = Field(1, ge=1)
    max_steps: int | None = None  # stop after this many optimiser steps (quick runs)
    lr: float = Field(8e-4, gt=0)  # learning rate of the CLIP head
    lr_ratio: float = Field(0.1, gt=0)  # backbone and SAM head lr as a fraction of lr (stage 2)
    sam_loss_weight: float = Field(10.0, ge=0)  # lambda in L_CLIP + lambda * L_SAM (stage 2)
    weight_decay: float = 0.05
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = 1.0
    clip_batch_size: int = Field(8, ge=1)  # images per CLIP batch, per worker
    sam_batch_size: int = Field(2, ge=1)  # images per SAM batch, per worker (stage 2)
    masks_per_image: int = Field(4, ge=1)  # sampled prompts per SAM image (stage 2)
    clip_resolution: int = Field(128, ge=16)  # input side of the student's CLIP branch
    focal_weight: float = 20.0  # SAM used 20:1 focal:dice in its own training
    dice_weight: float = 1.0
    checkpoint_every: int = Field(0, ge=0)  # steps between checkpoints; 0 means once per epoch
    early_stopping_patience: int | None = None  # epochs without val improvement before stopping
    log_every: int = Field(10, ge=1)  # optimiser steps between log lines (the first and last always log)


class TrainConfig(Section):
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint; -1 retries forever
    # forward-pass precision: auto is bf16 autocast on GPUs and float32 on CPUs
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # how Ray places the workers: PACK fills a node first, SPREAD puts them on different nodes
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    log_to_mlflow: bool = True  # rank 0 also sends metrics to registry.tracking_uri
    stage1: StageConfig = StageConfig(lr=8e-4)
    stage2: StageConfig = StageConfig(lr=4e-5)
    stage3: StageConfig = StageConfig(lr=8e-4, clip_resolution=256)
    run_stage3: bool = True


class SearchDim(Section):
    """One search dimension: ``loguniform``/``uniform`` over [low, high], or ``choice`` of values."""

    kind: Literal["loguniform", "uniform", "choice", "grid"] = "loguniform"
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check_bounds(self) -> "SearchDim":
        if self.kind in ("loguniform", "uniform") and (self.low is None or self.high is None):
            raise ValueError(f"search dimension of kind {self.kind!r} needs 'low' and 'high'")
        if self.kind in ("choice", "grid") and not self.values:
            raise ValueError(f"search dimension of kind {self.kind!r} needs a non-empty 'values' list")
        return self


class AshaConfig(Section):
    """ASHA early stopping: trials below the top 1/reduction_factor at a rung stop there."""

    time_attr: str = "epoch"  # the training loop reports "epoch" (fractional between epochs) and "step"
    grace_period: float = Field(1.0, gt=0)  # no trial stops before this much time_attr
    reduction_factor: float = Field(2.0, gt=1)
    # Rungs lie below max_t. None means the stage's epochs + 1, so that a trial is never cut
    # at its last epoch before the trial's final report (ASHA stops any trial at max_t).
    max_t: float | None = None


class SelectionConfig(Section):
    """How the sweep picks its winner among trials that finished with both objectives.

    score: maximise clip_weight * clip_objective + sam_weight * sam_objective (the sweep's weights).
    constraint: maximise ``objective`` among the trials with clip_objective >= min_clip and
    sam_objective >= min_sam, e.g. the best CLIP objective with SAM IoU to the teacher >= 0.95.
    """

    mode: Literal["score", "constraint"] = "score"
    objective: Literal["clip", "sam"] = "clip"  # what constraint mode maximises
    min_clip: float | None = None
    min_sam: float | None = None
    # constraint mode when no trial meets the bounds: "error" fails the sweep, "score" falls
    # back to the weighted score and records that in the winner
    fallback: Literal["error", "score"] = "error"
    # also consider trials that ASHA stopped early, at their last checkpoint; they trained less,
    # so they tend to keep more of SAM and would otherwise win constraints on it by default
    include_stopped: bool = False

    @model_validator(mode="after")
    def _check_bounds(self) -> "SelectionConfig":
        if self.mode == "constraint" and self.min_clip is None and self.min_sam is None:
            raise ValueError("sweep.selection.mode 'constraint' needs min_clip or min_sam")
        return self


class SweepConfig(Section):
    name: str = "stage2-sweep"
    num_samples: int = Field(4, ge=1)
    space: dict[str, SearchDim] = Field(
        default_factory=lambda: {
            "sam_loss_weight": SearchDim(kind="loguniform", low=1.0, high=100.0),
            "lr_ratio": SearchDim(kind="loguniform", low=0.03, high=0.3),
        }
    )  # keys are StageConfig fields
    # random: num_samples draws from the space; grid: every combination of each dimension's
    # values (loguniform and uniform ranges become grid_points values, geometric or even), run
    # num_samples times over
    searcher: Literal["random", "grid"] = "random"
    grid_points: int = Field(3, ge=2)
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: str = "val/score"  # validation metric that ASHA compares; the loop reports val/*
    mode: Literal["max", "min"] = "max"
    asha: AshaConfig = AshaConfig()
    max_concurrent_trials: int | None = None  # None derives it from the cluster's CPUs and GPUs
    cpus_per_trial_driver: float = 0.1
    # CPUs kept free for the trials' Ray Data tasks (1 CPU each by default) when concurrency is
    # derived from the cluster; with none free, running trials wait for their data forever
    reserved_cpus: float = Field(1.0, ge=0)
    clip_weight: float = 1.0  # score = clip_weight * clip_objective + sam_weight * sam_objective
    sam_weight: float = 1.0
    selection: SelectionConfig = SelectionConfig()


class EvaluateConfig(Section):
    templates: Literal["openai", "simple"] = "openai"  # class-name prompts: OpenAI's 80 or one template
    seg_resolution: int = Field(128, ge=16)  # side of the student's input for zero-shot segmentation
    prompts_per_image: int = Field(8, ge=1)  # prompts for SAM mask agreement on held-out images
    overlays: int = Field(4, ge=0)  # images drawn with overlays
    # your own class-name templates, each with a "{c}" field; when set they replace `templates`
    template_list: list[str] | None = None
    # datasets in standard layouts (samclip.tasks.eval_datasets); each is evaluated when set
    classification: str | None = None  # ImageFolder root, or a .parquet/.csv table of (image, label)
    segmentation: str | None = None  # VOC-style root: JPEGImages/, SegmentationClass/, classes.txt
    segmentation_split: str | None = None  # name of ImageSets/Segmentation/{split}.txt; None: every mask
    segmentation_images: str | None = None  # folder of the segmentation images; None: JPEGImages under the root
    instances: str | None = None  # COCO instances JSON
    instance_images: str | None = None  # folder of the COCO images; None: "images" beside the JSON's folder
    dataset_seg_resolution: int = Field(448, ge=16)  # zero-shot segmentation input side (448 in the paper)
    background_threshold: float | None = Field(None, ge=0, le=1)  # below it a pixel is background
    text_points: int = Field(3, ge=1)  # point prompts per class for text-prompted segmentation
    max_images: int | None = Field(None, ge=1)  # per dataset, for quick runs
    mlflow: bool = True  # log dataset evaluations to the registry's tracking URI

    @property
    def has_datasets(self) -> bool:
        """True when any ground-truth dataset is configured (the pipeline then scores on it)."""
        return bool(self.classification or self.segmentation or self.instances)


class PromotionGates(Section):
    """Conditions a new version must meet before it takes the champion alias.

    Metric names are the evaluation's keys (``objective/clip``, ``objective/sam``, ...). A
    missing metric fails its gate, so a renamed metric never promotes a model by accident.
    """

    # metric name -> lowest accepted value
    min_values: dict[str, float] = Field(default_factory=dict)
    # objectives compared with the current champion; higher is better for each
    objectives: list[str] = Field(default_factory=lambda: ["objective/clip", "objective/sam"])
    # largest accepted drop of an objective below the champion's value (absolute, same unit)
    max_regression: float = Field(0.0, ge=0)


class CompareConfig(Section):
    """The paper's comparison on the same data: teachers, naive distillation, Wise-FT, SAM-CLIP."""

    name: str = "compare"  # outputs go to {root}/compare/{name}-{settings digest}/
    wise_ft_alphas: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75])  # weight of the distilled model
    naive_stage: StageConfig | None = None  # naive distillation's settings; None: train.stage2's
    datasets: bool = True  # also run the dataset evaluations that `evaluate` configures

    @field_validator("wise_ft_alphas")
    @classmethod
    def _alphas_in_range(cls, values: list[float]) -> list[float]:
        bad = [value for value in values if not 0.0 <= value <= 1.0]
        if bad:
            raise ValueError(f"compare.wise_ft_alphas must lie within [0, 1], got {bad}")
        return values


class RegisterConfig(Section):
    tracking_uri: str = "sqlite:///{root}/mlflow.db"
    artifact_root: str = "{root}/mlartifacts"
    experiment: str = "samclip"
    model_name: str = "samclip-smoke"
    alias: str = "candidate"  # every new version takes this alias
    champion_alias: str = "champion"  # moved to a new version only when it passes the gates
    gates: PromotionGates = PromotionGates()


class TestbedConfig(Section):
    """The shapes testbed: procedural scenes with ground truth, and the two teachers trained on them.

    A profile that sets this section writes the scenes and trains the teachers (each a Ray Train
    job, reused while its settings stay the same) before curation. The trained files go to the
    locations that the ``teachers`` section names, so the rest of the run loads them as usual.
    """

    folder: str = "{root}/testbed/scenes"  # local folder of the written scenes
    seed: int = Field(0, ge=0)
    count: int = Field(2000, ge=1)  # scenes written for the pipeline (curation, distillation, evaluation)
    size: int = Field(128, ge=16)  # pixels per side
    val_fraction: float = Field(0.2, ge=0, lt=1)  # held out by content hash, as curation does
    cpus_per_teacher: float = Field(1.0, gt=0)  # Ray CPUs (and torch threads) of each teacher's job
    # settings of samclip.testbed.train_clip.ClipTrainConfig and train_sam.SamTrainConfig
    clip: dict[str, Any] = Field(default_factory=dict)
    sam: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(Section):
    profile: str = "smoke"
    description: str = ""
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    teachers: TeachersConfig = TeachersConfig()
    student: StudentConfig = StudentConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    train: TrainConfig = TrainConfig()
    sweep: SweepConfig = SweepConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compare: CompareConfig = CompareConfig()
    registry: RegisterConfig = RegisterConfig()
    testbed: TestbedConfig | None = None  # set by the shapes profile; None everywhere else

    @model_validator(mode="after")
    def _expand_root_in_locations(self) -> PipelineConfig:
        """Expand ``{root}`` in the data and evaluation locations, as the teacher locations allow."""
        for section, names in (
            (self.data, ("source", "labels")),
            (self.evaluate, ("classification", "segmentation", "segmentation_images", "instances", "instance_images")),
        ):
            for name in names:
                value = getattr(section, name)
                if isinstance(value, str) and "{root}" in value:
                    setattr(section, name, self.resolve_uri(value))
        return self

    def resolve_uri(self, template: str) -> str:
        """Expand ``{root}`` in a configured location to the storage root."""
        return template.replace("{root}", self.storage.root.rstrip("/"))

    def uri(self, *parts: str) -> str:
        """Join path parts under the storage root."""
        return "/".join([self.storage.root.rstrip("/"), *[p.strip("/") for p in parts]])


def available_profiles() -> list[str]:
    """List the profile names shipped with the package."""
    files = resources.files(PROFILE_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def _read_profile(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
        origin = str(path)
    else:
        resource = resources.files(PROFILE_PACKAGE) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ValueError(
                f"profile {name_or_path!r} not found: pass one of {available_profiles()} "
                "or the path of a YAML file"
            )
        text = resource.read_text()
        origin = name_or_path
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"profile {origin} must be a YAML mapping, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"invalid override {override!r}: expected key.path=value")
    key, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw else None
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"invalid override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(profile: str = "smoke", overrides: list[str] | None = None) -> PipelineConfig:
    """Load a profile by name or path, apply ``key.path=value`` overrides, and validate it.

    ``SAMCLIP_STORAGE_ROOT`` in the environment replaces ``storage.root`` (before overrides),
    which lets tests and schedulers redirect every output without editing a profile.
    """
    data = _read_profile(profile)
    data.setdefault("profile", Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile)
    env_root = os.environ.get("SAMCLIP_STORAGE_ROOT")
    if env_root:
        data.setdefault("storage", {})["root"] = env_root
    for override in overrides or []:
        _apply_override(data, override)
    return PipelineConfig.model_validate(data)


def dump_config(config: PipelineConfig) -> str:
    """Render the resolved config as YAML. It contains no credentials, because those come from the environment."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
