"""Structure of the checked-in infrastructure: KubeRay manifests, Dockerfile, prefect.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "infra" / "kuberay"


def _load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path} is not a YAML mapping"
    return document


def _check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert container.get("name"), f"{where}: a container has no name"
        assert container.get("image"), f"{where}: container {container.get('name')} has no image"


def _check_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion differs from the installed ray"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), f"{where}: head rayStartParams must be a mapping"
    _check_pod_template(head["template"], f"{where} head")
    groups = spec["workerGroupSpecs"]
    names = [group["groupName"] for group in groups]
    assert len(names) == len(set(names)), f"{where}: duplicate groupName in {names}"
    for group in groups:
        label = f"{where} group {group['groupName']}"
        assert isinstance(group["rayStartParams"], dict), f"{label}: rayStartParams must be a mapping"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], label
        _check_pod_template(group["template"], label)
        for value in group["rayStartParams"].values():
            assert isinstance(value, str), f"{label}: rayStartParams values must be strings"


def test_raycluster_structure():
    document = _load(KUBERAY / "raycluster.yaml")
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == "RayCluster"
    assert document["metadata"]["name"]
    _check_cluster_spec(document["spec"], "raycluster.yaml")


def test_raycluster_has_cpu_and_gpu_groups():
    groups = _load(KUBERAY / "raycluster.yaml")["spec"]["workerGroupSpecs"]
    gpus = {
        group["groupName"]: group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        for group in groups
    }
    assert gpus["cpu"] is None
    assert gpus["gpu"] == "1"


def test_rayjob_structure():
    document = _load(KUBERAY / "rayjob.yaml")
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == "RayJob"
    spec = document["spec"]
    assert spec["entrypoint"].startswith("samclip ")
    _check_pod_template(spec["submitterPodTemplate"], "rayjob.yaml submitter")
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")


def test_dockerfile_installs_project():
    text = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    assert text.startswith("#"), "the Dockerfile must open with what it builds and how"
    assert "\nFROM python:3.11" in text
    assert "requirements.lock" in text
    assert "COPY samclip ./samclip" in text


@pytest.mark.parametrize("name", ["samclip-pipeline-nightly", "samclip-precompute", "samclip-sweep"])
def test_prefect_yaml_deployment(name):
    from prefect.flows import load_flow_from_entrypoint

    from samclip.config import load_config

    document = _load(REPO / "prefect.yaml")
    deployment = {item["name"]: item for item in document["deployments"]}[name]
    assert deployment["work_pool"]["name"] == "samclip-process"
    flow = load_flow_from_entrypoint(deployment["entrypoint"])
    assert set(deployment["parameters"]) <= set(flow.parameters.properties)
    # the parameters must form a valid run config
    load_config(deployment["parameters"]["profile"], deployment["parameters"]["overrides"])


def test_prefect_yaml_nightly_schedule():
    document = _load(REPO / "prefect.yaml")
    nightly = {item["name"]: item for item in document["deployments"]}["samclip-pipeline-nightly"]
    assert [schedule["cron"] for schedule in nightly["schedules"]] == ["0 2 * * *"]
