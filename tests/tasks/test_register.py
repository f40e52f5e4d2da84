"""Registry: promotion gates, lineage tags, and loading a version in a clean process.

The gates tests register against a SQLite registry; one test runs a real ``mlflow server`` on
127.0.0.1 and registers against it over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from samclip.config import PromotionGates, load_config
from samclip.tasks.register import check_gates, register, registered_metrics

GOOD = {"objective/clip": 0.60, "objective/sam": 0.70, "cls/top1_student": 0.2}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A real tiny student checkpoint, so a registered version can be loaded back."""
    from samclip.model.architectures import build_student_random
    from samclip.tasks.checkpoints import save_student_checkpoint, student_meta

    folder = tmp_path_factory.mktemp("checkpoint")
    model = build_student_random("tiny", 64)
    save_student_checkpoint(str(folder), model, student_meta("tiny", 64), config_yaml="profile: test\n")
    return str(folder)


def _evaluation(folder: Path, metrics: dict[str, float]) -> SimpleNamespace:
    folder.mkdir(parents=True, exist_ok=True)
    report_json = folder / "report.json"
    report_json.write_text(json.dumps({"metrics": metrics}))
    report_md = folder / "report.md"
    report_md.write_text("# report\n")
    return SimpleNamespace(metrics=metrics, report_json_uri=str(report_json), report_md_uri=str(report_md))


def _config(root: Path, tracking_uri: str | None = None, **gates):
    overrides = [f"storage.root={root}", "registry.model_name=samclip-test"]
    if tracking_uri:
        overrides.append(f"registry.tracking_uri={tracking_uri}")
    for key, value in gates.items():
        overrides.append(f"registry.gates.{key}={json.dumps(value)}")
    return load_config("smoke", overrides)


def _lineage(manifest: Path) -> dict:
    manifest.write_bytes(b"manifest bytes")
    return {
        "manifest_uri": str(manifest),
        "teacher_fingerprints": {"sam": "sam-abc", "clip": "clip-def"},
        "prefect_flow_run_id": "flow-run-1",
        "ray_job_ids": ["01000000"],
    }


def test_gates_minimum_value():
    gates = PromotionGates(min_values={"objective/clip": 0.5})
    assert check_gates(GOOD, None, gates).passed
    low = {**GOOD, "objective/clip": 0.4}
    decision = check_gates(low, None, gates)
    assert not decision.passed
    assert "objective/clip 0.4000 below the minimum 0.5" in decision.describe()


def test_gates_missing_metric_fails():
    gates = PromotionGates(min_values={"seg/miou": 0.1})
    decision = check_gates(GOOD, None, gates)
    assert not decision.passed
    assert "seg/miou missing" in decision.describe()


def test_gates_regression_tolerance():
    gates = PromotionGates(max_regression=0.05)
    within = {**GOOD, "objective/sam": GOOD["objective/sam"] - 0.04}
    beyond = {**GOOD, "objective/clip": GOOD["objective/clip"] - 0.06}
    assert check_gates(within, GOOD, gates).passed
    decision = check_gates(beyond, GOOD, gates)
    assert not decision.passed
    assert "objective/clip regressed" in decision.describe()


def test_gates_nan_metric_fails():
    gates = PromotionGates(min_values={"objective/clip": 0.0})
    assert not check_gates({**GOOD, "objective/clip": float("nan")}, None, gates).passed


def test_registered_metrics_merge_ground_truth_metrics():
    agreement = SimpleNamespace(metrics={"objective/clip": 0.6, "sam/miou_vs_teacher": 0.7})
    truth = SimpleNamespace(metrics={"cls/top1": 0.5, "sam/box_miou_vs_truth": 0.8})

    merged = registered_metrics(agreement, truth)

    assert merged == {**agreement.metrics, **truth.metrics}
    assert registered_metrics(agreement) == agreement.metrics


def test_registered_metrics_reject_a_key_in_both_evaluations():
    agreement = SimpleNamespace(metrics={"cls/top1": 0.6})
    truth = SimpleNamespace(metrics={"cls/top1": 0.5})

    with pytest.raises(ValueError, match=r"\['cls/top1'\] come from both evaluations"):
        registered_metrics(agreement, truth)


def _register_three(config, checkpoint: str, root: Path):
    """Register a first model, a better one, then one that regresses on SAM retention."""
    lineage = _lineage(root / "manifest.parquet")
    better = {**GOOD, "objective/clip": 0.65, "objective/sam": 0.72}
    regressed = {**better, "objective/clip": 0.70, "objective/sam": 0.50}
    first = register(config, checkpoint, _evaluation(root / "e1", GOOD), lineage)
    second = register(config, checkpoint, _evaluation(root / "e2", better), lineage)
    third = register(config, checkpoint, _evaluation(root / "e3", regressed), lineage)
    return first, second, third


def _check_promotions(tracking_uri: str, first, second, third) -> None:
    from mlflow import MlflowClient

    assert (first.promoted, second.promoted, third.promoted) == (True, True, False)
    assert third.alias == "candidate"
    client = MlflowClient(tracking_uri=tracking_uri)
    assert str(client.get_model_version_by_alias("samclip-test", "champion").version) == second.version
    assert str(client.get_model_version_by_alias("samclip-test", "candidate").version) == third.version
    held = client.get_model_version("samclip-test", third.version)
    assert held.tags["promotion"] == "held"
    assert "objective/sam regressed to 0.5000 from the champion's 0.7200" in held.tags["promotion_reason"]
    assert held.tags["compared_with_version"] == second.version
    assert held.tags["teacher_fingerprints"] == json.dumps({"clip": "clip-def", "sam": "sam-abc"})
    assert held.tags["prefect_flow_run_id"] == "flow-run-1"
    assert json.loads(held.tags["ray_job_ids"]) == ["01000000"]
    assert len(held.tags["manifest_sha256"]) == 64
    assert held.tags["code_version"]


def test_gates_promote_better_hold_regressed(tmp_path, checkpoint):
    config = _config(tmp_path, min_values={"objective/clip": 0.1})
    first, second, third = _register_three(config, checkpoint, tmp_path)
    _check_promotions(first.tracking_uri, first, second, third)


def _load_in_clean_process(name_alias: str, tracking_uri: str, cwd: Path) -> dict:
    """Load a registered version in a fresh interpreter whose path holds only installed packages."""
    code = (
        "import json, sys; from samclip.tasks.register import load_registered; "
        "model, meta = load_registered(sys.argv[1], sys.argv[2], sys.argv[3]); "
        "print(json.dumps({'version': meta['version'], 'params': sum(p.numel() for p in model.parameters()), "
        "'lineage': meta['lineage']}))"
    )
    name, alias = name_alias.split("@")
    env = {**os.environ, "PYTHONPATH": ""}
    completed = subprocess.run(
        [sys.executable, "-c", code, name, alias, tracking_uri],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 with SQLite and a local artifact store."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()

    log = open(folder / "server.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination", str(folder / "artifacts"),
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )

    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
        time.sleep(1)

    yield url, folder

    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.mark.slow
def test_register_against_mlflow_server(tmp_path, checkpoint, mlflow_server):
    url, server_folder = mlflow_server
    config = _config(tmp_path / "root", tracking_uri=url)
    first, second, third = _register_three(config, checkpoint, tmp_path)
    _check_promotions(url, first, second, third)

    # the server, not this client, stored the model files
    stored = list((server_folder / "artifacts").rglob("model.safetensors"))
    assert len(stored) == 3
    assert not (tmp_path / "root" / "mlartifacts").exists()

    loaded = _load_in_clean_process("samclip-test@champion", url, tmp_path)
    assert loaded["version"] == second.version
    assert loaded["params"] > 0
    assert loaded["lineage"]["teacher_fingerprints"] == {"sam": "sam-abc", "clip": "clip-def"}
