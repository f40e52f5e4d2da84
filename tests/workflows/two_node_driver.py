"""Run the pipeline flow as a driver joining the Ray cluster at RAY_ADDRESS; print one JSON line.

Started by test_ray_cluster.py in a subprocess, because the test session runs its own local Ray.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import ray

    from samclip.workflows.pipeline import pipeline_flow

    outputs = pipeline_flow(profile="smoke", overrides=json.loads(sys.argv[1]))
    alive = [node for node in ray.nodes() if node["Alive"]]
    print(json.dumps({
        "nodes": len(alive),
        "node_addresses": sorted({node["NodeManagerAddress"] for node in alive}),
        "cpus": ray.cluster_resources().get("CPU"),
        "ray": outputs.sweep.data.ray,
        "registered": {"name": outputs.registered.name, "version": outputs.registered.version,
                       "alias": outputs.registered.alias, "tracking_uri": outputs.registered.tracking_uri},
        "config_uri": outputs.config_uri,
        "timings": outputs.timings,
    }))


if __name__ == "__main__":
    main()
