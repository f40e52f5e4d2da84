"""Deployments on a real Prefect server: deploy from prefect.yaml, run through a worker.

Starts ``prefect server`` and a process worker on 127.0.0.1, deploys the precompute flow with
``prefect deploy``, triggers a run with ``run_deployment`` and waits for it to complete. The
worker's environment contains planted credentials, and no output of the run may contain them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from local_servers import (
    PLANTED_SECRET,
    SECRET_ENV,
    files_containing,
    free_port,
    stop,
    wait_for_http,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
OVERRIDES = ["data.limit=4", "data.augment_crops=0", "precompute.batch_size=4"]

TRIGGER = """
import json, sys, time
from prefect.deployments import run_deployment
started = time.monotonic()
run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=float(sys.argv[3]))
print(json.dumps({"state": run.state.type.value, "id": str(run.id), "seconds": time.monotonic() - started}))
"""


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deployment")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    env.pop("PREFECT_API_KEY", None)
    processes: list[subprocess.Popen] = []
    ray_temp_dir = ""
    started = time.monotonic()
    try:
        server_log = folder / "server.log"
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=open(server_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        processes.append(server)
        wait_for_http(f"{api}/health", server, server_log)

        def cli(*args: str) -> str:
            done = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
            return done.stdout

        cli("work-pool", "create", "samclip-process", "--type", "process")
        cli("concurrency-limit", "create", "samclip-accelerator", "1")
        cli("--no-prompt", "deploy", "--name", "samclip-precompute")

        # the worker passes its environment (planted credentials, its own storage root) to the
        # flow run process it starts
        root = folder / "root"
        ray_temp_dir = tempfile.mkdtemp(prefix="sc-ray-")  # short: Ray's socket paths are length-limited
        worker_env = {
            **env,
            **SECRET_ENV,
            "SAMCLIP_STORAGE_ROOT": str(root),
            "SAMCLIP_RAY_TMPDIR": ray_temp_dir,
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        }
        worker_log = folder / "worker.log"
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", "samclip-process", "--limit", "1"],
            env=worker_env, cwd=folder, stdout=open(worker_log, "wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        processes.append(worker)

        parameters = {"profile": "smoke", "overrides": OVERRIDES}
        triggered = subprocess.run(
            [sys.executable, "-c", TRIGGER, "samclip-precompute/samclip-precompute", json.dumps(parameters), "600"],
            env=env, capture_output=True, text=True, timeout=700,
        )
        assert triggered.returncode == 0, triggered.stderr[-4000:]
        result = json.loads(triggered.stdout.strip().splitlines()[-1])
        result["total_seconds"] = time.monotonic() - started
        print(f"deployment run: {result}")
        yield result, folder, root, env, Path(ray_temp_dir)
    finally:
        for process in reversed(processes):
            stop(process)
        if ray_temp_dir:
            shutil.rmtree(ray_temp_dir, ignore_errors=True)


def test_deployment_run_completes(deployment_run):
    result, folder, root, _, _ = deployment_run
    assert result["state"] == "COMPLETED", (folder / "worker.log").read_text()[-4000:]
    assert (root / "curate" / "manifest.parquet").exists()
    assert list((root / "features").glob("clip-*/part-*.parquet"))


def test_deployment_has_nightly_schedule(deployment_run):
    _, _, _, env, _ = deployment_run
    done = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--name", "samclip-pipeline-nightly"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    inspected = subprocess.run(
        [PREFECT, "deployment", "inspect", "samclip-pipeline/samclip-pipeline-nightly"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert "'cron': '0 2 * * *'" in inspected.stdout
    assert "'entrypoint': 'samclip.workflows.pipeline:pipeline_flow'" in inspected.stdout


def test_deployment_leaks_no_secret(deployment_run):
    _, folder, _, _, _ = deployment_run
    # the server's database (flow runs, logs sent to the API), both logs and every output
    assert files_containing(folder, PLANTED_SECRET) == []


def test_deployment_ray_logs_no_secret(deployment_run):
    _, _, _, _, ray_temp_dir = deployment_run
    # the logs of the local Ray that the flow run started
    assert files_containing(ray_temp_dir, PLANTED_SECRET) == []
