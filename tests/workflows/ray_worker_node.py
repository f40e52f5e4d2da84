"""Join a Ray cluster as a worker node on 127.0.0.1 and stay up until terminated.

Does what ``ray start --address=... --block`` does for a worker node. The test needs this
because Ray 2.60's ``ray start --address`` aborts ("multi-node clusters are not supported on
Windows and OSX") when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the setting that keeps Ray on
loopback. With 1 it rewrites 127.0.0.1 in both --address and --node-ip-address to the
machine's routable address, where the loopback-bound head cannot be reached.

Usage: ray_worker_node.py GCS_ADDRESS TEMP_DIR NUM_CPUS OBJECT_STORE_BYTES
"""

from __future__ import annotations

import signal
import sys
import time


def main() -> None:
    import ray._private.node
    from ray._private.parameter import RayParams

    gcs_address, temp_dir, num_cpus, object_store_bytes = sys.argv[1:5]
    params = RayParams(
        node_ip_address="127.0.0.1",
        gcs_address=gcs_address,
        num_cpus=int(num_cpus),
        temp_dir=temp_dir,
        object_store_memory=int(object_store_bytes),
        include_dashboard=False,
    )
    # shutdown_at_exit and the reaper stop this node's processes when this process ends
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"worker node {node.node_id} joined {gcs_address}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
