"""The shapes testbed inside the pipeline: write the scenes, train both teachers as Ray Train jobs.

A profile with a ``testbed`` section (``shapes``) runs this before curation:

- ``write_scenes`` writes the procedural dataset to ``testbed.folder`` (reused when a finished
  set with the same settings is there);
- ``train_teacher`` trains the CLIP or the SAM teacher in a one-worker ``TorchTrainer`` and
  copies the result to the locations that the ``teachers`` section names, so the ordinary
  loaders and fingerprints take it from there.

A trained teacher is reused while its settings stay the same: beside the weights, a
``*.teacher.json`` file records the settings and the held-out scores. It is written last, so a
teacher whose files are incomplete is trained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from samclip.config import PipelineConfig
from samclip.tasks import storage

logger = logging.getLogger(__name__)

TeacherKind = Literal["clip", "sam"]


def scenes_folder(config: PipelineConfig) -> str:
    """Return the local folder of the testbed scenes; object-store roots are rejected."""
    if config.testbed is None:
        raise ValueError("the profile has no testbed section")
    folder = config.resolve_uri(config.testbed.folder)
    local = storage.local_path(folder)
    if local is None:
        raise ValueError(
            f"testbed.folder {folder!r} is not a local path: the scene writer writes local files; "
            "set testbed.folder to a local folder (the rest of the run may still use object storage)"
        )
    return local


def write_scenes(config: PipelineConfig) -> dict[str, Any]:
    """Write (or reuse) the testbed scenes; returns the contents of ``testbed.json``."""
    from samclip.testbed.writer import write_testbed

    settings = config.testbed
    assert settings is not None
    # The folder belongs to the run: a write cut short, or other settings, start it over (the
    # writer removes only its own files).
    return write_testbed(
        scenes_folder(config), settings.count, settings.seed, settings.size, settings.val_fraction,
        overwrite=True,
    )


def teacher_settings(config: PipelineConfig, kind: TeacherKind) -> Any:
    """Build the trainer's settings (ClipTrainConfig or SamTrainConfig) from ``testbed.{kind}``.

    Unknown keys raise ValueError naming the field, as the other sections do.
    """
    if kind == "clip":
        from samclip.testbed.train_clip import ClipTrainConfig as settings_type
    else:
        from samclip.testbed.train_sam import SamTrainConfig as settings_type  # type: ignore[assignment]
    assert config.testbed is not None
    values = dict(config.testbed.clip if kind == "clip" else config.testbed.sam)
    known = {item.name for item in dataclasses.fields(settings_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"testbed.{kind} has unknown keys {unknown}; expected some of {sorted(known)}"
        )
    values.setdefault("threads", max(1, int(config.testbed.cpus_per_teacher)))
    if kind == "sam":
        values.setdefault("variant", config.teachers.sam.variant)
    settings = settings_type(**values)
    # The teachers draw scenes from train_seed and eval_seed, and the CLIP teacher its
    # single-object scenes from train_seed + 1 and eval_seed + 1. The pipeline's seed must
    # differ from all of them, so that no teacher trains or stops on evaluation images.
    teacher_seeds = {settings.train_seed, settings.eval_seed}
    if kind == "clip":
        teacher_seeds |= {settings.train_seed + 1, settings.eval_seed + 1}
    if config.testbed.seed in teacher_seeds:
        raise ValueError(
            f"testbed.seed {config.testbed.seed} is one of the {kind} teacher's scene seeds "
            f"{sorted(teacher_seeds)}; choose another testbed.seed or testbed.{kind}.train_seed / eval_seed"
        )
    return settings


def _targets(config: PipelineConfig, kind: TeacherKind) -> dict[str, str]:
    """Map each file the trainer writes to the URI the teachers section names for it."""
    teachers = config.teachers
    if kind == "sam":
        return {"sam_shapes.pth": config.resolve_uri(teachers.sam.checkpoint)}
    if not teachers.clip.model_config_path:
        raise ValueError("teachers.clip.model_config_path must be set for the testbed's CLIP teacher")
    from samclip.testbed.train_clip import MODEL_NAME

    if teachers.clip.model != MODEL_NAME:
        raise ValueError(
            f"teachers.clip.model is {teachers.clip.model!r}; the testbed trains {MODEL_NAME!r}, so set it to that"
        )
    return {
        f"{MODEL_NAME}.json": config.resolve_uri(teachers.clip.model_config_path),
        f"{MODEL_NAME}.bin": config.resolve_uri(teachers.clip.weights),
    }


def _record_uri(config: PipelineConfig, kind: TeacherKind) -> str:
    first = next(iter(_targets(config, kind).values()))
    return f"{first}.teacher.json"


def _record_key(config: PipelineConfig, kind: TeacherKind) -> dict[str, Any]:
    from samclip.testbed.writer import FORMAT_VERSION

    return {"kind": kind, "settings": dataclasses.asdict(teacher_settings(config, kind)), "format": FORMAT_VERSION}


def cached_teacher(config: PipelineConfig, kind: TeacherKind) -> dict[str, Any] | None:
    """Return the record of a finished teacher with the current settings, or None."""
    record_uri = _record_uri(config, kind)
    if not storage.exists(record_uri):
        return None
    record = storage.read_json(record_uri)
    if record.get("key") != _record_key(config, kind):
        logger.info("the %s teacher at %s was trained with other settings; training again", kind, record_uri)
        return None
    if not all(storage.exists(uri) for uri in _targets(config, kind).values()):
        return None
    return record


def _train_in_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train one teacher into a temporary folder and report it as a checkpoint."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kind, settings = loop_config["kind"], loop_config["settings"]
    with tempfile.TemporaryDirectory(prefix=f"samclip-{kind}-teacher-") as out:
        if kind == "clip":
            from samclip.testbed.train_clip import train_clip

            result = train_clip(settings, out)
        else:
            from samclip.testbed.train_sam import train_sam

            result = train_sam(settings, out)
        summary = dataclasses.asdict(result)
        summary.pop("history", None)
        metrics = {key: value for key, value in summary.items() if isinstance(value, (int, float))}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))


def train_teacher(config: PipelineConfig, kind: TeacherKind) -> dict[str, Any]:
    """Train the CLIP or SAM testbed teacher as a Ray Train job, or reuse a finished one.

    Returns the record written beside the weights: settings, held-out scores and seconds.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from samclip.tasks.ray_cluster import loopback_environment

    cached = cached_teacher(config, kind)
    if cached is not None:
        logger.info("reusing the trained %s teacher: %s", kind, cached["result"])
        return cached

    assert config.testbed is not None
    started = time.perf_counter()
    settings = teacher_settings(config, kind)
    runs_root = config.uri("testbed", "ray")
    if runs_root.startswith("s3://"):
        # the controller process does not see this one's environment (see train._train_storage)
        filesystem, path = storage.pyarrow_s3_filesystem(config.storage.endpoint_url), runs_root[5:]
    else:
        filesystem, path = storage.pyarrow_filesystem(runs_root, config.storage.endpoint_url)
    trainer = TorchTrainer(
        _train_in_worker,
        train_loop_config={"kind": kind, "settings": settings},
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=False, resources_per_worker={"CPU": config.testbed.cpus_per_teacher}
        ),
        run_config=ray.train.RunConfig(
            name=f"{kind}-teacher-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=path,
            storage_filesystem=filesystem,
            worker_runtime_env={"env_vars": {**loopback_environment(), **storage.worker_environment()}},
        ),
    )
    logger.info("training the %s teacher on the testbed as a Ray Train job", kind)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the {kind} teacher's Ray Train job ended without a checkpoint; see the worker log above")

    targets = _targets(config, kind)
    # A record left from earlier settings must not vouch for files half replaced below.
    record_uri = _record_uri(config, kind)
    if storage.exists(record_uri):
        storage.remove(record_uri)
    with result.checkpoint.as_directory() as folder:
        for name, uri in targets.items():
            source = os.path.join(folder, name)
            if not os.path.exists(source):
                raise RuntimeError(f"the {kind} teacher's checkpoint lacks {name}")
            storage.put_file(source, uri)
        report_name = "train_clip.json" if kind == "clip" else "train_sam.json"
        report = json.loads(Path(folder, report_name).read_text(encoding="utf-8"))
    record = {
        "key": _record_key(config, kind),
        # the trainer's own paths name its temporary folder; "files" has the final locations
        "result": {k: v for k, v in report["result"].items() if k != "history" and not k.endswith("_path")},
        "history": report["result"].get("history", []),
        "seconds": time.perf_counter() - started,
        "files": targets,
    }
    storage.write_json(record_uri, record)  # last: marks the teacher finished
    logger.info("trained the %s teacher in %.0f s: %s", kind, record["seconds"], record["result"])
    return record
