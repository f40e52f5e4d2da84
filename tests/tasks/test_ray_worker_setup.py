"""The setup hook that init_ray gives every worker of a local Ray without a dashboard."""

from __future__ import annotations

import logging


def test_workers_quiet_the_placement_group_cleaner(ray_cluster):
    from samclip.tasks.ray_cluster import CLEANER_LOGGER

    @ray_cluster.remote
    def cleaner_log_level() -> int:
        return logging.getLogger(CLEANER_LOGGER).getEffectiveLevel()

    assert ray_cluster.get(cleaner_log_level.remote()) == logging.ERROR
