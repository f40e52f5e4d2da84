"""Register a merged model in MLflow's model registry and load it back by name and alias.

One registered model version holds everything needed to use and audit the model: the student
weights (safetensors, so loading never executes code), its architecture, the resolved run
config, the evaluation report and the lineage (manifest, teacher fingerprints, code version,
flow run, Ray job). Each new version takes the candidate alias; it also takes the champion
alias only when it passes the configured gates (minimum values, and no objective regressing
beyond a tolerance against the current champion), and the decision is recorded in the version's
``promotion`` and ``promotion_reason`` tags. The default registry is SQLite with artifacts
beside it on the storage root; any MLflow tracking URI works.
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

from samclip.config import PipelineConfig, PromotionGates
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
    alias: str  # the champion alias when the version was promoted, else the candidate alias
    run_id: str
    tracking_uri: str
    promoted: bool = False
    reason: str = ""  # why the gates promoted or held back this version (also a version tag)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]

    def describe(self) -> str:
        return "; ".join(self.reasons)


def check_gates(
    metrics: dict[str, float], champion: dict[str, float] | None, gates: PromotionGates
) -> GateDecision:
    """Decide whether a version with ``metrics`` may replace ``champion`` (None: no champion yet).

    A version passes when every metric in ``gates.min_values`` reaches its minimum and no
    objective in ``gates.objectives`` falls more than ``gates.max_regression`` below the
    champion's value. The reasons list every failed gate, or what passed.
    """
    failures: list[str] = []
    for key, minimum in sorted(gates.min_values.items()):
        value = metrics.get(key)
        if value is None:
            failures.append(f"{key} missing from the evaluation (minimum {minimum:g})")
        elif not value >= minimum:
            failures.append(f"{key} {value:.4f} below the minimum {minimum:g}")
    if champion is not None:
        for key in gates.objectives:
            value, best = metrics.get(key), champion.get(key)
            if best is None:
                continue  # the champion predates this objective: nothing to regress against
            if value is None:
                failures.append(f"{key} missing from the evaluation (champion {best:.4f})")
            elif not value >= best - gates.max_regression:
                failures.append(
                    f"{key} regressed to {value:.4f} from the champion's {best:.4f} "
                    f"(tolerance {gates.max_regression:g})"
                )
    if failures:
        return GateDecision(False, failures)
    if champion is None:
        return GateDecision(True, ["passed the minimum values; no champion yet"])
    return GateDecision(True, ["passed the minimum values and no objective regressed"])


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


def redact_uri(uri: str) -> str:
    """Replace the user-info part of a URI (``scheme://user:password@host``) for logging."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


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
    if tracking_uri(config).startswith(("http://", "https://")):
        # A tracking server stores artifacts where its operator configured it to
        # (``--artifacts-destination``); clients then need no access to that store themselves.
        return client.create_experiment(config.registry.experiment)
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
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def _mlflow_metric_key(key: str) -> str:
    return key.replace("/", ".")


def _champion_metrics(client, name: str, alias: str, keys: list[str]) -> tuple[str, dict[str, float]] | None:
    """Return the champion's version and its logged metrics for ``keys``, or None without one."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    logged = client.get_run(version.run_id).data.metrics
    values = {key: logged[_mlflow_metric_key(key)] for key in keys if _mlflow_metric_key(key) in logged}
    return str(version.version), values


def file_sha256(uri: str) -> str:
    """Return the sha256 hex digest of a file's bytes (manifests are recorded by content)."""
    import hashlib

    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def registered_metrics(evaluation, datasets=None) -> dict[str, float]:
    """Merge the agreement evaluation's metrics with the ground-truth evaluation's, if any.

    The two use different keys (``eval_suite`` and ``evaluate`` name theirs apart); a key in both
    is an error rather than one silently replacing the other.
    """
    metrics = dict(evaluation.metrics)
    if datasets is not None:
        shared = sorted(set(metrics) & set(datasets.metrics))
        if shared:
            raise ValueError(f"metrics {shared} come from both evaluations; rename one of them")
        metrics.update(datasets.metrics)
    return metrics


def register(
    config: PipelineConfig, checkpoint_uri: str, evaluation, lineage: dict[str, Any], datasets=None
) -> RegisteredModel:
    """Log the model, its evaluation and lineage to one MLflow run and register a new version.

    ``datasets`` (an ``eval_suite.DatasetEvalResult``) adds the ground-truth metrics and reports.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(config)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, config)
    lineage = {**lineage, "code_version": code_version(), "checkpoint_uri": checkpoint_uri}
    if lineage.get("manifest_uri") and "manifest_sha256" not in lineage:
        lineage["manifest_sha256"] = file_sha256(lineage["manifest_uri"])
    metrics = registered_metrics(evaluation, datasets)

    run = client.create_run(experiment_id, run_name=f"register-{config.registry.model_name}")
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        model_dir = Path(folder, MODEL_ARTIFACT)
        model_dir.mkdir()
        _stage_model_files(checkpoint_uri, str(model_dir))
        Path(model_dir, "evaluation.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        Path(model_dir, "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str))
        client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        reports = [("evaluation", evaluation.report_json_uri), ("evaluation", evaluation.report_md_uri)]
        if datasets is not None:
            reports += [("evaluation/datasets", datasets.report_json_uri), ("evaluation/datasets", datasets.report_md_uri)]
        for index, (artifact_path, report_uri) in enumerate(reports):
            local = Path(folder, f"report-{index}", Path(report_uri).name)
            local.parent.mkdir()
            local.write_bytes(storage.read_bytes(report_uri))
            client.log_artifact(run_id, str(local), artifact_path)

    for key, value in _numeric_metrics(metrics).items():
        client.log_metric(run_id, _mlflow_metric_key(key), value)
    client.log_param(run_id, "profile", config.profile)
    client.log_param(run_id, "student_arch", config.student.arch)
    client.set_tag(run_id, "code_version", lineage["code_version"])
    client.set_terminated(run_id)

    name = config.registry.model_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="SAM-CLIP merged backbone (samclip)")

    # the gates compare with the champion as it was before this version existed
    gates = config.registry.gates
    champion = _champion_metrics(client, name, config.registry.champion_alias, gates.objectives)
    decision = check_gates(_numeric_metrics(metrics), champion[1] if champion else None, gates)

    source = f"{run.info.artifact_uri}/{MODEL_ARTIFACT}"
    tags = {
        "code_version": lineage["code_version"],
        "teacher_fingerprints": json.dumps(lineage.get("teacher_fingerprints", {}), sort_keys=True),
        "manifest_uri": str(lineage.get("manifest_uri", "")),
        "manifest_sha256": str(lineage.get("manifest_sha256", "")),
        "prefect_flow_run_id": str(lineage.get("prefect_flow_run_id", "")),
        "ray_job_ids": json.dumps(lineage.get("ray_job_ids", [])),
        "promotion": "promoted" if decision.passed else "held",
        "promotion_reason": decision.describe(),
        "compared_with_version": champion[0] if champion else "",
    }
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, config.registry.alias, version.version)
    alias = config.registry.alias
    if decision.passed:
        client.set_registered_model_alias(name, config.registry.champion_alias, version.version)
        alias = config.registry.champion_alias
    logger.info(
        "registered %s version %s as @%s at %s: %s",
        name, version.version, alias, redact_uri(uri), decision.describe(),
    )
    return RegisteredModel(
        name=name,
        version=str(version.version),
        alias=alias,
        run_id=run_id,
        tracking_uri=uri,
        promoted=decision.passed,
        reason=decision.describe(),
    )


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
