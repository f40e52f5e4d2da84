"""Training at scale: resume after a killed worker or driver, two Ray nodes, and S3 storage.

The resume tests run stage 2 of the tiny student on 4 train images with one worker, or on 8
with two: 2 steps per epoch, 2 epochs and a checkpoint after every step. On a CPU every step is
deterministic given the data position, and the two workers' gradients are averaged by a gloo
all-reduce of two values, which is exact in either order. So a resumed run must match an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from samclip.tasks import storage

sys.path.insert(0, os.path.dirname(__file__))
from test_train import tiny_config, write_stage_data  # noqa: E402

pytestmark = pytest.mark.slow

TOTAL_STEPS = 4
DRIVER = os.path.join(os.path.dirname(__file__), "train_driver.py")
CLUSTER = os.path.join(os.path.dirname(__file__), "two_node_cluster.py")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _stage2_overrides() -> list[str]:
    return [
        "train.cpus_per_worker=0.5",
        "train.stage2.epochs=2",
        "train.stage2.checkpoint_every=1",
        "train.stage2.log_every=1",
        "train.stage2.warmup_steps=1",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resilience"))
    config = tiny_config(root, *_stage2_overrides())
    return config, write_stage_data(root, config)


@pytest.fixture(scope="module")
def reference(ray_cluster, setup):
    """An uninterrupted stage-2 run in the session's Ray: the weights every resumed run must reach."""
    from samclip.tasks.train import run_stage

    config, data = setup
    started = time.perf_counter()
    result = run_stage(config, 2, data, None, "reference")
    print(f"uninterrupted stage 2, {TOTAL_STEPS} steps: {time.perf_counter() - started:.1f} s")
    return result


@pytest.fixture(scope="module")
def two_worker_setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resilience-two-workers"))
    config = tiny_config(root, *_stage2_overrides(), "train.workers=2")
    return config, write_stage_data(root, config, n_train=8)


@pytest.fixture(scope="module")
def two_worker_reference(ray_cluster, two_worker_setup):
    """An uninterrupted stage-2 run of two workers, each reading 4 of the 8 train images."""
    from samclip.tasks.train import run_stage

    config, data = two_worker_setup
    started = time.perf_counter()
    result = run_stage(config, 2, data, None, "two-workers-reference")
    seconds = time.perf_counter() - started
    print(f"uninterrupted stage 2, two workers, {TOTAL_STEPS} steps: {seconds:.1f} s")
    return result


def _weights(checkpoint_uri: str) -> dict[str, torch.Tensor]:
    from samclip.tasks.checkpoints import load_student_state_dict

    return load_student_state_dict(checkpoint_uri)


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def _mlflow_steps(config, run_name: str, key: str) -> list[int]:
    """Return the steps of every value of ``key`` logged to the MLflow run of ``run_name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{config.storage.root}/mlflow.db")
    experiment_id = client.get_experiment_by_name(config.registry.experiment).experiment_id
    run_filter = f"tags.`samclip.run_name` = '{run_name}'"
    runs = client.search_runs([experiment_id], filter_string=run_filter)
    assert len(runs) == 1
    return sorted(metric.step for metric in client.get_metric_history(runs[0].info.run_id, key))


def _train_steps(metrics_uri: str) -> list[int]:
    from samclip.tasks.train_metrics import read_metrics_jsonl

    return [line["step"] for line in read_metrics_jsonl(metrics_uri) if line["kind"] == "train"]


def test_reference_run_logs_everything(reference, setup):
    from mlflow.tracking import MlflowClient

    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train_metrics import read_metrics_jsonl

    config, _ = setup
    state = load_train_state(reference.checkpoint_uri)
    assert state["step"] == TOTAL_STEPS
    assert len(state["rng_states"]) == 1
    assert set(state["rng_states"][0]) >= {"torch", "numpy", "python"}
    lines = read_metrics_jsonl(reference.metrics_jsonl_uri)
    train_lines = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4]
    for key in (
        "train/clip_cosine", "train/sam_focal", "train/sam_dice", "train/sam", "train/loss",
        "lr/clip_head", "lr/backbone", "lr/sam_head", "samples_per_second", "peak_memory_mib",
        "eta_seconds",
    ):
        assert key in train_lines[-1], key
    assert train_lines[-1]["lr/backbone"] == pytest.approx(0.1 * train_lines[-1]["lr/clip_head"])
    assert storage.read_bytes(reference.loss_curve_png_uri)[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{config.storage.root}/mlflow.db")
    runs = client.search_runs(
        [client.get_experiment_by_name(config.registry.experiment).experiment_id],
        filter_string="tags.`samclip.run_name` = 'reference'",
    )
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(metric.step for metric in history) == [1, 2, 3, 4]


def test_killed_worker_resumes_exactly(reference, setup, tmp_path, monkeypatch):
    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train import run_stage

    config, data = setup
    marker = tmp_path / "worker-killed"
    monkeypatch.setenv("SAMCLIP_TEST_FAIL_AT_STEP", "3")
    monkeypatch.setenv("SAMCLIP_TEST_FAIL_MARKER", str(marker))
    result = run_stage(config, 2, data, None, "killed-worker")

    assert marker.exists(), "the worker was never killed"
    assert load_train_state(result.checkpoint_uri)["step"] == TOTAL_STEPS
    # The steps after the last registered checkpoint ran twice, before the kill and after the
    # restart, and metrics.jsonl keeps only the second run of each.
    assert _train_steps(result.metrics_jsonl_uri) == [1, 2, 3, 4]
    difference = _max_difference(_weights(result.checkpoint_uri), _weights(reference.checkpoint_uri))
    print(f"killed worker: max weight difference from the uninterrupted run {difference}")
    assert difference == 0.0


def test_two_workers_killed_worker_resumes_exactly(
    two_worker_reference, two_worker_setup, tmp_path, monkeypatch
):
    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train import run_stage

    config, data = two_worker_setup
    marker = tmp_path / "worker-killed"
    # Rank 1 exits after step 2, so the group restarts from the checkpoint after step 1, in
    # the middle of the first epoch and of the first pass over the SAM rows.
    monkeypatch.setenv("SAMCLIP_TEST_FAIL_AT_STEP", "2")
    monkeypatch.setenv("SAMCLIP_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("SAMCLIP_TEST_FAIL_MARKER", str(marker))
    result = run_stage(config, 2, data, None, "two-workers-killed")

    assert marker.read_text().startswith("rank 1 exited after step 2")
    state = load_train_state(result.checkpoint_uri)
    assert state["step"] == TOTAL_STEPS
    assert len(state["rng_states"]) == 2
    assert _train_steps(result.metrics_jsonl_uri) == [1, 2, 3, 4]
    assert _mlflow_steps(config, "two-workers-killed", "train/loss") == [1, 2, 3, 4]
    expected = _weights(two_worker_reference.checkpoint_uri)
    difference = _max_difference(_weights(result.checkpoint_uri), expected)
    print(f"two workers, killed rank 1: max weight difference from the uninterrupted run {difference}")
    assert difference == 0.0


def test_rerun_resumes_from_unregistered_checkpoint(reference, setup):
    from samclip.tasks.checkpoints import MODEL_FILE, load_train_state
    from samclip.tasks.train import RESULT_FILE, run_stage
    from samclip.tasks.train_resume import COMPLETE_MARKER

    config, data = setup
    stage_cfg = config.train.stage2.model_copy(update={"max_steps": 3})
    stopped = run_stage(config, 2, data, None, "unregistered", stage_config=stage_cfg)
    assert load_train_state(stopped.checkpoint_uri)["step"] == 3

    # The reference's final checkpoint, copied into this run's folder, plays the checkpoint that
    # a killed driver uploaded but Ray Train never registered. Beside it lies a half-written
    # folder whose marker claims a higher step but whose weights file is cut short: resuming
    # from it would fail to load.
    run_folder = storage.local_path(storage.join(config.uri("train"), "unregistered"))
    unregistered = os.path.join(run_folder, "checkpoint_9999-01-01_00-00-00.000000")
    shutil.copytree(reference.checkpoint_uri, unregistered)
    half_written = os.path.join(run_folder, "checkpoint_9999-12-31_23-59-59.999999")
    shutil.copytree(reference.checkpoint_uri, half_written)
    marker_path = os.path.join(half_written, COMPLETE_MARKER)
    marker = json.loads(Path(marker_path).read_text())
    Path(marker_path).write_text(json.dumps({**marker, "step": TOTAL_STEPS + 1}))
    with open(os.path.join(half_written, MODEL_FILE), "r+b") as handle:
        handle.truncate(100)
    os.remove(os.path.join(run_folder, RESULT_FILE))

    resumed = run_stage(config, 2, data, None, "unregistered")
    assert load_train_state(resumed.checkpoint_uri)["step"] == TOTAL_STEPS
    difference = _max_difference(_weights(resumed.checkpoint_uri), _weights(reference.checkpoint_uri))
    assert difference == 0.0


# ---------------------------------------------------------------- a two-node cluster


def _pids_mentioning(text: str) -> list[int]:
    """Return the pids of this user's processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a second node, 1 CPU each, on 127.0.0.1, in a process this test starts."""
    temp_dir = tempfile.mkdtemp(prefix="scray-", dir="/tmp")  # short: Unix socket paths are limited
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [sys.executable, CLUSTER, temp_dir], env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        line = process.stdout.readline()
        assert line, f"the two-node cluster did not start (exit code {process.poll()})"
        yield json.loads(line)["address"]
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        # anything of this cluster that outlived its parent
        for pid in _pids_mentioning(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _registered_steps(run_uri: str) -> list[int]:
    """Return the steps of the checkpoints that Ray Train's controller has registered for a run."""
    snapshot = Path(run_uri) / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []
    return [int(result["metrics"]["step"]) for result in results]


def _driver(config, data, run_name: str, folder: Path, address: str, **extra_env: str) -> tuple[subprocess.Popen, Path]:
    config_path, data_path, result_path = folder / "config.json", folder / "data.json", folder / f"{run_name}.json"
    config_path.write_text(json.dumps(config.model_dump(mode="json")))
    data_path.write_text(json.dumps(data.__dict__))
    env = {**os.environ, **RAY_ENV, "RAY_ADDRESS": address, **extra_env}
    log = open(folder / f"{run_name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, DRIVER, str(config_path), str(data_path), "2", run_name, str(result_path)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return process, result_path


def _wait(process: subprocess.Popen, folder: Path, timeout: float = 300) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    logs = "\n".join(path.read_text()[-3000:] for path in folder.glob("*.log"))
    assert code == 0, f"driver exited with {code}:\n{logs}"


def test_two_nodes_two_workers(reference, setup, two_nodes, tmp_path):
    from samclip.tasks.checkpoints import load_train_state

    config, data = setup
    config = config.model_copy(
        update={"train": config.train.model_copy(update={"workers": 2, "placement_strategy": "SPREAD"})}
    )
    started = time.perf_counter()
    process, result_path = _driver(config, data, "two-nodes", tmp_path, two_nodes)
    _wait(process, tmp_path)
    print(f"two nodes, two workers: {time.perf_counter() - started:.1f} s")

    result = json.loads(result_path.read_text())
    assert result["metrics"]["nodes"] == 2
    # 4 train images over 2 workers in CLIP batches of 2: one step per epoch
    assert load_train_state(result["checkpoint_uri"])["step"] == 2
    assert _train_steps(result["metrics_jsonl_uri"]) == [1, 2]


def test_killed_driver_rerun_resumes_exactly(reference, setup, two_nodes, tmp_path):
    from samclip.tasks.checkpoints import load_train_state
    from samclip.tasks.train import RESULT_FILE

    config, data = setup
    run_uri = storage.join(config.uri("train"), "killed-driver")
    process, result_path = _driver(
        config, data, "killed-driver", tmp_path, two_nodes, SAMCLIP_TEST_STEP_SLEEP_S="2"
    )
    # Ray Train resumes from the checkpoints its controller has registered in this file, so
    # the kill waits for the first one there rather than for the checkpoint folder.
    deadline = time.monotonic() + 300
    while not _registered_steps(run_uri):
        assert process.poll() is None, "the driver exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint registered within 300 s"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything the driver started in its own session
    except ProcessLookupError:
        pass
    killed_at = max(_registered_steps(run_uri))
    assert not storage.exists(storage.join(run_uri, RESULT_FILE))
    assert 1 <= killed_at < TOTAL_STEPS

    process, result_path = _driver(config, data, "killed-driver", tmp_path, two_nodes)
    _wait(process, tmp_path)
    rerun_log = max(tmp_path.glob("killed-driver-*.log"), key=lambda path: path.stat().st_mtime)
    assert "stage 2 resumed at step" in rerun_log.read_text(), "the rerun started over"
    result = json.loads(result_path.read_text())
    assert load_train_state(result["checkpoint_uri"])["step"] == TOTAL_STEPS
    assert _train_steps(result["metrics_jsonl_uri"]) == [1, 2, 3, 4]
    difference = _max_difference(_weights(result["checkpoint_uri"]), _weights(reference.checkpoint_uri))
    print(f"killed driver after step {killed_at}: max weight difference {difference}")
    assert difference == 0.0


# ---------------------------------------------------------------- checkpoints on S3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("SAMCLIP_S3_ENDPOINT_URL", endpoint)
    fs, _ = storage.filesystem("s3://train-bucket")
    fs.mkdir("train-bucket")
    try:
        yield endpoint
    finally:
        server.stop()


def test_stage_on_s3_storage(ray_cluster, setup, s3_endpoint):
    from samclip.tasks.checkpoints import load_student, load_train_state
    from samclip.tasks.train import RESULT_FILE, run_stage

    config, data = setup
    config = config.model_copy(update={"storage": config.storage.model_copy(update={"endpoint_url": s3_endpoint})})
    stage_cfg = config.train.stage1.model_copy(update={"max_steps": 1, "checkpoint_every": 1})
    root = "s3://train-bucket/train"
    first = run_stage(config, 1, data, None, "on-s3", stage_config=stage_cfg, storage_uri=root)
    assert first.checkpoint_uri.startswith("s3://train-bucket/train/on-s3/")
    assert load_train_state(first.checkpoint_uri)["step"] == 1
    assert storage.read_bytes(first.loss_curve_png_uri)[:4] == b"\x89PNG"

    # as if the driver had died: the rerun restores the checkpoint from S3 through get_checkpoint()
    fs, path = storage.filesystem(storage.join(root, "on-s3", RESULT_FILE))
    fs.rm(path)
    longer = stage_cfg.model_copy(update={"max_steps": 2})
    second = run_stage(config, 1, data, None, "on-s3", stage_config=longer, storage_uri=root)
    assert load_train_state(second.checkpoint_uri)["step"] == 2
    assert _train_steps(second.metrics_jsonl_uri) == [1, 2]
    assert load_student(second.checkpoint_uri).embed_dim == 32
