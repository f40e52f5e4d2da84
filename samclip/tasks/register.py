"""Register a merged model in MLflow's model registry and load it back by name and alias.

One registered model version holds everything needed to use and audit the model: the student
weights (safetensors, so loading never executes code), its architecture, the resolved run
config, the evaluation report and the lineage (manifest, teacher fingerprints, code version,
flow run). The default registry is SQLite with artifacts beside it on the storage root; any
MLflow tracking URI works.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samclip.config import PipelineConfig
from samclip.tasks import storage

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# Files of a student checkpoint that a registered version carries; the training state is left
# out because serving needs only the weights and the architecture.
MODEL_FILES = ("model.safetensors", "student.json", "config.yaml")


@dataclass
class RegisteredModel:
    name: str
    version: str
    alias: str
    run_id: str
    tracking_uri: str


def code_version() -> str:
    """Return the git commit of the source tree when available, else the package version."""
    from importlib.metadata import version

    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return f"git:{commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"samclip=={version('samclip')}"


def tracking_uri(config: PipelineConfig) -> str:
    """Return the resolved tracking URI, creating the folder of a local SQLite file."""
    uri = config.resolve_uri(config.registry.tracking_uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        uri = "sqlite:///" + os.path.abspath(path)
    return uri


def _artifact_location(config: PipelineConfig) -> str:
    location = config.resolve_uri(config.registry.artifact_root)
    if "://" not in location:
        location = Path(os.path.abspath(location)).as_uri()
    return location


def _experiment_id(client, config: PipelineConfig) -> str:
    experiment = client.get_experiment_by_name(config.registry.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(config.registry.experiment, artifact_location=_artifact_location(config))


def _stage_model_files(checkpoint_uri: str, target: str) -> None:
    for name in MODEL_FILES:
        source = storage.join(checkpoint_uri, name)
        if not storage.exists(source):
            if name == "config.yaml":
                continue
            raise FileNotFoundError(f"checkpoint {checkpoint_uri} has no {name}; was it written by samclip?")
        Path(target, name).write_bytes(storage.read_bytes(source))


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        key.replace("/", "."): float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def register(config: PipelineConfig, checkpoint_uri: str, evaluation, lineage: dict[str, Any]) -> RegisteredModel:
    """Log the model, its evaluation and lineage to one MLflow run and register a new version."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, config)
    lineage = {**lineage, "code_version": code_version(), "checkpoint_uri": checkpoint_uri}
    metrics = dict(evaluation.metrics)

    run = client.create_run(experiment_id, run_name=f"register-{config.registry.model_name}")
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        model_dir = Path(folder, MODEL_ARTIFACT)
        model_dir.mkdir()
        _stage_model_files(checkpoint_uri, str(model_dir))
        Path(model_dir, "evaluation.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        Path(model_dir, "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str))
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        for report_uri in (evaluation.report_json_uri, evaluation.report_md_uri):
            local = Path(folder, Path(report_uri).name)
            local.write_bytes(storage.read_bytes(report_uri))
            client.log_artifact(run_id, str(local), "evaluation")

    for key, value in _numeric_metrics(metrics).items():
        client.log_metric(run_id, key, value)
    client.log_param(run_id, "profile", config.profile)
    client.log_param(run_id, "student_arch", config.student.arch)
    client.set_tag(run_id, "code_version", lineage["code_version"])
    client.set_terminated(run_id)

    name = config.registry.model_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="SAM-CLIP merged backbone (samclip)")
    source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    tags = {
        "code_version": lineage["code_version"],
        "teacher_fingerprints": json.dumps(lineage.get("teacher_fingerprints", {}), sort_keys=True),
        "manifest_uri": str(lineage.get("manifest_uri", "")),
        "prefect_flow_run_id": str(lineage.get("prefect_flow_run_id", "")),
    }
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, config.registry.alias, version.version)
    logger.info("registered %s version %s as @%s at %s", name, version.version, config.registry.alias, uri)
    return RegisteredModel(name=name, version=str(version.version), alias=config.registry.alias, run_id=run_id, tracking_uri=uri)


def download_registered(name: str, alias: str, tracking_uri_value: str, target: str) -> dict[str, Any]:
    """Download a registered version's model files into ``target`` and return its metadata."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri=tracking_uri_value)
    version = client.get_model_version_by_alias(name, alias)
    local = download_artifacts(
        run_id=version.run_id, artifact_path=MODEL_ARTIFACT, dst_path=target, tracking_uri=tracking_uri_value
    )
    return {"name": name, "alias": alias, "version": str(version.version), "run_id": version.run_id, "path": local}


def load_registered(name: str, alias: str, tracking_uri_value: str):
    """Load a registered student by name and alias; returns (model, metadata with evaluation)."""
    from samclip.tasks.checkpoints import load_student

    folder = tempfile.mkdtemp(prefix="samclip-registered-")
    meta = download_registered(name, alias, tracking_uri_value, folder)
    model = load_student(meta["path"])
    meta["evaluation"] = json.loads(Path(meta["path"], "evaluation.json").read_text())
    meta["lineage"] = json.loads(Path(meta["path"], "lineage.json").read_text())
    return model, meta
