"""A Ray cluster of two nodes on 127.0.0.1, run as its own process for tests.

Usage: python two_node_cluster.py TEMP_DIR

It starts a head node and a second node with one CPU each, and the second node also has the
custom resource ``second_node``. It prints the cluster address as one JSON line and keeps both
nodes running until it receives SIGTERM or SIGINT. ``ray start --address`` cannot add a node on
loopback in Ray 2.60: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 it aborts ("Multi-node Ray
clusters are not supported"), and with =1 it replaces 127.0.0.1 with the machine's routable
address. ``ray.cluster_utils.Cluster`` starts the same raylet and GCS processes without the
address rewrite, so every listener stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

import samclip.tasks  # noqa: F401  (sets Ray's loopback variables before ray is imported)


def main() -> None:
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Cluster records its address in Ray's default temporary folder for ray.init("auto"). The
    # tests pass the address explicitly, so nothing needs to be written outside temp_dir.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    temp_dir = sys.argv[1]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "object_store_memory": 200 * 2**20,
        },
    )
    cluster.add_node(num_cpus=1, resources={"second_node": 1}, object_store_memory=200 * 2**20)
    print(json.dumps({"address": cluster.address}), flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()


if __name__ == "__main__":
    main()
