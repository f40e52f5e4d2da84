"""Shared fixtures: one local Ray per test session, bound to loopback, and isolated homes."""

from __future__ import annotations

import os
import tempfile

import pytest

# Prefect, MLflow and Ray write into the home folder by default, so every test session keeps
# their state in one temporary folder. These are set before any of them is imported.
_SESSION_HOME = tempfile.mkdtemp(prefix="samclip-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_SESSION_HOME, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The S3 tests talk to moto on loopback, which accepts any key. Ray workers read credentials
# from their node's environment, so the session's local Ray must start with them set.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("SAMCLIP_RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "samclip-ray-tests"))

import samclip.tasks  # noqa: E402,F401  (sets Ray's loopback variables before ray is imported)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray on 127.0.0.1 shared by every test of the session."""
    import ray

    from samclip.config import RayConfig
    from samclip.tasks.ray_cluster import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_dir() -> str:
    return _SESSION_HOME


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (a temporary database and API) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
