"""Connect to Ray: a local cluster bound to loopback by default, or an existing one by address.

The same code path serves a laptop and a cluster: ``RAY_ADDRESS`` (or ``ray.address`` in the
profile) points at a running cluster; otherwise a local Ray starts on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
import tempfile

from samclip.config import RayConfig

logger = logging.getLogger(__name__)

# the logger of ray.train.v2's PlacementGroupCleaner actor (Ray 2.60)
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"

# Ray 2.60 listens on the machine's routable address and turns token authentication on by
# default; these keep a local cluster on loopback and out of the home folder. They are also set
# in samclip.tasks before ray is imported, because Ray reads some of them at import time.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def loopback_environment() -> dict[str, str]:
    """Return the environment variables that keep a local Ray on 127.0.0.1."""
    return dict(LOOPBACK_ENV)


def ray_temp_dir() -> str:
    """Return a short temporary folder for Ray's sockets (Unix socket paths are length-limited)."""
    path = os.environ.get("SAMCLIP_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "samclip-ray")
    os.makedirs(path, exist_ok=True)
    return path


def init_ray(config: RayConfig | None = None) -> dict[str, str]:
    """Start or join Ray once per process and return what it connected to.

    Repeated calls reuse the running connection, so flows and tests share one cluster.
    """
    import ray

    config = config or RayConfig()
    if ray.is_initialized():
        return {"address": ray.get_runtime_context().gcs_address, "started": "reused"}

    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS") or config.address
    runtime_env = {"env_vars": {k: v for k, v in LOOPBACK_ENV.items()}}
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        started = "joined"
    else:
        logger.info("starting a local Ray on 127.0.0.1")
        if not config.include_dashboard:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.quiet_placement_group_cleaner"
        kwargs = {}
        if config.object_store_memory_mb:
            kwargs["object_store_memory"] = config.object_store_memory_mb * 1024 * 1024
        ray.init(
            num_cpus=config.num_cpus,
            include_dashboard=config.include_dashboard,
            _node_ip_address="127.0.0.1",
            _temp_dir=ray_temp_dir(),
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            **kwargs,
        )
        started = "local"
    _quiet_ray_data()
    return {"address": ray.get_runtime_context().gcs_address, "started": started}


def quiet_placement_group_cleaner() -> None:
    """Keep Ray Train's placement-group cleaner from warning every second without a dashboard.

    The cleaner, an actor beside each Ray Train run, queries the State API every second whether the
    run's controller is still alive. The State API is served by the dashboard, so on a local Ray
    started without one every question fails with the same warning for the whole run, burying
    the training progress. Errors still show. Runs as each worker's setup hook.
    """
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)


def current_job_id() -> str | None:
    """Return this driver's Ray job id (hex), under which its Train and Tune runs execute."""
    import ray

    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_job_id()
